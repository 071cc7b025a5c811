"""Find and validate the user's StyleGAN2-ADA checkout."""

import os
import sys

import click

ENV_VAR = 'STYLEGAN2_ADA_ROOT'
_REQUIRED = ('train.py', 'legacy.py', 'dnnlib/util.py', 'torch_utils/persistence.py', 'training/networks.py', 'training/training_loop.py')


def validate(root: str) -> str:
    """Return the absolute path of a StyleGAN2-ADA checkout, or raise click.ClickException saying why not."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, 'training', 'networks_stylegan2.py')):
        raise click.ClickException(f'{root} is a StyleGAN3 checkout; rtm-mapping supports NVlabs/stylegan2-ada-pytorch only.')
    missing = [p for p in _REQUIRED if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise click.ClickException(f'{root} is not a StyleGAN2-ADA checkout (missing {", ".join(missing)}). '
                                   f'Pass the folder of a clone of NVlabs/stylegan2-ada-pytorch.')
    return root


def find(root=None) -> str:
    """The checkout given, else ${STYLEGAN2_ADA_ROOT}, else the current directory."""
    if root is None:
        root = os.environ.get(ENV_VAR) or os.getcwd()
    return validate(root)


def use(root=None) -> str:
    """Put a StyleGAN2-ADA checkout first on sys.path, so that dnnlib, legacy, torch_utils and training import."""
    root = find(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


option = click.option('--stylegan', type=click.Path(file_okay=False), default=None, metavar='PATH',
                      help=f'StyleGAN2-ADA checkout [default: ${ENV_VAR}, else the current folder].')
"""The --stylegan option of the commands that need a checkout; pass its value to use()."""
