"""rtm-mapping in NVIDIA's StyleGAN3 code (needs STYLEGAN3_ROOT): the RTM generators of both of its
families (networks_stylegan2.py for --cfg=stylegan2, networks_stylegan3.py for stylegan3-t/r), their
pickles without rtm-mapping, the train.py patch, CPU smoke runs and the tools on its pickles."""

import importlib
import inspect
import io
import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import SHIM_PATHS, copy_checkout, original_init, run_patch, run_stock, snapshot, train_py_runs, training_options
from conftest import stock_snapshot as stock_pickle

# family: (our adapter, the official module it extends, small synthesis arguments)
FAMILIES = {
    'stylegan2': ('rtm_mapping.networks_stylegan2', 'training.networks_stylegan2', dict(channel_base=256, channel_max=32)),
    'stylegan3': ('rtm_mapping.networks_stylegan3', 'training.networks_stylegan3', dict(channel_base=256, channel_max=32)),
}
RTM = dict(steps=3, tokens=4, token_dim=8)


def modules(family):
    ours, official, _ = FAMILIES[family]
    return importlib.import_module(ours), importlib.import_module(official)


def build(family, c_dim=0, official=False, **mapping_kwargs):
    """A small Generator of a family: ours (RTM) or the official one (MLP)."""
    ours, theirs = modules(family)
    cls = theirs.Generator if official else ours.Generator
    kwargs = {} if official else dict(RTM, **mapping_kwargs)
    return cls(z_dim=32, c_dim=c_dim, w_dim=32, img_resolution=16, img_channels=3, mapping_kwargs=kwargs,
               num_fp16_res=0, conv_clamp=None, **FAMILIES[family][2])


def build_d(c_dim=0):
    from training import networks_stylegan2
    return networks_stylegan2.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                                            num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))


def labels(n, c_dim):
    return torch.eye(c_dim)[torch.arange(n) % c_dim] if c_dim else torch.zeros(n, 0)


#----------------------------------------------------------------------------
# Networks.

@pytest.mark.parametrize('family', FAMILIES)
def test_signatures_are_the_official_ones(stylegan3_root, family):
    ours, theirs = modules(family)
    for name in ('MappingNetwork', 'Generator'):
        mine, official = getattr(ours, name), getattr(theirs, name)
        assert issubclass(mine, official)
        params = inspect.signature(original_init(mine)).parameters
        for arg, param in inspect.signature(original_init(official)).parameters.items():
            default = None if arg == 'mapping_kwargs' else param.default   # None instead of a mutable {}
            assert arg in params and params[arg].default == default and params[arg].kind == param.kind, (name, arg)
        assert inspect.signature(mine.forward) == inspect.signature(official.forward), name
    assert inspect.signature(original_init(ours.MappingNetwork)).parameters['w_avg_beta'].default == 0.998


@pytest.mark.parametrize('family', FAMILIES)
def test_generator_built_by_name(stylegan3_root, family):
    import dnnlib
    G = dnnlib.util.construct_class_by_name(class_name=f'{FAMILIES[family][0]}.Generator', z_dim=32, c_dim=0, w_dim=32,
                                            img_resolution=16, img_channels=3, mapping_kwargs=RTM, num_fp16_res=0, **FAMILIES[family][2])
    assert G.init_kwargs.mapping_kwargs == RTM and G.init_kwargs.channel_base == 256   # synthesis arguments stay flat
    assert G.mapping.rtm.steps == 3 and G.mapping.num_ws == G.num_ws == G.synthesis.num_ws
    assert not [name for name, _ in G.mapping.named_parameters() if name.startswith('fc')]
    img = G(torch.randn(2, 32), None, noise_mode='const')
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('c_dim', [0, 5])
def test_mapping_keeps_official_semantics(stylegan3_root, family, c_dim):
    G, official = build(family, c_dim=c_dim), build(family, c_dim=c_dim, official=True)
    m = G.mapping.train()
    z, c = torch.randn(8, 32), labels(8, c_dim)

    # The RTM receives exactly the official mapper's input (the official mapping without layers returns it).
    ref = type(official.mapping)(z_dim=32, c_dim=c_dim, w_dim=32, num_ws=G.num_ws, num_layers=0)
    if c_dim:
        ref.embed.load_state_dict(m.embed.state_dict())
    assert torch.equal(m.mapper_input(z, c), ref(z, c)[:, 0]) and m.mapper_input(z, c).dtype == torch.float32

    # w_avg moves only with update_emas=True, as in StyleGAN3 (not with train mode, as in StyleGAN2-ADA).
    ws = m(z, c)
    assert ws.shape == (8, G.num_ws, 32) and torch.equal(ws[:, 0], ws[:, -1])
    assert torch.equal(m.w_avg, torch.zeros(32))
    m.eval()(z, c, update_emas=True)
    torch.testing.assert_close(m.w_avg, ws[:, 0].mean(0) * (1 - 0.998))   # lerp from zeros
    m(torch.full([8, 32], float('nan')), c, update_emas=True)
    assert torch.isfinite(m.w_avg).all()

    w = m(z, c)
    torch.testing.assert_close(m(z, c, truncation_psi=0.5), m.w_avg.lerp(w, 0.5))
    cut = m(z, c, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], m.w_avg.lerp(w[:, :2], 0.5))
    assert torch.equal(cut[:, 2:], w[:, 2:])
    if c_dim:
        assert not torch.allclose(m(z, c), m(z, c.roll(1, dims=1)))


