"""Shared fixtures. Tests that need NVIDIA's code skip unless STYLEGAN2_ADA_ROOT (or STYLEGAN3_ROOT)
points at a checkout of NVlabs/stylegan2-ada-pytorch (or NVlabs/stylegan3); it is never vendored
here (NVIDIA Source Code License)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

SKIP_REASON = ('needs a StyleGAN2-ADA checkout: set STYLEGAN2_ADA_ROOT to a clone (or export) of '
               'NVlabs/stylegan2-ada-pytorch to run it')
SKIP_REASON_STYLEGAN3 = ('needs a StyleGAN3 checkout: set STYLEGAN3_ROOT to a clone (or export) of '
                         'NVlabs/stylegan3 to run it')

# StyleGAN3's torch_utils/ops import pkg_resources (gone from setuptools >= 81): tests/shims has a stand-in, put on the
# path only where setuptools has none (through PYTHONPATH it comes before site-packages and would shadow the real one).
SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shims')
SHIM_PATHS = [SHIMS] if importlib.util.find_spec('pkg_resources') is None else []

# Modules that belong to one checkout: the official packages and scripts, and our adapters that import them.
CHECKOUT_MODULES = ('dnnlib', 'legacy', 'torch_utils', 'training', 'metrics', 'train', 'calc_metrics', 'generate',
                    'gen_images', 'gen_video', 'style_mixing', 'projector', 'dataset_tool',
                    'rtm_mapping.networks', 'rtm_mapping.networks_stylegan2', 'rtm_mapping.networks_stylegan3')


@pytest.fixture(scope='session')
def stylegan_root():
    """Path of the StyleGAN2-ADA checkout, put on sys.path; skips the test when there is none."""
    root = os.environ.get('STYLEGAN2_ADA_ROOT')
    if not root:
        pytest.skip(SKIP_REASON)
    from stylegan2_ada_patch import checkout
    root = checkout.validate(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


def _checkout_modules(extra=()):
    return {name: module for name, module in sys.modules.items()
            if any(name == top or name.startswith(top + '.') for top in CHECKOUT_MODULES + extra)}


_stylegan3_modules = dict()   # StyleGAN3's modules between tests, imported once per session


@pytest.fixture
def stylegan3_root():
    """Path of the StyleGAN3 checkout. For the test, its dnnlib, torch_utils, training, metrics (and our
    adapters) are the ones imported, and sys.path starts with it; StyleGAN2-ADA's modules and sys.path
    come back afterwards. Skips the test when there is none."""
    root = os.environ.get('STYLEGAN3_ROOT')
    if not root:
        pytest.skip(SKIP_REASON_STYLEGAN3)
    from stylegan2_ada_patch import checkout
    root = checkout.validate(root)
    saved_modules, saved_path = _checkout_modules(), list(sys.path)
    had_pkg_resources = 'pkg_resources' in sys.modules
    for name in saved_modules:
        del sys.modules[name]
    sys.modules.update(_stylegan3_modules)
    other = os.environ.get('STYLEGAN2_ADA_ROOT')
    sys.path[:] = [root] + [p for p in sys.path if not (other and p == os.path.abspath(other))] + SHIM_PATHS
    try:
        yield root
    finally:
        _stylegan3_modules.clear()
        _stylegan3_modules.update(_checkout_modules(extra=() if had_pkg_resources else ('pkg_resources',)))
        for name in _stylegan3_modules:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


# Prepended to the code run_stock runs: importing our packages fails, as where rtm-mapping is not installed.
_NOT_INSTALLED = textwrap.dedent('''
    import sys, importlib.abc
    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('rtm_mapping', 'stylegan2_ada_patch'):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _NotInstalled())
''')


def run_stock(script: str, cwd, root, argv=()) -> str:
    """Run Python code, with sys.argv[1:] = argv, in a fresh process that has only the checkout at root (and
    tests/shims where there is no pkg_resources) on its path: rtm-mapping cannot be imported. Returns stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *SHIM_PATHS]), PYTHONDONTWRITEBYTECODE='1')
    code = _NOT_INSTALLED + textwrap.dedent(script)
    out = subprocess.run([sys.executable, '-c', code, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='session')
def write_images():
    """write_images(folder, count, resolution=16, seed=0) writes a folder of random RGB PNGs, which
    training.dataset.ImageFolderDataset reads directly, and returns the folder."""
    def write(folder, count, resolution=16, seed=0):
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(folder / f'{i:03d}.png')
        return folder
    return write
