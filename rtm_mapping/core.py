"""Recursive Token Mapper (RTM): a pure-PyTorch mapping network z -> w.

Implements Algorithm 1 of "Recursive Token Mapper" (arXiv 2605.15309, §3.2 and App. A):
a small shared block f is applied H * (L + 1) times to a pair of token states,
and only the last H-step is differentiated through ("short gradient").

This module imports nothing but torch (and the standard library), on purpose: StyleGAN pickles embed the source
of this file (see rtm_mapping/networks.py), so it must run wherever torch runs.

Speed. A GPU pays per launched kernel, and the recursion calls the shared block
H * (L + 1) = 32 times per mapper call. So everything that does not change between block calls
is computed once per call (`MixerBlock.prepare`: the equalized-learning-rate gains, the casts,
the RMSNorm constants), residuals are fused into their matrix product (addmm / baddbmm), and the
token-axis products run as batched matrix products on the [batch, tokens, token_dim] state
without transposes. `set_compile` captures the recursion with torch.compile (opt-in; never
stored in pickles or copies).
"""

import inspect
import math
import sys
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Defaults, in one place. At z_dim = w_dim = 512 they give 656,388 parameters
# (paper, Table 7: 0.66M), against 525,312 for the 2-layer StyleGAN2 MLP.
#
# Token shape (the paper does not give one): 4 tokens of 128 channels.
# tokens * token_dim = 512 keeps the lift and the readout square, so these two
# layers cost exactly what the 2-layer MLP costs; the shared block then adds
# 131k parameters with TRM's SwiGLU width (expansion 4, hidden = 2/3 * 4 * dim),
# which is the 0.66M the paper reports. The other shape that reaches 0.66M with
# a standard SwiGLU (8 x 64) needs a hidden width of 683 = 10.7 x dim.

DEFAULTS = dict(
    tokens      = 4,        # Number of latent tokens s.
    token_dim   = 128,      # Channels per token d_h.
    steps       = 16,       # Refinement steps H (outer cycles).
    inner_steps = 1,        # Inner cycles L per step.
    block       = 'mixer',  # Shared block f: 'mixer' (paper default) or 'attention' (TRM ablation, App. D).
    expansion   = 4.0,      # SwiGLU expansion, as in TRM.
    heads       = 2,        # Attention heads ('attention' block only).
    grad_steps  = 1,        # Steps differentiated through; 1 = short gradient of the paper.
    eps         = 1e-5,     # RMSNorm epsilon, as in TRM.
)

CARRY_SEED = 0x52544D  # 'RTM': the fixed carry vectors never touch the global RNG.

#----------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last axis, without a learned scale (TRM), computed in float32:
    x / sqrt(mean(x^2) + eps), as 4 kernels (vector_norm, addcmul, rsqrt, mul) instead of 5.

    Args:
        x: Any shape.
        eps: The epsilon as a 0-d float32 tensor on x's device (see MixerBlock.prepare).
    """
    y = x.to(torch.float32)
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)               # sqrt(sum(x^2))
    mean_square = torch.addcmul(eps, norm, norm, value=1 / y.shape[-1])     # eps + sum(x^2) / n
    return (y * torch.rsqrt(mean_square)).to(x.dtype)


def token_rms_norm(x: torch.Tensor, eps: torch.Tensor, token_mean: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the token axis of x [batch, tokens, token_dim], computed in float32, in 4 kernels:
    eps + mean(x^2) over the tokens is one batched product with token_mean, a [1, tokens] row of
    1 / tokens per sample (a reduction over a middle axis, linalg.vector_norm's or mean's, is slower on the CPU).

    Args:
        x: [batch, tokens, token_dim].
        eps: The epsilon as a 0-d float32 tensor on x's device.
        token_mean: [batch, 1, tokens] float32, every entry 1 / tokens.
    """
    y = x.to(torch.float32)
    with torch.autocast(y.device.type, enabled=False):     # the sum of squares stays float32 under autocast
        mean_square = torch.baddbmm(eps, token_mean, y.square())                # [batch, 1, token_dim]
    return (y * torch.rsqrt(mean_square)).to(x.dtype)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """StyleGAN's PixelNorm (normalize_2nd_moment) over the feature axis, in float32."""
    y = x.to(torch.float32)
    return y * torch.rsqrt(y.square().mean(dim=1, keepdim=True) + eps)


