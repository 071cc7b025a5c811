"""RS-IMLE generators (rtm_mapping.imle.networks) against App. C / Figure 4 of the RTM paper and the contract the training loop relies on."""

import json

import pytest
import torch
import torch.nn.functional as F

from rtm_mapping.core import RecursiveTokenMapper, pixel_norm
from rtm_mapping.imle import networks
from rtm_mapping.imle.networks import DECODERS, Generator

# Figure 4 and the table beneath it: blocks per resolution, block type, width.
APPENDIX_C = {
    'fewshot':  ('residual', 384, {1: 4, 4: 5, 8: 5, 16: 4, 32: 3, 64: 3, 128: 3, 256: 1}),
    'cifar10':  ('convnext', 768, {1: 1, 4: 3, 8: 6, 16: 6, 32: 6}),
    'celebahq': ('convnext', 768, {1: 1, 4: 3, 8: 5, 16: 6, 32: 6, 64: 6, 128: 5, 256: 2}),
}
TOTALS = {'fewshot': (8, 28, 256), 'cifar10': (5, 22, 32), 'celebahq': (8, 34, 256)}      # stages, blocks, resolution

# RS-IMLE's few-shot decoder string (its hps.py): RxN = N blocks at R, RmS = one block at R upsampled from S.
RSIMLE_FEWSHOT = '1x4,4m1,4x4,8m4,8x4,16m8,16x3,32m16,32x2,64m32,64x2,128m64,128x2,256m128'

TINY = dict(width=8)
TINY_RTM = dict(tokens=2, token_dim=8, steps=3, inner_steps=2)


def tiny(mapper='rtm', decoder='cifar10', **decoder_kwargs):
    mapper_kwargs = TINY_RTM if mapper == 'rtm' else dict(num_layers=3)
    return Generator(decoder=decoder, mapper=mapper, z_dim=16, w_dim=16, mapper_kwargs=mapper_kwargs,
                     decoder_kwargs=dict(TINY, **decoder_kwargs))


def blocks_per_resolution(G):
    counts = dict()
    for block in G.synthesis.blocks:
        counts[block.resolution] = counts.get(block.resolution, 0) + 1
    return counts


