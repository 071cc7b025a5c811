"""Find and validate the user's StyleGAN checkout: NVlabs/stylegan2-ada-pytorch or NVlabs/stylegan3."""

import dataclasses
import os
import sys
from typing import Tuple

import click


@dataclasses.dataclass(frozen=True)
class Codebase:
    """One official codebase rtm-mapping plugs into."""
    name:       str                 # As users call it.
    repo:       str                 # Where to get it: github.com/<repo>.
    commit:     str                 # The commit rtm-mapping is tested against (CI runs on exact copies of it).
    env_var:    str                 # Environment variable that points at a checkout.
    files:      Tuple[str, ...]     # Files that every checkout of it has (and the other codebase lacks one of).

    @property
    def url(self) -> str:
        return f'https://github.com/{self.repo}.git'

    @property
    def folder(self) -> str:
        """The folder name of a clone."""
        return self.repo.split('/')[1]


# key: Codebase. The keys are what the patch tables (patcher.EDITS) and the hooks are keyed by.
CODEBASES = {
    'stylegan2-ada': Codebase(name='StyleGAN2-ADA', repo='NVlabs/stylegan2-ada-pytorch', commit='d72cc7d041b42ec8e806021a205ed9349f87c6a4',
                              env_var='STYLEGAN2_ADA_ROOT',
                              files=('train.py', 'calc_metrics.py', 'legacy.py', 'dnnlib/util.py', 'torch_utils/persistence.py',
                                     'training/networks.py', 'training/training_loop.py')),
    'stylegan3':     Codebase(name='StyleGAN3', repo='NVlabs/stylegan3', commit='c233a919a6faee6e36a316ddd4eddababad1adf9',
                              env_var='STYLEGAN3_ROOT',
                              files=('train.py', 'calc_metrics.py', 'legacy.py', 'dnnlib/util.py', 'torch_utils/persistence.py',
                                     'training/networks_stylegan2.py', 'training/networks_stylegan3.py', 'training/training_loop.py')),
}


def codebase(root: str) -> str:
    """The key in CODEBASES of the checkout at root, or raise click.ClickException saying why it is none."""
    root = os.path.abspath(os.path.expanduser(root))
    missing = {key: [p for p in cb.files if not os.path.isfile(os.path.join(root, p))] for key, cb in CODEBASES.items()}
    found = [key for key, files in missing.items() if not files]
    if len(found) == 1:
        return found[0]
    if found:
        raise click.ClickException(f'{root} has the files of both ' + ' and '.join(CODEBASES[key].name for key in found)
                                   + '; rtm-mapping cannot tell which code it runs. Pass a checkout of one of them.')
    closest = min(missing, key=lambda key: len(missing[key]))
    raise click.ClickException(f'{root} is not a StyleGAN checkout rtm-mapping knows (closest: {CODEBASES[closest].name}, '
                               f'missing {", ".join(missing[closest])}). Pass the folder of a clone of '
                               + ' or '.join(cb.repo for cb in CODEBASES.values()) + '.')


def validate(root: str) -> str:
    """Return the absolute path of a StyleGAN2-ADA or StyleGAN3 checkout, or raise click.ClickException saying why not."""
    codebase(root)
    return os.path.abspath(os.path.expanduser(root))


def find(root=None) -> str:
    """The checkout given, else ${STYLEGAN2_ADA_ROOT}, else ${STYLEGAN3_ROOT}, else the current directory."""
    if root is None:
        root = next((os.environ[cb.env_var] for cb in CODEBASES.values() if os.environ.get(cb.env_var)), os.getcwd())
    return validate(root)


def use(root=None) -> str:
    """Put a StyleGAN checkout first on sys.path, so that dnnlib, legacy, torch_utils and training import,
    and make its code run on this stack (compat.apply())."""
    from stylegan2_ada_patch import compat
    root = find(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    compat.apply()
    return root


def loaded() -> str:
    """The key in CODEBASES of the checkout whose `training` package this process imports."""
    import training
    return codebase(os.path.dirname(os.path.dirname(os.path.abspath(training.__file__))))


option = click.option('--stylegan', type=click.Path(file_okay=False), default=None, metavar='PATH',
                      help='StyleGAN2-ADA or StyleGAN3 checkout [default: $' + ', else $'.join(cb.env_var for cb in CODEBASES.values())
                           + ', else the current folder].')
"""The --stylegan option of the commands that need a checkout; pass its value to use()."""
