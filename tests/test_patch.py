"""The train.py patch: idempotent, byte-exact revert, refusal of files it does not recognise, and
the options it adds (dry runs of the patched train.py against the real checkout)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from stylegan2_ada_patch import patcher
from stylegan2_ada_patch.compat import fix_infinite_sampler


@pytest.fixture
def checkout(stylegan_root, tmp_path):
    """A private copy of the checkout, so that patching never touches the user's files."""
    root = tmp_path / 'stylegan2-ada-pytorch'
    shutil.copytree(stylegan_root, root, ignore=shutil.ignore_patterns('__pycache__', '*.rtm-orig'))
    return root


def run_patch(*args):
    result = CliRunner().invoke(patcher.patch, [str(a) for a in args])
    return result.exit_code, result.output


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


EDITS = patcher.EDITS['stylegan2-ada']


def test_patch_is_idempotent_and_reverts_byte_for_byte(checkout):
    originals = {name: (checkout / name).read_bytes() for name in EDITS}
    code, out = run_patch(checkout)
    assert code == 0 and out.count('Patched') == 2
    patched = {name: (checkout / name).read_bytes() for name in EDITS}
    added = [line for line in patched['train.py'].decode().splitlines() if patcher.MARK in line]
    assert 2 <= len(added) <= 5  # a few lines, each marked

    code, out = run_patch(checkout)
    assert code == 0 and out.count('already patched') == 2
    assert {name: (checkout / name).read_bytes() for name in EDITS} == patched

    code, out = run_patch(checkout, '--check')
    assert code == 0 and out.count(': patched') == 2
    for name in EDITS:
        assert (checkout / (name + patcher.BACKUP_SUFFIX)).read_bytes() == originals[name]

    code, out = run_patch(checkout, '--revert')
    assert code == 0
    assert {name: (checkout / name).read_bytes() for name in EDITS} == originals
    code, out = run_patch(checkout, '--check')
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

def dry_run(root, *args):
    out = subprocess.run([sys.executable, 'train.py', '--outdir', str(root / 'runs'), '--data', str(root / 'data'), '--dry-run', *args],
                         cwd=root, capture_output=True, text=True, timeout=300)
    return out


@pytest.fixture
def patched(checkout):
    from stylegan2_ada_patch.dataset import write_dataset
    write_dataset(str(checkout / 'data'), count=8, resolution=32)
    unpatched = dry_run(checkout, '--cfg=cifar')
    run_patch(checkout)
    return checkout, unpatched


def options(output):
    text = output[output.index('Training options:') + len('Training options:'):]
    return json.loads(text[:text.index('\n}\n') + 2]), output.split('Output directory:')[1].split('\n')[0].strip()


def test_map_mlp_is_the_unpatched_train_py(patched):
    root, unpatched = patched
    assert unpatched.returncode == 0, unpatched.stderr
    for extra in ([], ['--map=mlp']):
        out = dry_run(root, '--cfg=cifar', *extra)
        assert out.returncode == 0, out.stderr
        assert options(out.stdout) == options(unpatched.stdout)


def test_map_rtm_options_reach_g_kwargs_and_run_name(patched):
    root, _ = patched
    out = dry_run(root, '--cfg=cifar', '--map=rtm', '--map-h=8', '--map-l=2', '--map-block=attention')
    assert out.returncode == 0, out.stderr
    args, run_dir = options(out.stdout)
    assert args['G_kwargs']['class_name'] == 'rtm_mapping.networks.Generator'
    assert args['G_kwargs']['mapping_kwargs'] == dict(steps=8, inner_steps=2, block='attention', tokens=4, token_dim=128)
    assert os.path.basename(run_dir).endswith('-cifar-rtmH8L2-attention')
    assert args['D_kwargs']['class_name'] == 'training.networks.Discriminator'

    out = dry_run(root, '--cfg=cifar', '--map-depth=16')
    args, run_dir = options(out.stdout)
    assert args['G_kwargs']['mapping_kwargs']['num_layers'] == 16 and run_dir.endswith('-cifar-map16')
    assert '--map-depth' in subprocess.run([sys.executable, 'train.py', '--help'], cwd=root, capture_output=True, text=True).stdout


@pytest.mark.parametrize('bad, message', [
    (['--map=rtm', '--map-h=0'], '0 is not in the range x>=1'),
    (['--map=transformer'], "'transformer' is not one of 'mlp', 'rtm'"),
    (['--map-h=8'], '--map-h need --map=rtm'),
    (['--map=rtm', '--map-depth=4'], '--map-depth sets the depth of the MLP mapper'),
    (['--map=rtm', '--map-block=attention', '--map-token-dim=90'], 'invalid RTM options'),
])
def test_bad_flags_get_clear_errors(patched, bad, message):
    root, _ = patched
    out = dry_run(root, '--cfg=cifar', *bad)
    assert out.returncode == 2 and message in out.stdout + out.stderr, out.stdout + out.stderr  # train.py logs stderr to stdout
