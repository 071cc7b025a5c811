"""Run the official StyleGAN2-ADA and StyleGAN3 scripts on a machine without a GPU, for smoke tests only.

The official training loops and tools hard-code CUDA (`torch.device('cuda')`, `torch.cuda.Event`,
`torch.cuda.reset_peak_memory_stats`, `Tensor.pin_memory()`). Instead of editing them, we replace
the name `torch` inside the official modules we run with `CPU_TORCH`, a view of torch that
answers those calls for the CPU. Nothing else in the process is affected: `cpu_torch()` does it
for a block and puts `torch` back; `use_cpu()`, for a process that runs only the official script.
"""

import contextlib
import importlib.util
import os
import sys
import types

import click
import torch

from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------

class _CpuTensor(torch.Tensor):
    """What CPU_TORCH.from_numpy returns: pin_memory() is a no-op (pinning needs an accelerator),
    and every operation on it gives back a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def pin_memory(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


class _Event:
    def __init__(self, enable_timing=False):
        del enable_timing

    def record(self, stream=None):
        del stream

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        del other
        return 0.0


_CPU_CUDA = types.SimpleNamespace(
    Event                   = _Event,
    current_stream          = lambda device=None: None,
    synchronize             = lambda device=None: None,
    max_memory_allocated    = lambda device=None: 0,
    max_memory_reserved     = lambda device=None: 0,
    reset_peak_memory_stats = lambda device=None: None,
    is_available            = lambda: False,
    device_count            = lambda: 0,
)


def _device(kind, index=None):
    if isinstance(kind, str) and kind.split(':')[0] == 'cuda':
        return torch.device('cpu')
    return torch.device(kind) if index is None else torch.device(kind, index)


class _CpuTorch(types.ModuleType):
    """torch, with CUDA-only calls of the official code answered for the CPU."""

    def __init__(self):
        super().__init__('torch')
        self.device = _device
        self.cuda = _CPU_CUDA
        self.from_numpy = lambda array: torch.from_numpy(array).as_subclass(_CpuTensor)

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorch()


def _official_modules(modules):
    """The given official modules and the metric code they call (which pins label tensors)."""
    from metrics import metric_utils, perceptual_path_length
    return [*modules, metric_utils, perceptual_path_length]


def use_cpu(*modules):
    """Make the given official modules, and the metric code they call, see CPU_TORCH as `torch` for the rest
    of the process. For processes that run only the official script (train.py --smoke, `rtm-mapping cpu`)."""
    for module in _official_modules(modules):
        module.torch = CPU_TORCH


@contextlib.contextmanager
def cpu_torch(*modules):
    """use_cpu() for the duration of a `with` block; each module gets its own `torch` back afterwards."""
    saved = [(module, module.torch) for module in _official_modules(modules)]
    use_cpu(*modules)
    try:
        yield
    finally:
        for module, torch_module in saved:
            module.torch = torch_module

#----------------------------------------------------------------------------

def small_snapshot_grid(setup_snapshot_image_grid, max_cols=4, max_rows=4):
    """Wrap training_loop.setup_snapshot_image_grid to keep at most max_rows x max_cols images
    (the official grid is 32 x 32 images at 32 px, minutes of CPU time per snapshot)."""

    def setup(training_set, random_seed=0):
        (gw, gh), images, labels = setup_snapshot_image_grid(training_set=training_set, random_seed=random_seed)
        cols, rows = min(gw, max_cols), min(gh, max_rows)
        keep = [r * gw + c for r in range(rows) for c in range(cols)]
        return (cols, rows), images[keep], labels[keep]

    return setup

#----------------------------------------------------------------------------

def load_script(path):
    """Import an official script (generate.py, ...) as a module without running its command."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} does not exist: give the path of a script in your StyleGAN2-ADA or StyleGAN3 checkout.')
    checkout.use(os.path.dirname(path))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@click.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.argument('script', type=click.Path(exists=True, dir_okay=False))
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def cpu(script, args):
    """Run an official StyleGAN2-ADA or StyleGAN3 SCRIPT (generate.py, style_mixing.py, projector.py,
    gen_images.py, calc_metrics.py) with ARGS on the CPU. For smoke tests: it is slow.

    \b
    Example:
      rtm-mapping cpu ~/stylegan2-ada-pytorch/generate.py --network=snapshot.pkl --seeds=0-3 --outdir=out
      rtm-mapping cpu ~/stylegan3/gen_images.py --network=snapshot.pkl --seeds=0-3 --outdir=out
    """
    module = load_script(script)
    from training import training_loop
    use_cpu(module, training_loop)
    commands = [v for v in vars(module).values() if isinstance(v, click.Command) and getattr(v.callback, '__module__', None) == module.__name__]
    if len(commands) != 1:
        raise click.ClickException(f'{script} does not define exactly one click command; is it an official StyleGAN2-ADA or StyleGAN3 script?')
    commands[0].main(args=list(args), prog_name=os.path.basename(script), standalone_mode=False)

#----------------------------------------------------------------------------
