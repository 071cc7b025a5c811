"""The paper's StyleGAN2-ADA runs as configs (training_configs/*.json), turned into patched train.py commands.

A config fixes the experiment (base config, conditioning, kimg, batch, gamma, augmentation, mapper);
the machine-specific part (data, outdir, gpus, resume, ...) comes from the command line.
"""

import json
import os
import shlex
import subprocess
import sys

import click

from rtm_mapping import adapters
from stylegan2_ada_patch import checkout, patcher

# Keys a config may set under "train": train.py options (official ones and the patch's), by type.
TRAIN_KEYS = {
    'cfg': str, 'cond': bool, 'mirror': bool, 'subset': int, 'kimg': int, 'batch': int, 'gamma': float,
    'aug': str, 'p': float, 'target': float, 'augpipe': str, 'freezed': int, 'metrics': str, 'snap': int, 'seed': int,
    'map': str, 'map_depth': int,
    **{adapters.option_key(argument): int if choices is None else str for argument, (_, _, choices) in adapters.TRAIN_OPTIONS.items()},
}
CONFIG_KEYS = {'source', 'notes', 'train'}


def builtin_configs():
    """{name: path} of the configs shipped with the package: rtm_mapping/training_configs/ where the package is
    installed (setup.cfg maps it there), training_configs/ beside rtm_mapping/ in the source tree, which is what
    `import rtm_mapping` finds when tests or scripts run from the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, 'training_configs'), os.path.join(os.path.dirname(here), 'training_configs')):
        if os.path.isdir(folder):
            return {name[:-len('.json')]: os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith('.json')}
    raise click.ClickException(f'no training_configs/ folder next to {here}; reinstall rtm-mapping.')


def load_config(name_or_path):
    """Read and validate a config; unknown keys and wrong types are errors, never ignored."""
    path = name_or_path
    if not os.path.isfile(path):
        configs = builtin_configs()
        name = os.path.splitext(os.path.basename(name_or_path))[0]
        if name not in configs:
            raise click.ClickException(f'{name_or_path}: no such config file or built-in config. Built-in: {", ".join(sorted(configs))}.')
        path = configs[name]
    with open(path, encoding='utf-8') as f:
        config = json.load(f)
    unknown = set(config) - CONFIG_KEYS
    if unknown or 'train' not in config or 'source' not in config:
        raise click.ClickException(f'{path}: a config has keys {sorted(CONFIG_KEYS)} ("train" and "source" required); got {sorted(config)}.')
    for key, value in config['train'].items():
        if key not in TRAIN_KEYS:
            raise click.ClickException(f'{path}: unknown train.py option {key!r}; known: {", ".join(TRAIN_KEYS)}.')
        kind = TRAIN_KEYS[key]
        if not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) and not (kind is float and isinstance(value, int)):
            raise click.ClickException(f'{path}: {key} must be a {kind.__name__}, got {value!r}.')
    return config


def train_args(config):
    """train.py flags for a config, e.g. ['--cfg=cifar', '--cond=0', '--map=rtm', '--map-h=16', ...]."""
    flags = []
    for key, value in config['train'].items():
        if isinstance(value, bool):
            value = int(value)
        flags.append(f'--{key.replace("_", "-")}={value}')
    return flags


@click.command(context_settings=dict(ignore_unknown_options=True))
@click.option('--config', 'config_name', help='Config file, or the name of a built-in one', required=True, metavar='PATH|NAME')
@click.option('--data', help='Training data (directory or zip)', required=True, metavar='PATH')
@click.option('--outdir', help='Where to save the results', required=True, metavar='DIR')
@click.option('--gpus', help='Number of GPUs', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--stylegan', help='StyleGAN2-ADA checkout, patched  [default: $STYLEGAN2_ADA_ROOT or .]', metavar='DIR')
@click.option('-n', '--dry-run', is_flag=True, help='Pass --dry-run to train.py: print the training options and exit.')
@click.option('--print-only', is_flag=True, help='Print the train.py command and exit.')
@click.argument('extra', nargs=-1, type=click.UNPROCESSED)
def train(config_name, data, outdir, gpus, stylegan, dry_run, print_only, extra):
    """Run the patched train.py with a config from training_configs/. EXTRA arguments after `--`
    go to train.py as they are (e.g. -- --resume=x.pkl --snap=10) and take precedence.

    \b
    Example:
      rtm-mapping train --config cifar10-stylegan2ada-rtm --data ~/datasets/cifar10.zip --outdir ~/runs --gpus 2
    """
    config = load_config(config_name)
    root = checkout.find(stylegan)
    if checkout.codebase(root) != 'stylegan2-ada':
        raise click.ClickException(f'{root} is not a StyleGAN2-ADA checkout; the configs are the paper\'s StyleGAN2-ADA runs: pass --stylegan PATH.')
    with open(os.path.join(root, 'train.py'), encoding='utf-8') as f:
        state = patcher.state('stylegan2-ada', 'train.py', f.read())
    if state != 'patched':
        raise click.ClickException(f'{root}/train.py is not patched ({state}). Run: rtm-mapping patch {root}')
    data, outdir = (os.path.abspath(os.path.expanduser(p)) for p in (data, outdir))  # train.py runs in the checkout
    cmd = [sys.executable, 'train.py', f'--outdir={outdir}', f'--data={data}', f'--gpus={gpus}', *train_args(config), *extra]
    if dry_run:
        cmd.append('--dry-run')
    print(f'# {config["source"]}')
    print(f'cd {shlex.quote(root)} && ' + ' '.join(shlex.quote(c) for c in cmd))
    if print_only:
        return
    raise SystemExit(subprocess.call(cmd, cwd=root))
