"""RS-IMLE evaluation on the CPU: `rtm-mapping imle generate`, `imle metrics` and `sweep-h` on tiny snapshots,
with the stand-in Inception detector in a dnnlib cache under tmp_path; the FID, IS and PRDC arithmetic
against independent computations and sanity cases."""

import json
import os
import re
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from rtm_mapping import detectors
from rtm_mapping.imle import generate, metrics, networks, snapshot
from rtm_mapping.metrics import feature_statistics, frechet_distance
from rtm_mapping.sweep import sweep_h

RESOLUTION = 8
NUM_IMAGES = 12
TINY = dict(decoder='fewshot', z_dim=16, w_dim=16, decoder_kwargs=dict(width=8, stages=[[1, 1], [4, 1], [8, 1]]))


def write_snapshot(path, data, mapper='rtm'):
    """A snapshot as `rtm-mapping imle train` writes one, of an untrained tiny generator whose noise injection is on."""
    torch.manual_seed(0)
    kwargs = dict(TINY, mapper=mapper, mapper_kwargs=dict(steps=2, inner_steps=1, tokens=2, token_dim=8) if mapper == 'rtm' else dict(num_layers=2))
    G = networks.Generator(**kwargs)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('noise.strength'):
                p.fill_(0.5)            # noise that shows in the images, so that reproducibility is tested
    optimizer = torch.optim.Adam(G.parameters())
    snapshot.save(str(path), dict(options=dict(dataset_kwargs=dict(path=str(data), max_images=None)), G_init_kwargs=G.init_kwargs,
                                  G=G.state_dict(), G_ema=G.state_dict(), optimizer=optimizer.state_dict(), latents=torch.zeros(NUM_IMAGES, 16),
                                  progress=dict(tick=0, epoch=0, step=0, nimg=0),
                                  rng=dict(world_size=1, shared=torch.get_rng_state(), ranks=[dict(torch=torch.get_rng_state(), noise=None, cuda=None)])))
    return str(path)


