"""The pure-torch RTM core against Algorithm 1 of the paper (App. A). Runs without StyleGAN."""

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from rtm_mapping import core
from rtm_mapping.core import RecursiveTokenMapper

# The core fuses what the math allows (residual into addmm / baddbmm, RMSNorm through
# vector_norm, equalized-lr gains as GEMM scalars, gains applied once per call): the same math
# in another summation order, so it matches the textbook form below to float32 rounding, not bitwise.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
EPS32 = torch.finfo(torch.float32).eps


def assert_close_float32(actual, expected, epsilons, msg=None):
    """|actual - expected| <= `epsilons` float32 epsilons of expected's largest entry: rounding, whatever the kernels.
    Through H (L + 1) normalised blocks the two orders of summation drift apart by tens of epsilons in the forward and
    hundreds in the gradients (over 20 seeds: forward up to 100 on torch 2.1's CPU kernels, 33 on 2.15; gradients up
    to 1,439 and 237); a wrong formula differs by the whole scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=epsilons * EPS32 * expected.abs().max().item(), msg=msg)


def textbook_linear(layer: core.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias * layer.bias_gain
    return F.linear(x, layer.weight * layer.weight_gain, bias)


def textbook_swiglu(mlp: core.SwiGLU, x: torch.Tensor) -> torch.Tensor:
    gate, up = textbook_linear(mlp.gate_up, x).chunk(2, dim=-1)
    return textbook_linear(mlp.down, F.silu(gate) * up)


def textbook_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def textbook_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shared block as the papers write it: transposes, one layer at a time, RMSNorm as mean of squares."""
    if isinstance(block, core.MixerBlock):
        t = x.transpose(1, 2)                                                   # token mixing over [batch, token_dim, tokens]
        x = textbook_rms_norm(t + textbook_swiglu(block.token_mlp, t), block.eps).transpose(1, 2)
    else:
        batch, tokens, dim = x.shape
        q, k, v = textbook_linear(block.qkv, x).reshape(batch, tokens, 3, block.heads, dim // block.heads).permute(2, 0, 3, 1, 4)

        def rope(u):
            u1, u2 = u.chunk(2, dim=-1)
            return u * block.rope_cos + torch.cat([-u2, u1], dim=-1) * block.rope_sin
        a = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(batch, tokens, dim)
        x = textbook_rms_norm(x + textbook_linear(block.out, a), block.eps)
    return textbook_rms_norm(x + textbook_swiglu(block.channel_mlp, x), block.eps)


def unrolled_algorithm_1(m: RecursiveTokenMapper, z: torch.Tensor, H: int, L: int) -> torch.Tensor:
    """Algorithm 1, line for line, with the explicit detach of line 9."""
    z0 = textbook_linear(m.lift, core.pixel_norm(z)).reshape(-1, m.tokens, m.token_dim)    # line 1
    z_h = m.h_init.expand_as(z0)                                                # line 2
    z_l = m.l_init.expand_as(z0)
    for h in range(1, H + 1):                                                   # line 3
        for _ in range(L):                                                      # line 4
            z_l = textbook_block(m.block, z_l + (z_h + z0))                     # line 5
        z_h = textbook_block(m.block, z_h + z_l)                                # line 7
        if h < H:                                                               # line 8
            z_h, z_l = z_h.detach(), z_l.detach()                               # line 9
    return textbook_linear(m.readout, z_h.flatten(1))                           # line 12


def saved_tensor_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while running fn()."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize('block', core.BLOCKS)
def test_shapes_and_dtype(block):
    m = RecursiveTokenMapper(96, 40, tokens=3, token_dim=16, steps=2, block=block, heads=2)
    w = m(torch.randn(5, 96))
    assert w.shape == (5, 40) and w.dtype == torch.float32


@pytest.mark.parametrize('block', core.BLOCKS)
@pytest.mark.parametrize('H,L', [(1, 1), (3, 2), (4, 1)])
def test_equals_hand_unrolled_algorithm_1(block, H, L):
    m = RecursiveTokenMapper(32, 24, tokens=4, token_dim=8, steps=H, inner_steps=L, block=block, heads=2)
    z = torch.randn(6, 32)
    assert_close_float32(m(z), unrolled_algorithm_1(m, z, H, L), epsilons=512)


@pytest.mark.parametrize('block', core.BLOCKS)
def test_short_gradient_is_last_step_with_earlier_steps_detached(block):
    m = RecursiveTokenMapper(32, 24, tokens=4, token_dim=8, steps=5, inner_steps=2, block=block, heads=2)
    z = torch.randn(6, 32)
    target = torch.randn(6, 24)

    def grads(fn):
        m.zero_grad()
        (fn() - target).square().mean().backward()
        return {name: p.grad.clone() for name, p in m.named_parameters()}

    ours, reference = grads(lambda: m(z)), grads(lambda: unrolled_algorithm_1(m, z, 5, 2))
    assert ours.keys() == reference.keys()
    for name in ours:
        assert_close_float32(ours[name], reference[name], epsilons=4096, msg=name)
        assert ours[name].abs().sum() > 0, f'{name} gets no gradient'


def test_earlier_steps_keep_no_autograd_state():
    z = torch.randn(32, 512)
    m = RecursiveTokenMapper(512, 512)
    at_h1 = saved_tensor_bytes(lambda: m(z, steps=1))
    at_h16 = saved_tensor_bytes(lambda: m(z, steps=16))
    m.set_steps(grad_steps=16)
    full = saved_tensor_bytes(lambda: m(z, steps=16))
    assert at_h16 <= 1.05 * at_h1
    assert full > 8 * at_h1  # full backpropagation through time keeps every step


def test_default_parameter_count_matches_paper_and_ignores_schedule():
    counts = {(H, L, g): sum(p.numel() for p in RecursiveTokenMapper(512, 512, steps=H, inner_steps=L, grad_steps=g).parameters())
              for H, L, g in [(16, 1, 1), (1, 1, 1), (64, 3, 1), (8, 2, 4)]}
    assert len(set(counts.values())) == 1
    lift = readout = 512 * 512 + 512                    # square layers with bias
    token_mlp, channel_mlp = 3 * 4 * 11, 3 * 128 * 341  # SwiGLU: gate_up [2h, dim] and down [dim, h], h = round(8/3 * dim)
    assert counts[16, 1, 1] == lift + readout + token_mlp + channel_mlp == 656_388    # README: the paper's 0.66M


def test_carry_vectors_are_deterministic_across_global_seeds():
    torch.manual_seed(1)
    a = RecursiveTokenMapper(16, 16, tokens=2, token_dim=8)
    torch.manual_seed(2)
    b = RecursiveTokenMapper(16, 16, tokens=2, token_dim=8)
    assert torch.equal(a.h_init, b.h_init) and torch.equal(a.l_init, b.l_init)
    assert not torch.equal(a.h_init, a.l_init)
    assert not torch.equal(a.lift.weight, b.lift.weight)  # parameters do follow the global seed
    assert {name for name, _ in a.named_buffers()} == {'h_init', 'l_init'}


def truncated_normal_std(bound: float) -> float:
    """Standard deviation of N(0, 1) cut at +-bound, by quadrature in float64 (no erf, unlike the core)."""
    x = torch.linspace(-bound, bound, 400_001, dtype=torch.float64)
    density = torch.exp(-x ** 2 / 2)
    return math.sqrt(torch.trapezoid(x ** 2 * density, x) / torch.trapezoid(density, x))


def test_carry_vectors_have_unit_variance_as_trms_initialiser():
    # TRM draws H_init / L_init with trunc_normal_init_(std=1): a normal cut at +-2 of its std, rescaled so that
    # the std is 1. torch.nn.init.trunc_normal_(std=1, a=-2, b=2) leaves the std at that of the cut normal, 0.88.
    cut_std = truncated_normal_std(2.0)
    assert cut_std == pytest.approx(0.8796, abs=1e-4)
    x = core.unit_trunc_normal([1_000_000], torch.Generator().manual_seed(0)).double()
    assert float(x.std()) == pytest.approx(1, abs=3e-3) and abs(float(x.mean())) < 3e-3
    assert 0.999 * 2 / cut_std < float(x.abs().max()) <= 2 / cut_std + 1e-6     # cut at 2 of the normal's std, rescaled

    m = RecursiveTokenMapper(16, 16, tokens=2, token_dim=64)
    draw = torch.nn.init.trunc_normal_(torch.empty([2, 64]), a=-2, b=2, generator=torch.Generator().manual_seed(core.CARRY_SEED))
    torch.testing.assert_close(torch.stack([m.h_init, m.l_init]), draw / cut_std, rtol=1e-6, atol=0)
    # Carry vectors are buffers: a state dict (or pickle) of an earlier version keeps the carry it was written with.
    old = dict(m.state_dict(), h_init=draw[0], l_init=draw[1])
    m.load_state_dict(old)
    assert torch.equal(m.h_init, draw[0]) and torch.equal(pickle.loads(pickle.dumps(m)).l_init, draw[1])


def test_input_is_pixel_normed_unless_the_caller_has():
    m = RecursiveTokenMapper(32, 24, tokens=4, token_dim=8, steps=2)
    z = torch.randn(6, 32)
    torch.testing.assert_close(m(z * 7), m(z), **TOLERANCE)        # PixelNorm first: the scale of z does not matter
    prenormed = RecursiveTokenMapper(32, 24, tokens=4, token_dim=8, steps=2, input_norm=False)     # as a MappingNetwork builds it
    prenormed.load_state_dict(m.state_dict())
    assert 'input_norm=False' in repr(prenormed) and 'input_norm' not in repr(m)
    torch.testing.assert_close(prenormed(core.pixel_norm(z)), m(z), rtol=0, atol=0)
    assert not torch.allclose(prenormed(z * 7), m(z), **TOLERANCE)


def test_inference_override_equals_a_model_built_with_that_schedule():
    trained = RecursiveTokenMapper(64, 64, tokens=4, token_dim=16, steps=16)
    z = torch.randn(8, 64)
    rebuilt = RecursiveTokenMapper(64, 64, tokens=4, token_dim=16, steps=32, inner_steps=2)
    rebuilt.load_state_dict(trained.state_dict())
    per_call = trained(z, steps=32, inner_steps=2)
    trained.set_steps(steps=32, inner_steps=2)
    torch.testing.assert_close(trained(z), rebuilt(z), rtol=0, atol=0)
    torch.testing.assert_close(per_call, rebuilt(z), rtol=0, atol=0)
    assert trained.steps == 32


def test_schedule_validation():
    m = RecursiveTokenMapper(8, 8, tokens=2, token_dim=4)
    for bad in [dict(steps=0), dict(inner_steps=-1), dict(grad_steps=1.5)]:
        with pytest.raises(ValueError):
            m.set_steps(**bad)
    with pytest.raises(ValueError, match='block'):
        RecursiveTokenMapper(8, 8, block='transformer')
    with pytest.raises(ValueError, match='heads'):
        RecursiveTokenMapper(8, 8, tokens=2, token_dim=6, block='attention', heads=4)


@pytest.mark.parametrize('block', core.BLOCKS)
def test_finite_at_depth_128_from_random_init(block):
    m = RecursiveTokenMapper(512, 512, steps=128, block=block)
    with torch.no_grad():
        w = m(torch.randn(16, 512) * 100)
    assert torch.isfinite(w).all()


def cpu_autocast_dtypes():
    """The half types this torch's CPU autocast takes (torch 2.1: bfloat16 only; later ones float16 too)."""
    supported = []
    for dtype in (torch.bfloat16, torch.float16):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')     # torch 2.1 warns, then raises, for float16
                with torch.autocast('cpu', dtype=dtype):
                    if torch.mm(torch.ones(1, 1), torch.ones(1, 1)).dtype == dtype:
                        supported.append(dtype)
        except RuntimeError:
            pass
    return supported


def test_cpu_autocast_has_a_half_type():
    assert torch.bfloat16 in cpu_autocast_dtypes()


@pytest.mark.parametrize('dtype', cpu_autocast_dtypes())
def test_finite_under_autocast(dtype):
    m = RecursiveTokenMapper(512, 512, steps=16)
    z = torch.randn(16, 512) * 1e3
    with torch.autocast('cpu', dtype=dtype):
        w = m(z)
    w.float().square().mean().backward()
    assert torch.isfinite(w).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.autocast('cpu', dtype=dtype):
        w1 = m(z, steps=1)
    torch.testing.assert_close(w1.float(), m(z, steps=1), atol=0.05, rtol=0.05)


def test_per_call_overrides_are_validated_like_set_steps():
    m = RecursiveTokenMapper(8, 8, tokens=2, token_dim=4)
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r'steps must be a positive integer, got 0'):
        m(z, steps=0)
    with pytest.raises(ValueError, match=r'inner_steps must be a positive integer, got -1'):
        m(z, inner_steps=-1)
    with pytest.raises(ValueError, match=r'steps must be a positive integer, got 2.0'):
        m(z, steps=2.0)


