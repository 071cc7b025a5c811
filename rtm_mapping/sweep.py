"""`rtm-mapping sweep-h`: evaluate one RTM pickle at several inference H, without retraining (paper §4.4, Table 4).

For each H the RTM of G_ema runs with `set_steps(steps=H)` (parameters unchanged) and each metric
is computed by the official `metric_main.calc_metric`, as calc_metrics.py does. Latents are drawn
from the same seed at every H, so the rows differ only by H. Writes one table, rows H and
columns the metrics' result keys, as JSON and markdown.
"""

import contextlib
import copy
import json
import os
from typing import Dict, List, Optional

import click
import numpy as np
import torch

from rtm_mapping import detectors, metrics, pickles
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------

def parse_steps(text: str) -> List[int]:
    """'8,16,32,64' -> [8, 16, 32, 64]: positive, distinct integers."""
    try:
        steps = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise click.BadParameter(f'{text!r} is not a comma-separated list of distinct positive integers, e.g. 8,16,32,64', param_hint='--map-h')
    return steps


def parse_metrics(text: str) -> List[str]:
    metrics = [m.strip() for m in text.split(',') if m.strip()]
    if not metrics:
        raise click.BadParameter('give at least one metric, e.g. fid50k_full,prdc_full', param_hint='--metrics')
    return metrics


@contextlib.contextmanager
def official_cuda_flags(device: torch.device):
    """calc_metrics.py's numerics on CUDA: cuDNN benchmark on, TF32 off; restored afterwards."""
    if device.type != 'cuda':
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False, False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

#----------------------------------------------------------------------------

def format_markdown(table: Dict) -> str:
    """The sweep as a markdown table: one row per H (the native one marked), one column per result key."""
    keys = list(table['rows'][0]['results']) if table['rows'] else []
    lines = [f'Inference-time H sweep of `{table["network"]}` (trained at H = {table["native_h"]}, L = {table["inner_steps"]}; seed {table["seed"]}).',
             '',
             '| H | ' + ' | '.join(keys) + ' |',
             '|---|' + '---|' * len(keys)]
    for row in table['rows']:
        h = f'{row["h"]} (native)' if row['native'] else str(row['h'])
        lines.append(f'| {h} | ' + ' | '.join(f'{row["results"][k]:.4g}' for k in keys) + ' |')
    return '\n'.join(lines) + '\n'


def run_sweep(G, metric_names: List[str], steps: List[int], dataset_kwargs: Dict, device: torch.device, seed: int = 0,
              verbose: bool = False) -> List[Dict]:
    """Compute the metrics for G at each inference H with metric_main.calc_metric; G's H is restored afterwards.

    Args:
        G: An RTM generator (G.mapping.rtm has set_steps), already on `device`.
        metric_names: Registered metric names.
        steps: Inference H values.
        dataset_kwargs: The reference dataset, as calc_metrics.py builds it.
        device: Where to run.
        seed: torch and numpy are seeded with it before each metric, so every H sees the same latents.
    Returns:
        One dict per H: h, native, results (result key: value), seconds (metric: seconds).
    """
    from metrics import metric_main, metric_utils

    from stylegan2_ada_patch import cpu
    on_cpu = device.type == 'cpu' and not torch.cuda.is_available()   # the metric code pins label tensors, which needs an accelerator
    rtm = G.mapping.rtm
    native = rtm.steps
    rows = []
    try:
        with official_cuda_flags(device), (cpu.cpu_torch() if on_cpu else contextlib.nullcontext()):
            for h in steps:
                rtm.set_steps(steps=h)
                row = dict(h=h, native=(h == native), results=dict(), seconds=dict())
                for metric in metric_names:
                    if verbose:
                        click.echo(f'H = {h}: {metric}...')
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    result = metric_main.calc_metric(metric=metric, G=G, dataset_kwargs=dataset_kwargs, num_gpus=1, rank=0,
                                                     device=device, progress=metric_utils.ProgressMonitor(verbose=verbose))
                    row['results'].update({key: float(value) for key, value in result.results.items()})
                    row['seconds'][metric] = result.total_time
                rows.append(row)
    finally:
        rtm.set_steps(steps=native)
    return rows


def _ensure_detectors(metric_names: List[str], verbose: bool) -> None:
    """Fetch (or find cached) every detector the metrics need now, so that an offline machine fails at once, with instructions."""
    import dnnlib
    codebase = checkout.loaded()
    failed = []
    for name in detectors.missing(metrics.detectors_needed(metric_names), codebase):
        try:
            with dnnlib.util.open_url(detectors.url_of(name, codebase), verbose=verbose):
                pass
        except Exception:  # open_url re-raises whatever its last download attempt raised.
            failed.append(name)
    if failed:
        raise click.ClickException(detectors.offline_help(failed, codebase))

#----------------------------------------------------------------------------

def _default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


