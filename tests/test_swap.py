"""`rtm-mapping swap`, `info` and `set-h` on small stock StyleGAN2-ADA pickles (needs STYLEGAN2_ADA_ROOT)."""

import json
import os
import pickle
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from conftest import run_stock
from conftest import stock_snapshot as stock_pickle

TINY = dict(z_dim=32, w_dim=32, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=0, conv_clamp=None))
FAST = ['--map-h', '2', '--eval-seeds', '8']


def stock_snapshot(c_dim):
    """A pickle as training_loop.py writes it, with official networks (MLP mapper, random weights). Seeded away from
    the RTM's seeds: with equal seeds the RTM lift would draw the numbers of the teacher's first layer."""
    from training import networks as official
    torch.manual_seed(1000 + c_dim)
    G = official.Generator(c_dim=c_dim, **TINY)
    D = official.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                               num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))
    return stock_pickle(G, D)


def write(path, data):
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return str(path)


def load(path, force_fp16=False):
    import legacy
    with open(path, 'rb') as f:
        return legacy.load_network_pkl(f, force_fp16=force_fp16)


def invoke(command, args):
    return CliRunner().invoke(command, args)


@pytest.fixture(scope='module')
def swapped(stylegan_root, tmp_path_factory):
    """(input path, output path, report) for an unconditional and a conditional stock pickle."""
    from rtm_mapping.swap import swap
    out = {}
    for c_dim in (0, 4):
        folder = tmp_path_factory.mktemp(f'swap{c_dim}')
        src = write(folder / 'stock.pkl', stock_snapshot(c_dim))
        dst = str(folder / 'rtm.pkl')
        result = invoke(swap, ['--network', src, '--out', dst, '--distill-kimg', '0.25', *FAST])
        assert result.exit_code == 0, result.output + repr(result.exception)
        report = json.loads([line for line in result.output.splitlines() if line.startswith('{')][-1])
        out[c_dim] = (src, dst, report)
    return out

#----------------------------------------------------------------------------

@pytest.mark.parametrize('c_dim', [0, 4])
def test_swap_keeps_everything_but_the_mapper(swapped, c_dim):
    from torch_utils import misc
    src, dst, report = swapped[c_dim]
    old, new = load(src), load(dst)
    for key in ('G', 'G_ema'):
        assert hasattr(new[key].mapping, 'rtm') and new[key].init_kwargs.mapping_kwargs['steps'] == 2
        assert 'num_layers' not in new[key].init_kwargs.mapping_kwargs
        old_tensors = dict(misc.named_params_and_buffers(old[key]))
        for name, tensor in misc.named_params_and_buffers(new[key]):
            if not name.startswith('mapping.rtm.'):
                assert torch.equal(tensor, old_tensors[name]), name    # synthesis, w_avg, embed
    assert c_dim == 0 or 'mapping.embed.weight' in dict(new['G_ema'].named_parameters())
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(old['D']), misc.named_params_and_buffers(new['D'])):
        assert torch.equal(a, b), name
    assert new['augment_pipe'] is None and new['training_set_kwargs'] is None
    assert os.path.isfile(report['grid'])


@pytest.mark.parametrize('c_dim', [0, 4])
def test_swap_beats_its_starting_point(swapped, c_dim):
    """The distilled RTM is closer to the old mapper than the RTM it started from, and than the mean w."""
    from rtm_mapping import swap as swap_module
    from rtm_mapping import swap_eval
    src, dst, report = swapped[c_dim]
    old, new = load(src), load(dst)
    evaluator = swap_eval.Evaluator(old['G_ema'], 8)
    start = swap_module.build_rtm_generator(old['G_ema'], 2)
    start_error = evaluator.w_error(evaluator.student_w(start.mapping))
    error = evaluator.w_error(evaluator.student_w(new['G_ema'].mapping))
    assert error == pytest.approx(report['swapped']['rel_w_error'], rel=1e-4)
    assert error < 1 < start_error
    ws = new['G_ema'].mapping(evaluator.z, evaluator.c)
    assert torch.isfinite(ws).all() and ws.shape == (8, new['G_ema'].num_ws, 32)