@pytest.mark.parametrize('family', FAMILIES)
def test_official_loss_phases(stylegan3_root, family):
    from training.loss import StyleGAN2Loss
    G, D = build(family, c_dim=3).train(), build_d(c_dim=3).train()
    extra = dict(style_mixing_prob=1.0, pl_weight=2) if family == 'stylegan2' else dict(blur_init_sigma=2, blur_fade_kimg=1)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, r1_gamma=1.0, **extra)
    real, c = torch.randn(4, 3, 16, 16), labels(4, 3)
    before = G.mapping.w_avg.clone()
    phases = [('Gmain', G), ('Greg', G), ('Dmain', D), ('Dreg', D)] if family == 'stylegan2' else [('Gmain', G), ('Dmain', D), ('Dreg', D)]
    for phase, module in phases:   # Greg is path length regularisation, off for stylegan3-t/r
        for net in (G, D):
            net.requires_grad_(net is module)
            net.zero_grad(set_to_none=True)
        loss.accumulate_gradients(phase=phase, real_img=real, real_c=c, gen_z=torch.randn(4, 32), gen_c=c, gain=1, cur_nimg=0)
        grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
        assert grads and all(torch.isfinite(g).all() for g in grads.values()), phase
        if phase in ('Gmain', 'Greg'):
            rtm = [g for name, g in grads.items() if name.startswith('mapping.rtm.')]
            assert len(rtm) == len(list(G.mapping.rtm.parameters())) and all(g.abs().sum() > 0 for g in rtm), phase
    assert not torch.equal(G.mapping.w_avg, before)   # Dmain runs G with update_emas=True


@pytest.mark.parametrize('family, c_dim', [('stylegan2', 3), ('stylegan3', 0)])
def test_pickles_load_and_run_without_the_package(stylegan3_root, tmp_path, family, c_dim):
    G = build(family, c_dim=c_dim)
    data = snapshot(G, build_d(c_dim=c_dim))
    z, c = torch.randn(4, 32), labels(4, c_dim)
    with open(tmp_path / 'snapshot.pkl', 'wb') as f:
        pickle.dump(data, f)
    G_ema = data['G_ema']
    torch.save(dict(z=z, c=c, img=G_ema(z, c, truncation_psi=0.7, noise_mode='const'), w=G_ema.mapping(z, c)), tmp_path / 'ref.pt')

    out = run_stock('''
        import sys, torch, legacy
        ref = torch.load('ref.pt')
        with open('snapshot.pkl', 'rb') as f:
            G_ema = legacy.load_network_pkl(f)['G_ema']
        assert not [m for m in sys.modules if m.startswith('rtm_mapping')]
        img = G_ema(ref['z'], ref['c'], truncation_psi=0.7, noise_mode='const')
        assert torch.equal(img, ref['img']), (img - ref['img']).abs().max()
        with open('snapshot.pkl', 'rb') as f:
            rebuilt = legacy.load_network_pkl(f, force_fp16=True)['G_ema']
        assert rebuilt.init_kwargs.num_fp16_res == 4 and hasattr(rebuilt.mapping, 'rtm')
        assert torch.equal(rebuilt.mapping(ref['z'], ref['c']), ref['w'])
        print('ok', type(rebuilt.mapping).__name__, rebuilt.mapping.rtm.steps)
    ''', tmp_path, stylegan3_root)
    assert out.strip() == 'ok MappingNetwork 3'