def unit_trunc_normal(shape, generator: torch.Generator, bound: float = 2.0) -> torch.Tensor:
    """A normal distribution truncated at +-bound of its standard deviation, rescaled to unit variance:
    TRM's trunc_normal_init_ with std 1 (the truncated normal of JAX and Flax). torch.nn.init.trunc_normal_
    (std=1, a=-2, b=2) draws the same shape with standard deviation 0.88, the std of N(0, 1) cut at +-2.

    Args:
        shape: Shape of the float32 result.
        generator: The random generator to draw from.
        bound: Truncation point, in standard deviations of the normal before truncation.
    """
    sample = torch.nn.init.trunc_normal_(torch.empty(shape), std=1.0, a=-bound, b=bound, generator=generator)
    mass = math.erf(bound / math.sqrt(2))                           # P(|x| < bound) for x ~ N(0, 1)
    density = math.exp(-bound ** 2 / 2) / math.sqrt(2 * math.pi)    # N(0, 1) density at the bound
    return sample / math.sqrt(1 - 2 * bound * density / mass)       # divided by the truncated normal's std


def swiglu_hidden(dim: int, expansion: float) -> int:
    """Hidden width of TRM's SwiGLU, round(2/3 * expansion * dim), without TRM's rounding to
    a multiple of 256 (made for GPU tiles at large widths, it would make a 4-token mixer 23x larger)."""
    return max(1, round(expansion * dim * 2 / 3))

#----------------------------------------------------------------------------

class Linear(torch.nn.Module):
    """Fully-connected layer with StyleGAN's equalized learning rate.

    The weight is stored as N(0, 1) / lr_multiplier and scaled by lr_multiplier / sqrt(in_features)
    at run time, so the layer starts as a 1/sqrt(fan_in) initialisation (TRM's) and Adam moves it
    lr_multiplier times slower, exactly like StyleGAN's FullyConnectedLayer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lr_multiplier: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.zeros([out_features])) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def scaled_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight with its gain applied, cast to dtype: what the layer multiplies by."""
        return self.weight.to(dtype) * self.weight_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return F.linear(x, self.scaled_weight(x.dtype))
        # One kernel: bias_gain * bias + weight_gain * (x @ weight^T), the gains as GEMM scalars.
        y = torch.addmm(self.bias.to(x.dtype), x.reshape(-1, x.shape[-1]), self.weight.to(x.dtype).t(),
                        beta=self.bias_gain, alpha=self.weight_gain)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f'in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, bias={self.bias is not None}'


