"""The train.py patch: idempotent, byte-exact revert, refusal of files it does not recognise, and
the options it adds (dry runs of the patched train.py against the real checkout)."""

import subprocess
import sys

import pytest
from conftest import copy_checkout, official_root, run_patch, train_py_runs, training_options

from stylegan2_ada_patch import patcher
from stylegan2_ada_patch.compat import fix_infinite_sampler


@pytest.fixture
def checkout(stylegan_root, tmp_path):
    """A private copy of the checkout, so that patching never touches the user's files."""
    return copy_checkout(stylegan_root, tmp_path / 'stylegan2-ada-pytorch')


def fake_checkout(root, train_text, codebase='stylegan2-ada'):
    """A folder shaped like a checkout, with our own stand-in files (no NVIDIA code)."""
    for name in patcher.checkout.CODEBASES[codebase].files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('# stand-in\n')
    (root / 'train.py').write_text(train_text)
    return root


def test_unrecognised_train_py_is_refused_and_left_alone(tmp_path):
    root = fake_checkout(tmp_path, 'import click\n\ndef main():\n    pass\n')
    code, out = run_patch(root)
    assert code != 0 and 'not a StyleGAN2-ADA train.py we recognise' in out and 'Nothing was changed' in out
    assert (root / 'train.py').read_text() == 'import click\n\ndef main():\n    pass\n'
    assert not (root / 'train.py.rtm-orig').exists()


def test_unrecognised_stylegan3_train_py_is_refused(tmp_path):
    root = fake_checkout(tmp_path, 'import torch\n\nimport dnnlib\n', codebase='stylegan3')
    code, out = run_patch(root)
    assert code != 0 and 'not a StyleGAN3 train.py we recognise' in out and 'NVlabs/stylegan3' in out and 'Nothing was changed' in out
    assert (root / 'train.py').read_text() == 'import torch\n\nimport dnnlib\n'


def test_not_a_checkout_is_refused(tmp_path):
    (tmp_path / 'train.py').write_text('# stand-in\n')
    code, out = run_patch(tmp_path)
    assert code != 0 and 'not a StyleGAN checkout rtm-mapping knows' in out
    assert 'NVlabs/stylegan2-ada-pytorch' in out and 'NVlabs/stylegan3' in out


@pytest.mark.parametrize('codebase', list(patcher.EDITS))
def test_patch_is_idempotent_and_reverts_byte_for_byte(codebase, tmp_path):
    root = copy_checkout(official_root(codebase), tmp_path / codebase, ignore=('docs', 'gui_utils', 'viz'))
    names = list(patcher.EDITS[codebase])
    originals = {name: (root / name).read_bytes() for name in names}
    code, out = run_patch(root)
    assert code == 0 and out.count('Patched') == 2
    patched = {name: (root / name).read_bytes() for name in names}
    text = patched['train.py'].decode()
    assert 2 <= len([line for line in text.splitlines() if patcher.MARK in line]) <= 5  # a few lines, each marked
    if codebase == 'stylegan3':     # its training package imports pkg_resources at import: the hook's fixes come first
        assert text.index('rtm_hooks.setup()') < text.index('from training import training_loop')

    code, out = run_patch(root)
    assert code == 0 and out.count('already patched') == 2
    assert {name: (root / name).read_bytes() for name in names} == patched

    code, out = run_patch(root, '--check')
    assert code == 0 and out.count(': patched') == 2
    for name in names:
        assert (root / (name + patcher.BACKUP_SUFFIX)).read_bytes() == originals[name]

    code, out = run_patch(root, '--revert')
    assert code == 0
    assert {name: (root / name).read_bytes() for name in names} == originals
    code, out = run_patch(root, '--check')
    assert code == 0 and out.count(': official') == 2


def test_hand_edited_patch_is_refused(checkout):
    run_patch(checkout)
    train = checkout / 'train.py'
    text = train.read_text().replace('rtm_hooks.setup() # rtm-mapping\n', '')
    train.write_text(text)
    code, out = run_patch(checkout, '--revert')
    assert code != 0 and 'rtm-mapping lines but not the ones' in out
    assert train.read_text() == text


def test_backup_is_never_overwritten(checkout):
    (checkout / 'train.py.rtm-orig').write_text('my own notes\n')
    code, out = run_patch(checkout)
    assert code != 0 and 'move it away' in out
    assert (checkout / 'train.py.rtm-orig').read_text() == 'my own notes\n'
    assert patcher.MARK not in (checkout / 'train.py').read_text()


