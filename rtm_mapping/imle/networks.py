"""RS-IMLE generators: a mapper z -> w and a decoder w -> image (RTM paper §3.2, App. C, Figure 4).

The mapper is the one thing the paper changes: `rtm_mapping.core.RecursiveTokenMapper` as it is, or
the baseline of all IMLE work, PixelNorm then 8 x (Linear + LeakyReLU 0.2) (Figure 3, left).

The decoders are those of Figure 4 and the table beneath it: each starts from a learned constant at
1x1, upsamples (nearest) at the first block of each stage, runs noise injection, AdaIN(w) and a
residual block at every block, and ends in a 1x1 convolution to RGB:

    fewshot   (Table 5)  residual 1x1/3x3/3x3/1x1 GELU blocks, width 384, 28 blocks, 256 px
    cifar10   (Table 1)  ConvNeXt blocks, width 768, 22 blocks, 32 px
    celebahq  (Table 2)  ConvNeXt blocks, width 768, 34 blocks, 256 px

Where the paper is silent, the few-shot decoder follows RS-IMLE's public code (Vashist et al. 2024;
facts only, no code of it here) and the ConvNeXt block follows Liu et al. 2022; each class says which.
Pure torch; nothing here needs a StyleGAN checkout.
"""

import copy
import inspect
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from rtm_mapping.core import RecursiveTokenMapper, pixel_norm

#----------------------------------------------------------------------------
# The architectures, in one place. stages: (resolution, number of blocks) from the constant up.

MAPPERS = ('rtm', 'mlp')
BLOCKS = ('residual', 'convnext')

DECODERS = {
    'fewshot':  dict(block='residual', width=384, stages=((1, 4), (4, 5), (8, 5), (16, 4), (32, 3), (64, 3), (128, 3), (256, 1))),
    'cifar10':  dict(block='convnext', width=768, stages=((1, 1), (4, 3), (8, 6), (16, 6), (32, 6))),
    'celebahq': dict(block='convnext', width=768, stages=((1, 1), (4, 3), (8, 5), (16, 6), (32, 6), (64, 6), (128, 5), (256, 2))),
}

DECODER_DEFAULTS = dict(
    noise_max_res = 256,    # Noise injection at every block of resolution <= this (App. C: "<= 256"); 0 = none (RS-IMLE's code).
    bottleneck    = 0.25,   # Residual blocks: width of the 3x3 convolutions / width (RS-IMLE's code).
    expansion     = 4,      # ConvNeXt blocks: hidden width / width (Liu et al. 2022).
    img_channels  = 3,      # Output channels.
)

MLP_DEFAULTS = dict(
    num_layers    = 8,      # Linear + LeakyReLU(0.2) layers after PixelNorm (paper §3.2, Figure 3).
)

#----------------------------------------------------------------------------

def _randn_like_device(shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, 1) noise for `like`'s device and dtype, drawn from `generator` (on its own device) or, when
    None, from torch's global RNG of that device."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> torch.nn.Conv2d:
    """A 'same' convolution with PyTorch's default weight initialisation and a zero bias (RS-IMLE's get_conv)."""
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    if bias:
        torch.nn.init.zeros_(conv.bias)
    return conv

#----------------------------------------------------------------------------
# The baseline mapper (paper §3.2, Figure 3 left).

class MappingMLP(torch.nn.Module):
    """The IMLE family's mapping network: PixelNorm, then num_layers x (Linear + LeakyReLU 0.2).

    Plain torch.nn.Linear layers with PyTorch's default weight initialisation and zero biases, no
    equalized learning rate: what RS-IMLE's code trains (its `EqualLinear` is an nn.Linear with the bias
    zeroed), so that the paper's baseline rows are this network. StyleGAN's mapper differs (equalized
    learning rate, lr_multiplier 0.01); that is the adversarial regime's, not this one's.
    """

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = MLP_DEFAULTS['num_layers']):
        super().__init__()
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f'num_layers must be a positive integer, got {num_layers!r}')
        self.z_dim, self.w_dim, self.num_layers = z_dim, w_dim, num_layers
        self.layers = torch.nn.ModuleList(torch.nn.Linear(z_dim if i == 0 else w_dim, w_dim) for i in range(num_layers))
        for layer in self.layers:
            torch.nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(z)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
        return x

#----------------------------------------------------------------------------
# The pieces of every decoder block (Figure 4; RS-IMLE's DecBlock order: noise, AdaIN, block).

