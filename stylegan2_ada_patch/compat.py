"""What NVIDIA's StyleGAN2-ADA and StyleGAN3 code needs to run on today's Python stack.

The official code was written for PyTorch 1.7-1.9, SciPy < 1.18, setuptools < 81 and Python < 3.12.
The patched train.py and calc_metrics.py (and `rtm-mapping cpu`) call `apply()` before NVIDIA's
modules are imported. Each fix is applied only where the stack needs it, changes only a name inside
the official module that breaks (no official file is edited, nothing else in the process is
affected), and is announced once:

    fix                     needed on                               what it does
    InfiniteSampler         PyTorch >= 2 (Sampler.__init__ lost     torch_utils.misc.InfiniteSampler gets a base class
                            its data_source argument)               that accepts the argument
    sqrtm(disp=False)       SciPy >= 1.18 (the argument is gone;    the FID module's `scipy` answers sqrtm(A, disp=False)
                            the official FID calls it)              as SciPy 1.17 did: the same root and error estimate
    pkg_resources           setuptools >= 81 (StyleGAN3's           a `pkg_resources` module with parse_version only,
                            conv2d_gradfix / grid_sample_gradfix)   when there is none
    grid_sample             PyTorch whose grid_sample has no        StyleGAN2-ADA's grid_sample_gradfix.grid_sample gets
                            double backward (2.1, ...; the gradfix  one whose backward is differentiable (torch's own
                            uses torch's op after 1.9): R1 through  kernels forward and backward)
                            ADA's geometric augmentations raises
    Adam betas              PyTorch whose Adam refuses betas that   a run's Adam betas made floats where the loop
                            mix int and float (2.13 does):          passes them to Adam as written (a fix of the
                            StyleGAN3's [0, 0.99], stylegan3-t/r    training options: train_hooks.apply() calls
                                                                    fix_adam_betas(args) on the run's config)

`dnnlib/util.py` imports `distutils`, which Python >= 3.12 no longer has: setuptools provides it, so
rtm-mapping depends on setuptools there (setup.cfg) and the stock tools (generate.py, ...) work too.
"""

import importlib
import inspect
import multiprocessing
import sys
import types
import warnings
from typing import List

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# PyTorch >= 2: Sampler.__init__(data_source).

class _SamplerDataSource(torch.utils.data.Sampler):
    """Accepts Sampler.__init__(data_source), which PyTorch 2.x removed and StyleGAN2-ADA still calls."""

    def __init__(self, data_source=None):
        del data_source
        super().__init__()


def fix_infinite_sampler() -> bool:
    """Make torch_utils.misc.InfiniteSampler construct on PyTorch 2.x; True if it did now.
    Its `super().__init__(dataset)` then resolves to _SamplerDataSource.__init__ (cooperative MRO)."""
    from torch_utils import misc
    try:
        misc.InfiniteSampler(range(1))
        return False
    except TypeError:
        misc.InfiniteSampler = type('InfiniteSampler', (misc.InfiniteSampler, _SamplerDataSource), {})
        return True

#----------------------------------------------------------------------------
# SciPy >= 1.18: sqrtm(A, disp=False).

def _sqrtm_takes_disp(sqrtm) -> bool:
    try:
        return 'disp' in inspect.signature(sqrtm).parameters
    except (TypeError, ValueError):
        return True


def sqrtm_with_disp(sqrtm):
    """sqrtm(A, disp=True) of SciPy < 1.18 on top of a sqrtm(A) without `disp`. With disp=False it returns
    (root, error estimate), the estimate computed as SciPy 1.17 did: ||root @ root - A||_F^2 / ||A||_F."""
    import numpy as np
    from scipy.linalg import norm

    def sqrtm_disp(A, disp=True):
        root = sqrtm(A)
        if disp:
            return root
        try:
            error = norm(root @ root - A, 'fro') ** 2 / norm(A, 'fro')
        except ValueError:  # NaNs in the matrix
            error = np.inf
        return root, error
    return sqrtm_disp


