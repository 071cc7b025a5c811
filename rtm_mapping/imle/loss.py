"""The IMLE reconstruction loss of RS-IMLE and the RTM paper (§3.1, eq. 1): LPIPS-VGG + 0.1 x MSE.

LPIPS (Zhang et al. 2018, VGG16 with the v0.1 linear weights) comes from NVIDIA's `vgg16.pt`, the
TorchScript network that StyleGAN2-ADA's PPL metric and projector.py call as
`vgg16(images_0_255, resize_images=False, return_lpips=True)`: it returns, per image, the unit-normalised
VGG activations of the five LPIPS layers scaled by the square roots of the linear weights and of
1 / (height * width), so that the squared L2 distance between two images' vectors is their LPIPS distance.
It loads with torch.jit.load alone (no StyleGAN checkout, no torchvision, no `lpips` package), and
`rtm-mapping detectors install vgg16 vgg16.pt` puts it where this module finds it offline.

Resolution: images go to VGG at their own size, as Zhang et al.'s `lpips` package and RS-IMLE's LPIPS
network do (CIFAR-10's 32 px included: VGG's fifth LPIPS layer is then 2 x 2). Upsampling 32 px to VGG's
224 px would cost every loss call about 49 times the VGG work and add no detail to compare.
"""

import os
import warnings
from typing import Union

import torch

from rtm_mapping import detectors

LPIPS_WEIGHT = 1.0      # RS-IMLE's lpips_coef
MSE_WEIGHT = 0.1        # RS-IMLE's l2_coef; the paper's "0.1 x MSE"

#----------------------------------------------------------------------------

def _freeze(module: torch.nn.Module) -> None:
    """Eval mode, no parameter gradients (parameter by parameter: ScriptModules have no requires_grad_)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def vgg16_path() -> str:
    """The vgg16.pt that `rtm-mapping detectors install vgg16` put into dnnlib's cache; a clear error when there is none."""
    files = detectors.cached_files('vgg16', 'stylegan2-ada')
    if len(files) == 1:
        return files[0]
    problem = ('is not installed' if not files else
               f'is installed {len(files)} times ({", ".join(files)}); remove all but one')
    raise FileNotFoundError(f'The RS-IMLE loss computes LPIPS with NVIDIA\'s vgg16.pt (TorchScript), which {problem}.\n'
                            + detectors.offline_help(['vgg16'], 'stylegan2-ada'))


def load_vgg16(path: Union[str, os.PathLike]) -> torch.nn.Module:
    """Load NVIDIA's vgg16.pt (or a stand-in with its call signature) for LPIPS, on the CPU, frozen, in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is not a file. ' + detectors.offline_help(['vgg16'], 'stylegan2-ada'))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)     # torch >= 2.10 deprecates TorchScript, the file's format
            vgg16 = torch.jit.load(path, map_location='cpu')
        _freeze(vgg16)
        with torch.no_grad():
            probe = vgg16(torch.zeros([1, 3, 32, 32]), resize_images=False, return_lpips=True)
    except Exception as e:
        raise ValueError(f'{path} is not NVIDIA\'s vgg16.pt: loading it with torch.jit.load and calling it with '
                         f'return_lpips=True failed ({type(e).__name__}: {e}). Pass the TorchScript file from '
                         f'{detectors.DETECTORS["stylegan2-ada"]["vgg16"]}') from e
    if probe.ndim != 2 or probe.shape[0] != 1:
        raise ValueError(f'{path} returned {list(probe.shape)} for one image with return_lpips=True; NVIDIA\'s vgg16.pt returns [1, features]')
    return vgg16

#----------------------------------------------------------------------------

class IMLELoss(torch.nn.Module):
    """L(fake, real) = lpips_weight * LPIPS-VGG(fake, real) + mse_weight * MSE(fake, real), per sample.

    Args:
        vgg16: NVIDIA's vgg16.pt as a path or a loaded module; None = the copy installed with
            `rtm-mapping detectors install vgg16 ...` (see vgg16_path).
        lpips_weight, mse_weight: The weights; RS-IMLE's 1.0 and 0.1 by default.

    The VGG network is a frozen submodule: `.to(device)` moves it; it is not trained and not part of
    the generator's snapshot.
    """

    def __init__(self, vgg16: Union[str, os.PathLike, torch.nn.Module, None] = None, *,
                 lpips_weight: float = LPIPS_WEIGHT, mse_weight: float = MSE_WEIGHT):
        super().__init__()
        for name, value in dict(lpips_weight=lpips_weight, mse_weight=mse_weight).items():
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f'{name} must be a number >= 0, got {value!r}')
        if vgg16 is None:
            vgg16 = vgg16_path()
        self.vgg16 = vgg16 if isinstance(vgg16, torch.nn.Module) else load_vgg16(vgg16)
        _freeze(self.vgg16)
        self.lpips_weight = float(lpips_weight)
        self.mse_weight = float(mse_weight)

    def lpips_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] float in [-1, 1] -> [N, F] vectors whose squared L2 distances are LPIPS distances."""
        return self.vgg16((images.to(torch.float32) + 1) * 127.5, resize_images=False, return_lpips=True)

    def lpips(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS-VGG distance [N]; no gradient flows into `real`."""
        with torch.no_grad():
            target = self.lpips_features(real)
        return (self.lpips_features(fake) - target).square().sum(dim=1)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [N] of generated images `fake` against training images `real` (no gradient), both [N, 3, H, W] float in [-1, 1]."""
        if fake.shape != real.shape or fake.ndim != 4 or fake.shape[1] != 3:
            raise ValueError(f'fake and real must both be [N, 3, H, W] images, got {list(fake.shape)} and {list(real.shape)}')
        if not (fake.is_floating_point() and real.is_floating_point()):
            raise ValueError(f'fake and real must be float images in [-1, 1], got {fake.dtype} and {real.dtype} '
                             f'(uint8 images x become x / 127.5 - 1)')
        real = real.detach()                # the training images are targets, never trained
        mse = (fake.to(torch.float32) - real.to(torch.float32)).square().flatten(1).mean(dim=1)
        if self.lpips_weight == 0:
            return self.mse_weight * mse
        return self.lpips_weight * self.lpips(fake, real) + self.mse_weight * mse

    def extra_repr(self) -> str:
        return f'lpips_weight={self.lpips_weight}, mse_weight={self.mse_weight}'

#----------------------------------------------------------------------------