@click.command()
@click.option('network_pkl', '--network', type=str, required=True, metavar='PKL',
              help='RTM network pickle (path or URL), e.g. a snapshot of train.py --map=rtm.')
@click.option('--metrics', 'metrics_text', type=str, default='fid50k_full', show_default=True, metavar='LIST',
              help='Comma-separated metrics: any of calc_metrics.py\'s, or rtm-mapping\'s (prdc_full, prdc_vgg_full).')
@click.option('--map-h', '--h', 'steps_text', type=str, default='8,16,32,64', show_default=True, metavar='LIST',
              help='Comma-separated inference H values, as train.py --map-h (--h works too).')
@click.option('--data', type=click.Path(exists=True), default=None, metavar='PATH',
              help='Reference dataset (folder or zip) [default: the pickle\'s training set].')
@click.option('--mirror', type=bool, default=None, metavar='BOOL',
              help='Whether the dataset was x-flipped in training [default: the pickle\'s setting].')
@click.option('--out-json', type=click.Path(dir_okay=False), default=None, metavar='FILE',
              help='Where to write the table as JSON [default: <pickle name>-sweep-h.json].')
@click.option('--out-md', type=click.Path(dir_okay=False), default=None, metavar='FILE',
              help='Where to write the table as markdown [default: <pickle name>-sweep-h.md].')
@checkout.option
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default=_default_device(), show_default=True,
              help='Where to run G and the feature networks.')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True,
              help='Seed for the latents, the same at every H.')
@click.option('--verbose', type=bool, default=True, show_default=True, metavar='BOOL',
              help='Print progress.')
def sweep_h(network_pkl: str, metrics_text: str, steps_text: str, data: Optional[str], mirror: Optional[bool],
            out_json: Optional[str], out_md: Optional[str], stylegan: Optional[str], device: str, seed: int, verbose: bool):
    """Evaluate one RTM pickle at several inference H (paper §4.4, Table 4), without retraining.

    \b
    Example:
        rtm-mapping sweep-h --network network-snapshot-025000.pkl --metrics fid50k_full,pr50k3_full --map-h 8,16,32,64
    """
    checkout.use(stylegan)
    import dnnlib
    import legacy
    from metrics import metric_main

    metrics.register_metrics()

    steps = parse_steps(steps_text)
    metric_names = parse_metrics(metrics_text)
    unknown = [m for m in metric_names if not metric_main.is_valid_metric(m)]
    if unknown:
        raise click.ClickException(f'Unknown metric(s) {", ".join(unknown)}. Use any of: {", ".join(metric_main.list_valid_metrics())}.')
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda was given but torch sees no CUDA device; pass --device cpu (slow: for small tests).')
    device = torch.device(device)

    # Load the network.
    if not dnnlib.util.is_url(network_pkl, allow_file_urls=True) and not os.path.isfile(network_pkl):
        raise click.ClickException(f'--network {network_pkl} is neither a file nor a URL; pass a network pickle.')
    with dnnlib.util.open_url(network_pkl, verbose=verbose) as f:
        network_dict = legacy.load_network_pkl(f)
    G = network_dict['G_ema']
    if pickles.mapper_kind(G) != 'rtm':
        raise click.ClickException(f'{network_pkl} has no Recursive Token Mapper (G_ema.mapping.rtm); '
                                   f'sweep-h needs a pickle trained with --map=rtm. Use calc_metrics.py for other networks.')
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    rtm = G.mapping.rtm

    # Reference dataset, as calc_metrics.py looks it up.
    if data is not None:
        dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data)
    elif network_dict.get('training_set_kwargs') is not None:
        dataset_kwargs = dnnlib.EasyDict(network_dict['training_set_kwargs'])
    else:
        raise click.ClickException(f'{network_pkl} does not record its training set; pass --data PATH (the reference folder or zip).')
    dataset_kwargs.resolution = G.img_resolution
    dataset_kwargs.use_labels = (G.c_dim != 0)
    if mirror is not None:
        dataset_kwargs.xflip = mirror

    _ensure_detectors(metric_names, verbose)
    rows = run_sweep(G, metric_names, steps, dataset_kwargs, device, seed=seed, verbose=verbose)

    # Write the table.
    stem = os.path.splitext(os.path.basename(network_pkl.rstrip('/')))[0]
    table = dict(network=network_pkl, native_h=rtm.steps, inner_steps=rtm.inner_steps, metrics=metric_names, seed=seed,
                 device=str(device), dataset_kwargs=dict(dataset_kwargs), rows=rows)
    markdown = format_markdown(table)
    for path, text in [(out_json or f'{stem}-sweep-h.json', json.dumps(table, indent=2) + '\n'), (out_md or f'{stem}-sweep-h.md', markdown)]:
        with open(path, 'w') as f:
            f.write(text)
        if verbose:
            click.echo(f'Wrote {path}')
    click.echo(markdown, nl=False)

#----------------------------------------------------------------------------
