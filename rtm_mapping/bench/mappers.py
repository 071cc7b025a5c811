"""The mappers that `rtm-mapping bench` compares, built one way for every part.

With a StyleGAN2-ADA checkout they are the official `training.networks.MappingNetwork` and
`rtm_mapping.networks.MappingNetwork`; without one, `rtm_mapping.mlp.ReferenceMLP` and the bare
`core.RecursiveTokenMapper` (same layers, same FLOPs). `num_ws=None` builds the bare mapper (one w, no
w_avg); an int builds it as train.py does (w broadcast to num_ws, w_avg tracked).
"""

import dataclasses
from typing import Callable, Dict, Iterable, Optional

import torch

from rtm_mapping import core
from rtm_mapping.mlp import ReferenceMLP

Z_DIM = W_DIM = 512         # As train.py.
MLP_LAYERS = (2, 8)         # Official mapping depths: train.py --cfg=cifar uses 2, the paper configs 8.


@dataclasses.dataclass
class Mapper:
    """One mapper under test: its row name in the tables, the module, and how the parts call it."""
    name:       str
    module:     torch.nn.Module
    kind:       str                 # 'mlp' or 'rtm'.
    steps:      Optional[int]       # RTM's H; None for an MLP.
    official:   bool                # A MappingNetwork, called as (z, c).

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.module(z, None) if self.official else self.module(z)

    @property
    def rtm(self) -> core.RecursiveTokenMapper:
        return getattr(self.module, 'rtm', self.module)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return self(z).square().mean()

    def forward(self, z: torch.Tensor) -> Callable[[], object]:
        """One eval-mode forward under no_grad (the module is put in eval mode now)."""
        self.module.eval()

        def run():
            with torch.no_grad():
                return self(z)
        return run

    def forward_backward(self, z: torch.Tensor) -> Callable[[], object]:
        """One train-mode forward and backward of a mean-square loss (the module is put in train mode now)."""
        self.module.train()

        def run():
            self.module.zero_grad(set_to_none=True)
            self.loss(z).backward()
        return run


def baseline(official: bool) -> str:
    """The MLP the RTM is measured against."""
    return 'official training.networks.MappingNetwork' if official else 'rtm_mapping.mlp.ReferenceMLP'


def mlp(official: bool, layers: int, num_ws: Optional[int] = None) -> Mapper:
    if official:
        from training import networks
        module = networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=num_ws, num_layers=layers,
                                         **(dict(w_avg_beta=None) if num_ws is None else {}))
    else:
        module = ReferenceMLP(Z_DIM, W_DIM, layers)
    return Mapper(name=f'MLP {layers} layers', module=module, kind='mlp', steps=None, official=official)


def rtm(official: bool, num_ws: Optional[int] = None, name: Optional[str] = None, **rtm_kwargs) -> Mapper:
    """RTM with core.DEFAULTS but for rtm_kwargs (steps, grad_steps, ...)."""
    if official:
        from rtm_mapping import networks
        module = networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=num_ws,
                                         **(dict(w_avg_beta=None) if num_ws is None else {}), **rtm_kwargs)
    else:
        module = core.RecursiveTokenMapper(Z_DIM, W_DIM, lr_multiplier=0.01, **rtm_kwargs)
    steps = getattr(module, 'rtm', module).steps
    return Mapper(name=name or f'RTM H={steps}', module=module, kind='rtm', steps=steps, official=official)


def build(official: bool, device: torch.device, steps: Iterable[int], num_ws: Optional[int] = None) -> Dict[str, Mapper]:
    """name -> Mapper: the MLP at each depth of MLP_LAYERS, then RTM at each H of `steps`, on `device`."""
    built = [mlp(official, layers, num_ws) for layers in MLP_LAYERS] + [rtm(official, num_ws, steps=h) for h in steps]
    for m in built:
        m.module.to(device)
    return {m.name: m for m in built}
