"""rtm-mapping: a Recursive Token Mapper (RTM) mapping network for StyleGAN2-ADA and StyleGAN3.

`rtm_mapping.core` is pure PyTorch and works anywhere. The adapters need the official code on
`sys.path`: `rtm_mapping.networks` a StyleGAN2-ADA checkout (it subclasses `training.networks`),
`rtm_mapping.networks_stylegan2` and `networks_stylegan3` a StyleGAN3 one.
"""

__version__ = '0.1.0'

from rtm_mapping.core import DEFAULTS, RecursiveTokenMapper  # noqa: E402

__all__ = ['DEFAULTS', 'RecursiveTokenMapper', '__version__']
