"""Apply, check and revert the rtm-mapping patch of a StyleGAN2-ADA or StyleGAN3 checkout.

The patch adds a few lines, each ending in `# rtm-mapping`, to train.py and calc_metrics.py;
no other official file is touched. Every edit replaces a line that must occur exactly once in the
official file, so an unrecognised file (a heavily edited fork) is refused untouched, and --revert
restores the file byte for byte. The original is also kept as FILE.rtm-orig. The edits are one
table, EDITS, keyed by codebase (stylegan2_ada_patch.checkout.CODEBASES) and file: supporting
another codebase is another entry.
"""

import os
import shutil
import tempfile

import click

from stylegan2_ada_patch import checkout

MARK = '# rtm-mapping'
BACKUP_SUFFIX = '.rtm-orig'
_HOOK_IMPORT = (
    'import stylegan2_ada_patch.train_hooks as rtm_hooks # rtm-mapping: --map=rtm, PyTorch 2.x fix, extra metrics.\n'
    'rtm_hooks.setup() # rtm-mapping\n'
)
_OPTIONS = '@rtm_hooks.mapping_options # rtm-mapping\n'

# codebase: {file: [(official text, patched text), ...]}; each official text occurs exactly once in the official file.
# StyleGAN3's hook import comes before `import dnnlib`: its training and metrics packages import
# pkg_resources (gone from setuptools >= 81) through torch_utils.ops, which setup() makes importable.
EDITS = {
    'stylegan2-ada': {
        'train.py': [
            ('from torch_utils import custom_ops\n',
             'from torch_utils import custom_ops\n' + _HOOK_IMPORT),
            ('\ndef main(ctx, outdir, dry_run, **config_kwargs):\n',
             '\n' + _OPTIONS + 'def main(ctx, outdir, dry_run, **config_kwargs):\n'),
            ('        run_desc, args = setup_training_loop_kwargs(**config_kwargs)\n',
             '        run_desc, args = rtm_hooks.setup_training_loop_kwargs(setup_training_loop_kwargs, **config_kwargs) # rtm-mapping\n'),
        ],
        'calc_metrics.py': [
            ('from torch_utils import misc\n',
             'from torch_utils import misc\n' + _HOOK_IMPORT),
        ],
    },
    'stylegan3': {
        'train.py': [
            ('import torch\n\nimport dnnlib\n',
             'import torch\n\n' + _HOOK_IMPORT + 'import dnnlib\n'),
            ('\ndef main(**kwargs):\n',
             '\n' + _OPTIONS + 'def main(**kwargs):\n'),
            ('    launch_training(c=c, desc=desc, outdir=opts.outdir, dry_run=opts.dry_run)\n',
             '    desc = rtm_hooks.apply_options(c, desc, opts) # rtm-mapping\n'
             '    launch_training(c=c, desc=desc, outdir=opts.outdir, dry_run=opts.dry_run)\n'),
        ],
        'calc_metrics.py': [
            ('import torch\n\nimport dnnlib\nimport legacy\n',
             'import torch\n\n' + _HOOK_IMPORT + 'import dnnlib\nimport legacy\n'),
        ],
    },
}

#----------------------------------------------------------------------------

def _read(path):
    with open(path, 'rb') as f:
        return f.read().decode('utf-8')


def _write_atomic(path, text):
    """Replace path with text, keeping its permissions; never leaves a half-written file."""
    mode = os.stat(path).st_mode
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.rtm-')
    with os.fdopen(fd, 'wb') as f:
        f.write(text.encode('utf-8'))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def state(codebase, name, text):
    """'patched', 'official', or a sentence saying why the file is not recognised."""
    edits = EDITS[codebase][name]
    if all(text.count(new) == 1 for _, new in edits):
        return 'patched'
    if MARK in text:
        return f'{name} has rtm-mapping lines but not the ones this version writes (edited by hand, or another rtm-mapping version)'
    for old, _ in edits:
        if text.count(old) != 1:
            cb = checkout.CODEBASES[codebase]
            return (f'{name} is not a {cb.name} {name} we recognise: expected exactly one {old.strip()!r}, '
                    f'found {text.count(old)}. rtm-mapping patches the files of {cb.repo} as published')
    return 'official'


def apply(codebase, name, text):
    for old, new in EDITS[codebase][name]:
        text = text.replace(old, new)
    return text


def revert(codebase, name, text):
    for old, new in EDITS[codebase][name]:
        text = text.replace(new, old)
    return text

#----------------------------------------------------------------------------

@click.command()
@click.argument('path', type=click.Path(exists=True, file_okay=False), default='.')
@click.option('--check', is_flag=True, help='Report whether PATH is patched; change nothing.')
@click.option('--revert', 'undo', is_flag=True, help='Remove the patch, restoring the files byte for byte.')
def patch(path, check, undo):
    """Patch the StyleGAN2-ADA or StyleGAN3 checkout at PATH (default: the current directory) so that
    its train.py takes --map=rtm, runs on PyTorch 2.x and knows the extra metrics.

    \b
    Idempotent; the originals are kept as train.py.rtm-orig and calc_metrics.py.rtm-orig.
    """
    root = checkout.validate(path)
    codebase = checkout.codebase(root)
    files = {name: os.path.join(root, name) for name in EDITS[codebase]}
    texts = {name: _read(p) for name, p in files.items()}
    states = {name: state(codebase, name, text) for name, text in texts.items()}
    bad = [s for s in states.values() if s not in ('patched', 'official')]

    if check:
        for name, s in states.items():
            print(f'{files[name]}: {s}')
        if bad or len(set(states.values())) != 1:
            raise SystemExit(1)
        return
    if bad:
        raise click.ClickException('; '.join(bad) + '. Nothing was changed.')

    if undo:
        for name in [n for n, s in states.items() if s == 'patched']:
            _write_atomic(files[name], revert(codebase, name, texts[name]))
            print(f'Reverted {files[name]}')
        if all(s == 'official' for s in states.values()):
            print(f'{root} is not patched; nothing to revert.')
        return

    for name in [n for n, s in states.items() if s == 'official']:
        backup = files[name] + BACKUP_SUFFIX
        if os.path.exists(backup) and _read(backup) != texts[name]:
            raise click.ClickException(f'{backup} exists and differs from {files[name]}; move it away first (nothing was changed).')
        shutil.copy2(files[name], backup)
    for name, s in states.items():
        if s == 'patched':
            print(f'{files[name]} is already patched.')
        else:
            _write_atomic(files[name], apply(codebase, name, texts[name]))
            print(f'Patched {files[name]} (original kept as {files[name] + BACKUP_SUFFIX})')

#----------------------------------------------------------------------------
