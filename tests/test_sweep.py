"""`rtm-mapping sweep-h` on CPU: a tiny RTM pickle, a folder of PNGs, stand-in detectors, tiny metrics.
Skips without STYLEGAN2_ADA_ROOT."""

import copy
import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from rtm_mapping import detectors
from rtm_mapping.metrics import PRDCMetric, register_metrics
from rtm_mapping.sweep import run_sweep, sweep_h

NATIVE_H = 4
NUM_IMAGES = 24
RESOLUTION = 8      # The smallest StyleGAN2 synthesis (blocks at 4 and 8): G dominates the run time on CPU.


def fid_test(opts):
    """fid50k_full at test size: all 24 reference images, 24 fakes."""
    from metrics import frechet_inception_distance
    opts.dataset_kwargs.update(max_size=None, xflip=False)
    return dict(fid_test=frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=NUM_IMAGES))


def failing_test(opts):
    raise RuntimeError('metric failed')


def write_pickle(path, G, data):
    """A snapshot as training_loop.py writes one."""
    from training import networks
    D = networks.Discriminator(c_dim=0, img_resolution=RESOLUTION, img_channels=3, channel_base=256, channel_max=8)
    snapshot = dict(training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(data), use_labels=False,
                                             max_size=None, xflip=False, resolution=RESOLUTION))
    for name, module in [('G', G), ('D', D), ('G_ema', copy.deepcopy(G)), ('augment_pipe', None)]:
        snapshot[name] = None if module is None else copy.deepcopy(module).eval().requires_grad_(False)
    with open(path, 'wb') as f:
        pickle.dump(snapshot, f)
    return path


@pytest.fixture
def setup(stylegan_root, tmp_path, monkeypatch, write_images):
    """Dataset, RTM pickle, stand-in detectors in a dnnlib cache under tmp_path, and the test metrics registered."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    monkeypatch.chdir(tmp_path)
    from metrics import metric_main, metric_utils

    from rtm_mapping import networks
    monkeypatch.setattr(metric_utils, '_feature_detector_cache', dict())
    for name in detectors.NAMES:
        detectors.install(name, detectors.standin(name, str(tmp_path / f'{name}.pt'), num_features=16))
    metric_main.register_metric(fid_test)
    metric_main.register_metric(failing_test)
    register_metrics(PRDCMetric(name='prdc_test', detector='inception', k=3, max_real=None))

    data = write_images(tmp_path / 'data', count=NUM_IMAGES, resolution=RESOLUTION)
    G = networks.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=RESOLUTION, img_channels=3,
                           mapping_kwargs=dict(steps=NATIVE_H, tokens=2, token_dim=8),
                           synthesis_kwargs=dict(channel_base=256, channel_max=8))
    return dict(root=stylegan_root, pkl=write_pickle(tmp_path / 'rtm.pkl', G, data), G=G, data=data, tmp=tmp_path)


def _sweep(setup, *args):
    return CliRunner().invoke(sweep_h, ['--network', str(setup['pkl']), '--stylegan', setup['root'], '--device', 'cpu',
                                        '--verbose', 'false', *args])


def test_sweep_writes_one_table(setup):
    out = setup['tmp']
    result = _sweep(setup, '--metrics', 'fid_test,prdc_test', '--map-h', f'2,{NATIVE_H}', '--out-json', str(out / 't.json'), '--out-md', str(out / 't.md'))
    assert result.exit_code == 0, result.output
    table = json.loads((out / 't.json').read_text())
    assert table['native_h'] == NATIVE_H and [row['h'] for row in table['rows']] == [2, NATIVE_H]
    assert [row['native'] for row in table['rows']] == [False, True]
    keys = ['fid_test', 'prdc_test_precision', 'prdc_test_recall', 'prdc_test_density', 'prdc_test_coverage']
    assert all(list(row['results']) == keys for row in table['rows'])
    assert table['rows'][0]['results']['fid_test'] != table['rows'][1]['results']['fid_test']     # H reached G.
    markdown = (out / 't.md').read_text()
    assert '| H | ' + ' | '.join(keys) + ' |' in markdown and f'| {NATIVE_H} (native) |' in markdown
    assert markdown in result.output

    # Same seed at every H: the native row alone, in another run, gives the same numbers.
    again = _sweep(setup, '--metrics', 'fid_test', '--map-h', str(NATIVE_H))
    assert again.exit_code == 0, again.output
    assert json.loads((out / 'rtm-sweep-h.json').read_text())['rows'][0]['results']['fid_test'] == table['rows'][1]['results']['fid_test']


def test_h_and_torch_are_restored_when_a_metric_fails(setup):
    from metrics import metric_utils, perceptual_path_length
    G = setup['G']
    with pytest.raises(RuntimeError, match='metric failed'):
        run_sweep(G, ['failing_test'], [8, 16], dict(class_name='training.dataset.ImageFolderDataset', path=str(setup['data'])),
                  torch.device('cpu'))
    assert G.mapping.rtm.steps == NATIVE_H
    assert metric_utils.torch is torch and perceptual_path_length.torch is torch   # the CPU substitution ends with the sweep


def test_refuses_a_pickle_without_rtm(setup):
    from training import networks
    G = networks.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=RESOLUTION, img_channels=3, mapping_kwargs=dict(num_layers=2),
                           synthesis_kwargs=dict(channel_base=256, channel_max=8))
    setup['pkl'] = write_pickle(setup['tmp'] / 'mlp.pkl', G, setup['data'])
    result = _sweep(setup, '--metrics', 'fid_test')
    assert result.exit_code == 1 and 'has no Recursive Token Mapper' in result.output and 'calc_metrics.py' in result.output


def test_rejects_unknown_metrics_and_bad_h(setup):
    result = _sweep(setup, '--metrics', 'fid50k_fulll')
    assert result.exit_code == 1 and 'Unknown metric(s) fid50k_fulll' in result.output and 'prdc_full' in result.output
    result = _sweep(setup, '--metrics', 'fid_test', '--h', '8,0')     # --h: --map-h's other name
    assert result.exit_code == 2 and 'distinct positive integers' in result.output


def test_offline_user_is_told_how_to_install_detectors(setup, monkeypatch):
    import dnnlib

    def offline(url, **kwargs):     # Local files open, downloads fail: a machine without network access.
        if '://' not in url:
            return open(url, 'rb')
        raise ConnectionError(f'cannot reach {url}')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(setup['tmp'] / 'empty'))
    monkeypatch.setattr(dnnlib.util, 'open_url', offline)
    result = CliRunner().invoke(sweep_h, ['--network', str(setup['pkl']), '--stylegan', setup['root'], '--device', 'cpu',
                                          '--verbose', 'false', '--metrics', 'prdc_vgg_full'])
    assert result.exit_code == 1
    assert 'rtm-mapping detectors install vgg16 /path/to/vgg16.pt' in result.output and detectors.DETECTORS['stylegan2-ada']['vgg16'] in result.output
