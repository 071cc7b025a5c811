"""PRDC math (no checkout needed), the detector cache hook, and the registered metrics end to end
(with a stand-in feature network; these skip without STYLEGAN2_ADA_ROOT)."""

import hashlib
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from rtm_mapping import detectors
from rtm_mapping.metrics import METRICS, PRDCMetric, detectors_needed, knn_radii, prdc
from stylegan2_ada_patch import cpu

#----------------------------------------------------------------------------
# The math.

def _t(values):
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), -1)


def test_knn_radius_excludes_the_point_itself():
    x = _t([0, 1, 3])
    assert knn_radii(x, k=1).tolist() == [1, 1, 2]
    assert knn_radii(x, k=2).tolist() == [3, 2, 3]
    with pytest.raises(ValueError, match='k must be'):
        knn_radii(x, k=3)   # Only 2 other points.


def test_hand_computed_case():
    # Reals 0, 1, 3, 20 have k=1 radii 1, 1, 2, 17; fakes 0.5, 2.5, 10 have radii 2, 2, 7.5.
    # Precision: every fake lies in some real ball (10 in the outlier 20's ball of radius 17).
    # Recall: 20 is in no fake ball. Density: fake 0.5 is in 2 real balls, 2.5 in 1, 10 in 1 -> 4 / (1 * 3).
    # Coverage: each real's nearest fake is inside its ball.
    result = prdc(_t([0, 1, 3, 20]), _t([0.5, 2.5, 10]), k=1)
    assert result == pytest.approx(dict(precision=1.0, recall=0.75, density=4 / 3, coverage=1.0))


def test_balls_are_open():
    # Fake radii (k=1) are both 1; real 0 is at exactly distance 1 from fake 1: not inside (Naeem et al.'s `<`).
    result = prdc(_t([0, 4]), _t([1, 2]), k=1)
    assert result == pytest.approx(dict(precision=1.0, recall=0.0, density=2.0, coverage=1.0))


def test_identical_sets():
    x = torch.randn([300, 16], generator=torch.Generator().manual_seed(1))
    result = prdc(x, x.clone(), k=5)
    assert result['precision'] == result['recall'] == result['coverage'] == 1.0
    assert result['density'] == pytest.approx(1.0, abs=0.02)    # Exactly 1 up to ties at the ball boundaries.


def test_far_disjoint_sets():
    x = torch.randn([200, 8], generator=torch.Generator().manual_seed(2))
    result = prdc(x, x[:150] + 1000, k=5)
    assert result == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


def _brute_force(real, fake, k):
    """The definitions, written once more in float64 numpy with whole distance matrices."""
    real, fake = real.double().numpy(), fake.double().numpy()
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    real_radii = np.sort(dist(real, real), axis=1)[:, k]
    fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)                                        # [N, M]
    inside_real = d < real_radii[:, None]
    return dict(
        precision = inside_real.any(axis=0).mean(),
        recall    = (d < fake_radii[None, :]).any(axis=1).mean(),
        density   = inside_real.sum(axis=0).mean() / k,
        coverage  = inside_real.any(axis=1).mean(),
    )


@pytest.mark.parametrize('row_batch_size,col_batch_size', [(7, 11), (64, 5), (1000, 1000)])
def test_blocks_match_brute_force(row_batch_size, col_batch_size):
    g = torch.Generator().manual_seed(3)
    real = torch.randn([230, 12], generator=g)
    fake = torch.randn([170, 12], generator=g) * 1.3 + 0.2
    result = prdc(real, fake, k=5, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    assert result == pytest.approx(_brute_force(real, fake, k=5), abs=1e-9)
    assert 0 < result['precision'] < 1 and 0 < result['recall'] < 1     # A case that tells the four apart.


@pytest.mark.parametrize('offset', [100.0, 1000.0])
def test_features_far_from_the_origin_match_brute_force(offset):
    # A distance through the matrix product, |x|^2 + |y|^2 - 2 x.y, cancels when features share a large offset
    # (float32 with every feature + 100 moved precision by 0.01 against the reference prdc package).
    g = torch.Generator().manual_seed(4)
    real = torch.randn([400, 32], generator=g)
    fake = torch.randn([300, 32], generator=g) * 1.1 + 0.05
    real, fake = real + offset, fake + offset          # float32 features, as the detectors return them
    expected = _brute_force(real, fake, k=5)
    assert 0 < expected['precision'] < 1 and 0 < expected['coverage'] < 1
    for row_batch_size, col_batch_size in [(64, 37), (1000, 1000)]:
        result = prdc(real, fake, k=5, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
        assert result == pytest.approx(expected, abs=1e-9), (row_batch_size, col_batch_size)
    radii = knn_radii(real, k=5, row_batch_size=64, col_batch_size=37)
    x = real.double().numpy()
    exact = np.sort(np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)), axis=1)[:, 5]
    np.testing.assert_allclose(radii.numpy(), exact, rtol=1e-9)


