"""RS-IMLE snapshots: plain data written with torch.save, read with torch.load(weights_only=True).

A snapshot is all a run needs to continue exactly, and nothing that runs code when loaded: tensors, dicts,
lists, tuples, str, int, float, bool and None only (what `weights_only=True` accepts on torch 2.1 to 2.15),
unlike a StyleGAN pickle. Keys (FORMAT, VERSION say which layout):

    format, version         'rtm-mapping-imle-snapshot', 1
    rtm_mapping_version     the package version that wrote it
    options                 the run's training options (training_options.json)
    G_init_kwargs           Generator(**G_init_kwargs) rebuilds the architecture
    G, G_ema                state_dicts of the trained generator and of its moving average
    optimizer               the optimizer's state_dict
    progress                {'tick', 'epoch', 'step', 'nimg'}: ticks, epochs, optimizer steps and images done; the
                            learning rate is a function of these (training_loop.learning_rate), so they are the
                            scheduler's whole state
    latents                 float32 [n, z_dim]: the latent each training image was paired with in the last tick
    rng                     {'world_size', 'shared', 'ranks': [{'torch', 'cuda', 'noise'} per rank]}: the states
                            of every random number generator the loop draws from

`load_generator()` is the entry point for tools (generate, metrics, sweeps): a snapshot path in, a ready
Generator out.
"""

import collections
import os
import pickle
import re
import zipfile
from typing import Any, Dict

import click
import torch

from rtm_mapping import __version__

FORMAT = 'rtm-mapping-imle-snapshot'
VERSION = 1
KEYS = ('format', 'version', 'rtm_mapping_version', 'options', 'G_init_kwargs', 'G', 'G_ema', 'optimizer', 'progress', 'latents', 'rng')

#----------------------------------------------------------------------------

def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless `value` is plain data that torch.load(weights_only=True) reads back."""
    if isinstance(value, torch.Tensor) or value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f'{where}: key {key!r} is not a str or int')
            _check_plain(item, f'{where}.{key}')
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f'{where}[{i}]')
        return
    raise TypeError(f'{where} is a {type(value).__module__}.{type(value).__qualname__}, not plain data: '
                    'a snapshot holds tensors, dicts, lists, tuples, str, int, float, bool and None only')


def save(path: str, data: Dict[str, Any]) -> None:
    """Write a snapshot atomically: to PATH.tmp, then renamed, so that a run killed while writing leaves
    the previous snapshot intact and never a truncated file under the snapshot's name.

    Raises:
        ValueError: a key of KEYS is missing.
        TypeError: something in `data` is not plain data (a class instance, a numpy array, ...).
    """
    missing = set(KEYS) - set(data) - {'format', 'version', 'rtm_mapping_version'}
    if missing:
        raise ValueError(f'snapshot data lacks {sorted(missing)}')
    _check_plain(data, 'snapshot')
    data = dict(data, format=FORMAT, version=VERSION, rtm_mapping_version=__version__)
    tmp = path + '.tmp'
    torch.save(data, tmp)
    os.replace(tmp, path)


def load(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Read a snapshot written by `save()`, running no code (torch.load with weights_only=True).

    Raises:
        click.ClickException: the file is missing, empty, truncated, foreign (a pickle such as a StyleGAN
            network-snapshot-*.pkl, another torch file), or written by a newer rtm-mapping; the message says what
            the file is and what to pass instead.
    """
    hint = 'Pass a snapshot-epoch-*.pt written by `rtm-mapping imle train`.'
    if not os.path.isfile(path):
        raise click.ClickException(f'{path}: no such file. {hint}')
    with open(path, 'rb') as f:
        head = f.read(2)
    if not head:
        raise click.ClickException(f'{path}: empty. {hint}')
    if head[:1] == b'\x80':
        raise click.ClickException(f'{path}: a Python pickle (a StyleGAN network-snapshot-*.pkl?), not an RS-IMLE snapshot; loading '
                                   'it would run code. StyleGAN pickles train with the patched train.py and `rtm-mapping train`. ' + hint)
    if head != b'PK':
        raise click.ClickException(f'{path}: not a file written by torch.save. {hint}')
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:    # weights_only refuses anything but plain data
        found = re.search(r'(?:GLOBAL|Unsupported class) ([\w.]+)', str(err))     # newer torch | torch 2.1
        what = f' ({found.group(1)})' if found else ''
        raise click.ClickException(f'{path}: a torch file holding Python objects{what} that loading would have to run code for: '
                                   f'not an RS-IMLE snapshot. {hint}') from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise click.ClickException(f'{path}: truncated or damaged ({str(err).strip().splitlines()[0]}); a run killed while '
                                   f'copying it? Take an earlier snapshot of the run. {hint}') from err
    if not (isinstance(data, dict) and data.get('format') == FORMAT):
        what = f'a dict of {sorted(map(str, data))[:8]}' if isinstance(data, dict) else f'a {type(data).__name__}'
        raise click.ClickException(f'{path}: a torch file holding {what}, not an RS-IMLE snapshot. {hint}')
    if not isinstance(data.get('version'), int) or data['version'] > VERSION:
        raise click.ClickException(f'{path}: snapshot format {data.get("version")!r}, written by rtm-mapping '
                                   f'{data.get("rtm_mapping_version")}; this rtm-mapping ({__version__}) reads format {VERSION}: upgrade it.')
    missing = set(KEYS) - set(data)
    if missing:
        raise click.ClickException(f'{path}: an RS-IMLE snapshot without {sorted(missing)}: damaged. {hint}')
    return data


def load_generator(path: str, ema: bool = True, device: Any = 'cpu'):
    """A snapshot's generator, ready for inference: eval mode, no gradients, on `device`.

    Args:
        path: A snapshot written by `rtm-mapping imle train`.
        ema: The moving average of the weights (what the paper evaluates), else the trained weights.
        device: Where to put it.
    Returns:
        rtm_mapping.imle.networks.Generator. Its steps (H) can then be changed with G.set_steps (RTM).
    """
    from rtm_mapping.imle.networks import Generator
    data = load(path)
    G = Generator(**data['G_init_kwargs'])
    G.load_state_dict(data['G_ema' if ema else 'G'])
    return G.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
