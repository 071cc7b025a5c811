"""`rtm-mapping set-h`: store another inference H in an RTM pickle, in the live RTM and in the init_kwargs a
rebuild reads, so that generate.py and calc_metrics.py use it unchanged (paper §4.4: H can change at inference)."""

import pickle
from typing import Optional

import click

from rtm_mapping import pickles
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------

def store_steps(G, steps: int) -> None:
    """Set the inference H of an RTM generator, in the live RTM and in the init_kwargs that
    legacy.load_network_pkl(force_fp16=True) rebuilds it from."""
    G.mapping.rtm.set_steps(steps=steps)
    mapping_kwargs = dict(G._init_kwargs.get('mapping_kwargs') or {})
    mapping_kwargs['steps'] = steps
    G._init_kwargs['mapping_kwargs'] = mapping_kwargs
    if 'steps' in getattr(G.mapping, '_init_kwargs', {}):
        G.mapping._init_kwargs['steps'] = steps


@click.command()
@click.argument('network_pkl', type=click.Path(exists=True, dir_okay=False), metavar='PKL')
@click.option('--map-h', '--h', 'steps', type=click.IntRange(min=1), required=True, metavar='INT',
              help='Inference refinement steps H, as train.py --map-h (--h works too).')
@click.option('--out', type=click.Path(dir_okay=False), required=True, metavar='PKL', help='Output pickle (never the input).')
@checkout.option
def set_h(network_pkl: str, steps: int, out: str, stylegan: Optional[str]):
    """Store another inference H in an RTM pickle, for generate.py and calc_metrics.py to use unchanged."""
    checkout.use(stylegan)
    pickles.check_output_path(out, [network_pkl])
    data = pickles.load_pickle(network_pkl)
    names = [name for name in ('G', 'G_ema') if name in data]
    if any(pickles.mapper_kind(data[name]) != 'rtm' for name in names):
        raise click.ClickException(f'{network_pkl} has an MLP mapper; run `rtm-mapping swap` first, then set-h on its output.')
    for name in names:
        store_steps(data[name], steps)
    with open(out, 'wb') as f:
        pickle.dump(data, f)
    click.echo(f'Wrote {out} with H = {steps} (was trained or distilled at another H: quality may differ; see sweep-h).')