def test_docs_table_describes_the_registered_metrics():
    """docs/metrics.md's table of metrics (features, k, image counts) says what METRICS computes."""
    path = os.path.join(os.path.dirname(__file__), '..', 'docs', 'metrics.md')
    rows = {}
    for line in open(path, encoding='utf-8'):
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if line.startswith('| `') and len(cells) == 6:
            rows[cells[0].strip('`')] = cells
    assert set(rows) == set(METRICS)
    features = {'inception': 'Inception-v3', 'vgg16': 'VGG16'}
    for name, (_, feature, k, reference, generated, _) in rows.items():
        metric = METRICS[name]
        assert feature.startswith(features[metric.detector]) and int(k) == metric.k, name
        assert metric.num_gen is None and generated in ('as many as reference images', 'same'), name
        assert metric.max_real == 200000 and reference in ('the dataset, no x-flips, at most 200k', 'same'), name

#----------------------------------------------------------------------------
# Detector hook.

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    monkeypatch.delitem(__import__('sys').modules, 'dnnlib', raising=False)   # Use the environment, as dnnlib does.
    return tmp_path / 'dnnlib' / 'downloads'


def test_install_uses_open_urls_cache_name(cache, tmp_path):
    url = detectors.DETECTORS['stylegan2-ada']['inception']
    path = detectors.install('inception', detectors.standin('inception', str(tmp_path / 'inception.pt'), num_features=8))
    assert path == str(cache / f'{hashlib.md5(url.encode()).hexdigest()}_inception-2015-12-05.pt')
    assert detectors.missing(detectors_needed(['fid50k_full', 'prdc_full', 'pr50k3_full', 'prdc_vgg_full'])) == ['vgg16']
    assert detectors.missing(detectors_needed(['fid50k_full', 'is50k'])) == []
    assert detectors.missing(detectors_needed(['fid50k_full']), 'stylegan3') == ['inception']   # StyleGAN3 loads a pickle from elsewhere


def test_a_pickle_installs_where_stylegan3_looks(cache, tmp_path):
    url = detectors.DETECTORS['stylegan3']['vgg16']
    path = detectors.install('vgg16', detectors.standin('vgg16', str(tmp_path / 'vgg16.pkl'), num_features=8))
    assert path == str(cache / f'{hashlib.md5(url.encode()).hexdigest()}_vgg16.pkl')
    assert detectors.cached_files('vgg16', 'stylegan3') == [path] and detectors.cached_files('vgg16') == []
    with open(path, 'rb') as f:
        assert pickle.load(f)(torch.zeros([2, 3, 8, 8], dtype=torch.uint8), return_features=True).shape == (2, 8)
    assert detectors_needed(['eqt50k_int', 'prdc_vgg_full']) == ['vgg16']


def test_install_keeps_a_backup_of_a_different_copy(cache, tmp_path):
    first = detectors.standin('vgg16', str(tmp_path / 'a.pt'), num_features=8)
    second = detectors.standin('vgg16', str(tmp_path / 'b.pt'), num_features=9)
    target = detectors.install('vgg16', first)
    assert detectors.install('vgg16', first) == target and len(os.listdir(cache)) == 1      # Same bytes: nothing to do.
    detectors.install('vgg16', second)
    backups = [f for f in os.listdir(cache) if f.startswith('backup-')]
    assert len(backups) == 1 and open(cache / backups[0], 'rb').read() == open(first, 'rb').read()
    assert detectors.cached_files('vgg16') == [target] and open(target, 'rb').read() == open(second, 'rb').read()


def test_install_refuses_a_file_that_is_not_torchscript(cache, tmp_path):
    bad = tmp_path / 'vgg16.pt'
    bad.write_bytes(b'<html>not a network</html>')
    result = CliRunner().invoke(detectors.detectors, ['install', 'vgg16', str(bad)])
    assert result.exit_code == 1 and 'not a TorchScript file' in result.output
    assert not cache.exists() or detectors.cached_files('vgg16') == []


def test_docs_install_command(cache, tmp_path):
    local = detectors.standin('inception', str(tmp_path / 'inception-2015-12-05.pt'), num_features=8)
    result = CliRunner().invoke(detectors.detectors, ['install', 'inception', local])
    assert result.exit_code == 0, result.output
    listing = CliRunner().invoke(detectors.detectors, ['list']).output
    assert 'inception  cached' in listing and 'vgg16      not cached' in listing


def test_offline_help_names_the_command():
    text = detectors.offline_help(['vgg16'])
    assert detectors.DETECTORS['stylegan2-ada']['vgg16'] in text and 'rtm-mapping detectors install vgg16 /path/to/vgg16.pt' in text
    text = detectors.offline_help(['vgg16'], 'stylegan3')
    assert detectors.DETECTORS['stylegan3']['vgg16'] in text and 'rtm-mapping detectors install vgg16 /path/to/vgg16.pkl' in text


