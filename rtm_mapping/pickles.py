"""StyleGAN2-ADA and StyleGAN3 network pickles, as the tools read them: loading with errors a user can act
on, which codebase and generator class wrote a network, what its mapper is, and never writing over an input.
Used by `rtm-mapping swap`, `info`, `set-h` and `sweep-h`."""

import os
import pickle
from typing import Dict

import click
import torch

from stylegan2_ada_patch import checkout

NETWORKS = ('G', 'D', 'G_ema')

#----------------------------------------------------------------------------
# Loading and checks.

def load_pickle(path: str) -> Dict:
    """legacy.load_network_pkl, with the errors a user can act on."""
    import legacy
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} is not a file; pass a network pickle (network-snapshot-*.pkl).')
    loaded = checkout.loaded()
    try:
        with open(path, 'rb') as f:
            data = legacy.load_network_pkl(f)
    except ImportError as err:   # a module, or a name in one, that the other codebase has
        if 'filtered_lrelu' in str(err) or 'networks_stylegan' in str(err):
            raise click.ClickException(wrong_checkout(path, 'stylegan3')) from err
        raise click.ClickException(f'{path} needs a module the {checkout.CODEBASES[loaded].name} checkout lacks ({err}); pass a '
                                   f'StyleGAN2-ADA or StyleGAN3 pickle, and point --stylegan at the checkout that wrote it.') from err
    except KeyError as err:
        if err.args and err.args[0] in NETWORKS:
            raise click.ClickException(f'{path} has no {err.args[0]}; pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
        raise click.ClickException(f'{path} is not a StyleGAN network pickle (KeyError: {err}); '
                                   f'pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
    except (AssertionError, TypeError, pickle.UnpicklingError) as err:
        raise click.ClickException(f'{path} is not a StyleGAN network pickle ({type(err).__name__}: {err}); '
                                   f'pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
    if not isinstance(data, dict) or not isinstance(data.get('G_ema'), torch.nn.Module):
        raise click.ClickException(f'{path} has no G_ema; pass a snapshot written by train.py (a dict with G, D and G_ema).')
    written_by = 'stylegan3' if any(is_stylegan3(data.get(name)) for name in NETWORKS) else 'stylegan2-ada'
    if written_by != loaded:
        raise click.ClickException(wrong_checkout(path, written_by))
    return data


def wrong_checkout(path: str, written_by: str) -> str:
    """What to tell a user who loads a pickle of one codebase with the other's checkout."""
    codebase = checkout.CODEBASES[written_by]
    return (f'{path} is a {codebase.name} pickle; point --stylegan (or ${codebase.env_var}) at a {codebase.name} checkout '
            f'({codebase.repo}): its networks need that code.')


def is_stylegan3(net) -> bool:
    """StyleGAN3's networks (networks_stylegan3.py and its networks_stylegan2.py) take update_emas,
    where StyleGAN2-ADA's take skip_w_avg_update."""
    src = getattr(net, '_orig_module_src', '') or ''
    src = '\n'.join(line for line in src.split('\n') if not line.startswith('CORE_SOURCE = '))  # an adapter's copy of its core (one line)
    return 'update_emas' in src


def official_generator(G) -> str:
    """The official generator class of a stock generator, a key of RTM_GENERATORS. A StyleGAN3
    synthesis network with an `input` layer is networks_stylegan3's, as gen_images.py tells them apart."""
    if not is_stylegan3(G):
        return 'training.networks.Generator'
    if hasattr(getattr(G, 'synthesis', None), 'input'):
        return 'training.networks_stylegan3.Generator'
    return 'training.networks_stylegan2.Generator'


def mapper_kind(G) -> str:
    mapping = getattr(G, 'mapping', None)
    if mapping is None:
        return 'none'
    if isinstance(getattr(mapping, 'rtm', None), torch.nn.Module):
        return 'rtm'
    return 'mlp'


def check_output_path(out: str, inputs) -> None:
    """Refuse to write over an input pickle."""
    for path in inputs:
        if os.path.abspath(out) == os.path.abspath(path) or (os.path.exists(out) and os.path.samefile(out, path)):
            raise click.ClickException(f'--out {out} is the input pickle; give another path (the input is never overwritten).')
