"""How `rtm-mapping bench` measures: time (paired, alternating), autograd memory, dispatched ops and
kernel launches, compiled graphs, and analytic FLOPs. Each probe takes a callable and knows nothing of
the parts that use it."""

import collections
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rtm_mapping import core

#----------------------------------------------------------------------------
# Time.

def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each timed call of each function, after `warmup` calls of each. Within a repeat
    the functions run one after the other, in reverse order every other repeat (A B, B A, ...),
    so that machine noise hits every function alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def paired_overhead(times: Dict[str, List[float]], arm: str, baseline: str) -> float:
    """Median over repeats of t_arm / t_baseline - 1, each ratio from one repeat: load that
    drifts over the run (other jobs on the machine) cancels in each pair."""
    return statistics.median(a / b for a, b in zip(times[arm], times[baseline])) - 1

#----------------------------------------------------------------------------
# Autograd memory.

def saved_tensor_bytes(fn: Callable[[], object], exclude: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages that autograd keeps for backward while running fn(),
    leaving out the storages of `exclude` (parameters and buffers, which exist anyway).
    Works on every device; a view of a storage already kept costs nothing more."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())

#----------------------------------------------------------------------------
# Dispatched ops, kernel launches, compiled graphs.

# Aten ops that dispatch but launch no kernel: aliasing ops (views) and these.
NO_KERNEL_OPS = {'aten::_unsafe_view', 'aten::lift_fresh', 'aten::empty.memory_format', 'aten::empty_strided'}


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active: all of them, and those that launch a kernel
    (views and NO_KERNEL_OPS apart). Ops that a kernel calls internally are not seen; neither is
    a torch.compile'd region, which does not run under a dispatch mode."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def counts(self) -> dict:
        views = sum(n for f, n in self.ops.items() if f.is_view or f.name() in NO_KERNEL_OPS)
        total = sum(self.ops.values())
        return dict(ops=total, kernels=total - views)


def count_dispatch(fn: Callable[[], object]) -> dict:
    """dict(ops, kernels): aten ops fn() dispatches, and those of them that launch a kernel."""
    with DispatchCounter() as counter:
        fn()
    return counter.counts()


def cuda_launches(fn: Callable[[], object]) -> int:
    """Kernel and CUDA-graph launches fn() makes on the host (CUDA runtime and driver calls seen by torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if 'LaunchKernel' in e.key or 'GraphLaunch' in e.key)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']

#----------------------------------------------------------------------------
# Analytic FLOPs.

def _linear_flops(layer: torch.nn.Module) -> int:
    """FLOPs of one row through a fully-connected layer: one multiply-add (2 FLOPs) per weight."""
    return 2 * layer.weight.numel()


def _block_flops(block: torch.nn.Module, tokens: int, token_dim: int) -> int:
    """FLOPs of one application of RTM's shared block to one sample's [tokens, token_dim] state."""
    if isinstance(block, core.MixerBlock):
        token_mlp = _linear_flops(block.token_mlp.gate_up) + _linear_flops(block.token_mlp.down)        # per channel
        channel_mlp = _linear_flops(block.channel_mlp.gate_up) + _linear_flops(block.channel_mlp.down)  # per token
        return token_dim * token_mlp + tokens * channel_mlp
    if isinstance(block, core.AttentionBlock):
        per_token = (_linear_flops(block.qkv) + _linear_flops(block.out)
                     + _linear_flops(block.channel_mlp.gate_up) + _linear_flops(block.channel_mlp.down))
        attention = 2 * (2 * tokens * tokens * token_dim)   # q k^T and a v, summed over heads
        return tokens * per_token + attention
    raise TypeError(f'no FLOP count for block {type(block).__name__}')


def mapper_flops(module: torch.nn.Module) -> int:
    """Analytic FLOPs per sample of a mapper z -> w, from its layer shapes.

    Counts matrix products only (2 FLOPs per multiply-add); normalizations, activations and
    biases (under 2% of either mapper) and the label embedding (the same in both) are left out.

    Args:
        module: a RecursiveTokenMapper, anything holding one as `.rtm` (rtm_mapping.networks.MappingNetwork),
            or a feed-forward MLP whose 2-D weights are each applied once per sample (the official
            MappingNetwork, rtm_mapping.mlp.ReferenceMLP).
    Returns:
        FLOPs per sample at the module's current steps and inner_steps.
    """
    rtm = getattr(module, 'rtm', module)
    if isinstance(rtm, core.RecursiveTokenMapper):
        applications = rtm.steps * (rtm.inner_steps + 1)
        return _linear_flops(rtm.lift) + _linear_flops(rtm.readout) + applications * _block_flops(rtm.block, rtm.tokens, rtm.token_dim)
    layers = [m for name, m in module.named_modules()
              if name != 'embed' and isinstance(getattr(m, 'weight', None), torch.Tensor) and m.weight.ndim == 2]
    if not layers:
        raise TypeError(f'no fully-connected layers in {type(module).__name__}')
    return sum(_linear_flops(m) for m in layers)