def test_standin_signatures(tmp_path):
    inception = torch.jit.load(detectors.standin('inception', str(tmp_path / 'i.pt')))
    vgg = torch.jit.load(detectors.standin('vgg16', str(tmp_path / 'v.pt'), num_features=32))
    images = torch.randint(0, 256, [5, 3, 16, 16], dtype=torch.uint8)
    assert inception(images, return_features=True).shape == (5, 2048)
    probs = inception(images, no_output_bias=True)
    assert probs.shape == (5, 1008) and torch.allclose(probs.sum(1), torch.ones(5))
    assert vgg(images, return_features=True).shape == (5, 32)
    assert torch.allclose(vgg(images.float(), resize_images=False, return_lpips=True).norm(dim=1), torch.ones(5))

#----------------------------------------------------------------------------
# Registered metrics through the official pipeline (stand-in detectors, tiny sizes).

@pytest.fixture
def official_metrics(stylegan_root, tmp_path, monkeypatch):
    """The official metric modules, with the stand-in detectors installed in a fresh dnnlib cache under tmp_path."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    from metrics import metric_main, metric_utils
    for name in detectors.NAMES:
        detectors.install(name, detectors.standin(name, str(tmp_path / f'{name}.pt'), num_features=16))
    monkeypatch.setattr(metric_utils, '_feature_detector_cache', dict())
    monkeypatch.setattr(metric_main, '_metric_dict', dict(metric_main._metric_dict))   # Registrations last for the test only.
    monkeypatch.setattr(metric_utils, 'torch', cpu.CPU_TORCH)  # Its label pinning needs an accelerator; only for this test.
    return metric_main


class ReplayGenerator(torch.nn.Module):
    """Returns the dataset's images in order, as [-1, 1] floats that metric_utils turns back into the same uint8,
    then white images: a metric that takes more fakes than reference images sees far outliers."""
    produced = 0    # Class attribute: metric_utils deep-copies G.

    def __init__(self, images):
        super().__init__()
        self.z_dim, self.c_dim = 4, 0
        self.register_buffer('images', torch.cat([(images.to(torch.float32) - 127.5) / 127.5, torch.ones_like(images[:1], dtype=torch.float32)]))

    def forward(self, z, c, **kwargs):
        index = torch.arange(ReplayGenerator.produced, ReplayGenerator.produced + z.shape[0]).clamp(max=len(self.images) - 1)
        ReplayGenerator.produced += z.shape[0]
        return self.images[index]


def test_registered_metrics_run_by_name(official_metrics, tmp_path, write_images):
    """--metrics=prdc_full,prdc_vgg_full: each runs on its own detector, with as many fakes as reference images
    (a generator that replays the data scores 1, and a 25th fake, an outlier, would lower precision)."""
    from metrics import metric_utils

    from rtm_mapping.metrics import register_metrics
    data = write_images(tmp_path / 'data', count=24)
    images = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(data / f'{i:03d}.png')).transpose(2, 0, 1) for i in range(24)]))
    register_metrics()
    for name, metric in METRICS.items():
        metric_utils._feature_detector_cache.clear()
        ReplayGenerator.produced = 0
        result = official_metrics.calc_metric(name, G=ReplayGenerator(images), device=torch.device('cpu'),
                                              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(data)))
        assert [url for url, _ in metric_utils._feature_detector_cache] == [detectors.DETECTORS['stylegan2-ada'][metric.detector]], name
        values = {key[len(name) + 1:]: value for key, value in result.results.items()}
        assert values.keys() == {'precision', 'recall', 'density', 'coverage'}, name
        assert values['precision'] == values['recall'] == values['coverage'] == 1.0 and values['density'] > 0, name


def test_as_many_fakes_as_reference_images_equal_to_the_data_score_perfectly(official_metrics, tmp_path, write_images):
    from rtm_mapping.metrics import register_metrics
    data = write_images(tmp_path / 'data', count=24)
    # k = 1: a real image without its copy among the fakes is not covered (its nearest fake is a real
    # at least its own 1-NN distance away), so coverage = 1 needs all 24 copies.
    register_metrics(PRDCMetric(name='prdc_test', detector='vgg16', k=1, max_real=None))
    images = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(data / f'{i:03d}.png')).transpose(2, 0, 1) for i in range(24)]))
    ReplayGenerator.produced = 0
    result = official_metrics.calc_metric('prdc_test', G=ReplayGenerator(images), device=torch.device('cpu'),
                                          dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(data)))
    assert result.results.prdc_test_precision == 1.0        # No white outlier: at most 24 fakes.
    assert result.results.prdc_test_recall == result.results.prdc_test_coverage == 1.0     # Every real has its copy: 24 fakes.
    assert result.results.prdc_test_density == 1.0

#----------------------------------------------------------------------------