def test_two_pickles_with_different_cores_each_run_with_their_own(stylegan3_root, tmp_path):
    # Both families' adapters, in pickles of this rtm-mapping and of one whose core differs, loaded in one process.
    from conftest import check_two_core_versions
    D = dict(class_name='training.networks_stylegan2.Discriminator', c_dim=0, img_resolution=16, img_channels=3, channel_base=256,
             channel_max=32, num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))
    specs = [dict(G=dict(class_name=f'{adapter}.Generator', z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3,
                         mapping_kwargs=RTM, num_fp16_res=0, conv_clamp=None, **synthesis), D=D)
             for adapter, _, synthesis in FAMILIES.values()]
    check_two_core_versions(tmp_path, stylegan3_root, specs, adapters=[adapter for adapter, _, _ in FAMILIES.values()])


def test_force_fp16_rebuild_keeps_rtm(stylegan3_root):
    import legacy
    G = build('stylegan3', block='attention', token_dim=16)
    buf = io.BytesIO()
    pickle.dump(snapshot(G, build_d()), buf)
    buf.seek(0)
    rebuilt = legacy.load_network_pkl(buf, force_fp16=True)['G_ema']
    assert rebuilt.init_kwargs.num_fp16_res == 4 and rebuilt.mapping.rtm.block_name == 'attention'
    z = torch.randn(2, 32)
    assert torch.equal(rebuilt.mapping(z, None), G.eval().mapping(z, None))

#----------------------------------------------------------------------------
# The patch of StyleGAN3's train.py and calc_metrics.py.

@pytest.fixture
def sg3_checkout(stylegan3_root, tmp_path):
    """A private copy of the StyleGAN3 checkout, so that patching never touches the user's files."""
    return copy_checkout(stylegan3_root, tmp_path / 'stylegan3', ignore=('docs', 'gui_utils', 'viz'))


def test_edited_train_py_is_refused_untouched(sg3_checkout):
    train = sg3_checkout / 'train.py'
    text = train.read_text().replace('def main(**kwargs):', 'def main(**options):')
    train.write_text(text)
    code, out = run_patch(sg3_checkout)
    assert code != 0 and 'not a StyleGAN3 train.py we recognise' in out and "'def main(**kwargs):'" in out
    assert train.read_text() == text and not (sg3_checkout / 'train.py.rtm-orig').exists()


