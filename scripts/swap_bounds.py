"""How far below the linear floor could a distilled mapper get? Reference points for docs/swap.md.

On the stock teacher of scripts/swap_ablation.py (official MappingNetwork, random weights), fits by least squares a
readout of w from feature banks that an oracle builds from the teacher's own weights:

- linear: the mapper input x (the linear floor);
- + lrelu of the teacher's first-layer pre-activations (what a student gets from "lift = fc0 + one elementwise
  nonlinearity"), then + lrelu of the linearised pre-activations of each later layer (the chain of fc_k with
  every lrelu replaced by its mean slope).

Also prints the share of w's variance in the weakest directions of the linear map: an RTM whose state is a product
of RMS-normalised groups (4 tokens x 128 channels: 384 free directions out of 512) cannot follow w along 128
directions locally, and this says what that costs at most.

    STYLEGAN2_ADA_ROOT=/path/to/stylegan2-ada-pytorch python scripts/swap_bounds.py --layers 2
"""

import os
import sys

import click
import torch
import torch.nn.functional as F

from rtm_mapping import distill


def fit_error(features: torch.Tensor, w: torch.Tensor, n_fit: int) -> float:
    """Centered relative error on the held-out rows of a ridge least-squares readout fitted on the first n_fit."""
    a = distill.ridge_fit(features[:n_fit], w[:n_fit], ridge=1e-6)
    return distill.relative_error(distill.affine(a, features[n_fit:]), w[n_fit:])


@click.command()
@click.option('--layers', type=click.IntRange(min=1), default=2, show_default=True, help='MLP layers of the teacher.')
@click.option('--samples', type=click.IntRange(min=1024), default=16384, show_default=True, help='Fitting samples (2048 more are held out).')
def main(layers: int, samples: int):
    sys.path.insert(0, os.environ['STYLEGAN2_ADA_ROOT'])
    sys.path.insert(0, os.path.dirname(__file__))
    from swap_ablation import stock_teacher

    from rtm_mapping import swap
    teacher = stock_teacher(layers)
    mapping, student = teacher.mapping, swap.build_rtm_generator(teacher, 16).mapping
    z, c = distill.Sampler(mapping.z_dim, mapping.c_dim, 0)(samples + 2048)
    with torch.no_grad():
        x = student.mapper_input(z, c).double()
        w = mapping(z, c)[:, 0].double()
    lrelu = lambda v: F.leaky_relu(v, 0.2) * 2 ** 0.5     # noqa: E731  (bias_act's lrelu with its default gain)
    features, linearised = [x], x
    click.echo(f'{layers}-layer teacher, centered relative w error of a least-squares readout, {samples} samples:')
    click.echo(f'  linear (the floor)                               {fit_error(x, w, samples):.3f}  [{x.shape[1]} features]')
    for k in range(layers):
        fc = getattr(mapping, f'fc{k}')
        pre = linearised @ (fc.weight * fc.weight_gain).double().T + (fc.bias * fc.bias_gain).double()
        features.append(lrelu(pre))
        linearised = pre * (0.6 * 2 ** 0.5)         # E[lrelu'(u)] = 0.6 for symmetric u, times the gain
        bank = torch.cat(features, dim=1)
        click.echo(f'  + lrelu(linearised pre-activations of fc0..fc{k})   {fit_error(bank, w, samples):.3f}  [{bank.shape[1]} features]')
    floor = distill.linear_floor(distill.Sampler(mapping.z_dim, mapping.c_dim, 1), lambda z, c: mapping(z, c)[:, 0], student, samples)
    eigenvalues = torch.linalg.eigvalsh(floor[:-1].double().T @ floor[:-1].double())      # ascending
    variance = (w - w.mean(dim=0)).square().sum(dim=1).mean().item()
    for k in (128, 64):
        share = eigenvalues[:k].sum().item() / variance
        click.echo(f'  w variance along the {k} weakest directions of the linear map: {share:.4f} (error ~{share ** 0.5:.3f})')


if __name__ == '__main__':
    main()
