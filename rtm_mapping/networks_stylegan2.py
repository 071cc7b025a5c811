"""StyleGAN3's StyleGAN2 networks (`--cfg=stylegan2`) with a Recursive Token Mapper (RTM) as the mapping network.

Drop-in for `training/networks_stylegan2.py` of NVlabs/stylegan3:

    c.G_kwargs = dnnlib.EasyDict(class_name='rtm_mapping.networks_stylegan2.Generator', z_dim=512, w_dim=512,
                                 mapping_kwargs=dnnlib.EasyDict(steps=16, inner_steps=1), channel_base=..., ...)

One of three thin adapters over rtm_mapping/core.py (core.StyleMapping holds what they share).
What is StyleGAN3's here: w_avg tracked only when the caller passes update_emas=True, w_avg_beta
0.998, and the synthesis arguments passed flat to Generator. Pickles carry this file and core.py
(see rtm_mapping/networks.py), so the official tools load them with rtm-mapping not installed.
"""

import sys

from torch_utils import persistence
from training import networks_stylegan2

#----------------------------------------------------------------------------

# The RTM core this file runs with: rtm_mapping.core, or in the copy a pickle carries, the core whose source
# CORE_SOURCE holds, that of the same pickle (see rtm_mapping/networks.py).
CORE_SOURCE = None
if CORE_SOURCE is None:
    from rtm_mapping import core
    core.pickle_adapter_with_core(sys.modules[__name__], persistence)
else:
    core = persistence._src_to_module(CORE_SOURCE)

#----------------------------------------------------------------------------

@persistence.persistent_class
class MappingNetwork(core.StyleMapping, networks_stylegan2.MappingNetwork):
    def __init__(self,
        z_dim,                      # Input latent (Z) dimensionality, 0 = no latent.
        c_dim,                      # Conditioning label (C) dimensionality, 0 = no label.
        w_dim,                      # Intermediate latent (W) dimensionality.
        num_ws,                     # Number of intermediate latents to output, None = do not broadcast.
        num_layers      = 8,        # Unused by RTM (its depth is steps * (inner_steps + 1)); kept for signature parity.
        embed_features  = None,     # Label embedding dimensionality, None = same as w_dim.
        layer_features  = None,     # Unused by RTM (its width is tokens * token_dim); kept for signature parity.
        activation      = 'lrelu',  # Unused by RTM (SwiGLU); kept for signature parity.
        lr_multiplier   = 0.01,     # Learning rate multiplier for every RTM layer (lift, shared block, readout).
        w_avg_beta      = 0.998,    # Decay for tracking the moving average of W during training, None = do not track.
        **rtm_kwargs,               # Arguments for rtm_mapping.core.RecursiveTokenMapper: steps, inner_steps, block, tokens, token_dim, ...
    ):
        # The official constructor with no layers sets the attributes, the label embedding and w_avg.
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=num_ws, num_layers=0,
            embed_features=embed_features, layer_features=layer_features, activation=activation,
            lr_multiplier=lr_multiplier, w_avg_beta=w_avg_beta)
        self.rtm = self.build_rtm(persistence, lr_multiplier=lr_multiplier, **rtm_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        return self.rtm_forward(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_w_avg=update_emas)

#----------------------------------------------------------------------------

@persistence.persistent_class
class Generator(networks_stylegan2.Generator):
    def __init__(self,
        z_dim,                      # Input latent (Z) dimensionality.
        c_dim,                      # Conditioning label (C) dimensionality.
        w_dim,                      # Intermediate latent (W) dimensionality.
        img_resolution,             # Output resolution.
        img_channels,               # Number of output color channels.
        mapping_kwargs      = None, # Arguments for MappingNetwork (official ones and RTM's), None = defaults.
        **synthesis_kwargs,         # Arguments for SynthesisNetwork.
    ):
        # The official constructor builds the synthesis network and a placeholder mapping without layers.
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
            mapping_kwargs=dict(num_layers=0), **synthesis_kwargs)
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **(mapping_kwargs or {}))

#----------------------------------------------------------------------------
