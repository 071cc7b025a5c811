"""Ablation of `rtm-mapping swap`'s distillation: relative w error against wall time, one curve per method,
on the stock teacher of docs/swap.md (official StyleGAN2-ADA classes, 32 px, z = w = 512, random weights).

Needs STYLEGAN2_ADA_ROOT (a StyleGAN2-ADA checkout) and matplotlib, which is not an rtm-mapping
dependency (pip install matplotlib). Writes the figure and a JSON of the curves:

    STYLEGAN2_ADA_ROOT=/path/to/stylegan2-ada-pytorch python scripts/swap_ablation.py \\
        --out docs/swap-distill-ablation.png --kimg 16
"""

import copy
import json
import os
import sys
import time

import click
import torch

from rtm_mapping import distill, swap, swap_eval

# name: keyword arguments of distill.distill (the rest are its defaults).
METHODS = {
    'default (teacher lift, lr 0.1)':   dict(),
    'random lift (lr 0.1)':             dict(init='zero'),
    'full backprop (grad_steps = H)':   dict(grad_steps=16),
    'random init (lr 0.1)':             dict(init='random'),
}


def stock_teacher(layers: int, seed: int = 1000):
    """A stock StyleGAN2-ADA generator with random weights. Its seed must differ from the RTM's (0): with
    the same seed the RTM's lift draws the very numbers of the teacher's first layer, which is the
    teacher-lift initialisation by accident (it made a random lift look as good as the teacher's)."""
    from training import networks as official
    torch.manual_seed(seed)
    return official.Generator(z_dim=512, w_dim=512, c_dim=0, img_resolution=32, img_channels=3,
                              mapping_kwargs=dict(num_layers=layers),
                              synthesis_kwargs=dict(channel_base=1024, num_fp16_res=0, conv_clamp=None)).eval().requires_grad_(False)


@click.command()
@click.option('--out', type=click.Path(dir_okay=False), default='docs/swap-distill-ablation.png', show_default=True)
@click.option('--kimg', type=click.FloatRange(min=0.1), default=16, show_default=True, help='Adam samples per method, thousands.')
@click.option('--layers', type=click.IntRange(min=1), default=2, show_default=True, help='MLP layers of the teacher.')
@click.option('--threads', type=click.IntRange(min=1), default=2, show_default=True)
def main(out: str, kimg: float, layers: int, threads: int):
    """Run every method of METHODS at the same sample budget and plot rel. w error (64 seeds) against seconds."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sys.path.insert(0, os.environ['STYLEGAN2_ADA_ROOT'])
    torch.set_num_threads(threads)
    teacher = stock_teacher(layers)
    evaluator = swap_eval.Evaluator(teacher, 64)
    floor_error = evaluator.floor_figures(swap.build_rtm_generator(teacher, 16).mapping, images=False)['rel_w_error']
    curves = {}
    for name, kwargs in METHODS.items():
        G = swap.build_rtm_generator(teacher, 16)
        clock = dict(start=time.time(), paused=0.0)

        def evaluate(G=G, clock=clock):
            t = time.time()
            row = dict(rel_w_error=evaluator.w_error(evaluator.student_w(G.mapping)),
                       seconds=t - clock['start'] - clock['paused'])
            clock['paused'] += time.time() - t
            return row
        history = distill.distill(G.mapping, lambda z, c: teacher.mapping(z, c)[:, 0], kimg=kimg, evaluate=evaluate,
                                  teacher_layer=distill.first_layer(teacher.mapping),
                                  eval_every=max(1, round(kimg * 1000 / 64 / 16)), **kwargs)
        curves[name] = [dict(seconds=h['seconds'], rel_w_error=h['rel_w_error']) for h in history]
        click.echo(f'{name}: {curves[name][-1]["rel_w_error"]:.4f} after {curves[name][-1]["seconds"]:.0f} s')
    plt.figure(figsize=(7, 4.2))
    for name, rows in curves.items():
        plt.plot([r['seconds'] for r in rows], [r['rel_w_error'] for r in rows], marker='.', label=name)
    plt.axhline(floor_error, color='k', ls='--', lw=1, label=f'linear least-squares floor ({floor_error:.3f})')
    plt.xlabel(f'wall seconds (torch threads: {threads}; shared machine; includes the least-squares fits)')
    plt.ylabel('relative w error (centered), seeds 0-63')
    plt.title(f'Distilling a {layers}-layer MLP mapper into an RTM (H = 16), {kimg:g} kimg each')
    plt.ylim(0.35, 1.05)
    plt.legend(fontsize=8)
    plt.tight_layout()
    plt.savefig(out, dpi=110)
    with open(os.path.splitext(out)[0] + '.json', 'w') as f:
        json.dump(dict(kimg=kimg, layers=layers, floor=floor_error, curves=copy.deepcopy(curves)), f, indent=1)
    click.echo(f'Wrote {out}')


if __name__ == '__main__':
    main()
