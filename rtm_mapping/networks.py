"""StyleGAN2-ADA networks with a Recursive Token Mapper (RTM) as the mapping network.

Drop-in for the official `training/networks.py` of NVlabs/stylegan2-ada-pytorch:

    G_kwargs = dnnlib.EasyDict(class_name='rtm_mapping.networks.Generator', z_dim=512, w_dim=512,
                               mapping_kwargs=dnnlib.EasyDict(steps=16, inner_steps=1), synthesis_kwargs=...)

One of three thin adapters over rtm_mapping/core.py (StyleGAN3's are networks_stylegan2.py and
networks_stylegan3.py); what they share, core.StyleMapping, is there. What is StyleGAN2-ADA's
here: the official signatures, w_avg tracked in train mode unless skip_w_avg_update, and
synthesis_kwargs passed as a dict.

Pickles are self-contained. `torch_utils.persistence` embeds the source of the module that
defines each persistent class: this file for MappingNetwork and Generator, and
rtm_mapping/core.py for the RTM layers, which are made persistent where they are built.
Both files import only torch and the official code, so the official tools load the pickle
with rtm-mapping not installed, and the copy of this file in a pickle names the core of
that pickle exactly (CORE_SOURCE below), so it runs with it whatever else is loaded.
"""

import sys

from torch_utils import persistence
from training import networks

#----------------------------------------------------------------------------

# The RTM core this file runs with, named exactly. Installed, it is rtm_mapping.core, and the copy of
# this file that a network pickle carries has that core's source in CORE_SOURCE instead of None
# (core.pickle_adapter_with_core). Unpickled, torch_utils.persistence runs that copy, which takes
# persistence's module for that source: the core the RTM layers of the same pickle run in, whatever
# else the process has loaded. These lines are in each adapter: a file a pickle carries cannot import
# a shared one, and the shared part runs in the installed core.
CORE_SOURCE = None
if CORE_SOURCE is None:
    from rtm_mapping import core
    core.pickle_adapter_with_core(sys.modules[__name__], persistence)
else:
    core = persistence._src_to_module(CORE_SOURCE)

#----------------------------------------------------------------------------

@persistence.persistent_class
class MappingNetwork(core.StyleMapping, networks.MappingNetwork):
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
        w_avg_beta      = 0.995,    # Decay for tracking the moving average of W during training, None = do not track.
        **rtm_kwargs,               # Arguments for rtm_mapping.core.RecursiveTokenMapper: steps, inner_steps, block, tokens, token_dim, ...
    ):
        # The official constructor with no layers sets the attributes, the label embedding and w_avg.
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=num_ws, num_layers=0,
            embed_features=embed_features, layer_features=layer_features, activation=activation,
            lr_multiplier=lr_multiplier, w_avg_beta=w_avg_beta)
        self.rtm = self.build_rtm(persistence, lr_multiplier=lr_multiplier, **rtm_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False):
        return self.rtm_forward(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
            update_w_avg=(self.training and not skip_w_avg_update))

#----------------------------------------------------------------------------

@persistence.persistent_class
class Generator(networks.Generator):
    def __init__(self,
        z_dim,                      # Input latent (Z) dimensionality.
        c_dim,                      # Conditioning label (C) dimensionality.
        w_dim,                      # Intermediate latent (W) dimensionality.
        img_resolution,             # Output resolution.
        img_channels,               # Number of output color channels.
        mapping_kwargs      = None, # Arguments for MappingNetwork (official ones and RTM's), None = defaults.
        synthesis_kwargs    = None, # Arguments for SynthesisNetwork, None = defaults.
    ):
        # The official constructor builds the synthesis network and a placeholder mapping without layers.
        super().__init__(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
            mapping_kwargs=dict(num_layers=0), synthesis_kwargs=dict(synthesis_kwargs or {}))
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **(mapping_kwargs or {}))

#----------------------------------------------------------------------------
