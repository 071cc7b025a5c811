"""rtm_mapping.networks against the official StyleGAN2-ADA code (needs STYLEGAN2_ADA_ROOT)."""

import inspect
import io
import os
import pickle
import sys

import pytest
import torch
from conftest import original_init, run_stock, snapshot

SMALL = dict(z_dim=64, w_dim=64, img_resolution=16, img_channels=3,
             mapping_kwargs=dict(steps=4, tokens=4, token_dim=16),
             synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=0, conv_clamp=None))


def build(c_dim=0, **overrides):
    from rtm_mapping import networks
    return networks.Generator(c_dim=c_dim, **dict(SMALL, **overrides))


def build_d(c_dim=0):
    from training import networks as official
    return official.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                                  num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))


def test_mapping_signature_extends_the_official_one(stylegan_root):
    from training import networks as official

    from rtm_mapping import networks
    ours = inspect.signature(original_init(networks.MappingNetwork)).parameters
    theirs = inspect.signature(original_init(official.MappingNetwork)).parameters
    for name, param in theirs.items():
        assert name in ours and ours[name].default == param.default and ours[name].kind == param.kind, name
    assert list(inspect.signature(networks.MappingNetwork.forward).parameters) == list(inspect.signature(official.MappingNetwork.forward).parameters)
    assert issubclass(networks.MappingNetwork, official.MappingNetwork) and issubclass(networks.Generator, official.Generator)


def test_generator_built_by_name_records_rtm(stylegan_root):
    import dnnlib
    G = dnnlib.util.construct_class_by_name(class_name='rtm_mapping.networks.Generator', c_dim=0, **SMALL)
    assert G.init_kwargs.mapping_kwargs == SMALL['mapping_kwargs']
    assert G.mapping.rtm.steps == 4 and G.num_ws == G.mapping.num_ws
    assert not [name for name, _ in G.mapping.named_parameters() if name.startswith('fc')]
    img = G(torch.randn(3, 64), None)
    assert img.shape == (3, 3, 16, 16) and torch.isfinite(img).all()


@pytest.mark.parametrize('c_dim', [0, 5])
def test_mapping_keeps_official_semantics(stylegan_root, c_dim):
    G = build(c_dim=c_dim)
    m = G.mapping.train()
    z, c = torch.randn(8, 64), torch.eye(5)[torch.arange(8) % 5] if c_dim else None
    ws = m(z, c)
    assert ws.shape == (8, G.num_ws, 64) and torch.equal(ws[:, 0], ws[:, -1])
    torch.testing.assert_close(m.w_avg, ws[:, 0].mean(0) * (1 - m.w_avg_beta))  # lerp from zeros

    before = m.w_avg.clone()
    m(z, c, skip_w_avg_update=True)
    m.eval()(z, c)
    assert torch.equal(m.w_avg, before)

    w = m(z, c)
    torch.testing.assert_close(m(z, c, truncation_psi=0.5), m.w_avg.lerp(w, 0.5))
    cut = m(z, c, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], m.w_avg.lerp(w[:, :2], 0.5))
    assert torch.equal(cut[:, 2:], w[:, 2:])
    if c_dim:  # labels matter, through the official embedding
        assert not torch.allclose(m(z, c), m(z, c.roll(1, dims=1)))


def test_w_avg_survives_a_non_finite_batch(stylegan_root):
    from torch_utils import misc
    G = build().train()
    G.mapping(torch.randn(8, 64), None)
    good = G.mapping.w_avg.clone()
    G.mapping(torch.full([8, 64], float('nan')), None)
    G.mapping(torch.full([8, 64], float('inf')), None)
    assert torch.equal(G.mapping.w_avg, good)
    misc.print_module_summary(G, [torch.empty([4, 64]).fill_(float('nan')), torch.empty([4, 0])])  # what the loop does
    assert torch.isfinite(G.mapping.w_avg).all()