@pytest.mark.parametrize('name', ['expansion', 'eps', 'lr_multiplier'])
def test_positive_number_errors_name_the_argument_and_value(name):
    with pytest.raises(ValueError, match=rf'^{name} must be a positive number, got -0.5$'):
        RecursiveTokenMapper(8, 8, **{name: -0.5})


def test_state_dict_names_and_shapes_unchanged():
    # Pickles written before the fused eager path must load into this code: same tensors.
    m = RecursiveTokenMapper(512, 512)
    shapes = {name: tuple(t.shape) for name, t in m.state_dict().items()}
    assert shapes == {
        'lift.weight': (512, 512), 'lift.bias': (512,),
        'block.token_mlp.gate_up.weight': (22, 4), 'block.token_mlp.down.weight': (4, 11),
        'block.channel_mlp.gate_up.weight': (682, 128), 'block.channel_mlp.down.weight': (128, 341),
        'readout.weight': (512, 512), 'readout.bias': (512,),
        'h_init': (128,), 'l_init': (128,),
    }


def test_compile_setting_is_left_out_of_pickles_and_copies():
    m = RecursiveTokenMapper(8, 8, tokens=2, token_dim=4).set_compile('default')
    assert m._compile_mode == 'default' and 'compile' in repr(m)
    for other in [pickle.loads(pickle.dumps(m)), copy.deepcopy(m)]:
        assert other._compile_mode is None and '_compile_mode' not in vars(other)
        torch.testing.assert_close(other.state_dict(), m.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match='compile mode'):
        m.set_compile('fast')


def test_rms_norms_are_the_mean_square_form():
    x = torch.randn(5, 3, 7) * 10
    eps = torch.full([], 1e-5)
    for dim, normed in [(-1, core.rms_norm(x, eps)), (1, core.token_rms_norm(x, eps, torch.full([1, 1, 3], 1 / 3).expand(5, -1, -1)))]:
        expected = x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + 1e-5)
        torch.testing.assert_close(normed, expected, **TOLERANCE)
    tiny = torch.zeros(2, 4)
    assert torch.equal(core.rms_norm(tiny, eps), tiny)          # epsilon keeps an all-zero row finite
    assert math.isclose(core.rms_norm(torch.ones(1, 4), eps).sum().item(), 4 / math.sqrt(1 + 1e-5), rel_tol=1e-6)
