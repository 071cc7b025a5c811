"""`rtm-mapping swap`: give a pretrained StyleGAN2-ADA or StyleGAN3 pickle an RTM mapper.

`swap` builds the RTM generator of the old generator's family (rtm_mapping.networks.Generator for
StyleGAN2-ADA, networks_stylegan2/networks_stylegan3.Generator for StyleGAN3's --cfg=stylegan2 and
stylegan3-t/r) from the old generator's init_kwargs (so the pickle records the RTM class and
legacy.load_network_pkl(force_fp16=True) rebuilds it), copies the synthesis network, w_avg and the
label embedding bit for bit, and distils the RTM onto the old mapper of G_ema (rtm_mapping/distill.py).
G gets the same RTM (its own synthesis network, w_avg and embedding). D, the augment pipe and the
training-set record are written unchanged. The output pickle embeds core.py and the adapter
(torch_utils.persistence), so the official tools load it without rtm-mapping. How close the result is
to the original: rtm_mapping/swap_eval.py.
"""

import copy
import json
import os
import pickle
import time
from typing import Dict, Optional

import click
import torch

from rtm_mapping import adapters, core, distill, pickles, swap_eval
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------
# Checks.

def check_mlp_mappers(data: Dict, path: str) -> None:
    """Refuse a pickle whose G or G_ema has no MLP mapper to distil from."""
    for name in ('G', 'G_ema'):
        if name in data and pickles.mapper_kind(data[name]) == 'rtm':
            raise click.ClickException(f'{path} already has an RTM mapper; use `rtm-mapping set-h` to change its H, '
                                       f'or pass a pickle with the MLP mapper.')
        if name in data and pickles.mapper_kind(data[name]) != 'mlp':
            raise click.ClickException(f'{name} in {path} has no mapping network; pass a StyleGAN2-ADA or StyleGAN3 generator pickle.')

#----------------------------------------------------------------------------
# Building the RTM generator.

def rtm_generator_kwargs(G_old, steps: int) -> Dict:
    """init_kwargs of the RTM Generator: the old ones, the MLP depth replaced by the RTM's options."""
    kwargs = copy.deepcopy(dict(G_old.init_kwargs))
    mapping_kwargs = dict(kwargs.get('mapping_kwargs') or {})
    mapping_kwargs.pop('num_layers', None)
    mapping_kwargs.update(adapters.rtm_kwargs(steps=steps))   # H = steps, the rest core.DEFAULTS, as train.py --map=rtm writes them
    kwargs['mapping_kwargs'] = mapping_kwargs
    return kwargs


def build_rtm_generator(G_old, steps: int, seed: int = 0):
    """A new RTM generator of G_old's family (adapters.RTM_GENERATORS) with every tensor of G_old but the
    MLP layers copied; the RTM is initialised from `seed` (the global RNG is left as it was)."""
    import dnnlib
    from torch_utils import misc
    class_name = adapters.RTM_GENERATORS[pickles.official_generator(G_old)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = dnnlib.util.construct_class_by_name(class_name=class_name, **rtm_generator_kwargs(G_old, steps)).eval().requires_grad_(False)
    old = {name for name, _ in misc.named_params_and_buffers(G_old)}
    new = {name for name, _ in misc.named_params_and_buffers(G)}
    skipped = sorted(n for n in old - new if not n.startswith('mapping.fc'))
    if skipped:
        raise click.ClickException(f'the generator has tensors that the RTM generator lacks ({", ".join(skipped[:4])}), '
                                   f'which a swap would lose; swap supports the stock generators ({", ".join(adapters.RTM_GENERATORS)}) '
                                   f'only: pass a pickle that train.py wrote with the stock networks.')
    with torch.no_grad():
        misc.copy_params_and_buffers(G_old, G, require_all=False)
    return G

#----------------------------------------------------------------------------

def _default_grid(out: str) -> str:
    return os.path.splitext(out)[0] + '-grid.png'


@click.command()
@click.option('network_pkl', '--network', type=click.Path(exists=True, dir_okay=False), required=True, metavar='PKL',
              help='Pretrained StyleGAN2-ADA or StyleGAN3 pickle (MLP mapper).')
@click.option('--out', type=click.Path(dir_okay=False), required=True, metavar='PKL', help='Output pickle (never the input).')
@click.option('--map-h', type=click.IntRange(min=1), default=core.DEFAULTS['steps'], show_default=True, metavar='INT',
              help='RTM refinement steps H stored in the pickle (set-h changes it later).')
@click.option('--distill-kimg', type=click.FloatRange(min=0), default=distill.DEFAULTS['kimg'], show_default=True, metavar='KIMG',
              help='Thousands of (z, c) samples to distil on; 0 = least-squares initialisation only.')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True, help='Seed of the RTM initialisation and of the distillation samples.')
