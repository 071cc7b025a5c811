"""rtm-mapping in NVIDIA's StyleGAN3 code (needs STYLEGAN3_ROOT): the RTM generators of both of its
families (networks_stylegan2.py for --cfg=stylegan2, networks_stylegan3.py for stylegan3-t/r), their
pickles without rtm-mapping, the train.py patch, CPU smoke runs and the tools on its pickles."""

import copy
import importlib
import inspect
import io
import pickle

import pytest
import torch
from conftest import run_stock

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


def original_init(cls):
    """The constructor under persistence's Decorator."""
    return cls.__mro__[1].__init__

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


def snapshot(G, D):
    return dict(G=G, D=D, G_ema=copy.deepcopy(G).eval(), augment_pipe=None, training_set_kwargs=None)


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