class SwiGLU(torch.nn.Module):
    """SwiGLU MLP (Shazeer 2020) as in TRM's layers.py: down(silu(gate) * up), no biases."""

    def __init__(self, dim: int, expansion: float, lr_multiplier: float = 1.0):
        super().__init__()
        hidden = swiglu_hidden(dim, expansion)
        self.gate_up = Linear(dim, 2 * hidden, bias=False, lr_multiplier=lr_multiplier)
        self.down = Linear(hidden, dim, bias=False, lr_multiplier=lr_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def channel_mix(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """rms_norm(x + SwiGLU(x)) along the channel axis of x [batch, tokens, token_dim], the residual
    fused into the down projection (addmm). gate_up, down: scaled weights (Linear.scaled_weight)."""
    flat = x.reshape(-1, x.shape[-1])
    gate, up = (flat @ gate_up.t()).chunk(2, dim=-1)
    y = torch.addmm(flat, F.silu(gate) * up, down.t())                  # x + down(silu(gate) * up)
    return rms_norm(y.reshape(x.shape), eps)

#----------------------------------------------------------------------------
# Shared blocks f. Each maps [batch, tokens, token_dim] to the same shape and is
# called as f(state + injection), TRM's ReasoningModule with one layer.
# block(x, weights) takes what block.prepare(x) returns, computed once per mapper call;
# block(x) prepares its own.

class MixerWeights(NamedTuple):
    token_gate_up: torch.Tensor     # [batch, 2 * hidden, tokens], one weight expanded over the batch (a view)
    token_down: torch.Tensor        # [batch, tokens, hidden], the same
    channel_gate_up: torch.Tensor   # [2 * hidden, token_dim]
    channel_down: torch.Tensor      # [token_dim, hidden]
    eps: torch.Tensor               # 0-d float32
    token_mean: torch.Tensor        # [batch, 1, tokens] float32, every entry 1 / tokens (a view)


class MixerBlock(torch.nn.Module):
    """MLP-Mixer block (Tolstikhin et al. 2021) in TRM's post-norm `mlp_t` form.

    Token mixing: SwiGLU along the token axis, residual, RMSNorm (over that axis, as TRM's mlp_t).
    Channel mixing: SwiGLU along the channel axis, residual, RMSNorm.
    Equal to TinyRecursiveModels' TinyRecursiveReasoningModel_ACTV1Block with mlp_t=True where TRM's
    rounding of the SwiGLU hidden widths up to a multiple of 256 is a no-op (each round(8/3 * width)
    already a multiple of 256); otherwise TRM's hidden layers are wider (swiglu_hidden: at the
    defaults, 11 and 341 here against 256 and 512 in TRM).
    """

    def __init__(self, tokens: int, token_dim: int, expansion: float, eps: float, lr_multiplier: float = 1.0):
        super().__init__()
        self.eps = eps
        self.token_mlp = SwiGLU(tokens, expansion, lr_multiplier)
        self.channel_mlp = SwiGLU(token_dim, expansion, lr_multiplier)

    def prepare(self, x: torch.Tensor) -> MixerWeights:
        """Scaled weights and constants for x's batch, dtype and device; they do not change between
        block calls. The token-axis ones are expanded over the batch here, once, not in each block call
        (torch.compile materializes each expand it meets for a batched product)."""
        batch, tokens = x.shape[:2]
        return MixerWeights(
            token_gate_up   = self.token_mlp.gate_up.scaled_weight(x.dtype).expand(batch, -1, -1),
            token_down      = self.token_mlp.down.scaled_weight(x.dtype).expand(batch, -1, -1),
            channel_gate_up = self.channel_mlp.gate_up.scaled_weight(x.dtype),
            channel_down    = self.channel_mlp.down.scaled_weight(x.dtype),
            eps             = torch.full([], self.eps, dtype=torch.float32, device=x.device),
            token_mean      = torch.full([1, 1, tokens], 1 / tokens, dtype=torch.float32, device=x.device).expand(batch, -1, -1),
        )

    def forward(self, x: torch.Tensor, weights: Optional[MixerWeights] = None) -> torch.Tensor:
        w = self.prepare(x) if weights is None else weights
        # Token mixing, SwiGLU over the token axis of [batch, tokens, token_dim] as batched products
        # (weight @ x per sample), the residual fused into the down projection (baddbmm).
        gate, up = torch.bmm(w.token_gate_up, x).chunk(2, dim=1)
        x = token_rms_norm(torch.baddbmm(x, w.token_down, F.silu(gate) * up), w.eps, w.token_mean)
        # Channel mixing.
        return channel_mix(x, w.channel_gate_up, w.channel_down, w.eps)


class AttentionWeights(NamedTuple):
    qkv: torch.Tensor               # [3 * token_dim, token_dim]
    out: torch.Tensor               # [token_dim, token_dim]
    channel_gate_up: torch.Tensor
    channel_down: torch.Tensor
    rope_cos: torch.Tensor          # [tokens, head_dim]
    rope_sin: torch.Tensor
    eps: torch.Tensor


class AttentionBlock(torch.nn.Module):
    """TRM's transformer block: non-causal multi-head self-attention with rotary position
    embeddings over the token grid, then a SwiGLU channel MLP, each residual + post-norm RMSNorm.
    The ablation of App. D; the paper found it worse and slower than MixerBlock.
    """

    def __init__(self, tokens: int, token_dim: int, heads: int, expansion: float, eps: float, lr_multiplier: float = 1.0):
        super().__init__()
        if token_dim % heads != 0 or (token_dim // heads) % 2 != 0:
            raise ValueError(f'token_dim={token_dim} must split into {heads} heads of even size')
        self.eps = eps
        self.heads = heads
        self.qkv = Linear(token_dim, 3 * token_dim, bias=False, lr_multiplier=lr_multiplier)
        self.out = Linear(token_dim, token_dim, bias=False, lr_multiplier=lr_multiplier)
        self.channel_mlp = SwiGLU(token_dim, expansion, lr_multiplier)
        head_dim = token_dim // heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(tokens, dtype=torch.float32), freqs)
        angles = torch.cat([angles, angles], dim=-1)            # [tokens, head_dim]
        self.register_buffer('rope_cos', angles.cos())
        self.register_buffer('rope_sin', angles.sin())

    def prepare(self, x: torch.Tensor) -> AttentionWeights:
        """Scaled weights, rotary tables and epsilon for x's dtype and device."""
        return AttentionWeights(
            qkv             = self.qkv.scaled_weight(x.dtype),
            out             = self.out.scaled_weight(x.dtype),
            channel_gate_up = self.channel_mlp.gate_up.scaled_weight(x.dtype),
            channel_down    = self.channel_mlp.down.scaled_weight(x.dtype),
            rope_cos        = self.rope_cos.to(x.dtype),
            rope_sin        = self.rope_sin.to(x.dtype),
            eps             = torch.full([], self.eps, dtype=torch.float32, device=x.device),
        )

    @staticmethod
    def _rope(x: torch.Tensor, w: AttentionWeights) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * w.rope_cos + rotated * w.rope_sin

    def forward(self, x: torch.Tensor, weights: Optional[AttentionWeights] = None) -> torch.Tensor:
        w = self.prepare(x) if weights is None else weights
        batch, tokens, dim = x.shape
        q, k, v = (x @ w.qkv.t()).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self._rope(q, w), self._rope(k, w), v)
        a = a.transpose(1, 2).reshape(batch * tokens, dim)
        x = rms_norm(torch.addmm(x.reshape(batch * tokens, dim), a, w.out.t()).reshape(x.shape), w.eps)
        return channel_mix(x, w.channel_gate_up, w.channel_down, w.eps)


BLOCKS = ('mixer', 'attention')

#----------------------------------------------------------------------------
# Capturing the recursion (opt-in). torch.compile traces lines 2-11 of Algorithm 1 into one
# graph per (batch size, dtype, device, H, L, grad_steps, grad mode); 'reduce-overhead' replays
# it as a CUDA graph. The compiled function is shared by every mapper of the process and is
# never part of a mapper's state: pickles and copies hold no trace of it.
#
# CUDA graphs and a mapper called again before its results are used up. A CUDA graph's outputs
# live in memory that its next replay writes again, and so do the gradients its backward graph
# computes. StyleGAN's loss calls the mapper twice per phase for style mixing (the first call's w
# still in use), the discriminator phases call it with nothing waiting for a backward (there, each
# call starts a new CUDA-graph iteration, which frees the previous one's memory), and with gradient
# accumulation the parameters' .grad from one round would be graph memory that the next round's
# backward writes again. So nothing that leaves the captured region is graph memory (_copied_out):
# the forward's output is a copy, and the gradients the graph's backward hands to the parameters
# and to z0 are copies, made by a hook on the graph's autograd node before they reach .grad or the
# lift. What stays in graph memory is only what the graph's own backward reads, which PyTorch's
# CUDA graph trees keep while that backward is pending. It costs one [batch, tokens, token_dim]
# copy per call and one copy of the block's gradients per backward, next to hundreds of kernels.
#
# Under DDP (train.py --gpus > 1), dynamo by default splits a graph it compiles at DDP's gradient
# buckets, so that all-reduce starts during the backward ("optimize_ddp"). The recursion's backward
# is one short graph with nothing worth splitting, and on torch 2.1 that path fails for a fullgraph
# compile (a TypeError inside dynamo), so in a process with a process group the captured call runs
# with it off.

COMPILE_MODES = ('auto', 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
_compile_default: Optional[str] = None      # set_compile_default(); per process
_compiled = dict()                          # (function, mode) -> torch.compile(function)


def _check_compile_mode(mode: Optional[str]) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f'compile mode must be None (eager) or one of {COMPILE_MODES}, got {mode!r}')
    if mode is not None and not hasattr(torch, 'compile'):
        raise RuntimeError(f'capturing the recursion needs torch.compile (PyTorch 2.0 or later); this is torch {torch.__version__}')


def set_compile_default(mode: Optional[str]) -> None:
    """Capture the recursion of every mapper in this process that has no set_compile() of its own
    (what train.py --map-compile does in each training process: G, G_ema and rebuilt copies alike).
    None = eager. Nothing of it is stored in pickles."""
    global _compile_default
    _check_compile_mode(mode)
    _compile_default = mode


def _copy_gradients(grad_inputs, grad_outputs):
    """Hook of a captured graph's autograd node: the gradients it computed, as copies (see above)."""
    return tuple(None if grad is None else grad.clone() for grad in grad_inputs)


def _copied_out(captured):
    """`captured` (a compiled recursion) as the mapper calls it: its output and gradients leave it as copies, never
    as graph memory, and in a process with a process group dynamo compiles it without DDP's graph splitting (see above)."""

    def call(*args):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            config = torch._dynamo.config
            optimize_ddp, config.optimize_ddp = config.optimize_ddp, False
            try:
                out = captured(*args)
            finally:
                config.optimize_ddp = optimize_ddp
        else:
            out = captured(*args)
        if out.grad_fn is not None:
            out.grad_fn.register_hook(_copy_gradients)
        return out.clone()
    return call


def compiled(function, mode: str, device_type: str):
    """torch.compile(function) for `mode`, built once per process and reused, its results copied out
    (_copied_out). 'auto': CUDA graphs on CUDA; elsewhere inductor with its C++ wrapper, which calls
    the graph's kernels without a Python dispatch each (at batch 1 on the CPU: 0.26x the eager call
    against 0.39x with the Python wrapper)."""
    if mode == 'auto' and device_type != 'cuda':
        key = (function, 'auto-cpu')
        if key not in _compiled:
            _compiled[key] = _copied_out(torch.compile(function, fullgraph=True, options={'cpp_wrapper': True}))
        return _compiled[key]
    mode = 'reduce-overhead' if mode == 'auto' else mode
    key = (function, mode)
    if key not in _compiled:
        _compiled[key] = _copied_out(torch.compile(function, mode=mode, fullgraph=True))
    return _compiled[key]

#----------------------------------------------------------------------------

class RecursiveTokenMapper(torch.nn.Module):
    """Recursive Token Mapper: maps a latent [batch, in_features] to a style [batch, out_features].

    Args:
        in_features: Input width (z_dim, plus the label embedding in a conditional StyleGAN).
        out_features: Output width (w_dim).
        tokens, token_dim, steps, inner_steps, block, expansion, heads, grad_steps, eps:
            see DEFAULTS. None of them but tokens, token_dim, block and expansion changes the
            parameters, so steps, inner_steps and grad_steps can be changed on a trained model.
        lr_multiplier: Equalized learning-rate multiplier of every layer (StyleGAN uses 0.01).
        input_norm: PixelNorm the input first (Algorithm 1, line 1). False where the caller has normalised
            it: a StyleGAN MappingNetwork normalises z and the label embedding each on its own (StyleMapping).
    """

    _compile_mode: Optional[str] = None     # set_compile(); an instance attribute, left out of pickles and copies

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tokens: int = DEFAULTS['tokens'],
        token_dim: int = DEFAULTS['token_dim'],
        steps: int = DEFAULTS['steps'],
        inner_steps: int = DEFAULTS['inner_steps'],
        block: str = DEFAULTS['block'],
        expansion: float = DEFAULTS['expansion'],
        heads: int = DEFAULTS['heads'],
        grad_steps: int = DEFAULTS['grad_steps'],
        eps: float = DEFAULTS['eps'],
        lr_multiplier: float = 1.0,
        input_norm: bool = True,
    ):
        super().__init__()
        for name, value in dict(in_features=in_features, out_features=out_features, tokens=tokens, token_dim=token_dim, heads=heads).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        if block not in BLOCKS:
            raise ValueError(f'block must be one of {BLOCKS}, got {block!r}')
        for name, value in dict(expansion=expansion, eps=eps, lr_multiplier=lr_multiplier).items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f'{name} must be a positive number, got {value!r}')
        self.in_features = in_features
        self.out_features = out_features
        self.tokens = tokens
        self.token_dim = token_dim
        self.block_name = block
        self.input_norm = bool(input_norm)
        self.set_steps(steps=steps, inner_steps=inner_steps, grad_steps=grad_steps)

        self.lift = Linear(in_features, tokens * token_dim, lr_multiplier=lr_multiplier)     # W_proj, b_proj
        if block == 'mixer':
            self.block = MixerBlock(tokens, token_dim, expansion, eps, lr_multiplier)
        else:
            self.block = AttentionBlock(tokens, token_dim, heads, expansion, eps, lr_multiplier)
        self.readout = Linear(tokens * token_dim, out_features, lr_multiplier=lr_multiplier)  # W_out, b_out

        # Fixed carry vectors Z_H^init, Z_L^init (TRM's H_init / L_init: one unit-variance
        # vector each, shared by all tokens). Drawn from a private generator, so every DDP rank
        # and every rebuild from the constructor arguments gets the same values. They are
        # buffers: a pickle or state dict keeps the values it was written with.
        carry = unit_trunc_normal([2, token_dim], torch.Generator().manual_seed(CARRY_SEED))
        self.register_buffer('h_init', carry[0].clone())
        self.register_buffer('l_init', carry[1].clone())

    @staticmethod
    def _check_steps(**counts) -> None:
        for name, value in counts.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f'{name} must be a positive integer, got {value!r}')

    def set_steps(self, steps: Optional[int] = None, inner_steps: Optional[int] = None, grad_steps: Optional[int] = None) -> None:
        """Change H, L or the number of differentiated steps in place; parameters are unaffected
        (paper §4.4: a model trained at H = 16 can run at H = 8 ... 64 without retraining)."""
        steps = self.steps if steps is None else steps
        inner_steps = self.inner_steps if inner_steps is None else inner_steps
        grad_steps = self.grad_steps if grad_steps is None else grad_steps
        self._check_steps(steps=steps, inner_steps=inner_steps, grad_steps=grad_steps)
        self.steps, self.inner_steps, self.grad_steps = steps, inner_steps, grad_steps

    def set_compile(self, mode: Optional[str] = 'auto') -> 'RecursiveTokenMapper':
        """Capture the recursion (Algorithm 1, lines 2-11) with torch.compile, or None = eager.

        Args:
            mode: 'auto' (CUDA graphs, torch.compile's 'reduce-overhead', on CUDA; inductor with its
                C++ wrapper elsewhere) or a torch.compile mode of COMPILE_MODES.
        Returns:
            self. Outputs and gradients equal the eager ones within float tolerance. Each new batch
            size, dtype, H, L or grad mode compiles once more (torch._dynamo guards). A copy
            (copy.deepcopy, pickle) runs eager until set_compile is called on it.
        """
        _check_compile_mode(mode)
        self._compile_mode = mode
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('_compile_mode', None)
        return state

    def f(self, state: torch.Tensor, injection: torch.Tensor, weights) -> torch.Tensor:
        """The shared block: f(state, injection) = block(state + injection)."""
        return self.block(state + injection, weights)

    def step(self, z_h: torch.Tensor, z_l: torch.Tensor, z0: torch.Tensor, inner_steps: int, weights):
        """One refinement step h of Algorithm 1 (lines 4-7)."""
        for _ in range(inner_steps):
            z_l = self.f(z_l, z_h + z0, weights)    # L-level update with noise re-injection
        z_h = self.f(z_h, z_l, weights)             # H-level update
        return z_h, z_l

    def recurse(self, z0: torch.Tensor, steps: int, inner_steps: int, grad_steps: int) -> torch.Tensor:
        """Lines 2-11 of Algorithm 1: the carry, then H refinement steps; returns the outer state z_H."""
        weights = self.block.prepare(z0)    # gains and casts once per call, not in each of the H (L + 1) block calls

        # Line 2: initialise the carry from fixed vectors.
        z_h = self.h_init.to(z0.dtype).expand_as(z0)
        z_l = self.l_init.to(z0.dtype).expand_as(z0)

        # Lines 3-11. Steps before the last `grad_steps` keep no autograd state (short gradient, §3.2).
        with torch.no_grad():
            for _ in range(steps - grad_steps):
                z_h, z_l = self.step(z_h, z_l, z0, inner_steps, weights)
        for _ in range(grad_steps):
            z_h, z_l = self.step(z_h, z_l, z0, inner_steps, weights)
        return z_h

    def forward(self, z: torch.Tensor, steps: Optional[int] = None, inner_steps: Optional[int] = None) -> torch.Tensor:
        """Map z [batch, in_features] to w [batch, out_features] (float32).

        Args:
            z: Latent (or latent and label embedding), any scale: it is PixelNorm-ed first (unless input_norm=False).
            steps, inner_steps: Override H and L for this call only (positive integers).
        Returns:
            w, float32 unless run under autocast.
        """
        steps = self.steps if steps is None else steps
        inner_steps = self.inner_steps if inner_steps is None else inner_steps
        self._check_steps(steps=steps, inner_steps=inner_steps)
        grad_steps = min(self.grad_steps, steps)

        # Algorithm 1, line 1: project noise to tokens.
        z0 = self.lift(pixel_norm(z) if self.input_norm else z).reshape(-1, self.tokens, self.token_dim)
        # Lines 2-11: the recursion, eager or captured (set_compile).
        mode = self._compile_mode or _compile_default
        recurse = type(self).recurse if mode is None else compiled(type(self).recurse, mode, z0.device.type)
        z_h = recurse(self, z0, steps, inner_steps, grad_steps)
        # Line 12: readout of the flattened outer state.
        return self.readout(z_h.flatten(1))

    def extra_repr(self) -> str:
        return (f'tokens={self.tokens}, token_dim={self.token_dim}, block={self.block_name!r}, '
                f'steps={self.steps}, inner_steps={self.inner_steps}, grad_steps={self.grad_steps}'
                + ('' if self.input_norm else ', input_norm=False')
                + ('' if self._compile_mode is None else f', compile={self._compile_mode!r}'))