def fix_fid_sqrtm() -> bool:
    """Give the official FID module a `scipy` whose linalg.sqrtm accepts disp=, if SciPy's does not; True if it did now."""
    import scipy.linalg
    fid = importlib.import_module('metrics.frechet_inception_distance')
    if _sqrtm_takes_disp(fid.scipy.linalg.sqrtm):       # SciPy < 1.18, or already given.
        return False
    linalg = types.SimpleNamespace(**{name: getattr(scipy.linalg, name) for name in dir(scipy.linalg) if not name.startswith('__')})
    linalg.sqrtm = sqrtm_with_disp(scipy.linalg.sqrtm)
    fid.scipy = types.SimpleNamespace(linalg=linalg, __version__=scipy.__version__)
    return True

#----------------------------------------------------------------------------
# setuptools >= 81: no pkg_resources (StyleGAN3's ops import parse_version from it).

def _official_code_imports(module: str, name: str) -> bool:
    """Whether the official module's source (found on sys.path, not imported) mentions `name`."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return False
    if spec is None or not spec.origin or not spec.origin.endswith('.py'):
        return False
    with open(spec.origin, encoding='utf-8') as f:
        return name in f.read()


def fix_pkg_resources() -> bool:
    """Provide `pkg_resources.parse_version` when the official ops import it (StyleGAN3) and setuptools has
    no pkg_resources; True if it did now. Any other name of that stand-in raises an error saying what it is."""
    if not _official_code_imports('torch_utils.ops.conv2d_gradfix', 'pkg_resources'):
        return False
    try:
        importlib.import_module('pkg_resources')
        return False
    except ImportError:
        pass
    try:
        from packaging.version import parse
    except ImportError:
        from torch._vendor.packaging.version import parse

    module = types.ModuleType('pkg_resources', 'rtm-mapping stand-in: parse_version only, for NVIDIA StyleGAN3 ops.')
    module.parse_version = parse

    def missing(name):
        raise AttributeError(f'pkg_resources.{name}: this pkg_resources is rtm-mapping\'s stand-in (setuptools >= 81 has none), '
                             f'which provides parse_version only. Install "setuptools<81" for the real one.')
    module.__getattr__ = missing
    sys.modules['pkg_resources'] = module
    return True

#----------------------------------------------------------------------------
# PyTorch without a double backward for grid_sample: R1 through ADA's geometric augmentations.
# StyleGAN2-ADA's grid_sample_gradfix uses its own op on PyTorch 1.7-1.9 only and torch's grid_sample
# elsewhere; where torch has no derivative of grid_sampler_2d_backward (2.1 here; users report it on
# 2.5.1), the first R1 step of --aug=ada raises, even at augmentation probability 0 (the pipe samples
# anyway). StyleGAN3's gradfix uses its own op whenever its training loop enables it, so there the probe
# below passes and nothing is changed.

def _grid_sample_native(input, grid):
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


class _GridSample(torch.autograd.Function):
    """torch's grid_sample (bilinear, zeros padding, align_corners=False: what the augment pipe calls) for a grid
    that needs no gradient, whose backward is itself differentiable (_GridSampleBackward)."""

    @staticmethod
    def forward(ctx, input, grid):
        ctx.save_for_backward(input, grid)
        return _grid_sample_native(input, grid)

    @staticmethod
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        return _GridSampleBackward.apply(grad_output, input, grid), None


class _GridSampleBackward(torch.autograd.Function):
    """The input's gradient of grid_sample, by torch's kernel. For a fixed grid, grid_sample is a linear map S of the
    input (each output pixel a bilinear blend of four input pixels), so grad_input = S^T grad_output: linear in
    grad_output, independent of the input. Its derivative, applied to a gradient g of grad_input, is S g =
    grid_sample(g, grid), again a _GridSample: every order of gradient works."""

    @staticmethod
    def forward(ctx, grad_output, input, grid):
        ctx.save_for_backward(grid)
        grad_input, _ = torch.ops.aten.grid_sampler_2d_backward(grad_output, input, grid, 0, 0, False, [True, False])
        return grad_input

    @staticmethod
    def backward(ctx, grad2_input):
        grid, = ctx.saved_tensors
        return _GridSample.apply(grad2_input, grid), None, None


def grid_sample(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample_gradfix.grid_sample with a gradient of any order with respect to the input. A grid that needs a
    gradient itself (never the augment pipe's) goes to torch's op, as in the official code."""
    if grid.requires_grad:
        return _grid_sample_native(input, grid)
    return _GridSample.apply(input, grid)


