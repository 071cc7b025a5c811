"""The RS-IMLE loss (rtm_mapping.imle.loss): LPIPS through NVIDIA's vgg16.pt call signature + 0.1 x MSE, with the test stand-in."""

import pytest
import torch

from rtm_mapping import detectors
from rtm_mapping.imle.loss import IMLELoss


@pytest.fixture(scope='module')
def vgg16_file(tmp_path_factory):
    return detectors.standin('vgg16', str(tmp_path_factory.mktemp('vgg16') / 'vgg16.pt'))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'dnnlib'))
    return tmp_path / 'dnnlib'


def images(seed, n=3, res=32):
    return torch.rand([n, 3, res, res], generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loss_is_lpips_plus_a_tenth_of_mse(vgg16_file):
    loss = IMLELoss(vgg16_file)
    fake, real = images(0), images(1)
    vgg16 = torch.jit.load(vgg16_file)
    # As StyleGAN2-ADA's projector.py and PPL use vgg16.pt: pixels in [0, 255], squared L2 of the LPIPS vectors.
    lpips = (vgg16((fake + 1) * 127.5, resize_images=False, return_lpips=True)
             - vgg16((real + 1) * 127.5, resize_images=False, return_lpips=True)).square().sum(dim=1)
    mse = (fake - real).square().mean(dim=[1, 2, 3])
    value = loss(fake, real)
    assert value.shape == (3,) and (lpips > 0).all()
    torch.testing.assert_close(value, lpips + 0.1 * mse)
    torch.testing.assert_close(IMLELoss(vgg16, lpips_weight=2.0, mse_weight=0.5)(fake, real), 2 * lpips + 0.5 * mse)
    torch.testing.assert_close(IMLELoss(vgg16, lpips_weight=0)(fake, real), 0.1 * mse)
    assert torch.equal(loss(real, real), torch.zeros(3))


def test_gradient_reaches_the_generated_images_only(vgg16_file):
    loss = IMLELoss(vgg16_file)
    fake = images(2).requires_grad_(True)
    real = images(3).requires_grad_(True)
    loss(fake, real).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert real.grad is None
    assert not any(p.requires_grad for p in loss.parameters())


def test_installed_vgg16_is_found_offline(vgg16_file, empty_cache):
    detectors.install('vgg16', vgg16_file)
    fake, real = images(4, res=16), images(5, res=16)
    torch.testing.assert_close(IMLELoss()(fake, real), IMLELoss(vgg16_file)(fake, real))


def test_missing_vgg16_says_how_to_install_it(empty_cache):
    with pytest.raises(FileNotFoundError, match='rtm-mapping detectors install vgg16') as info:
        IMLELoss()
    assert 'vgg16.pt' in str(info.value) and 'is not installed' in str(info.value)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / 'not-vgg16.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="is not NVIDIA's vgg16.pt"):
        IMLELoss(path)
    with pytest.raises(FileNotFoundError, match='rtm-mapping detectors install vgg16'):
        IMLELoss(tmp_path / 'missing.pt')


def test_bad_images_are_refused(vgg16_file):
    loss = IMLELoss(vgg16_file)
    with pytest.raises(ValueError, match='must both be'):
        loss(images(0), images(1, res=16))
    with pytest.raises(ValueError, match='float images'):
        loss(images(0), (images(1) * 127.5 + 128).to(torch.uint8))
