"""`rtm-mapping get-stylegan`: clone NVIDIA's repository of a codebase at the commit rtm-mapping is tested
against (checkout.CODEBASES), so that a new user need not find it by hand.

Nothing of NVIDIA's code is part of rtm-mapping (NVIDIA Source Code License): it is cloned from
GitHub onto the user's machine, as the user would clone it.
"""

import os
import shutil
import subprocess
from typing import Optional

import click

from stylegan2_ada_patch.checkout import CODEBASES


def _git(*args, cwd=None) -> str:
    if shutil.which('git') is None:
        raise click.ClickException('git is not installed; install it, or clone the repository by hand and pass its folder.')
    out = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f'git {" ".join(args)} failed:\n{out.stderr.strip()}')
    return out.stdout.strip()


def clone(codebase: str, dest: str, url: Optional[str] = None, commit: Optional[str] = None) -> str:
    """Clone `codebase` at its tested commit into `dest` (a new folder), or reuse `dest` if it already is
    a clone at that commit. Never writes into an existing folder that is anything else. Returns dest."""
    url, commit = url or CODEBASES[codebase].url, commit or CODEBASES[codebase].commit
    dest = os.path.abspath(os.path.expanduser(dest))
    if os.path.exists(dest):
        head = None
        if os.path.isdir(os.path.join(dest, '.git')):
            head = _git('rev-parse', 'HEAD', cwd=dest)
        if head is not None and head.startswith(commit):
            return dest
        raise click.ClickException(f'{dest} exists and is not a clone at {commit[:7]}: pass a new folder '
                                   f'(nothing was changed), or use that checkout as it is with --stylegan / $STYLEGAN2_ADA_ROOT.')
    tmp = dest + '.rtm-partial'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        _git('clone', '--quiet', '--no-checkout', url, tmp)
        _git('-c', 'advice.detachedHead=false', 'checkout', '--quiet', commit, cwd=tmp)
    except click.ClickException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, dest)
    return dest


@click.command()
@click.argument('dest', type=click.Path(file_okay=False), required=False)
@click.option('--codebase', type=click.Choice(sorted(CODEBASES)), default='stylegan2-ada', show_default=True,
              help='NVlabs/stylegan2-ada-pytorch or NVlabs/stylegan3.')
@click.option('--url', default=None, metavar='URL', help='Clone from here instead (a fork or a mirror)  [default: NVIDIA\'s GitHub]')
@click.option('--commit', default=None, metavar='SHA', help='Check out this commit instead of the tested one.')
def get_stylegan(dest: Optional[str], codebase: str, url: Optional[str], commit: Optional[str]):
    """Clone NVIDIA's StyleGAN code at the commit rtm-mapping is tested against into DEST
    (default: ./stylegan2-ada-pytorch or ./stylegan3), and print its path. Reuses DEST if it is
    already that clone; refuses any other existing folder.

    \b
    Example:
      export STYLEGAN2_ADA_ROOT=$(rtm-mapping get-stylegan)
    """
    dest = clone(codebase, dest or CODEBASES[codebase].folder, url=url, commit=commit)
    click.echo(dest)