def test_distillation_is_deterministic(stylegan_root):
    from rtm_mapping import distill, swap_eval
    from rtm_mapping import swap as swap_module
    teacher = stock_snapshot(0)['G_ema']
    evaluator = swap_eval.Evaluator(teacher, 16)

    def run():
        G = swap_module.build_rtm_generator(teacher, 2)
        history = distill.distill(G.mapping, lambda z, c: teacher.mapping(z, c)[:, 0], kimg=1, seed=3, batch=64, lsq_samples=1024,
                                  teacher_layer=distill.first_layer(teacher.mapping),
                                  evaluate=lambda: evaluator.figures(evaluator.student_w(G.mapping), images=False), eval_every=4)
        return G, history
    (G1, h1), (G2, _) = run(), run()
    for a, b in zip(G1.mapping.rtm.parameters(), G2.mapping.rtm.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(G1.mapping.rtm.h_init, G2.mapping.rtm.h_init)
    assert h1[-1]['rel_w_error'] < 1 and h1[0]['rel_w_error'] < 1     # far better than the mean w


def test_swap_refuses_bad_input(stylegan_root, swapped, tmp_path, monkeypatch):
    from rtm_mapping.swap import swap
    src, dst, _ = swapped[0]
    cases = {
        'is the input pickle': ['--network', src, '--out', src],
        'already has an RTM mapper': ['--network', dst, '--out', str(tmp_path / 'again.pkl')],
        'has no G_ema': ['--network', write(tmp_path / 'no_ema.pkl', {k: v for k, v in load(src).items() if k != 'G_ema'}),
                         '--out', str(tmp_path / 'x.pkl')],
        'is a StyleGAN3 pickle': ['--network', write(tmp_path / 'sg3.pkl', stylegan3_like(tmp_path, monkeypatch)), '--out', str(tmp_path / 'y.pkl')],
    }
    for message, args in cases.items():
        result = invoke(swap, args + FAST)
        assert result.exit_code != 0 and message in result.output, (message, result.output)
    assert not os.path.exists(tmp_path / 'again.pkl')


def stylegan3_like(tmp_path, monkeypatch):
    """A persistent network whose embedded source has StyleGAN3's signature (update_emas)."""
    import importlib.util

    from torch_utils import persistence
    source = tmp_path / 'networks_stylegan3_like.py'
    source.write_text(textwrap.dedent('''
        import torch
        from torch_utils import persistence

        @persistence.persistent_class
        class Generator(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.z_dim = 4
            def forward(self, z, c, update_emas=False):
                return z
    '''))
    spec = importlib.util.spec_from_file_location('networks_stylegan3_like', source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert persistence.is_persistent(module.Generator)
    net = module.Generator()
    return dict(G=net, D=net, G_ema=net)

#----------------------------------------------------------------------------

def test_set_h_changes_the_output_and_survives_force_fp16(swapped, tmp_path):
    from rtm_mapping.set_h import set_h
    _, dst, _ = swapped[4]
    out = str(tmp_path / 'h8.pkl')
    result = invoke(set_h, [dst, '--map-h', '8', '--out', out])
    assert result.exit_code == 0, result.output
    before, after, rebuilt = load(dst)['G_ema'], load(out)['G_ema'], load(out, force_fp16=True)['G_ema']
    z, c = torch.randn(4, 32), torch.eye(4)
    assert after.mapping.rtm.steps == 8 and rebuilt.mapping.rtm.steps == 8
    assert rebuilt.init_kwargs.synthesis_kwargs.num_fp16_res == 4      # it was rebuilt
    expected = before.mapping.rtm(before.mapping.mapper_input(z, c), steps=8)
    assert torch.equal(after.mapping(z, c)[:, 0], expected)
    assert torch.equal(rebuilt.mapping(z, c)[:, 0], expected)
    assert not torch.equal(before.mapping(z, c)[:, 0], expected)
    result = invoke(set_h, [dst, '--h', '8', '--out', dst])     # --h: --map-h's other name
    assert result.exit_code != 0 and 'is the input pickle' in result.output     # never over the input


def test_info_prints_the_facts(swapped):
    from rtm_mapping.info import info
    src, dst, _ = swapped[4]
    text = invoke(info, [dst]).output
    assert 'mapper rtm (H=2, L=1, block=mixer' in text and 'w_avg finite: True' in text and text.startswith('G:')
    assert 'D: Discriminator' in text and 'augment_pipe: None' in text
    assert 'mapper mlp (2 layers' in invoke(info, [src]).output
    facts = json.loads(invoke(info, [dst, '--json']).output)
    assert facts['G_ema']['H'] == 2 and facts['G_ema']['mapper_params'] > 0

#----------------------------------------------------------------------------

def test_swapped_pickle_runs_without_the_package(stylegan_root, swapped, tmp_path):
    """The output loads in a fresh process with only the checkout on sys.path, and gives the same images."""
    _, dst, _ = swapped[4]
    G = load(dst)['G_ema']
    z, c = torch.randn(3, 32), torch.eye(4)[:3]
    torch.save(dict(z=z, c=c, img=G(z, c, truncation_psi=0.7, noise_mode='const')), tmp_path / 'ref.pt')
    out = run_stock(f'''
        import sys, torch, legacy
        ref = torch.load('ref.pt')
        with open({dst!r}, 'rb') as f:
            G = legacy.load_network_pkl(f)['G_ema']
        assert not [m for m in sys.modules if m.startswith('rtm_mapping')]
        img = G(ref['z'], ref['c'], truncation_psi=0.7, noise_mode='const')
        assert torch.equal(img, ref['img']), (img - ref['img']).abs().max()
        with open({dst!r}, 'rb') as f:
            print(legacy.load_network_pkl(f, force_fp16=True)['G_ema'].mapping.rtm.steps)
    ''', tmp_path, stylegan_root)
    assert out.strip() == '2'
