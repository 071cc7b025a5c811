"""Test-side stand-in for the one name StyleGAN3's torch_utils/ops import from pkg_resources, which
setuptools >= 81 no longer ships. NVIDIA's code needs it, not rtm-mapping: tests put this folder
last on the path, so a real pkg_resources wins where there is one."""

from packaging.version import parse as parse_version

__all__ = ['parse_version']