@pytest.fixture
def setup(tmp_path, monkeypatch, write_images):
    """Training images, an RTM and an MLP snapshot, the stand-in Inception (16 features) in a dnnlib cache under tmp_path."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    monkeypatch.chdir(tmp_path)
    detectors.install('inception', detectors.standin('inception', str(tmp_path / 'inception.pt'), num_features=16))
    data = write_images(tmp_path / 'data', count=NUM_IMAGES, resolution=RESOLUTION)
    return dict(tmp=tmp_path, data=data, rtm=write_snapshot(tmp_path / 'rtm.pt', data), mlp=write_snapshot(tmp_path / 'mlp.pt', data, 'mlp'))


def _png(path):
    return np.asarray(PIL.Image.open(path))

#----------------------------------------------------------------------------
# generate

def test_seeds_parse_like_stylegans_generate():
    assert generate.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
    assert generate.parse_seeds('5') == [5]
    for bad in ('3-1', 'a', '1,,2', '1,1', '-1', str(2 ** 32)):
        with pytest.raises(click.BadParameter, match='seed'):
            generate.parse_seeds(bad)


def test_seed_gives_stylegans_latent():
    z = generate.seed_latents([3, 7], 16)
    assert z.dtype == torch.float32
    assert torch.equal(z[1], torch.from_numpy(np.random.RandomState(7).randn(16).astype(np.float32)))


def test_generate_writes_one_png_per_seed_and_a_grid_the_same_for_a_seed_alone(setup):
    out = setup['tmp'] / 'out'
    result = CliRunner().invoke(generate.generate_command, ['--snapshot', setup['rtm'], '--seeds', '0-4', '--outdir', str(out), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['grid.png'] + [f'seed{s:04d}.png' for s in range(5)]
    images = [_png(out / f'seed{s:04d}.png') for s in range(5)]
    assert images[0].shape == (RESOLUTION, RESOLUTION, 3)
    grid = _png(out / 'grid.png')
    assert grid.shape == (2 * RESOLUTION, 3 * RESOLUTION, 3)                           # ceil(sqrt(5)) = 3 columns, 2 rows
    assert np.array_equal(grid[RESOLUTION:, :RESOLUTION], images[3])                   # row by row
    assert not np.array_equal(images[0], images[1])

    alone = setup['tmp'] / 'alone'
    result = CliRunner().invoke(generate.generate_command, ['--snapshot', setup['rtm'], '--seeds', '3', '--outdir', str(alone),
                                                            '--no-grid', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert os.listdir(alone) == ['seed0003.png']
    assert np.array_equal(_png(alone / 'seed0003.png'), images[3])


def test_noise_is_drawn_from_the_seed(setup):
    G = snapshot.load_generator(setup['rtm'])
    first, again = generate.generate(G, [4, 5], device='cpu'), generate.generate(G, [5, 4], device='cpu')
    assert torch.equal(first, again.flip(0))
    assert torch.equal(generate.generate(G, [4], device='cpu')[0], next(generate.batches(G, [4, 9], device='cpu', batch_size=1))[0])
    z = generate.seed_latents([4], G.z_dim)
    with torch.no_grad():
        other_noise = generate.to_uint8(G(z, generator=torch.Generator().manual_seed(99)))
    assert not torch.equal(other_noise, first[:1])             # the noise injection is on: the seed's noise matters


def test_map_h_changes_the_rtm_images_and_is_refused_for_the_mlp(setup):
    G = snapshot.load_generator(setup['rtm'])
    native, h1 = generate.generate(G, [0, 1], device='cpu'), generate.generate(G, [0, 1], device='cpu', steps=1)
    assert not torch.equal(native, h1)
    assert torch.equal(generate.generate(G, [0, 1], device='cpu', steps=2), native)      # H = 2 is the native H
    out = setup['tmp'] / 'h1'
    run = CliRunner().invoke
    result = run(generate.generate_command, ['--snapshot', setup['rtm'], '--seeds', '0-1', '--map-h', '1', '--outdir', str(out), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert np.array_equal(_png(out / 'seed0001.png'), h1[1].permute(1, 2, 0).numpy())

    result = run(generate.generate_command, ['--snapshot', setup['mlp'], '--seeds', '0', '--map-h', '4', '--outdir', str(out), '--device', 'cpu'])
    assert result.exit_code != 0 and "'mlp' mapper (2 layers), whose depth is fixed" in result.output
    result = run(generate.generate_command, ['--snapshot', setup['mlp'], '--seeds', '0', '--outdir', str(setup['tmp'] / 'mlp'), '--device', 'cpu'])
    assert result.exit_code == 0, result.output

#----------------------------------------------------------------------------
# The metric arithmetic.

def _spd(n, seed):
    a = np.random.default_rng(seed).standard_normal([n, n + 3])
    return a @ a.T / n


def test_frechet_distance_equals_an_independent_float64_computation():
    mu1, mu2 = np.random.default_rng(0).standard_normal([2, 6])
    s1, s2 = _spd(6, 1), _spd(6, 2)
    # tr sqrtm(s1 s2) = sum of sqrt of the eigenvalues of the symmetric s1^1/2 s2 s1^1/2.
    e, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(e)) @ v.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    reference = np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu1), torch.from_numpy(s1)) == pytest.approx(0, abs=1e-9)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_feature_statistics_are_the_official_ones():
    x = torch.randn(50, 4, dtype=torch.float64) + 3
    mean, cov = feature_statistics(x.float())
    assert torch.allclose(mean, x.float().double().mean(0))
    xd = x.float().double()
    assert torch.allclose(cov, xd.T @ xd / 50 - torch.outer(xd.mean(0), xd.mean(0)), atol=1e-10)   # FeatureStats: divided by N


def test_inception_score_of_known_distributions():
    assert metrics.inception_score(torch.full([20, 5], 0.2)) == pytest.approx(dict(is_mean=1.0, is_std=0.0))
    confident = torch.eye(4).repeat(10, 1) * (1 - 4e-12) + 1e-12      # each split: 4 classes, equally often, each image sure
    assert metrics.inception_score(confident, splits=10)['is_mean'] == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match='at least 10'):
        metrics.inception_score(torch.full([5, 3], 1 / 3))


def test_generated_equal_to_real_scores_perfectly(setup):
    """The training images themselves as the 'generated' set: FID 0, precision, recall, coverage 1."""
    detector = metrics.load_detector(metrics.detector_file(), 'cpu')
    from rtm_mapping.imle import dataset
    images = dataset.load_images(str(setup['data']), RESOLUTION, log=None)
    real = metrics.image_features(detector, [images], device='cpu')
    fake = metrics.image_features(detector, images.split(5), device='cpu', probabilities=True)
    assert real['features'].shape == (NUM_IMAGES, 16) and fake['probs'].shape == (NUM_IMAGES, 1008)
    results = metrics.compute(real, fake, metrics.METRICS)
    assert results['fid'] == pytest.approx(0, abs=1e-6)
    assert results['precision'] == results['recall'] == results['coverage'] == 1.0
    assert results['density'] >= 1 / metrics.PRDC_K and results['is_mean'] >= 1.0


def test_missing_detector_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'empty'))

    def offline(url, path):
        raise OSError('no network')
    monkeypatch.setattr(metrics, '_download', offline)
    with pytest.raises(Exception, match='rtm-mapping detectors install inception /path/to/inception-2015-12-05.pt'):
        metrics.detector_file(log=None)
    assert not os.path.exists(tmp_path / 'empty' / 'downloads') or not os.listdir(tmp_path / 'empty' / 'downloads')

#----------------------------------------------------------------------------
# imle metrics

def _metrics(setup, *args):
    return CliRunner().invoke(metrics.metrics_command, ['--snapshot', setup['rtm'], '--device', 'cpu', '--num-gen', '20', *args])


def test_metrics_command_writes_json_and_caches_the_training_features(setup):
    out = setup['tmp'] / 'm.json'
    result = _metrics(setup, '--out', str(out), '--batch', '8')
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report['num_gen'] == 20 and report['num_real'] == NUM_IMAGES and report['seeds'] == [0, 19]
    assert report['data'] == str(setup['data']) and report['steps'] == 2 and report['weights'] == 'G_ema'
    assert set(report['results']) == {'fid', 'precision', 'recall', 'density', 'coverage', 'is_mean', 'is_std'}
    assert all(np.isfinite(v) for v in report['results'].values()) and report['results']['fid'] > 0
    cached = os.listdir(setup['tmp'] / 'dnnlib' / 'gan-metrics')
    assert len(cached) == 1 and cached[0].startswith('rtm-imle-data-8px-inception-')

    # Again: the cached features, the same numbers (the batch size does not change them beyond float noise).
    mtime = os.stat(setup['tmp'] / 'dnnlib' / 'gan-metrics' / cached[0]).st_mtime_ns
    again = setup['tmp'] / 'again.json'
    assert _metrics(setup, '--out', str(again), '--batch', '8').exit_code == 0
    assert json.loads(again.read_text())['results'] == report['results']
    assert os.stat(setup['tmp'] / 'dnnlib' / 'gan-metrics' / cached[0]).st_mtime_ns == mtime
    # A changed training set is a new cache entry.
    PIL.Image.fromarray(np.zeros([RESOLUTION, RESOLUTION, 3], np.uint8)).save(setup['data'] / 'extra.png')
    result = _metrics(setup, '--out', str(again), '--metrics', 'fid')
    assert result.exit_code == 0, result.output
    assert json.loads(again.read_text())['num_real'] == NUM_IMAGES + 1 and len(os.listdir(setup['tmp'] / 'dnnlib' / 'gan-metrics')) == 2


def test_metrics_command_refusals(setup):
    result = _metrics(setup, '--metrics', 'fid50k_full')
    assert result.exit_code != 0 and 'fid, prdc, is' in result.output
    result = CliRunner().invoke(metrics.metrics_command, ['--snapshot', setup['mlp'], '--device', 'cpu', '--map-h', '3'])
    assert result.exit_code != 0 and 'whose depth is fixed' in result.output
    result = _metrics(setup, '--num-gen', '5')
    assert result.exit_code != 0 and 'at least 10' in result.output

#----------------------------------------------------------------------------
# sweep-h

def test_sweep_h_on_an_imle_snapshot_scores_each_h_on_the_same_seeds(setup):
    out = setup['tmp']
    result = CliRunner().invoke(sweep_h, ['--network', setup['rtm'], '--h', '1,2', '--num-gen', '12', '--device', 'cpu', '--verbose', 'false',
                                          '--out-json', str(out / 's.json'), '--out-md', str(out / 's.md')])
    assert result.exit_code == 0, result.output
    table = json.loads((out / 's.json').read_text())
    assert table['native_h'] == 2 and [r['h'] for r in table['rows']] == [1, 2] and [r['native'] for r in table['rows']] == [False, True]
    assert table['num_gen'] == 12 and table['num_real'] == NUM_IMAGES and table['metrics'] == list(metrics.METRICS)
    assert table['rows'][0]['results'] != table['rows'][1]['results']
    assert '| 2 (native) |' in (out / 's.md').read_text()
    # The native row is what `imle metrics` gives for the same seeds.
    assert _metrics(setup, '--num-gen', '12', '--out', str(out / 'm.json')).exit_code == 0
    assert json.loads((out / 'm.json').read_text())['results'] == pytest.approx(table['rows'][1]['results'])


def test_sweep_h_refuses_what_does_not_apply_to_imle_snapshots(setup):
    def sweep(*args):
        return CliRunner().invoke(sweep_h, ['--network', setup['rtm'], '--device', 'cpu', '--verbose', 'false', '--num-gen', '12', *args])
    result = sweep('--metrics', 'fid50k_full')
    assert result.exit_code != 0 and "rtm-mapping's own metrics" in result.output
    result = CliRunner().invoke(sweep_h, ['--network', setup['rtm'], '--device', 'cpu', '--num-gen', '6'])
    assert result.exit_code != 0 and 'at least 10' in result.output
    result = sweep('--mirror', 'true')
    assert result.exit_code != 0 and 'options for StyleGAN pickles' in result.output
    result = CliRunner().invoke(sweep_h, ['--network', setup['mlp'], '--device', 'cpu', '--num-gen', '12'])
    assert result.exit_code != 0 and 'sweep-h needs a snapshot trained with --map=rtm' in result.output

#----------------------------------------------------------------------------
# The README's quick start.

def test_readme_quick_start_runs(tmp_path, monkeypatch):
    """The RS-IMLE quick start as a user runs it, after its install line, with the stand-in Inception network
    installed first (no download) and without its bench line (tests/test_imle_bench.py runs that part)."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md'), encoding='utf-8').read()
    block, = [b for b in re.findall(r'```bash\n(.*?)```', readme, flags=re.S) if 'imle train --config fewshot-imle-rtm --data imle-data.zip' in b]
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0].startswith('pip install') and lines[-1] == 'rtm-mapping bench --quick --part imle'
    detectors.standin('inception', str(tmp_path / 'inception.pt'), num_features=16)
    script = '\n'.join(['set -euo pipefail', f'rtm-mapping() {{ "{sys.executable}" -m rtm_mapping.cli "$@"; }}',
                        f'rtm-mapping detectors install inception {tmp_path / "inception.pt"}'] + lines[1:-1])
    # One torch thread per command: two threads that spin against other jobs make a loaded 2-core machine much slower.
    out = subprocess.run(['bash', '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, DNNLIB_CACHE_DIR=str(tmp_path / 'dnnlib'), OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(os.listdir(tmp_path / 'imle-out')) == 17 and (tmp_path / 'imle-out-h16' / 'grid.png').is_file()
    report, = (tmp_path / 'imle-runs').glob('*/snapshot-epoch-*-metrics.json')
    assert json.loads(report.read_text())['num_gen'] == 32
    assert '| 8 (native) |' in next(tmp_path.glob('snapshot-epoch-*-sweep-h.md')).read_text()
