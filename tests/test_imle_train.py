"""`rtm-mapping imle train` and the RS-IMLE training loop: configs, options, smoke, exact resume, two processes."""

import json
import os
import re
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from rtm_mapping import configs, detectors
from rtm_mapping.cli import main
from rtm_mapping.imle import networks, snapshot, train, training_loop
from stylegan2_ada_patch.dataset import write_dataset

# A generator small enough for seconds of CPU: 16 px, one block per stage, width 16, H=2 (the few-shot block type).
TINY = dict(decoder='fewshot', decoder_kwargs=dict(width=16, stages=[[1, 1], [4, 1], [8, 1], [16, 1]]), z_dim=32, w_dim=32,
            map='rtm', map_h=2, map_l=1, epochs=4, reselect=2, batch=4, lr=2e-3, betas=[0.5, 0.999], weight_decay=0.01,
            lr_warmup=2, lr_decay_epochs=3, lr_decay=0.5, ema=0.9, force_factor=1, epsilon=0.05, knn_ignore=2, knn_chunk=1024, jitter=0.001,
            features='pixels', lpips_weight=1.0, mse_weight=0.1)
PAIRS = [('cifar10-imle-rtm', 'cifar10-imle-mlp'), ('celebahq256-imle-rtm', 'celebahq256-imle-mlp'),
         ('fewshot-imle-rtm', 'fewshot-imle-mlp'), ('fewshot-imle-rtm', 'fewshot-imle-rtm-attention')]
PAPER = {  # the paper's (decoder, map, H, L, block) of each run
    'cifar10-imle-rtm': ('cifar10', 'rtm', 16, 1, 'mixer'), 'cifar10-imle-mlp': ('cifar10', 'mlp', None, None, None),
    'celebahq256-imle-rtm': ('celebahq', 'rtm', 16, 2, 'mixer'), 'celebahq256-imle-mlp': ('celebahq', 'mlp', None, None, None),
    'fewshot-imle-rtm': ('fewshot', 'rtm', 8, 2, 'mixer'), 'fewshot-imle-mlp': ('fewshot', 'mlp', None, None, None),
    'fewshot-imle-rtm-attention': ('fewshot', 'rtm', 8, 2, 'attention'),
}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two spinning threads cost 10x; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_vgg16(tmp_path, monkeypatch):
    """An empty dnnlib cache: no vgg16.pt, so that a smoke run takes its stand-in."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'empty-cache'))


@pytest.fixture(scope='module')
def vgg16_standin(tmp_path_factory):
    return detectors.standin('vgg16', str(tmp_path_factory.mktemp('vgg16') / 'vgg16.pt'))


@pytest.fixture
def vgg16_cache(vgg16_standin, tmp_path, monkeypatch):
    """A dnnlib cache under tmp_path holding the stand-in vgg16.pt, where the loss looks for NVIDIA's."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    detectors.install('vgg16', vgg16_standin)
    return str(tmp_path / 'dnnlib')


def _options(tmp_path, data, run_dir, settings=None, **run):
    c = train.training_options(dict(TINY, **(settings or {})), data=str(data), snap=1, seed=0, batch_gpu=None, pool_batch=256, subset=None)
    c.update(run, run_dir=str(run_dir), progress=False)
    os.makedirs(run_dir, exist_ok=True)
    return c

#----------------------------------------------------------------------------
# Configs.

def test_every_table_run_has_a_complete_config_saying_where_each_value_comes_from():
    assert set(configs.builtin_configs('imle')) == set(PAPER)
    for name, (decoder, mapper, steps, inner_steps, block) in PAPER.items():
        config = configs.load_config(name, regime='imle')
        settings = train.validate_settings(config['imle'], name)
        assert re.match(r'Table [125] ', config['source']), name
        assert list(config['sources']) == list(config['imle']) and all(len(text) > 10 for text in config['sources'].values()), name
        assert (settings['decoder'], settings['map'], settings.get('map_h'), settings.get('map_l'), settings.get('map_block')) == \
            (decoder, mapper, steps, inner_steps, block)
        assert settings['betas'] == [0.5, 0.999] and 'App. F' in config['sources']['betas']     # the paper's optimiser
        assert settings['lpips_weight'] == 1.0 and settings['mse_weight'] == 0.1
    for a, b in PAIRS:
        sa, sb = (configs.load_config(name, regime='imle')['imle'] for name in (a, b))
        differ = {key for key in set(sa) | set(sb) if sa.get(key) != sb.get(key)}
        assert differ and differ <= set(train.RTM_KEYS) | set(train.MLP_KEYS) | {'map'}, (a, b, differ)