def shim_env():
    """The environment of the official scripts: tests/shims last on the path where there is no pkg_resources (see conftest)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in [os.environ.get('PYTHONPATH'), *SHIM_PATHS] if p]), PYTHONDONTWRITEBYTECODE='1')


def train(root, *args, timeout=300):
    return subprocess.run([sys.executable, 'train.py', '--outdir', str(root / 'runs'), '--data', str(root / 'data.zip'), '--gpus=1',
                           '--batch=4', '--gamma=1', *args], cwd=root, env=shim_env(), capture_output=True, text=True, timeout=timeout)


def adam_refuses_mixed_betas():
    try:
        torch.optim.Adam([torch.zeros([1], requires_grad=True)], betas=[0, 0.99])
        return False
    except ValueError:
        return True


def test_dry_runs_of_the_patched_train_py(sg3_checkout):
    from stylegan2_ada_patch.dataset import write_dataset
    root = sg3_checkout
    write_dataset(str(root / 'data.zip'), count=8, resolution=16)
    common = ['--outdir', root / 'runs', '--data', root / 'data.zip', '--gpus=1', '--batch=4', '--gamma=1', '--dry-run']
    official = dict(zip(('stylegan2', 'stylegan3-t'), train_py_runs(root, [common + ['--cfg=stylegan2'], common + ['--cfg=stylegan3-t']], env=shim_env())))
    assert run_patch(root)[0] == 0
    # The README's StyleGAN3 smoke command, as a dry run (what it would train).
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md'), encoding='utf-8').read()
    command, = [line for line in readme.replace('\\\n', ' ').splitlines() if 'train.py' in line and '--smoke' in line and 'stylegan3-t' in line]
    runs = {
        'stylegan2 mlp':            common + ['--cfg=stylegan2', '--map=mlp'],
        'stylegan3-t mlp':          common + ['--cfg=stylegan3-t', '--map=mlp'],
        'stylegan3-r rtm':          common + ['--cfg=stylegan3-r', '--map=rtm', '--map-h=8', '--map-l=2'],
        'stylegan2 rtm attention':  common + ['--cfg=stylegan2', '--map=rtm', '--map-block=attention'],
        'stylegan2 map-depth':      common + ['--cfg=stylegan2', '--map-depth=3'],
        'stylegan3-t rtm map-depth': common + ['--cfg=stylegan3-t', '--map=rtm', '--map-depth=3'],
        'help':                     ['--help'],
        'readme':                   shlex.split(command)[2:] + ['--dry-run'],
    }
    out = dict(zip(runs, train_py_runs(root, list(runs.values()), env=shim_env())))
    for cfg in ('stylegan2', 'stylegan3-t'):
        assert official[cfg][0] == 0 and out[f'{cfg} mlp'][0] == 0, official[cfg][1] + out[f'{cfg} mlp'][1]
        assert training_options(out[f'{cfg} mlp'][1]) == training_options(official[cfg][1])    # --map=mlp is the official train.py

    code, text = out['stylegan3-r rtm']
    assert code == 0, text
    args, run_dir = training_options(text)
    assert args['G_kwargs']['class_name'] == 'rtm_mapping.networks_stylegan3.Generator' and args['G_kwargs']['use_radial_filters']
    assert args['G_kwargs']['mapping_kwargs'] == dict(steps=8, inner_steps=2, block='mixer', tokens=4, token_dim=128)
    assert run_dir.endswith('-stylegan3-r-data-gpus1-batch4-gamma1-rtmH8L2')
    assert args['D_kwargs']['class_name'] == 'training.networks_stylegan2.Discriminator'
    refuses = adam_refuses_mixed_betas()                # torch 2.1's Adam takes [0, 0.99]; newer ones refuse it
    betas = args['G_opt_kwargs']['betas']               # the loop passes them to Adam as written
    assert all(isinstance(beta, float) for beta in betas) if refuses else betas == [0, 0.99]
    assert ('made them floats' in text) == refuses

    code, text = out['stylegan2 rtm attention']
    args, run_dir = training_options(text)
    assert args['G_kwargs']['class_name'] == 'rtm_mapping.networks_stylegan2.Generator' and run_dir.endswith('-rtmH16L1-attention')
    assert 'made them floats' not in text     # lazy regularization: the loop makes them floats itself

    args, run_dir = training_options(out['stylegan2 map-depth'][1])   # StyleGAN3's own option, its own meaning
    assert args['G_kwargs']['mapping_kwargs'] == dict(num_layers=3) and run_dir.endswith('-gamma1')

    code, text = out['stylegan3-t rtm map-depth']
    assert code == 2 and '--map-depth sets the depth of the MLP mapper' in text
    code, help_text = out['help']
    assert code == 0 and help_text.count('--map-depth') == 1 and '--map-h' in help_text and '--smoke' in help_text

    code, text = out['readme']
    assert code == 0, text
    args, run_dir = training_options(text)
    smoke = 'smoke' if torch.cuda.is_available() else 'cpusmoke'
    assert run_dir.endswith(f'-stylegan3-t-data-gpus1-batch4-gamma1-rtmH4L1-{smoke}') and args['total_kimg'] == 0.008

#----------------------------------------------------------------------------
# As a new user would: patch, a CPU smoke run of each family, the stock gen_images.py without
# rtm-mapping, and --revert.

# gen_images.py hard-codes torch.device('cuda'); on a machine without one, the test answers that call
# for the CPU inside gen_images (the file itself is run as published).
GEN_IMAGES_ON_CPU = '''
    import types, torch, gen_images
    class CpuTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)
    gen_images.torch = CpuTorch('torch')
    gen_images.torch.device = lambda *args: torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gen_images.generate_images.main(sys.argv[1:], standalone_mode=False)
    assert not [m for m in sys.modules if m.startswith('rtm_mapping')]
'''


def rtm_mapping(*args, cwd=None):
    """`rtm-mapping ARGS`, the console script, in a fresh process."""
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', *map(str, args)], cwd=cwd, env=shim_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize('cfg, extra', [('stylegan3-t', ['--aug=noaug']), ('stylegan2', ['--cond=1', '--aug=ada'])])
def test_smoke_run_and_stock_gen_images(sg3_checkout, tmp_path, cfg, extra):
    from stylegan2_ada_patch.dataset import write_dataset
    originals = {name: (sg3_checkout / name).read_bytes() for name in ('train.py', 'calc_metrics.py')}
    rtm_mapping('patch', sg3_checkout)
    write_dataset(str(sg3_checkout / 'data.zip'), count=16, resolution=16, num_classes=3)

    out = train(sg3_checkout, f'--cfg={cfg}', '--cbase=1024', '--cmax=64', '--map=rtm', '--map-h=4', '--smoke=8', '--workers=1', *extra, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'rtm-mapping: smoke mode: 8 images on the' in out.stdout
    run_dir, = (sg3_checkout / 'runs').iterdir()
    assert run_dir.name.endswith(f'-{cfg}-data-gpus1-batch4-gamma1-rtmH4L1-' + ('smoke' if torch.cuda.is_available() else 'cpusmoke'))
    snapshot, = run_dir.glob('network-snapshot-*.pkl')
    family = 'stylegan2' if cfg == 'stylegan2' else 'stylegan3'
    assert json.loads((run_dir / 'training_options.json').read_text())['G_kwargs']['class_name'] == f'{FAMILIES[family][0]}.Generator'

    stdout = run_stock(GEN_IMAGES_ON_CPU, tmp_path, sg3_checkout,
                       argv=[f'--network={snapshot}', '--seeds=0-1', '--trunc=0.7', f'--outdir={tmp_path / "out"}',
                             *(['--class=1'] if '--cond=1' in extra else [])])
    assert 'Generating image for seed 1' in stdout
    images = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert images == ['seed0000.png', 'seed0001.png']

    rtm_mapping('patch', '--revert', sg3_checkout)
    assert {name: (sg3_checkout / name).read_bytes() for name in originals} == originals

#----------------------------------------------------------------------------
# Metrics and sweep-h on a StyleGAN3-codebase RTM pickle (stand-in detectors, tiny sizes).

def test_prdc_through_calc_metrics_and_sweep_h(sg3_checkout, tmp_path, monkeypatch):
    from metrics import metric_utils

    from rtm_mapping import detectors
    from rtm_mapping.sweep import sweep_h
    from stylegan2_ada_patch.dataset import write_dataset
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    monkeypatch.setattr(metric_utils, '_feature_detector_cache', dict())
    for name in detectors.NAMES:   # StyleGAN3's metrics unpickle their detectors: .pkl stand-ins
        detectors.install(name, detectors.standin(name, str(tmp_path / f'{name}.pkl'), num_features=16))
    data = write_dataset(str(tmp_path / 'data.zip'), count=12, resolution=16)
    G = build('stylegan2').eval()
    snapshot_pkl = tmp_path / 'snapshot.pkl'
    with open(snapshot_pkl, 'wb') as f:
        pickle.dump(dict(snapshot(G, build_d()), training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data,
                                                                          use_labels=False, max_size=None, xflip=False, resolution=16)), f)

    rtm_mapping('patch', sg3_checkout)
    env = dict(shim_env(), DNNLIB_CACHE_DIR=str(tmp_path / 'dnnlib'))
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', 'cpu', 'calc_metrics.py', f'--network={snapshot_pkl}', '--metrics=prdc_full'],
                         cwd=sg3_checkout, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"results"')))['results']
    assert set(result) == {f'prdc_full_{key}' for key in ('precision', 'recall', 'density', 'coverage')}
    assert all(0 <= value <= 1 for key, value in result.items() if not key.endswith('density'))

    table = tmp_path / 'sweep.json'
    result = CliRunner().invoke(sweep_h, ['--network', str(snapshot_pkl), '--metrics', 'prdc_vgg_full', '--map-h', '2,3', '--stylegan', str(sg3_checkout),
                                          '--device', 'cpu', '--verbose', 'false', '--out-json', str(table), '--out-md', str(tmp_path / 'sweep.md')])
    assert result.exit_code == 0, result.output
    rows = json.loads(table.read_text())['rows']
    assert [(row['h'], row['native']) for row in rows] == [(2, False), (3, True)] and G.mapping.rtm.steps == 3
    assert list(rows[0]['results']) == [f'prdc_vgg_full_{key}' for key in ('precision', 'recall', 'density', 'coverage')]
    assert metric_utils.torch is torch   # the sweep's CPU substitution ended with it

#----------------------------------------------------------------------------
# swap, info and set-h on stock StyleGAN3-codebase pickles.

def stock_snapshot(family, c_dim):
    """A pickle as training_loop.py writes it, with the official networks of a family (MLP mapper, random weights)."""
    torch.manual_seed(1000 + c_dim)
    return stock_pickle(build(family, c_dim=c_dim, official=True), build_d(c_dim))


def load(path, force_fp16=False):
    import legacy
    with open(path, 'rb') as f:
        return legacy.load_network_pkl(f, force_fp16=force_fp16)


@pytest.mark.parametrize('family, c_dim', [('stylegan3', 0), ('stylegan2', 4)])
def test_swap_info_and_set_h_on_a_stock_pickle(stylegan3_root, tmp_path, family, c_dim):
    from torch_utils import misc

    from rtm_mapping.info import info
    from rtm_mapping.set_h import set_h
    from rtm_mapping.swap import swap
    stock = stock_snapshot(family, c_dim)
    src, dst = str(tmp_path / 'stock.pkl'), str(tmp_path / 'rtm.pkl')
    with open(src, 'wb') as f:
        pickle.dump(stock, f)
    result = CliRunner().invoke(swap, ['--network', src, '--out', dst, '--distill-kimg', '0.1', '--map-h', '2', '--eval-seeds', '4',
                                       '--stylegan', stylegan3_root])
    assert result.exit_code == 0, result.output + repr(result.exception)

    new = load(dst)
    for name in ('G', 'G_ema'):
        assert type(new[name]) is modules(family)[0].Generator, name    # the RTM generator of the family
        assert new[name].init_kwargs.mapping_kwargs == dict(steps=2, inner_steps=1, block='mixer', tokens=4, token_dim=128)
        old = dict(misc.named_params_and_buffers(stock[name]))
        for key, tensor in misc.named_params_and_buffers(new[name]):
            if not key.startswith('mapping.rtm.'):
                assert torch.equal(tensor, old[key]), (name, key)    # synthesis, w_avg, label embedding: bit for bit
    assert type(new['D']).__name__ == 'Discriminator'

    facts = json.loads(CliRunner().invoke(info, [dst, '--json', '--stylegan', stylegan3_root]).output)
    assert facts['G_ema']['mapper'] == 'rtm' and facts['G_ema']['H'] == 2 and facts['G_ema']['w_avg_finite']
    assert CliRunner().invoke(info, [src, '--stylegan', stylegan3_root]).output.count(f'mapper mlp ({stock["G"].mapping.num_layers} layers') == 2

    again = str(tmp_path / 'rtm-h3.pkl')
    result = CliRunner().invoke(set_h, [dst, '--map-h', '3', '--out', again, '--stylegan', stylegan3_root])
    assert result.exit_code == 0, result.output
    assert load(again)['G_ema'].mapping.rtm.steps == 3 and load(again, force_fp16=True)['G_ema'].mapping.rtm.steps == 3

    out = run_stock('''
        import sys, torch, legacy
        with open('rtm.pkl', 'rb') as f:
            G = legacy.load_network_pkl(f)['G_ema']
        img = G(torch.randn([2, G.z_dim]), torch.eye(max(G.c_dim, 1))[:2, :G.c_dim], truncation_psi=0.7, noise_mode='const')
        assert torch.isfinite(img).all() and not [m for m in sys.modules if m.startswith('rtm_mapping')]
        print('ok', type(G.mapping).__name__, G.mapping.rtm.steps)
    ''', tmp_path, stylegan3_root)
    assert out.strip() == 'ok MappingNetwork 2'


def test_tools_ask_for_the_checkout_that_wrote_the_pickle(stylegan3_root, tmp_path):
    """A StyleGAN3 pickle given to the tools with a StyleGAN2-ADA checkout: refused, saying which checkout to use."""
    other = os.environ.get('STYLEGAN2_ADA_ROOT')
    if not other:
        pytest.skip('needs STYLEGAN2_ADA_ROOT too')
    with open(tmp_path / 'stock.pkl', 'wb') as f:
        pickle.dump(stock_snapshot('stylegan3', 0), f)
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', 'info', str(tmp_path / 'stock.pkl'), '--stylegan', other],
                         env=shim_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and 'is a StyleGAN3 pickle; point --stylegan (or $STYLEGAN3_ROOT) at a StyleGAN3 checkout' in out.stderr, out.stderr
