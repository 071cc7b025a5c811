"""Shared fixtures. Tests that need NVIDIA's code skip unless STYLEGAN2_ADA_ROOT points at a
checkout of NVlabs/stylegan2-ada-pytorch (it is never vendored here: NVIDIA Source Code License)."""

import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

SKIP_REASON = ('needs a StyleGAN2-ADA checkout: set STYLEGAN2_ADA_ROOT to a clone (or export) of '
               'NVlabs/stylegan2-ada-pytorch to run it')


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