def test_a_non_finite_w_avg_restarts_from_the_next_finite_batch(stylegan_root):
    # A stock snapshot's w_avg can be NaN (the official mapper has no guard); --resume with --map=rtm copies it.
    G = build().train()
    G.mapping.w_avg.fill_(float('nan'))
    z = torch.randn(8, 64)
    w = G.mapping(z, None)[:, 0]
    torch.testing.assert_close(G.mapping.w_avg, w.detach().mean(0))
    assert torch.isfinite(G.mapping(z, None, truncation_psi=0.7)).all()


def test_official_loss_phases_with_style_mixing_and_augment(stylegan_root):
    from training.augment import AugmentPipe
    from training.loss import StyleGAN2Loss

    from stylegan2_ada_patch import compat
    compat.fix_grid_sample()    # as the patched train.py does: R1 through ADA's geometric augmentations on any torch
    torch.manual_seed(0)
    G, D = build(c_dim=3).train(), build_d(c_dim=3).train()
    augment = AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    augment.p.copy_(torch.as_tensor(0.5))
    loss = StyleGAN2Loss(device=torch.device('cpu'), G_mapping=G.mapping, G_synthesis=G.synthesis, D=D, augment_pipe=augment,
                         style_mixing_prob=1.0, r1_gamma=1.0)
    real = torch.randn(4, 3, 16, 16)
    c = torch.eye(3)[torch.arange(4) % 3]
    for phase, module in [('Gmain', G), ('Greg', G), ('Dmain', D), ('Dreg', D)]:
        for net in (G, D):
            net.requires_grad_(net is module)
            net.zero_grad(set_to_none=True)
        loss.accumulate_gradients(phase=phase, real_img=real, real_c=c, gen_z=torch.randn(4, 64), gen_c=c, sync=True, gain=1)
        grads = {name: p.grad for name, p in module.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), phase
        if phase in ('Gmain', 'Greg'):
            rtm = {name: g for name, g in grads.items() if name.startswith('mapping.')}
            assert rtm and all(g.abs().sum() > 0 for g in rtm.values()), f'{phase}: an RTM parameter gets no gradient'


@pytest.mark.parametrize('c_dim', [0, 3])
def test_pickles_load_and_run_without_the_package(stylegan_root, tmp_path, c_dim):
    G = build(c_dim=c_dim)
    data = snapshot(G, build_d(c_dim=c_dim))
    z = torch.randn(4, 64)
    c = torch.eye(3)[torch.arange(4) % 3] if c_dim else torch.zeros(4, 0)
    with open(tmp_path / 'snapshot.pkl', 'wb') as f:
        pickle.dump(data, f)
    with open(tmp_path / 'G.pkl', 'wb') as f:
        pickle.dump(G, f)
    torch.save(dict(z=z, c=c, img=data['G_ema'](z, c, truncation_psi=0.7, noise_mode='const'), w=data['G_ema'].mapping(z, c)), tmp_path / 'ref.pt')

    out = run_stock('''
        import pickle, sys, torch, legacy
        ref = torch.load('ref.pt')
        with open('snapshot.pkl', 'rb') as f:
            G_ema = legacy.load_network_pkl(f)['G_ema']
        with open('G.pkl', 'rb') as f:
            G = pickle.load(f).eval()
        assert not [m for m in sys.modules if m.startswith('rtm_mapping')]
        img = G_ema(ref['z'], ref['c'], truncation_psi=0.7, noise_mode='const')
        assert torch.equal(img, ref['img']), (img - ref['img']).abs().max()
        assert torch.equal(G.mapping(ref['z'], ref['c']), ref['w'])
        with open('snapshot.pkl', 'rb') as f:
            rebuilt = legacy.load_network_pkl(f, force_fp16=True)['G_ema']
        assert rebuilt.init_kwargs.synthesis_kwargs.num_fp16_res == 4 and hasattr(rebuilt.mapping, 'rtm')
        torch.testing.assert_close(rebuilt.mapping(ref['z'], ref['c']), ref['w'], rtol=0, atol=0)
        print('ok', type(G.mapping).__name__)
    ''', tmp_path, stylegan_root)
    assert out.strip() == 'ok MappingNetwork'


