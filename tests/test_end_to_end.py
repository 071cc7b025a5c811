"""What a user runs, end to end, on a copy of the real checkout (CPU, needs STYLEGAN2_ADA_ROOT):
dataset_tool.py -> patched train.py --map=rtm -> snapshot -> generate.py, style_mixing.py,
projector.py -> --resume; and --map=mlp, whose snapshot then resumes into --map=rtm."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from stylegan2_ada_patch.dataset import write_dataset

# train.py has no --cbase: at 32 px and below, every --cfg has 512 channels at every resolution, so the cost
# is set by the resolution. 8 px (blocks at 4 and 8, as in test_sweep) takes a third of 32 px's CPU time per run,
# and --smoke=8 (one batch, so tick 0 only) half of --smoke=16's.
RESOLUTION = 8
TRAIN = ['--cfg=cifar', '--fp32=1', '--batch=8', '--workers=1', '--snap=1', '--smoke=8']
CLI = [sys.executable, '-m', 'rtm_mapping.cli']     # `rtm-mapping`, without relying on PATH


def sampler_takes_data_source():
    """Whether this PyTorch's Sampler.__init__ still takes the data_source that StyleGAN2-ADA passes (1.x does)."""
    try:
        torch.utils.data.Sampler(range(1))
        return True
    except TypeError:
        return False


def run(cmd, cwd, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f'{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}'
    return out.stdout + out.stderr


@pytest.fixture(scope='module')
def workspace(stylegan_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('e2e')
    root = tmp / 'stylegan2-ada-pytorch'
    shutil.copytree(stylegan_root, root, ignore=shutil.ignore_patterns('__pycache__', '*.rtm-orig'))
    run([sys.executable, '-m', 'stylegan2_ada_patch', str(root)], cwd=tmp)
    write_dataset(str(tmp / 'images'), count=24, resolution=RESOLUTION)
    run([sys.executable, 'dataset_tool.py', f'--source={tmp / "images"}', f'--dest={tmp / "data.zip"}'], cwd=root)
    return tmp, root


def train(workspace, name, *args):
    tmp, root = workspace
    outdir = tmp / name
    log = run([sys.executable, 'train.py', f'--outdir={outdir}', f'--data={tmp / "data.zip"}', *TRAIN, *args], cwd=root)
    run_dir, = glob.glob(str(outdir / '*'))
    return log, run_dir, sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]


def training_options(run_dir):
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def rtm_run(workspace):
    return train(workspace, 'rtm', '--map=rtm', '--map-h=4')


def test_train_rtm_writes_a_snapshot(rtm_run):
    log, run_dir, pkl = rtm_run
    assert log.count('has no Sampler.__init__(data_source)') == (0 if sampler_takes_data_source() else 1)  # the fix, announced once
    options = training_options(run_dir)
    assert options['G_kwargs']['class_name'] == 'rtm_mapping.networks.Generator'
    assert options['G_kwargs']['mapping_kwargs']['steps'] == 4
    assert os.path.basename(run_dir).endswith('-rtmH4L1-' + ('smoke' if torch.cuda.is_available() else 'cpusmoke'))
    assert os.path.getsize(pkl) > 0 and os.path.isfile(os.path.join(run_dir, 'fakes000000.png'))


def images_in(folder):
    arrays = [np.asarray(PIL.Image.open(p)) for p in sorted(glob.glob(os.path.join(folder, '*.png')))]
    assert arrays
    return arrays


@pytest.mark.parametrize('trunc', ['1', '0.7'])
def test_generate_py_on_the_snapshot(workspace, rtm_run, trunc):
    tmp, root = workspace
    out = tmp / f'generated-{trunc}'
    run([*CLI, 'cpu', 'generate.py', f'--network={rtm_run[2]}', '--seeds=0-2', f'--trunc={trunc}', f'--outdir={out}'], cwd=root)
    imgs = images_in(out)
    assert len(imgs) == 3 and all(img.shape == (RESOLUTION, RESOLUTION, 3) and img.std() > 0 for img in imgs)


def test_style_mixing_and_projector_accept_the_snapshot(workspace, rtm_run, monkeypatch):
    from rtm_mapping import detectors
    tmp, root = workspace
    run([*CLI, 'cpu', 'style_mixing.py', f'--network={rtm_run[2]}', '--rows=0,1', '--cols=2,3', '--styles=0-3', f'--outdir={tmp / "mix"}'], cwd=root)
    assert os.path.isfile(tmp / 'mix' / 'grid.png')

    # No network here: a stand-in VGG16 in a dnnlib download cache of this test's own (rtm_mapping.detectors).
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp / 'dnnlib-cache'))
    detectors.install('vgg16', detectors.standin('vgg16', str(tmp / 'vgg16-standin.pt')))
    target = glob.glob(str(tmp / 'images' / '*' / '*.png'))[0]
    run([*CLI, 'cpu', 'projector.py', f'--network={rtm_run[2]}', f'--target={target}', '--num-steps=3',
         '--save-video=False', f'--outdir={tmp / "proj"}'], cwd=root)
    w = np.load(tmp / 'proj' / 'projected_w.npz')['w']
    assert w.shape[-1] == 512 and np.isfinite(w).all()


def test_resume_from_the_rtm_snapshot_continues_silently(workspace, rtm_run):
    log, run_dir, pkl = train(workspace, 'rtm-resumed', '--map=rtm', '--map-h=4', f'--resume={rtm_run[2]}')
    assert 'Resuming from' in log and '--resume found no value' not in log and '--resume dropped' not in log


def test_mlp_run_then_swap_by_fine_tuning_into_rtm(workspace):
    log, run_dir, mlp_pkl = train(workspace, 'mlp', '--map=mlp')
    options = training_options(run_dir)
    assert options['G_kwargs']['class_name'] == 'training.networks.Generator' and options['G_kwargs']['mapping_kwargs'] == {'num_layers': 2}
    assert 'rtm-mapping: --resume' not in log

    log, _, _ = train(workspace, 'mlp-to-rtm', '--map=rtm', '--map-h=4', f'--resume={mlp_pkl}')
    assert 'rtm-mapping: --resume found no value for' in log and 'mapping.rtm.lift.weight' in log
    assert 'rtm-mapping: --resume dropped' in log and 'mapping.fc0.weight' in log