def test_bad_configs_are_errors(tmp_path):
    def load(settings):
        path = tmp_path / 'c.json'
        path.write_text(json.dumps(dict(source='mine', imle=settings)))
        return train.validate_settings(configs.load_config(str(path), regime='imle')['imle'], str(path))
    assert load(TINY)['decoder_kwargs'] == TINY['decoder_kwargs']
    for settings, message in [
        (dict(TINY, learning_rate=1), 'unknown setting.*learning_rate'),
        ({k: v for k, v in TINY.items() if k != 'epsilon'}, 'missing setting.*epsilon.*copy a built-in one'),
        (dict(TINY, batch='4'), "batch must be an integer, got '4'"),
        (dict(TINY, lr=0), 'lr: 0.0 is not in the range x>0'),
        (dict(TINY, betas=[0.5]), 'not two numbers'),
        (dict(TINY, map='gru'), "map: 'gru' is not one of"),
        (dict(TINY, map='mlp'), 'map_h, map_l set, but map is .mlp.'),
    ]:
        with pytest.raises(click.ClickException, match=message):
            load(settings)

#----------------------------------------------------------------------------
# The command line.

def _invoke(*args):
    result = CliRunner().invoke(main, ['imle', 'train', *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def test_dry_run_prints_the_options_and_the_run_name(tmp_path):
    data = write_dataset(str(tmp_path / 'obama'), count=2, resolution=16)
    code, out = _invoke('--config', 'fewshot-imle-rtm', '--data', data, '--outdir', tmp_path / 'runs', '--dry-run')
    assert code == 0, out
    options = json.loads(out[out.index('Training options:') + len('Training options:'):out.index('\n}\n') + 2])
    assert options['run_dir'] == str(tmp_path / 'runs' / '00000-fewshot-obama-rtmH8L2')
    assert options['G_kwargs'] == dict(decoder='fewshot', mapper='rtm', z_dim=1024, w_dim=1024, decoder_kwargs=None,
                                       mapper_kwargs=dict(steps=8, inner_steps=2, block='mixer', tokens=4, token_dim=128))
    assert options['optimizer_kwargs'] == dict(lr=2e-4, betas=[0.5, 0.999], weight_decay=0.01) and options['epochs_per_tick'] == 30
    assert options['sampler_kwargs'] == dict(force_factor=10, epsilon=0.1, knn_ignore=5, knn_chunk=1024, jitter_std=0.001,
                                             features='pixels', batch_size=64)
    assert 'Dry run; exiting.' in out and not (tmp_path / 'runs').exists()

    code, out = _invoke('--config', 'fewshot-imle-rtm', '--data', data, '--outdir', tmp_path / 'runs', '--dry-run', '--map', 'mlp', '--lr', '1e-4')
    assert code == 0, out
    assert '00000-fewshot-obama-mlp8' in out and '"mapper_kwargs": null' in out and '"lr": 0.0001' in out
    assert "map_h, map_l, map_block, map_tokens, map_token_dim belong to the other mapper; left out" in out

    for args, message in [
        (['--config', 'fewshot-imle-mlp', '--map-h', '4'], '--map-h is an option of the RTM mapper; this run has --map=mlp'),
        (['--config', 'fewshot-imle-rtm', '--lr', '0'], "Invalid value for '--lr'"),
        (['--config', 'fewshot-imle-rtm', '--betas', '0.5'], 'not two numbers'),
        (['--config', 'cifar10-stylegan2-rtm'], 'is a StyleGAN2-ADA config .*`rtm-mapping train --config cifar10-stylegan2-rtm'),
        (['--config', 'nonesuch'], 'no such config file or built-in config. Built-in: celebahq256-imle-mlp'),
        (['--config', 'fewshot-imle-rtm', '--decoder-kwargs', '{"depth": 3}'], 'invalid generator options: unknown decoder option.*depth'),
        (['--config', 'fewshot-imle-rtm', '--data', tmp_path / 'nowhere'], 'nowhere: no such folder or zip'),
        ([], 'pass --config NAME'),
    ]:
        code, out = _invoke('--data', data, *args, '--outdir', tmp_path / 'runs', '--dry-run')
        assert code != 0 and re.search(message, out), (args, out)


def test_smoke_runs_on_a_folder_and_on_a_zip_and_resumes(tmp_path, one_thread, no_vgg16):
    folder = write_dataset(str(tmp_path / 'blobs'), count=10, resolution=64)
    archive = write_dataset(str(tmp_path / 'blobs.zip'), count=10, resolution=64)
    code, out = _invoke('--config', 'fewshot-imle-rtm', '--data', folder, '--outdir', tmp_path / 'runs', '--smoke')
    assert code == 0, out
    run = tmp_path / 'runs' / '00000-fewshot-blobs-rtmH8L2-smoke'
    assert 'LPIPS network:      a stand-in' in out and 'resized 8 images from 64x64 to 32x32' in out
    assert sorted(os.listdir(run)) == ['fakes-epoch-000010.png', 'fakes-init.png', 'log.txt', 'reals.png', 'snapshot-epoch-000010.pt',
                                       'stats.jsonl', 'training_options.json', 'vgg16-standin.pt']
    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert len(stats) == 1 and stats[0]['Progress/epoch'] == 10 and stats[0]['Select/pool_size'] == 1024
    for key in ('Loss/loss', 'Select/rejected_frac', 'Select/distance_mean', 'Select/decode_img_per_sec', 'Select/search_pairs_per_sec',
                'Timing/sec_per_tick'):
        assert key in stats[0], key
    assert 'Exiting...' in (run / 'log.txt').read_text()

    code, out = _invoke('--config', 'fewshot-imle-rtm', '--data', archive, '--outdir', tmp_path / 'runs', '--smoke', '--map', 'mlp')
    assert code == 0, out
    assert (tmp_path / 'runs' / '00001-fewshot-blobs-mlp8-smoke' / 'snapshot-epoch-000010.pt').is_file()

    # Resume: continue the first run for another tick; refuse changes and a finished run.
    snap = run / 'snapshot-epoch-000010.pt'
    code, out = _invoke('--resume', snap, '--outdir', tmp_path / 'runs', '--lr', '1e-3')
    assert code != 0 and '--lr: the snapshot\'s run continues with its own settings' in out
    code, out = _invoke('--resume', snap, '--outdir', tmp_path / 'runs')
    assert code != 0 and 'is at epoch 10 of 10: nothing to do. Pass --epochs N' in out
    code, out = _invoke('--resume', snap, '--outdir', tmp_path / 'runs', '--epochs', '20')
    assert code == 0, out
    resumed = tmp_path / 'runs' / '00002-fewshot-blobs-rtmH8L2-smoke'
    assert (resumed / 'snapshot-epoch-000020.pt').is_file() and (resumed / 'fakes-resume-epoch-000010.png').is_file()
    assert json.loads((resumed / 'training_options.json').read_text())['resume'] == str(snap)
    assert snapshot.load(str(resumed / 'snapshot-epoch-000020.pt'))['progress']['tick'] == 2
    # The first command again, with --resume: the same options, so it continues too.
    code, out = _invoke('--config', 'fewshot-imle-rtm', '--data', folder, '--outdir', tmp_path / 'runs', '--smoke',
                        '--resume', resumed / 'snapshot-epoch-000020.pt', '--epochs', '30')
    assert code == 0, out
    again = json.loads((tmp_path / 'runs' / '00003-fewshot-blobs-rtmH8L2-smoke' / 'training_options.json').read_text())
    before = json.loads((resumed / 'training_options.json').read_text())
    assert {key for key in again if again[key] != before[key]} == {'run_dir', 'resume', 'total_epochs'}

#----------------------------------------------------------------------------
# Exactness and several processes.

def _final(run_dir):
    names = sorted(name for name in os.listdir(run_dir) if name.startswith('snapshot-epoch-'))
    return snapshot.load(os.path.join(run_dir, names[-1]))


def _assert_same(a, b, path=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f'{path}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


def test_a_run_stopped_and_resumed_ends_with_the_same_weights(tmp_path, vgg16_cache, one_thread):
    data = write_dataset(str(tmp_path / 'data'), count=6, resolution=16)
    straight = _options(tmp_path, data, tmp_path / 'straight', total_epochs=6)
    training_loop.training_loop(**straight)
    first = _options(tmp_path, data, tmp_path / 'first', total_epochs=4)
    training_loop.training_loop(**first)
    second = _options(tmp_path, data, tmp_path / 'second', total_epochs=6, resume=str(tmp_path / 'first' / 'snapshot-epoch-000004.pt'))
    training_loop.training_loop(**second)
    a, b = _final(tmp_path / 'straight'), _final(tmp_path / 'second')
    assert a['progress'] == b['progress'] == dict(tick=3, epoch=6, step=12, nimg=36)
    for key in ('G', 'G_ema', 'optimizer', 'latents', 'rng'):
        _assert_same(a[key], b[key], key)
    halfway = _final(tmp_path / 'first')['G']
    assert any(not torch.equal(a['G'][key], halfway[key]) for key in halfway)      # and it trained after the stop


def test_two_processes_train_as_one(tmp_path, vgg16_cache):
    """torchrun with 2 gloo processes: the pool split across ranks gives the same selection as one process,
    the sharded minibatches (5 images in batches of 4: rank 1's share of the last one is empty) the same
    updates up to the order of float sums; rank 0 alone writes."""
    data = write_dataset(str(tmp_path / 'data'), count=5, resolution=16)
    settings = dict(TINY, decoder_kwargs=dict(TINY['decoder_kwargs'], noise_max_res=0), epochs=2)   # no per-rank decoder noise
    (tmp_path / 'tiny.json').write_text(json.dumps(dict(source='test', imle=settings)))
    args = ['imle', 'train', '--config', str(tmp_path / 'tiny.json'), '--data', data, '--pool-batch', '256']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    runs = {}
    for name, launcher in [('one', [sys.executable, '-m', 'rtm_mapping.cli']),
                           ('two', [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'rtm_mapping.cli'])]:
        out = subprocess.run([*launcher, *args, '--outdir', str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (run_dir,) = (tmp_path / name).iterdir()
        assert sorted(os.listdir(run_dir)) == ['fakes-epoch-000002.png', 'fakes-init.png', 'log.txt', 'reals.png', 'snapshot-epoch-000002.pt',
                                               'stats.jsonl', 'training_options.json']
        (stats,) = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
        assert stats['Select/decode_img_per_sec'] > 0 and stats['Select/search_pairs_per_sec'] > 0     # the whole pool's, whichever rank
        runs[name] = run_dir
    one, two = (_final(run_dir) for run_dir in runs.values())
    assert two['rng']['world_size'] == 2 and len(two['rng']['ranks']) == 2
    assert not torch.equal(two['rng']['ranks'][0]['noise'], two['rng']['ranks'][1]['noise'])
    assert torch.equal(one['latents'], two['latents'])          # the same selection, bit for bit
    assert one['progress'] == two['progress'] == dict(tick=1, epoch=2, step=4, nimg=10)
    # The same generator up to float rounding. (Compared by its images: parameters with vanishing gradients,
    # such as the 1x1 stage's, take Adam steps of +-lr whose sign rounding decides; the images do not depend on them.)
    z = torch.randn([16, 32], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)    # the loop builds G under the run's seed: this is G before training
    initial = networks.Generator(**one['G_init_kwargs']).eval()(z)
    for ema in (False, True):
        a, b = (snapshot.load_generator(str(run_dir / 'snapshot-epoch-000002.pt'), ema=ema)(z) for run_dir in runs.values())
        assert (a - b).abs().max() < 1e-3, (ema, (a - b).abs().max())
        assert (a - initial).abs().max() > 2e-2, ema             # training moved the images 20x more than the runs differ


@pytest.mark.parametrize('name', sorted(set(PAPER) - {'fewshot-imle-rtm', 'fewshot-imle-mlp'}))
def test_every_config_has_a_smoke_that_trains_and_snapshots(tmp_path, name, one_thread, no_vgg16):
    """The smoke of every config (its mapper as the paper has it, the tiny decoder of its block type) trains for
    its tick and leaves a snapshot whose generator generates; the two few-shot configs run their smokes in
    test_smoke_runs_on_a_folder_and_on_a_zip_and_resumes."""
    data = write_dataset(str(tmp_path / 'data'), count=8, resolution=32)
    code, out = _invoke('--config', name, '--data', data, '--outdir', tmp_path / 'runs', '--smoke')
    assert code == 0, out
    (run,) = (tmp_path / 'runs').iterdir()
    options = json.loads((run / 'training_options.json').read_text())
    assert options['G_kwargs']['decoder_kwargs'] == train.SMOKE_SETTINGS['decoder_kwargs'] and options['total_epochs'] == options['epochs_per_tick']
    (stats,) = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert stats['Progress/epoch'] == options['total_epochs'] and torch.isfinite(torch.tensor(stats['Loss/loss']))
    (snap,) = run.glob('snapshot-epoch-*.pt')
    G = snapshot.load_generator(str(snap))
    assert G.init_kwargs['decoder'] == PAPER[name][0] and G.init_kwargs['mapper'] == PAPER[name][1]
    kwargs = G.init_kwargs['mapper_kwargs']
    assert tuple(kwargs.get(key) for key in ('steps', 'inner_steps', 'block')) == PAPER[name][2:]
    images = G(torch.randn([2, G.z_dim]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