def test_force_fp16_rebuild_keeps_rtm(stylegan_root, tmp_path):
    import legacy
    G = build(mapping_kwargs=dict(steps=3, tokens=4, token_dim=16, block='attention'))
    buf = io.BytesIO()
    pickle.dump(snapshot(G, build_d()), buf)
    buf.seek(0)
    rebuilt = legacy.load_network_pkl(buf, force_fp16=True)['G_ema']
    assert rebuilt.init_kwargs.synthesis_kwargs.num_fp16_res == 4
    assert rebuilt.mapping.rtm.block_name == 'attention' and rebuilt.mapping.rtm.steps == 3
    z = torch.randn(2, 64)
    torch.testing.assert_close(rebuilt.mapping(z, None), G.eval().mapping(z, None), rtol=0, atol=0)

def test_two_pickles_with_different_cores_each_run_with_their_own(stylegan_root, tmp_path):
    # A notebook comparing runs of two rtm-mapping versions, calc_metrics.py over their snapshots: one process,
    # in which torch_utils.persistence runs each pickled source once, whichever pickle brought it first.
    from conftest import check_two_core_versions
    G = dict(class_name='rtm_mapping.networks.Generator', c_dim=0, **SMALL)
    D = dict(class_name='training.networks.Discriminator', c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
             num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))
    check_two_core_versions(tmp_path, stylegan_root, [dict(G=G, D=D)], adapters=['rtm_mapping.networks'])

#----------------------------------------------------------------------------
# DDP, as the training loop does it: rank-specific seeds, broadcast, the mapping wrapped on its own.

def _ddp_worker(rank, init_file, root, result_file):
    sys.path.insert(0, root)
    from torch_utils import misc
    from training.loss import StyleGAN2Loss
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.manual_seed(rank)
    G, D = build(c_dim=0).train().requires_grad_(False), build_d().train().requires_grad_(False)
    carry = [G.mapping.rtm.h_init.clone(), G.mapping.rtm.l_init.clone()]
    for module in (G, D):
        for tensor in misc.params_and_buffers(module):
            torch.distributed.broadcast(tensor, src=0)
    mapping = torch.nn.parallel.DistributedDataParallel(G.mapping.requires_grad_(True), broadcast_buffers=False)
    G.synthesis.requires_grad_(True)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G_mapping=mapping, G_synthesis=G.synthesis, D=D, style_mixing_prob=0.9, r1_gamma=1)
    torch.manual_seed(100 + rank)
    for _ in range(3):  # an unused parameter would make DDP fail on the second iteration
        for phase in ('Gmain', 'Greg'):
            G.zero_grad(set_to_none=True)
            loss.accumulate_gradients(phase=phase, real_img=None, real_c=None, gen_z=torch.randn(4, 64), gen_c=torch.zeros(4, 0), sync=True, gain=1)
    grads = torch.cat([p.grad.flatten() for p in G.mapping.parameters()])
    misc.check_ddp_consistency(G.mapping, ignore_regex=r'.*\.w_avg')
    torch.save(dict(carry=carry, grads=grads, missing=[n for n, p in G.mapping.named_parameters() if p.grad is None]), f'{result_file}.{rank}')
    torch.distributed.barrier()     # both results written; then no gloo teardown: on torch 2.1, destroy_process_group
    os._exit(0)                     # sometimes hung for good in one worker after the other had exited


def test_ddp_two_processes_gloo(stylegan_root, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / 'init'), stylegan_root, str(tmp_path / 'result')), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'result.{rank}') for rank in (0, 1))
    assert r0['missing'] == [] and r1['missing'] == []
    assert all(torch.equal(a, b) for a, b in zip(r0['carry'], r1['carry']))  # equal before any broadcast
    torch.testing.assert_close(r0['grads'], r1['grads'])
    assert r0['grads'].abs().sum() > 0