def test_python_dash_m_entry_point(checkout):
    out = subprocess.run([sys.executable, '-m', 'stylegan2_ada_patch', str(checkout), '--check'], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count(': official') == 2


def test_infinite_sampler_fix(stylegan_root):
    from torch_utils import misc
    fix_infinite_sampler()  # needed on torch >= 2, a no-op before
    def draws(seed):
        stream = iter(misc.InfiniteSampler(list(range(10)), seed=seed))
        return [int(next(stream)) for _ in range(100)]
    assert set(draws(1)) == set(range(10)) and draws(1) == draws(1) != draws(2)  # every image, reproducible per seed
    assert fix_infinite_sampler() is False  # idempotent

#----------------------------------------------------------------------------
# The patched train.py's options, in dry runs: every run of this part in one process before the patch and one after.

BAD_FLAGS = [
    (['--map=rtm', '--map-h=0'], '0 is not in the range x>=1'),
    (['--map=transformer'], "'transformer' is not one of 'mlp', 'rtm'"),
    (['--map-h=8'], '--map-h need --map=rtm'),
    (['--map=rtm', '--map-depth=4'], '--map-depth sets the depth of the MLP mapper'),
    (['--map=rtm', '--map-block=attention', '--map-token-dim=90'], 'invalid RTM options'),
]
DRY_RUNS = [['--cfg=cifar'], ['--cfg=cifar', '--map=mlp'], ['--cfg=cifar', '--map=rtm', '--map-h=8', '--map-l=2', '--map-block=attention'],
            ['--cfg=cifar', '--map-depth=16']] + [['--cfg=cifar', *bad] for bad, _ in BAD_FLAGS]


@pytest.fixture(scope='module')
def dry_runs(stylegan_root, tmp_path_factory):
    """{flags: (exit code, output)} of train.py --dry-run: 'official' of the unpatched train.py with --cfg=cifar,
    the others of DRY_RUNS and --help with the patched one."""
    from stylegan2_ada_patch.dataset import write_dataset
    tmp = tmp_path_factory.mktemp('dry-runs')
    root = copy_checkout(stylegan_root, tmp / 'stylegan2-ada-pytorch')
    write_dataset(str(tmp / 'data'), count=8, resolution=32)
    common = ['--outdir', tmp / 'runs', '--data', tmp / 'data', '--dry-run']
    official, = train_py_runs(root, [common + ['--cfg=cifar']])
    assert run_patch(root)[0] == 0
    results = train_py_runs(root, [common + args for args in DRY_RUNS] + [['--help']])
    return dict(official=official, **{' '.join(args): result for args, result in zip(DRY_RUNS + [['--help']], results)})


def test_map_mlp_is_the_unpatched_train_py(dry_runs):
    code, official = dry_runs['official']
    assert code == 0, official
    for flags in ('--cfg=cifar', '--cfg=cifar --map=mlp'):
        code, out = dry_runs[flags]
        assert code == 0, out
        assert training_options(out) == training_options(official)


def test_map_rtm_options_reach_g_kwargs_and_run_name(dry_runs):
    code, out = dry_runs['--cfg=cifar --map=rtm --map-h=8 --map-l=2 --map-block=attention']
    assert code == 0, out
    args, run_dir = training_options(out)
    assert args['G_kwargs']['class_name'] == 'rtm_mapping.networks.Generator'
    assert args['G_kwargs']['mapping_kwargs'] == dict(steps=8, inner_steps=2, block='attention', tokens=4, token_dim=128)
    assert run_dir.endswith('-cifar-rtmH8L2-attention')
    assert args['D_kwargs']['class_name'] == 'training.networks.Discriminator'

    args, run_dir = training_options(dry_runs['--cfg=cifar --map-depth=16'][1])
    assert args['G_kwargs']['mapping_kwargs']['num_layers'] == 16 and run_dir.endswith('-cifar-map16')
    code, help_text = dry_runs['--help']
    assert code == 0 and '--map-depth' in help_text


@pytest.mark.parametrize('bad, message', BAD_FLAGS)
def test_bad_flags_get_clear_errors(dry_runs, bad, message):
    code, out = dry_runs[' '.join(['--cfg=cifar', *bad])]
    assert code == 2 and message in out, out
