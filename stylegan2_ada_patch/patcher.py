"""Apply, check and revert the rtm-mapping patch of a StyleGAN2-ADA checkout.

The patch adds a few lines, each ending in `# rtm-mapping`, to train.py and calc_metrics.py;
no other official file is touched. Every edit replaces a line that must occur exactly once in the
official file, so an unrecognised file (StyleGAN3, a heavily edited fork) is refused untouched,
and --revert restores the file byte for byte. The original is also kept as FILE.rtm-orig.
"""

import os
import shutil
import tempfile

import click

from stylegan2_ada_patch import checkout

MARK = '# rtm-mapping'
BACKUP_SUFFIX = '.rtm-orig'
_HOOK_IMPORT = (
    'import stylegan2_ada_patch.train_hooks as rtm_hooks # rtm-mapping: --map=rtm, today\'s-stack fixes, extra metrics.\n'
    'rtm_hooks.setup() # rtm-mapping\n'
)

# file: [(official text, patched text), ...]; each official text occurs exactly once in the official file.
# The hooks come before `import dnnlib`: compat.apply() must run before NVIDIA's modules are imported.
EDITS = {
    'train.py': [
        ('import dnnlib\n',
         _HOOK_IMPORT + 'import dnnlib\n'),
        ('\ndef main(ctx, outdir, dry_run, **config_kwargs):\n',
         '\n@rtm_hooks.mapping_options # rtm-mapping\ndef main(ctx, outdir, dry_run, **config_kwargs):\n'),
        ('        run_desc, args = setup_training_loop_kwargs(**config_kwargs)\n',
         '        run_desc, args = rtm_hooks.setup_training_loop_kwargs(setup_training_loop_kwargs, **config_kwargs) # rtm-mapping\n'),
    ],
    'calc_metrics.py': [
        ('import dnnlib\n',
         _HOOK_IMPORT + 'import dnnlib\n'),
    ],
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


def state(name, text):
    """'patched', 'official', or a sentence saying why the file is not recognised."""
    edits = EDITS[name]
    if all(text.count(new) == 1 for _, new in edits):
        return 'patched'
    if MARK in text:
        return f'{name} has rtm-mapping lines but not the ones this version writes (edited by hand, or another rtm-mapping version)'
    for old, _ in edits:
        if text.count(old) != 1:
            return (f'{name} is not a StyleGAN2-ADA {name} we recognise: expected exactly one line {old.strip()!r}, '
                    f'found {text.count(old)}. rtm-mapping patches NVlabs/stylegan2-ada-pytorch (StyleGAN3 is not supported)')
    return 'official'


def apply(text, name):
    for old, new in EDITS[name]:
        text = text.replace(old, new)
    return text


def revert(text, name):
    for old, new in EDITS[name]:
        text = text.replace(new, old)
    return text

#----------------------------------------------------------------------------

@click.command()
@click.argument('path', type=click.Path(exists=True, file_okay=False), default='.')
@click.option('--check', is_flag=True, help='Report whether PATH is patched; change nothing.')
@click.option('--revert', 'undo', is_flag=True, help='Remove the patch, restoring the files byte for byte.')
def patch(path, check, undo):
    """Patch the StyleGAN2-ADA checkout at PATH (default: the current directory) so that its
    train.py takes --map=rtm, runs on PyTorch 2.x and knows the extra metrics.

    \b
    Idempotent; the originals are kept as train.py.rtm-orig and calc_metrics.py.rtm-orig.
    """
    root = checkout.validate(path)
    files = {name: os.path.join(root, name) for name in EDITS}
    texts = {name: _read(p) for name, p in files.items()}
    states = {name: state(name, text) for name, text in texts.items()}
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
            _write_atomic(files[name], revert(texts[name], name))
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
            _write_atomic(files[name], apply(texts[name], name))
            print(f'Patched {files[name]} (original kept as {files[name] + BACKUP_SUFFIX})')

#----------------------------------------------------------------------------
