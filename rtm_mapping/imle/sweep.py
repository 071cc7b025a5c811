"""`rtm-mapping sweep-h` on an RS-IMLE snapshot: the metrics at several inference H (paper §4.4, Table 4).

The RTM of G_ema runs at each H (parameters unchanged); every H scores the images of the same seeds
(rtm_mapping.imle.generate) against the same training-set features, computed once, with the metrics of
rtm_mapping.imle.metrics (Table 4: FID, IS, Precision, Recall). The table has the layout of the StyleGAN
sweep (rtm_mapping.sweep.format_markdown). `rtm-mapping sweep-h` hands a file here when it is an RS-IMLE
snapshot (a torch.save zip, `is_snapshot`) rather than a StyleGAN pickle.
"""

import json
import os
import zipfile
from typing import Callable, List, Optional

import click
import torch

from rtm_mapping.imle import metrics as imle_metrics
from rtm_mapping.imle import snapshot
from rtm_mapping.sweep import format_markdown, parse_steps


def is_snapshot(path: str) -> bool:
    """Whether `path` is a file torch.save wrote (a zip), as RS-IMLE snapshots are and StyleGAN pickles never are.
    snapshot.load then refuses, saying what it is, a torch file that is not an RS-IMLE snapshot."""
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def run_sweep(G, evaluator: imle_metrics.Evaluator, metric_names: List[str], steps: List[int], *, num_gen: int, seed: int = 0,
              batch_size: int = 64, log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """One row per H: h, native, results (metric: value), seconds. G's H is restored afterwards."""
    native = G.mapping.steps
    rows = []
    try:
        for h in steps:
            if log is not None:
                log(f'H = {h}: {", ".join(metric_names)} on {num_gen} images ...')
            G.set_steps(steps=h)
            result = evaluator.evaluate(G, metric_names, num_gen=num_gen, seed=seed, batch_size=batch_size)
            rows.append(dict(h=h, native=(h == native), results=result['results'], seconds=result['seconds']))
    finally:
        G.set_steps(steps=native)
    return rows


def sweep_h(ctx: click.Context) -> dict:
    """The sweep of an RS-IMLE snapshot, from the options of `rtm-mapping sweep-h` (ctx.params), written as JSON
    and markdown. --metrics left at its default means all of rtm_mapping.imle.metrics.METRICS; --num-gen unset,
    the paper's count for the decoder; --mirror and --stylegan belong to StyleGAN pickles."""
    p = ctx.params
    given = [f'--{name}' for name in ('mirror', 'stylegan') if p.get(name) is not None]
    if given:
        raise click.UsageError(f'{" and ".join(given)}: options for StyleGAN pickles; {p["network_pkl"]} is an RS-IMLE snapshot.')
    network, seed, device = p['network_pkl'], p['seed'], p['device']
    log = click.echo if p['verbose'] else None
    steps = parse_steps(p['steps_text'])
    default_metrics = ctx.get_parameter_source('metrics_text') == click.core.ParameterSource.DEFAULT
    try:
        metric_names = imle_metrics.parse_metrics(','.join(imle_metrics.METRICS) if default_metrics else p['metrics_text'])
    except click.BadParameter as err:
        raise click.BadParameter(f'{err.message}. An RS-IMLE snapshot is scored with rtm-mapping\'s own metrics against its '
                                 'training set, not with calc_metrics.py\'s', param_hint='--metrics') from err
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda was given but torch sees no CUDA device; pass --device cpu (slow: for small tests).')
    G = snapshot.load_generator(network, ema=True, device=device)
    if G.mapper != 'rtm':
        raise click.ClickException(f'{network} has the {G.mapper!r} mapper, whose depth is fixed; sweep-h needs a snapshot '
                                   'trained with --map=rtm. Use `rtm-mapping imle metrics` for other snapshots.')
    num_gen = p['num_gen'] or imle_metrics.default_num_gen(G)
    if 'is' in metric_names and num_gen < imle_metrics.IS_SPLITS:
        raise click.ClickException(f'--num-gen {num_gen}: the Inception Score needs at least {imle_metrics.IS_SPLITS} images.')
    data, max_images = imle_metrics.reference_of(network, p['data'])
    evaluator = imle_metrics.Evaluator(data, resolution=G.img_resolution, max_images=max_images, device=device, log=log)
    rows = run_sweep(G, evaluator, metric_names, steps, num_gen=num_gen, seed=seed, log=log)

    stem = os.path.splitext(os.path.basename(network))[0]
    table = dict(network=network, native_h=G.mapping.steps, inner_steps=G.mapping.inner_steps, metrics=metric_names, seed=seed,
                 num_gen=num_gen, num_real=int(evaluator.real['features'].shape[0]), data=os.path.abspath(data), max_images=max_images,
                 detector=evaluator.detector_path, device=device, rows=rows)
    markdown = format_markdown(table)
    for path, text in [(p['out_json'] or f'{stem}-sweep-h.json', json.dumps(table, indent=2) + '\n'),
                       (p['out_md'] or f'{stem}-sweep-h.md', markdown)]:
        with open(path, 'w') as f:
            f.write(text)
        if log is not None:
            log(f'Wrote {path}')
    click.echo(markdown, nl=False)
    return table
