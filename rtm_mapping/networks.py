"""StyleGAN2-ADA networks with a Recursive Token Mapper (RTM) as the mapping network.

Drop-in for the official `training/networks.py` of NVlabs/stylegan2-ada-pytorch:

    G_kwargs = dnnlib.EasyDict(class_name='rtm_mapping.networks.Generator', z_dim=512, w_dim=512,
                               mapping_kwargs=dnnlib.EasyDict(steps=16, inner_steps=1), synthesis_kwargs=...)

Pickles are self-contained. `torch_utils.persistence` embeds the source of the module that
defines each persistent class: this file for MappingNetwork and Generator, and
rtm_mapping/core.py for the RTM layers, which are made persistent where they are built.
Both files import only torch and the official code, so the official tools load the pickle
with rtm-mapping not installed. This file imports rtm_mapping.core only to build new networks.
"""

import sys

import torch
from torch_utils import misc, persistence
from training import networks

#----------------------------------------------------------------------------

def _core():
    """The pure-torch RTM core: the installed rtm_mapping.core, else the one an RTM pickle
    loaded in this process carries (so that legacy.load_network_pkl(force_fp16=True) can
    rebuild an RTM network on a machine without rtm-mapping)."""
    try:
        from rtm_mapping import core
        return core
    except ImportError:
        carried = [m for m in list(sys.modules.values()) if {'RecursiveTokenMapper', 'CARRY_SEED'} <= set(vars(m))]
        if len(carried) == 1:
            return carried[0]
    raise ImportError('Building an RTM network needs rtm-mapping (pip install rtm-mapping); '
                      'loading and running an RTM pickle does not.')


_persistent_classes = dict()

def _make_persistent(module):
    """Give every RTM core submodule a persistent class, so that pickles embed core.py.
    Re-classing an instance to a subclass that adds no state is what torch.nn.utils.parametrize does."""
    for m in module.modules():
        cls = type(m)
        if not persistence.is_persistent(m):
            if cls not in _persistent_classes:
                _persistent_classes[cls] = persistence.persistent_class(cls)
            m.__class__ = _persistent_classes[cls]
    return module

#----------------------------------------------------------------------------

@persistence.persistent_class
class MappingNetwork(networks.MappingNetwork):
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
        in_features = z_dim + (self.embed.weight.shape[0] if c_dim > 0 else 0)
        self.rtm = _make_persistent(_core().RecursiveTokenMapper(in_features, w_dim, lr_multiplier=lr_multiplier, **rtm_kwargs))

    def mapper_input(self, z, c):
        """What the RTM receives: normalized z, concatenated with the normalized label embedding
        for a conditional model; float32 [batch, in_features]."""
        x = None
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim])
            x = networks.normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim])
            y = networks.normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        return x

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False):
        # Embed, normalize, and concat inputs.
        with torch.autograd.profiler.record_function('input'):
            x = self.mapper_input(z, c)

        # Recursive token mapper.
        x = self.rtm(x)

        # Update moving average of W, skipping batches that are not finite (the training loop
        # feeds torch.empty() through G once at start-up, see misc.print_module_summary).
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.autograd.profiler.record_function('update_w_avg'):
                batch_avg = x.detach().mean(dim=0)
                new_avg = batch_avg.lerp(self.w_avg, self.w_avg_beta)
                self.w_avg.copy_(torch.where(torch.isfinite(batch_avg).all(), new_avg, self.w_avg))

        # Broadcast.
        if self.num_ws is not None:
            with torch.autograd.profiler.record_function('broadcast'):
                x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        # Apply truncation.
        if truncation_psi != 1:
            with torch.autograd.profiler.record_function('truncate'):
                assert self.w_avg_beta is not None
                if self.num_ws is None or truncation_cutoff is None:
                    x = self.w_avg.lerp(x, truncation_psi)
                else:
                    x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x

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