@click.option('--eval-seeds', type=click.IntRange(min=1), default=64, show_default=True, metavar='INT',
              help='Seeds 0..N-1 (generate.py draws) for the report and the grid.')
@click.option('--grid', type=click.Path(dir_okay=False), default=None, metavar='PNG',
              help='Image grid, originals above swapped (first 16 seeds) [default: OUT without .pkl + -grid.png].')
@checkout.option
def swap(network_pkl: str, out: str, map_h: int, distill_kimg: float, seed: int, eval_seeds: int, grid: Optional[str], stylegan: Optional[str]):
    """Replace the MLP mapper of G and G_ema in a pretrained pickle with an RTM distilled onto it.

    \b
    Example:
      rtm-mapping swap --network=network-snapshot.pkl --out=rtm.pkl
      python train.py --resume=rtm.pkl ...          # fine-tune with the RTM mapper
    """
    checkout.use(stylegan)
    grid = grid or _default_grid(out)
    pickles.check_output_path(out, [network_pkl])
    pickles.check_output_path(grid, [network_pkl])
    data = pickles.load_pickle(network_pkl)
    check_mlp_mappers(data, network_pkl)
    torch.set_grad_enabled(True)
    start = time.time()

    evaluator = swap_eval.Evaluator(data['G_ema'], eval_seeds)
    result = dict(data, **rtm_generators(data, map_h, distill_kimg, seed))
    G_ema = result['G_ema']
    figures, floor_figures = evaluator.figures(evaluator.student_w(G_ema.mapping)), evaluator.floor_figures(G_ema.mapping, seed)
    elapsed = time.time() - start
    with open(out, 'wb') as f:
        pickle.dump(result, f)
    n = min(16, eval_seeds)
    swap_eval.save_grid([evaluator.images[:n], evaluator.synthesize(evaluator.student_w(G_ema.mapping)[:n])], grid)

    report = dict(network=network_pkl, out=out, grid=grid, map_h=map_h, distill_kimg=distill_kimg, seed=seed, eval_seeds=eval_seeds,
                  seconds=round(elapsed, 1), swapped=figures, linear_floor=floor_figures)
    click.echo(summary(report))
    click.echo(json.dumps(report))
    click.echo(f'Wrote {out} and {grid} in {elapsed:.0f} s.')


def rtm_generators(data: Dict, steps: int, kimg: float, seed: int) -> Dict:
    """G_ema, and G where the pickle has one, with an RTM mapper distilled onto G_ema's MLP mapper
    (G gets the same RTM, with its own synthesis network, w_avg and embedding)."""
    teacher = data['G_ema'].mapping
    G_ema = build_rtm_generator(data['G_ema'], steps, seed)
    total = distill.adam_steps(kimg, distill.DEFAULTS['batch'])
    with click.progressbar(length=total, label=f'Distilling {kimg:g} kimg', show_eta=True, show_pos=True) as bar:
        distill.distill(G_ema.mapping, lambda z, c: teacher(z, c)[:, 0], kimg=kimg, seed=seed,
                        teacher_layer=distill.first_layer(teacher), progress=lambda step, steps, loss: bar.update(1))
    generators = dict(G_ema=G_ema)
    if 'G' in data:
        G = build_rtm_generator(data['G'], steps, seed)
        with torch.no_grad():
            for dst, src in zip(G.mapping.rtm.parameters(), G_ema.mapping.rtm.parameters()):
                dst.copy_(src)
        generators['G'] = G
    return generators


def summary(report: Dict) -> str:
    """The swap's figures in one sentence."""
    figures, floor = report['swapped'], report['linear_floor']
    return (f'On seeds 0..{report["eval_seeds"] - 1}: relative w error {figures["rel_w_error"]:.4f} centered, '
            f'{figures["rel_w_error_uncentered"]:.4f} uncentered (linear least-squares floor {floor["rel_w_error"]:.4f}, '
            f'{floor["rel_w_error_uncentered"]:.4f}), median PSNR {figures["psnr_median"]:.2f} dB '
            f'(floor {floor["psnr_median"]:.2f} dB), worst {figures["psnr_min"]:.2f} dB.')

