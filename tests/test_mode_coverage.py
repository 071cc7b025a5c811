"""`rtm-mapping mode-coverage`: the metrics on hand-made samples, the datasets, the statistics, and the
--quick pipeline end to end (files, keys, ranges, determinism). Nothing here asserts which mapper wins."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rtm_mapping import mode_coverage as mc
from rtm_mapping.cli import main

#----------------------------------------------------------------------------
# Metrics on hand-made samples.

@pytest.mark.parametrize('name', list(mc.DATASETS))
def test_samples_at_the_modes_cover_every_mode(name):
    dataset = mc.DATASETS[name]()
    samples = dataset.means.repeat(30, 1)
    stats = mc.mode_statistics(samples, dataset, min_count=20)
    assert stats['covered'] == dataset.modes and stats['covered_share'] == 1.0
    assert stats['high_quality'] == 1.0
    assert stats['kl_uniform'] == pytest.approx(0.0, abs=1e-12)


def test_samples_at_one_mode_cover_one_mode():
    dataset = mc.DATASETS['grid25']()
    samples = dataset.means[7].repeat(500, 1)
    stats = mc.mode_statistics(samples, dataset, min_count=20)
    assert stats['covered'] == 1 and stats['high_quality'] == 1.0
    assert stats['kl_uniform'] == pytest.approx(math.log(25))


def test_high_quality_radius_and_min_count():
    dataset = mc.DATASETS['ring8']()
    assert dataset.radius == pytest.approx(3 * dataset.std)           # 3 sigma in 2-D, as PacGAN
    mode = dataset.means[2]
    inside = mode + torch.tensor([0.99 * dataset.radius, 0.0])
    outside = mode + torch.tensor([0.0, 1.01 * dataset.radius])
    stats = mc.mode_statistics(torch.stack([inside] * 19 + [outside] * 21), dataset, min_count=20)
    assert stats['high_quality'] == pytest.approx(19 / 40) and stats['covered'] == 0   # 19 high-quality < 20
    stats = mc.mode_statistics(torch.stack([inside] * 20), dataset, min_count=20)
    assert stats['covered'] == 1


def test_far_samples_are_not_high_quality():
    dataset = mc.DATASETS['cube100']()
    stats = mc.mode_statistics(torch.full([300, 64], 10.0), dataset, min_count=1)
    assert stats['covered'] == 0 and stats['high_quality'] == 0.0


def test_mode_statistics_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r'\[num, 2\]'):
        mc.mode_statistics(torch.zeros(10, 3), mc.DATASETS['ring8'](), min_count=1)

#----------------------------------------------------------------------------
# The datasets.

@pytest.mark.parametrize('name, modes, dim', [('ring8', 8, 2), ('grid25', 25, 2), ('cube100', 100, 64)])
def test_true_samples_score_as_a_perfect_generator(name, modes, dim):
    dataset = mc.DATASETS[name]()
    assert (dataset.modes, dataset.dim) == (modes, dim)
    # High-quality balls do not overlap, so the nearest mode of a high-quality sample is its own.
    gaps = torch.cdist(dataset.means, dataset.means) + 1e9 * torch.eye(modes)
    assert float(gaps.min()) > 2 * dataset.radius
    samples = dataset.sample(100 * modes, torch.Generator().manual_seed(0))
    stats = mc.mode_statistics(samples, dataset, min_count=20)
    assert stats['covered'] == modes
    assert abs(stats['high_quality'] - mc.HIGH_QUALITY_PROB) < 0.01   # 98.9% by construction of the radius
    assert stats['kl_uniform'] < 0.05


def test_cube_is_fixed_and_on_hypercube_corners():
    a, b = mc.DATASETS['cube100']().means, mc.DATASETS['cube100']().means
    assert torch.equal(a, b)
    # Orthonormal embedding of {-1, 1}^10: every mode has norm sqrt(10), distances are 2 sqrt(Hamming).
    assert torch.allclose(a.norm(dim=1), torch.full([100], math.sqrt(10)), atol=1e-4)
    distances = torch.cdist(a.double(), a.double())[~torch.eye(100, dtype=torch.bool)]
    assert torch.allclose((distances / 2).square(), (distances / 2).square().round(), atol=1e-3)

#----------------------------------------------------------------------------
# Statistics.

def test_bootstrap_median_interval():
    s = mc.bootstrap_median([3.0, 1.0, 2.0, 5.0, 4.0])
    assert s['median'] == 3.0 and 1.0 <= s['low'] <= 3.0 <= s['high'] <= 5.0 and s['low'] < s['high']
    assert mc.bootstrap_median([3.0, 1.0, 2.0, 5.0, 4.0]) == s                  # fixed bootstrap RNG
    assert mc.bootstrap_median([2.0] * 5) == dict(median=2.0, low=2.0, high=2.0)
    with pytest.raises(ValueError):
        mc.bootstrap_median([])


def test_summarize_pairs_by_seed():
    def run(mapper, seed, covered):
        return dict(dataset='ring8', mapper=mapper, seed=seed, figures={m: float(covered) for m in mc.METRICS})
    runs = [run('MLP-2', s, s) for s in range(5)] + [run('RTM-H16', s, s + 2) for s in reversed(range(5))]
    summary = mc.summarize(runs)['ring8']
    assert 'paired' not in summary['MLP-2']
    assert summary['RTM-H16']['paired']['covered'] == dict(median=2.0, low=2.0, high=2.0)
    assert summary['RTM-H16']['metrics']['covered']['median'] == 4.0 and summary['RTM-H16']['seeds'] == [0, 1, 2, 3, 4]

#----------------------------------------------------------------------------
# The command, end to end, in quick mode.

QUICK = ['mode-coverage', '--quick', '--dataset', 'ring8', '--mapper', 'MLP-2', '--mapper', 'RTM-H4']


def _run(out, *extra):
    result = CliRunner().invoke(main, QUICK + ['--out', str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / 'mode-coverage.json').read_text())


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """One --quick run on one worker: (output folder, results, whether RNG and thread count were left as they were)."""
    out = tmp_path_factory.mktemp('mode-coverage')
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    results = _run(out, '--workers', '1')
    return out, results, torch.equal(torch.random.get_rng_state(), rng_state) and torch.get_num_threads() == threads


def test_quick_run_writes_results(quick):
    out, results, state_kept = quick
    assert state_kept
    assert {'config', 'baseline', 'datasets', 'mappers', 'runs', 'summary', 'timing', 'machine'} <= set(results)
    assert results['machine']['torch'] == torch.__version__ and results['timing']['wall_seconds'] > 0
    assert results['mappers']['MLP-2']['params'] == 2 * (64 * 64 + 64)
    seeds = results['config']['seed_list']
    assert [(r['mapper'], r['seed']) for r in results['runs']] == [(m, s) for m in ('MLP-2', 'RTM-H4') for s in seeds]
    for run in results['runs']:
        f = run['figures']
        assert 0 <= f['covered'] <= 8 and f['covered_share'] == f['covered'] / 8
        assert 0 <= f['kl_uniform'] <= math.log(8) + 1e-9
        assert all(0 <= f[k] <= 1 for k in ('high_quality', 'precision', 'recall', 'coverage')) and f['density'] >= 0
    summary = results['summary']['ring8']
    for entry in summary.values():
        for m in mc.METRICS:
            s = entry['metrics'][m]
            assert s['low'] <= s['median'] <= s['high']
    assert 'paired' in summary['RTM-H4'] and 'paired' not in summary['MLP-2']

    table = (out / 'mode-coverage.md').read_text()
    assert '| RTM-H4 | 10,516 |' in table and 'Paired differences against MLP-2' in table
    with Image.open(out / 'mode-coverage-ring8.png') as png:
        assert png.size == (170 * len(seeds), 170 * 2)
        colours = np.unique(np.asarray(png.convert('RGB')).reshape(-1, 3), axis=0)
        assert len(colours) > 3     # background, frames, mode circles, samples, text
    assert not (out / 'mode-coverage-cube100.png').exists()


def test_quick_run_is_deterministic_for_a_seed_and_any_workers(quick, tmp_path):
    _, first, _ = quick
    second = _run(tmp_path, '--workers', '2')
    assert [r['figures'] for r in first['runs']] == [r['figures'] for r in second['runs']]
    assert first['summary'] == second['summary']


def test_one_seed_is_refused(tmp_path):
    result = CliRunner().invoke(main, QUICK + ['--seeds', '1', '--out', str(tmp_path)])
    assert result.exit_code != 0 and '--seeds must be at least 2' in result.output