#----------------------------------------------------------------------------

# Around the RTM: what a StyleGAN MappingNetwork does before and after its layers (the label
# input, the w_avg tracker, broadcast and truncation), written once for the three adapters:
# rtm_mapping/networks.py (StyleGAN2-ADA), networks_stylegan2.py and networks_stylegan3.py
# (StyleGAN3). It lives in this file because every RTM pickle carries this file (the RTM's
# layers get persistent classes) and no other of ours: an adapter unpickled without rtm-mapping
# installed finds it here. Pure torch; the official parts come from the adapter.
#
# Each adapter runs with the core of its own pickle, named exactly. torch_utils.persistence pickles the
# source of the module of each persistent class and, unpickling, runs each source once per process (a
# source it has seen before gives the module it made then). So the source an adapter pickles is its file
# with the line `CORE_SOURCE = None` replaced by this file's source (pickle_adapter_with_core); unpickled,
# that copy takes persistence's module for that core source, the module the RTM layers of the same pickle
# run in, whatever else the process has loaded and in whichever order. Pickles whose cores differ carry
# different adapter sources, hence get different adapter modules.

ADAPTER_CORE_LINE = 'CORE_SOURCE = None'
_persistent_classes = dict()    # (persistent_class, class) -> persistent subclass


def pickle_adapter_with_core(adapter: types.ModuleType, persistence) -> None:
    """Make torch_utils.persistence pickle `adapter` with the source of this core in it (see above).

    Args:
        adapter: An installed adapter module, while it is imported: before it defines its persistent classes.
        persistence: The official torch_utils.persistence module the adapter decorates its classes with.
    """
    core_source = persistence._module_to_src(sys.modules[__name__])     # what the RTM layers' persistent classes carry
    lines = inspect.getsource(adapter).split('\n')
    if lines.count(ADAPTER_CORE_LINE) != 1:
        raise RuntimeError(f'{adapter.__name__} must have the line {ADAPTER_CORE_LINE!r} exactly once: its pickles name their core there')
    lines[lines.index(ADAPTER_CORE_LINE)] = f'CORE_SOURCE = {core_source!r}'
    source = '\n'.join(lines)
    persistence._module_to_src_dict[adapter] = source       # persistence._module_to_src(adapter) from now on
    persistence._src_to_module_dict[source] = adapter


