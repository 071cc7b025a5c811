"""The official StyleGAN2-ADA MLP mapper in pure torch, for comparisons that have no checkout.

`ReferenceMLP` is what `rtm-mapping bench` measures RTM against when no StyleGAN2-ADA checkout is given,
and the MLP mapper of `rtm-mapping mode-coverage`.
"""

import math

import torch
import torch.nn.functional as F

from rtm_mapping import core


class ReferenceMLP(torch.nn.Module):
    """A pure-torch equivalent of the official StyleGAN2-ADA MappingNetwork (unconditional, no w_avg):
    PixelNorm, then `num_layers` equalized-learning-rate fully-connected layers (lr_multiplier 0.01)
    each followed by leaky ReLU (slope 0.2) with gain sqrt(2), as the official bias_act 'lrelu'.
    It has the official layer shapes, hence its FLOPs."""

    def __init__(self, in_features: int, out_features: int, num_layers: int, lr_multiplier: float = 0.01):
        super().__init__()
        features = [in_features] + [out_features] * num_layers
        self.layers = torch.nn.ModuleList([core.Linear(features[i], features[i + 1], lr_multiplier=lr_multiplier)
                                           for i in range(num_layers)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = core.pixel_norm(z)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2) * math.sqrt(2)
        return x