def set_noise_strengths(G, value):
    with torch.no_grad():
        for module in G.modules():
            if isinstance(module, networks.NoiseInjection):
                module.strength.fill_(value)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_stages_are_those_of_appendix_c(name):
    with torch.device('meta'):
        G = Generator(decoder=name, mapper='mlp')
    block, width, per_res = APPENDIX_C[name]
    stages, total, resolution = TOTALS[name]
    assert blocks_per_resolution(G) == per_res
    assert len(per_res) == stages and len(G.synthesis.blocks) == total
    assert G.img_resolution == resolution and G.img_channels == 3
    assert G.synthesis.const.shape == (1, width, 1, 1)                  # a learned constant at 1x1
    assert G.synthesis.to_rgb.kernel_size == (1, 1)                     # a 1x1 conv to RGB
    kind = networks.ResidualBlock if block == 'residual' else networks.ConvNeXtBlock
    for b in G.synthesis.blocks:
        assert isinstance(b.block, kind) and isinstance(b.adain, networks.AdaIN)     # AdaIN(w) in every block
        assert b.adain.style.in_features == 512 and b.adain.style.out_features == 2 * width
        assert b.noise is not None                                      # App. C: noise at resolutions <= 256
    ups = [(b.resolution, b.up) for b in G.synthesis.blocks if b.up > 1]
    assert ups == [(r, r // p) for p, r in zip(sorted(per_res), sorted(per_res)[1:])]     # upsampled once per stage


def test_fewshot_decoder_is_rsimle_decoder_string():
    blocks = []
    for part in RSIMLE_FEWSHOT.split(','):
        if 'x' in part:
            res, num = map(int, part.split('x'))
            blocks += [res] * num
        else:
            blocks.append(int(part.split('m')[0]))
    with torch.device('meta'):
        G = Generator(decoder='fewshot', mapper='mlp')
    assert [b.resolution for b in G.synthesis.blocks] == blocks
    for b in G.synthesis.blocks:                                        # 3x3 convs only above 2x2, at width / 4
        assert b.block.conv2.kernel_size == ((3, 3) if b.resolution > 2 else (1, 1))
        assert b.block.conv2.in_channels == 96


def expected_parameters(name, w_dim=512):
    block, width, per_res = APPENDIX_C[name]
    adain = w_dim * 2 * width + 2 * width
    noise = width
    if block == 'residual':
        h = width // 4
        per = {res: (width * h + h) + 2 * (h * h * (9 if res > 2 else 1) + h) + (h * width + width) for res in per_res}
    else:
        per = {res: (width * 49 + width) + 2 * width + (width * 4 * width + 4 * width) + (4 * width * width + width) + width for res in per_res}
    blocks = sum(n * (per[res] + adain + noise) for res, n in per_res.items())
    return blocks + width + 3 * width + 3 + 3         # constant, to_rgb, gain, bias


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_full_size_decoders_run_on_the_meta_device(name):
    with torch.device('meta'):                  # the RTM core's autocast guard needs a real device: MLP here
        G = Generator(decoder=name, mapper='mlp')
        images = G(torch.randn([2, 512]))
    assert images.shape == (2, 3, G.img_resolution, G.img_resolution) and images.dtype == torch.float32
    assert sum(p.numel() for p in G.synthesis.parameters()) == expected_parameters(name)


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_reduced_width_decoders_generate_images(name):
    G = Generator(decoder=name, mapper='mlp', z_dim=16, w_dim=16, decoder_kwargs=dict(width=8))
    images = G(torch.randn([2, 16], generator=torch.Generator().manual_seed(0)))
    R = TOTALS[name][2]
    assert images.shape == (2, 3, R, R) and torch.isfinite(images).all()
    assert 0.05 < images.std() < 5             # a usable scale at initialisation, not zero or exploding
    assert not torch.allclose(images[0], images[1])                 # the output depends on z


def test_mappers_both_map_z_to_w():
    rtm, mlp = tiny('rtm'), tiny('mlp')
    assert isinstance(rtm.mapping, RecursiveTokenMapper) and rtm.mapping.steps == 3 and rtm.mapping.inner_steps == 2
    assert isinstance(mlp.mapping, networks.MappingMLP)
    z = torch.randn([5, 16], generator=torch.Generator().manual_seed(1))
    # The baseline, layer by layer: PixelNorm, then Linear + LeakyReLU(0.2) each.
    x = pixel_norm(z)
    for layer in mlp.mapping.layers:
        assert type(layer) is torch.nn.Linear and not layer.bias.any()
        x = F.leaky_relu(layer(x), 0.2)
    torch.testing.assert_close(mlp.map(z), x)
    for G in (rtm, mlp):
        assert G.map(z).shape == (5, 16)
        torch.testing.assert_close(G.map(3 * z), G.map(z), rtol=1e-5, atol=1e-5)     # PixelNorm first
    with torch.device('meta'):
        assert len(Generator(decoder='cifar10', mapper='mlp').mapping.layers) == 8


def test_rtm_steps_change_at_inference_without_changing_parameters():
    G = tiny('rtm')
    z = torch.randn([4, 16], generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in G.state_dict().items()}
    native = G(z)
    per_call = G(z, steps=6, inner_steps=1)
    assert not torch.allclose(native, per_call)
    torch.testing.assert_close(G(z), native)                          # a per-call override leaves the setting alone
    G.set_steps(steps=6, inner_steps=1)
    torch.testing.assert_close(G(z), per_call)
    assert G.mapping.steps == 6 and G.mapping.inner_steps == 1
    assert all(torch.equal(state[k], v) for k, v in G.state_dict().items())


def test_mlp_mapper_refuses_steps():
    G = tiny('mlp')
    with pytest.raises(ValueError, match='needs the RTM mapper'):
        G.set_steps(steps=4)
    with pytest.raises(ValueError, match='needs the RTM mapper'):
        G(torch.randn([1, 16]), steps=4)


@pytest.mark.parametrize('mapper', networks.MAPPERS)
def test_init_kwargs_rebuild_the_same_generator(mapper):
    G = tiny(mapper, decoder='fewshot', stages=((1, 1), (4, 2), (8, 1)), noise_max_res=4)
    set_noise_strengths(G, 0.3)
    kwargs = json.loads(json.dumps(G.init_kwargs))          # what training_options.json and snapshots keep
    rebuilt = Generator(**kwargs)
    rebuilt.load_state_dict(G.state_dict())                 # strict: same parameter names and shapes
    assert rebuilt.init_kwargs == kwargs and rebuilt.img_resolution == 8
    z = torch.randn([3, 16], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rebuilt(z, generator=torch.Generator().manual_seed(4)),
                               G(z, generator=torch.Generator().manual_seed(4)), rtol=0, atol=0)


def test_noise_draws_from_the_generator_only():
    G = tiny('rtm', decoder='fewshot', stages=((1, 1), (4, 1), (8, 1)), noise_max_res=4)
    assert [b.noise is not None for b in G.synthesis.blocks] == [True, True, False]
    z = torch.randn([2, 16], generator=torch.Generator().manual_seed(5))
    at_init = G(z, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(G(z, generator=torch.Generator().manual_seed(1)), at_init, rtol=0, atol=0)   # zero strengths: identity
    set_noise_strengths(G, 0.5)
    rng = torch.get_rng_state()
    a = G(z, generator=torch.Generator().manual_seed(7))
    b = G(z, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), rng)           # the global RNG is untouched
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, G(z, generator=torch.Generator().manual_seed(8)))
    torch.manual_seed(9)
    c = G(z)
    torch.manual_seed(9)
    torch.testing.assert_close(G(z), c, rtol=0, atol=0)      # without a generator: the global RNG


def test_no_noise_option():
    G = tiny('mlp', noise_max_res=0)
    assert all(b.noise is None for b in G.synthesis.blocks)
    assert not any('noise' in name for name in G.state_dict())


def test_gradients_reach_mapper_and_decoder():
    for mapper in networks.MAPPERS:
        G = tiny(mapper)
        G(torch.randn([2, 16])).square().mean().backward()
        assert G.synthesis.const.grad.abs().sum() > 0
        assert all(p.grad is not None for p in G.mapping.parameters())


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match='unknown decoder'):
        Generator(decoder='ffhq')
    with pytest.raises(ValueError, match='unknown mapper'):
        Generator(decoder='cifar10', mapper='transformer')
    with pytest.raises(ValueError, match='decoder_kwargs takes'):
        Generator(decoder='cifar10', decoder_kwargs=dict(depth=3))
    with pytest.raises(ValueError, match='mapper_kwargs takes'):
        Generator(decoder='cifar10', mapper='mlp', mapper_kwargs=dict(steps=3))
    with pytest.raises(ValueError, match='stages must be'):
        Generator(decoder='cifar10', decoder_kwargs=dict(stages=((1, 1), (3, 2), (4, 1))))
    with pytest.raises(ValueError, match='z must have shape'):
        tiny()(torch.randn([2, 17]))


def test_the_constant_and_the_1x1_stage_reach_the_image():
    # A 1x1 map upsampled is uniform over space; instance-normalising it would zero every feature, and the
    # constant and the 1x1 blocks would get gradients ~1e-6 of the next stage's. The norm is skipped there.
    G = Generator(decoder='fewshot', z_dim=32, w_dim=32, mapper_kwargs=dict(steps=2),
                  decoder_kwargs=dict(width=32, stages=((1, 2), (4, 2), (8, 1)), noise_max_res=0))
    G(torch.randn([4, 32])).square().mean().backward()
    first_4x4 = G.synthesis.blocks[2]
    assert not G.synthesis.blocks[0].adain.normalize and not first_4x4.adain.normalize and G.synthesis.blocks[3].adain.normalize
    at_1x1 = G.synthesis.blocks[0].block.conv1.weight.grad.norm()
    at_4x4 = G.synthesis.blocks[3].block.conv1.weight.grad.norm()
    assert G.synthesis.const.grad.norm() > 1e-3 * at_4x4 and at_1x1 > 1e-3 * at_4x4