class StyleMapping:
    """Mixin for a StyleGAN MappingNetwork whose layers are one RecursiveTokenMapper, `self.rtm`.

    Uses what the official MappingNetwork constructor sets: z_dim, c_dim, w_dim, num_ws,
    w_avg_beta, embed (the label embedding, when c_dim > 0) and the w_avg buffer.
    """

    def build_rtm(self, persistence, lr_multiplier: float, **rtm_kwargs) -> RecursiveTokenMapper:
        """A RecursiveTokenMapper from mapper_input() to w, each submodule re-classed to a persistent
        subclass by the official `persistence` module (adding no state, as torch.nn.utils.parametrize
        does), so that pickles embed this file. mapper_input() has PixelNorm-ed its input: the RTM
        does not again (input_norm=False)."""
        in_features = self.z_dim + (self.embed.weight.shape[0] if self.c_dim > 0 else 0)
        rtm = RecursiveTokenMapper(in_features, self.w_dim, lr_multiplier=lr_multiplier, input_norm=False, **rtm_kwargs)
        for m in rtm.modules():
            if not persistence.is_persistent(m):
                key = (persistence.persistent_class, type(m))
                if key not in _persistent_classes:
                    _persistent_classes[key] = persistence.persistent_class(type(m))
                m.__class__ = _persistent_classes[key]
        return rtm

    def mapper_input(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """What the RTM receives: PixelNorm(z), then PixelNorm(embed(c)) for a conditional model.

        Args:
            z: [batch, z_dim] latents (ignored when z_dim = 0).
            c: [batch, c_dim] labels (ignored when c_dim = 0).
        Returns:
            float32 [batch, rtm.in_features].
        """
        parts = []
        if self.z_dim > 0:
            _assert_width(z, self.z_dim, 'z')
            parts.append(pixel_norm(z))
        if self.c_dim > 0:
            _assert_width(c, self.c_dim, 'c')
            parts.append(pixel_norm(self.embed(c.to(torch.float32))))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def rtm_forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                    update_w_avg: bool = False) -> torch.Tensor:
        """The official MappingNetwork.forward with the RTM as its layers; the adapter says when to update w_avg.
        Batches with a non-finite mean leave w_avg as it was (the training loops feed torch.empty()
        through G at start-up, see misc.print_module_summary), and a non-finite w_avg (one copied by --resume
        from a stock snapshot whose start-up made it NaN) restarts from the next finite batch mean."""
        with torch.autograd.profiler.record_function('input'):
            x = self.mapper_input(z, c)
        x = self.rtm(x)

        if update_w_avg and self.w_avg_beta is not None:
            with torch.autograd.profiler.record_function('update_w_avg'):
                batch_avg = x.detach().mean(dim=0)
                new_avg = torch.where(torch.isfinite(self.w_avg).all(), batch_avg.lerp(self.w_avg, self.w_avg_beta), batch_avg)
                self.w_avg.copy_(torch.where(torch.isfinite(batch_avg).all(), new_avg, self.w_avg))

        if self.num_ws is not None:
            with torch.autograd.profiler.record_function('broadcast'):
                x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            with torch.autograd.profiler.record_function('truncate'):
                assert self.w_avg_beta is not None
                if self.num_ws is None or truncation_cutoff is None:
                    x = self.w_avg.lerp(x, truncation_psi)
                else:
                    x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


def _assert_width(x: torch.Tensor, width: int, name: str) -> None:
    """misc.assert_shape(x, [None, width]) of the official code."""
    if x.ndim != 2 or x.shape[1] != width:
        raise AssertionError(f'{name} must have shape [batch, {width}], got {list(x.shape)}')

#----------------------------------------------------------------------------
