"""rtm-mapping: a Recursive Token Mapper (RTM) mapping network for StyleGAN2-ADA.

`rtm_mapping.core` is pure PyTorch and works anywhere. `rtm_mapping.networks` needs a
StyleGAN2-ADA checkout on `sys.path` (it subclasses `training.networks`).
"""

__version__ = '0.1.0'

from rtm_mapping.core import DEFAULTS, RecursiveTokenMapper  # noqa: E402

__all__ = ['DEFAULTS', 'RecursiveTokenMapper', '__version__']