class NoiseInjection(torch.nn.Module):
    """Spatial noise injection (StyleGAN, Karras et al. 2019): x + strength[c] * n, n ~ N(0, 1) of shape
    [N, 1, H, W], one learned strength per channel, starting at zero.

    Zero strengths make the module the identity at initialisation, which is what RS-IMLE's code runs
    throughout (its noise module returns its input); training then finds how much noise the paper's
    decoders (App. C: noise at resolutions <= 256) use.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.strength = torch.nn.Parameter(torch.zeros([channels]))

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = _randn_like_device([x.shape[0], 1, x.shape[2], x.shape[3]], x, generator)
        return torch.addcmul(x, self.strength.to(x.dtype).reshape(1, -1, 1, 1), noise)


class AdaIN(torch.nn.Module):
    """Adaptive instance normalization (Huang & Belongie 2017) as RS-IMLE's decoder has it:
    gamma(w) * InstanceNorm(x) + beta(w), gamma and beta from one nn.Linear of w whose bias starts at 1
    (gamma) and 0 (beta); instance norm eps 1e-2.

    normalize=False skips the instance norm where the features hold one value per channel: the 1x1 stage
    and the block that upsamples from it (nearest upsampling of a 1x1 map is spatially uniform). Normalising
    a uniform map sets every feature to zero, so the constant and the 1x1 blocks would reach the image with
    gradients ~1e-6 of the others' (measured at initialisation); RS-IMLE's code skips the norm at 1x1 only."""

    def __init__(self, channels: int, w_dim: int, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.style = torch.nn.Linear(w_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1
            self.style.bias[channels:] = 0

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(w).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        if self.normalize:
            x = F.instance_norm(x, eps=1e-2)
        return torch.addcmul(beta, gamma, x)


class ResidualBlock(torch.nn.Module):
    """The few-shot decoder's block (paper §3.2 and App. C; RS-IMLE's code): x + c4(g(c3(g(c2(g(c1(g(x)))))))),
    g = GELU, c1 1x1 to width * bottleneck, c2 and c3 3x3 (1x1 at resolutions <= 2), c4 1x1 back to width,
    c4's weights scaled by sqrt(1 / num_blocks) so that the residual sum keeps its scale."""

    def __init__(self, width: int, bottleneck: float, num_blocks: int, resolution: int):
        super().__init__()
        hidden = int(width * bottleneck)
        if hidden < 1:
            raise ValueError(f'bottleneck={bottleneck} leaves no channels at width {width}')
        k = 3 if resolution > 2 else 1
        self.conv1 = _conv(width, hidden, 1)
        self.conv2 = _conv(hidden, hidden, k)
        self.conv3 = _conv(hidden, hidden, k)
        self.conv4 = _conv(hidden, width, 1)
        with torch.no_grad():
            self.conv4.weight.mul_(math.sqrt(1 / num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.gelu(x))
        y = self.conv2(F.gelu(y))
        y = self.conv3(F.gelu(y))
        return x + self.conv4(F.gelu(y))


class ConvNeXtBlock(torch.nn.Module):
    """ConvNeXt block (Liu et al. 2022, Fig. 4; equivalent to `Block` of the official convnext.py without
    drop path): x + gamma * pw2(GELU(pw1(LayerNorm(dwconv7x7(x))))), pw1 to width * expansion, layer scale
    gamma starting at 1e-6, weights truncated-normal with std 0.02 and zero biases, as there."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        hidden = int(width * expansion)
        self.dwconv = torch.nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = torch.nn.LayerNorm(width, eps=1e-6)
        self.pwconv1 = torch.nn.Linear(width, hidden)
        self.pwconv2 = torch.nn.Linear(hidden, width)
        self.gamma = torch.nn.Parameter(torch.full([width], 1e-6))
        for layer in (self.dwconv, self.pwconv1, self.pwconv2):
            torch.nn.init.trunc_normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)                             # channels last, as the official block
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (y * self.gamma).permute(0, 3, 1, 2)


class DecoderBlock(torch.nn.Module):
    """One block of Figure 4: nearest upsampling by `up` (the first block of a stage), noise injection
    (at resolutions <= noise_max_res), AdaIN(w), then the residual or ConvNeXt block."""

    def __init__(self, *, block: str, width: int, w_dim: int, resolution: int, up: int, noise: bool,
                 num_blocks: int, bottleneck: float, expansion: int):
        super().__init__()
        self.resolution, self.up = resolution, up
        self.noise = NoiseInjection(width) if noise else None
        self.adain = AdaIN(width, w_dim, normalize=resolution // up > 1)   # the features' own resolution, before upsampling
        if block == 'residual':
            self.block = ResidualBlock(width, bottleneck, num_blocks, resolution)
        else:
            self.block = ConvNeXtBlock(width, expansion)

    def forward(self, x: torch.Tensor, w: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode='nearest')
        if self.noise is not None:
            x = self.noise(x, generator)
        return self.block(self.adain(x, w))

    def extra_repr(self) -> str:
        return f'resolution={self.resolution}, up={self.up}'

#----------------------------------------------------------------------------

def _check_stages(stages) -> list:
    """stages as [[resolution, blocks], ...]: positive integers, each resolution an integer multiple (>= 2) of the one before."""
    try:
        pairs = [[res, num] for res, num in stages]
    except (TypeError, ValueError):
        pairs = []
    ok = len(pairs) >= 1 and all(isinstance(v, int) and v >= 1 for pair in pairs for v in pair)
    ok = ok and all(b[0] > a[0] and b[0] % a[0] == 0 for a, b in zip(pairs, pairs[1:]))
    if not ok:
        raise ValueError(f'stages must be (resolution, blocks) pairs of positive integers, each resolution an integer '
                         f'multiple of the one before, e.g. ((1, 1), (4, 3), (8, 6)); got {stages!r}')
    return pairs


class Decoder(torch.nn.Module):
    """A decoder of App. C / Figure 4: learned constant at the first stage's resolution, DecoderBlocks, 1x1 conv to RGB.

    Args:
        w_dim: Width of the style w that every block's AdaIN reads.
        block: 'residual' (few-shot decoder) or 'convnext' (CIFAR-10 and CelebA-HQ decoders).
        width: Channels of every block.
        stages: (resolution, blocks) pairs from the constant up; the last resolution is the image's.
        noise_max_res, bottleneck, expansion, img_channels: see DECODER_DEFAULTS.
    """

    def __init__(self, w_dim: int, *, block: str, width: int, stages, noise_max_res: int = DECODER_DEFAULTS['noise_max_res'],
                 bottleneck: float = DECODER_DEFAULTS['bottleneck'], expansion: int = DECODER_DEFAULTS['expansion'],
                 img_channels: int = DECODER_DEFAULTS['img_channels']):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f'block must be one of {BLOCKS}, got {block!r}')
        for name, value in dict(width=width, img_channels=img_channels, expansion=expansion).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        if not (isinstance(noise_max_res, int) and noise_max_res >= 0):
            raise ValueError(f'noise_max_res must be an integer >= 0 (0 = no noise injection), got {noise_max_res!r}')
        stages = _check_stages(stages)
        self.stages = stages
        self.img_resolution = stages[-1][0]
        self.img_channels = img_channels

        num_blocks = sum(num for _, num in stages)
        blocks = []
        previous = stages[0][0]
        for resolution, num in stages:
            for i in range(num):
                blocks.append(DecoderBlock(block=block, width=width, w_dim=w_dim, resolution=resolution,
                                           up=resolution // previous if i == 0 else 1, noise=resolution <= noise_max_res,
                                           num_blocks=num_blocks, bottleneck=bottleneck, expansion=expansion))
            previous = resolution
        self.const = torch.nn.Parameter(torch.randn([1, width, stages[0][0], stages[0][0]]))
        self.blocks = torch.nn.ModuleList(blocks)
        self.to_rgb = _conv(width, img_channels, 1, bias=False)
        self.gain = torch.nn.Parameter(torch.ones([1, img_channels, 1, 1]))        # output = gain * to_rgb(x) + bias (RS-IMLE's)
        self.bias = torch.nn.Parameter(torch.zeros([1, img_channels, 1, 1]))

    def forward(self, w: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """w [N, w_dim] -> images [N, img_channels, R, R]; noise from `generator`, else torch's global RNG."""
        x = self.const.expand(w.shape[0], -1, -1, -1)
        for block in self.blocks:
            x = block(x, w, generator)
        return torch.addcmul(self.bias, self.gain, self.to_rgb(x))


def decoder_architecture(name: str, overrides: Optional[dict] = None) -> dict:
    """Keyword arguments of Decoder (all but w_dim) for a named decoder of DECODERS, with `overrides` applied."""
    if name not in DECODERS:
        raise ValueError(f'unknown decoder {name!r}: use one of {", ".join(DECODERS)}')
    arch = dict(DECODER_DEFAULTS, **copy.deepcopy(DECODERS[name]))
    unknown = sorted(set(overrides or {}) - set(arch))
    if unknown:
        raise ValueError(f'unknown decoder option(s) {", ".join(unknown)}: decoder_kwargs takes {", ".join(sorted(arch))}')
    arch.update(copy.deepcopy(overrides or {}))
    return arch

#----------------------------------------------------------------------------

def _rtm_options() -> list:
    return [name for name in inspect.signature(RecursiveTokenMapper.__init__).parameters if name not in ('self', 'in_features', 'out_features')]


def build_mapper(mapper: str, z_dim: int, w_dim: int, mapper_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """The mapper z [N, z_dim] -> w [N, w_dim]: 'rtm' (core.RecursiveTokenMapper) or 'mlp' (MappingMLP)."""
    if mapper not in MAPPERS:
        raise ValueError(f'unknown mapper {mapper!r}: use one of {", ".join(MAPPERS)}')
    kwargs = dict(mapper_kwargs or {})
    allowed = _rtm_options() if mapper == 'rtm' else list(MLP_DEFAULTS)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f'unknown option(s) {", ".join(unknown)} for mapper {mapper!r}: mapper_kwargs takes {", ".join(allowed)}')
    if mapper == 'rtm':
        return RecursiveTokenMapper(z_dim, w_dim, **kwargs)
    return MappingMLP(z_dim, w_dim, **kwargs)


class Generator(torch.nn.Module):
    """An RS-IMLE generator: images = synthesis(mapping(z)).

    Args:
        decoder: A name of DECODERS: 'fewshot' (Table 5), 'cifar10' (Table 1) or 'celebahq' (Table 2).
        mapper: 'rtm' (the paper's Recursive Token Mapper) or 'mlp' (the IMLE baseline).
        z_dim, w_dim: Latent and style widths.
        mapper_kwargs: For 'rtm', RecursiveTokenMapper options (steps, inner_steps, block, tokens, token_dim, ...);
            for 'mlp', num_layers.
        decoder_kwargs: Override the named architecture (block, width, stages, noise_max_res, bottleneck,
            expansion, img_channels), e.g. a small width for tests and smoke runs.

    `init_kwargs` holds these arguments as plain Python values: Generator(**G.init_kwargs) rebuilds the
    same architecture (H and L as constructed; set_steps changes no parameter).
    """

    def __init__(self, *, decoder: str, mapper: str = 'rtm', z_dim: int = 512, w_dim: int = 512,
                 mapper_kwargs: Optional[dict] = None, decoder_kwargs: Optional[dict] = None):
        super().__init__()
        for name, value in dict(z_dim=z_dim, w_dim=w_dim).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        self.init_kwargs = dict(decoder=decoder, mapper=mapper, z_dim=z_dim, w_dim=w_dim,
                                mapper_kwargs=copy.deepcopy(mapper_kwargs), decoder_kwargs=copy.deepcopy(decoder_kwargs))
        self.z_dim, self.w_dim = z_dim, w_dim
        self.mapper = mapper
        self.mapping = build_mapper(mapper, z_dim, w_dim, mapper_kwargs)
        self.synthesis = Decoder(w_dim, **decoder_architecture(decoder, decoder_kwargs))
        self.img_resolution = self.synthesis.img_resolution
        self.img_channels = self.synthesis.img_channels

    def _check_rtm(self, what: str) -> None:
        if self.mapper != 'rtm':
            raise ValueError(f'{what} needs the RTM mapper; this generator has the {self.mapper!r} mapper, '
                             f'whose depth is fixed at construction (mapper_kwargs num_layers)')

    def set_steps(self, steps: Optional[int] = None, inner_steps: Optional[int] = None) -> None:
        """Change the RTM's H (steps) and L (inner_steps) in place (paper §4.4); parameters are unaffected."""
        self._check_rtm('set_steps')
        self.mapping.set_steps(steps=steps, inner_steps=inner_steps)

    def map(self, z: torch.Tensor, steps: Optional[int] = None, inner_steps: Optional[int] = None) -> torch.Tensor:
        """z [N, z_dim] -> w [N, w_dim]; steps, inner_steps override H and L for this call (RTM only)."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f'z must have shape [N, {self.z_dim}], got {list(z.shape)}')
        if self.mapper != 'rtm':
            if steps is not None or inner_steps is not None:
                self._check_rtm('steps and inner_steps')
            return self.mapping(z)
        return self.mapping(z, steps=steps, inner_steps=inner_steps)

    def forward(self, z: torch.Tensor, steps: Optional[int] = None, inner_steps: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z [N, z_dim] -> images [N, img_channels, R, R], float32, nominal range [-1, 1].

        Args:
            z: Latents.
            steps, inner_steps: H and L of the RTM for this call only (None = as set).
            generator: Draws the decoder's noise; None = torch's global RNG. The same generator state gives
                the same images.
        """
        return self.synthesis(self.map(z, steps=steps, inner_steps=inner_steps), generator=generator)

#----------------------------------------------------------------------------