def _double_backward_works(grid_sample) -> bool:
    """Whether a gradient of an input gradient (what R1 takes) passes through grid_sample, tried on a 2x2 image."""
    image = torch.ones([1, 1, 2, 2], requires_grad=True)
    try:
        (grad,) = torch.autograd.grad(grid_sample(image, torch.zeros([1, 1, 1, 2])).square().sum(), image, create_graph=True)
        grad.square().sum().backward()
    except RuntimeError as err:
        if 'grid_sampler_2d_backward' not in str(err):  # "derivative for aten::grid_sampler_2d_backward is not implemented"
            raise
        return False
    return True


def fix_grid_sample() -> bool:
    """Give torch_utils.ops.grid_sample_gradfix a grid_sample with a differentiable backward where the official one,
    enabled as the training loop enables it, has none; True if it did now."""
    from torch_utils.ops import grid_sample_gradfix
    enabled = grid_sample_gradfix.enabled
    grid_sample_gradfix.enabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')     # StyleGAN2-ADA's warns on each call on PyTorch >= 1.10
            if _double_backward_works(grid_sample_gradfix.grid_sample):
                return False
    finally:
        grid_sample_gradfix.enabled = enabled
    grid_sample_gradfix.grid_sample = grid_sample
    return True

#----------------------------------------------------------------------------
# Adam that refuses betas mixing int and float (StyleGAN3's betas=[0, 0.99]). A fix of a run's training
# options, not of a module: the patched train.py calls it through train_hooks.apply().

def fix_adam_betas(args) -> bool:
    """Make an optimizer's betas floats where the loop passes them to Adam as written and this PyTorch refuses
    them, as it does StyleGAN3's betas=[0, 0.99] (an int and a float) for G of stylegan3-t/r. With lazy
    regularization the loop makes them floats itself. Returns True if a fix was needed."""
    from training import training_loop
    defaults = inspect.signature(training_loop.training_loop).parameters
    fixed = False
    for net in ('G', 'D'):
        opt_kwargs = args[f'{net}_opt_kwargs']
        betas = opt_kwargs.get('betas')
        reg_interval = args.get(f'{net}_reg_interval', defaults[f'{net}_reg_interval'].default)
        if reg_interval is not None or opt_kwargs.get('class_name') != 'torch.optim.Adam' or betas is None:
            continue
        try:
            torch.optim.Adam([torch.zeros([1], requires_grad=True)], betas=betas)
        except ValueError:
            opt_kwargs.betas = [float(beta) for beta in betas]
            fixed = True
    if fixed:
        print(f'rtm-mapping: PyTorch {torch.__version__} refuses Adam betas that mix int and float, as train.py writes them; '
              'made them floats for this run.')
    return fixed

#----------------------------------------------------------------------------

FIXES = [
    # (fix, what to say when it was needed)
    (fix_pkg_resources,    'setuptools has no pkg_resources; gave NVIDIA\'s ops a stand-in with parse_version'),
    (fix_infinite_sampler, f'PyTorch {torch.__version__} has no Sampler.__init__(data_source); gave torch_utils.misc.InfiniteSampler one'),
    (fix_fid_sqrtm,        'SciPy has no sqrtm(disp=); gave the official FID a sqrtm that takes it (SciPy 1.17\'s results)'),
    (fix_grid_sample,      f'PyTorch {torch.__version__} has no double backward for grid_sample (R1 through ADA\'s geometric augmentations); '
                           'gave torch_utils.ops.grid_sample_gradfix one'),
]


def apply(announce: bool = True) -> List[str]:
    """Apply every fix the stack needs; the official code must be on sys.path. Idempotent. Returns the
    messages of the fixes applied now, printed to stderr in the main process only (not in DataLoader or DDP workers)."""
    messages = [message for fix, message in FIXES if fix()]
    if announce and multiprocessing.current_process().name == 'MainProcess':
        for message in messages:
            print(f'rtm-mapping: {message} for this run.', file=sys.stderr)
    return messages

#----------------------------------------------------------------------------
