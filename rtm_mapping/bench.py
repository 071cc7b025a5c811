"""`rtm-mapping bench`: what RTM costs against the MLP mapper of StyleGAN2-ADA, side by side.

Five measurements in one run (issues 5 and 14), each a median over repeats after warm-up, with RTM
and MLP timed alternately (A B, then B A) so that machine noise hits both alike:

  (a) mapper forward and forward + backward: RTM at H in SWEEP_H against the 2- and 8-layer MLP;
  (b) with a StyleGAN2-ADA checkout: whole-generator forward (App. H protocol: no gradient,
      batch of z, divided by the batch size) and one generator training step (the official
      StyleGAN2Loss 'Gmain' phase through the discriminator, then Adam) at the cifar and
      paper512 configurations of train.py, RTM mapper against MLP mapper;
  (c) mapper training memory: bytes autograd keeps for backward at H = 16 against H = 1
      (short gradient, §3.2) and against full backpropagation through all 16 steps;
  (d) analytic FLOPs per sample of each mapper, and RTM's time per FLOP relative to the MLP's;
  (e) dispatch: aten ops each mapper call dispatches (counted with a TorchDispatchMode, views apart)
      and the batch-1 latency, where a call is bound by dispatch and kernel launches rather than
      arithmetic: the 2- and 8-layer MLP, RTM eager and RTM captured (torch.compile, set_compile).

The MLP baseline is the official `training.networks.MappingNetwork` when a checkout is given,
else `ReferenceMLP` below, a pure-torch equivalent of it.
"""

import collections
import copy
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import click
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rtm_mapping import __version__, core
from rtm_mapping.core import RecursiveTokenMapper
from rtm_mapping.imle import bench as imle_bench
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------
# What is measured, in one place.

Z_DIM = W_DIM = 512         # As train.py.
SWEEP_H = (1, 8, 16, 32)    # RTM steps H of part (a); core.DEFAULTS['steps'] is the default config.
MLP_LAYERS = (2, 8)         # Official mapping depths: train.py --cfg=cifar uses 2, the paper configs 8.
MEMORY_H = 16               # Part (c): H = 16 against H = 1 and against full backpropagation.
DISPATCH_BATCH = 64         # Part (e): op counts at the batch of issue 14 (train.py --cfg=cifar); latency at batch 1.
NUM_WS = 8                  # Part (e): the mapper as train.py --cfg=cifar builds it (32 px: 8 ws, w_avg tracked).

# Unconditional generator configurations of the official train.py (cfg_specs), part (b).
# On CUDA, mixed precision as train.py (num_fp16_res=4, conv_clamp=256); on CPU, float32.
GENERATOR_CONFIGS = {
    'cifar':    dict(resolution=32,  channel_base=32768, channel_max=512, map=2, batch=64, mbstd=32,
                     architecture='orig',   style_mixing_prob=0.0, lrate=0.0025),
    'paper512': dict(resolution=512, channel_base=32768, channel_max=512, map=8, batch=8,  mbstd=8,
                     architecture='resnet', style_mixing_prob=0.9, lrate=0.0025),
}

# Targets of issues 5 and 14. Ratios are printed and recorded, never asserted; the op counts are
# deterministic and pinned by tests/test_bench.py as well.
TARGETS = {
    'generator_forward_overhead': {'cpu': 0.01, 'cuda': 0.05},  # cifar, batch 64: t_RTM / t_MLP - 1.
    'train_step_overhead':        {'cuda': 0.05},               # cifar, batch 64, generator training step (paper: +4.7%).
    'memory_ratio':               1.3,                          # Saved bytes, H = 16 over H = 1.
    'time_per_flop_ratio':        1.5,                          # RTM (default H) over the MLP, mapper forward.
    'kernels_no_grad':            600,                          # RTM eager at H = 16, batch 64, forward under no_grad.
    'kernels_train':              750,                          # The same, train-mode forward + backward.
}

# Option defaults of a full run, and the tiny settings of --quick (a smoke test, not a measurement).
# map_h: RTM steps of parts (b) and (e); --quick uses 2 to keep its compile short.
RUNS = {
    'full':  dict(batch=64, repeats=50, warmup=10, gen_repeats=5, gen_warmup=1, channel_div=1, gen_batch_div=1, map_h=core.DEFAULTS['steps']),
    'quick': dict(batch=4,  repeats=2,  warmup=1,  gen_repeats=1, gen_warmup=1, channel_div=16, gen_batch_div=16, map_h=2),
}

#----------------------------------------------------------------------------
# The MLP baseline without a checkout.

class ReferenceMLP(torch.nn.Module):
    """A pure-torch equivalent of the official StyleGAN2-ADA MappingNetwork (unconditional, no w_avg):
    PixelNorm, then `num_layers` equalized-learning-rate fully-connected layers (lr_multiplier 0.01)
    each followed by leaky ReLU (slope 0.2) with gain sqrt(2), as the official bias_act 'lrelu'.
    Used only when no checkout is given; it has the official layer shapes, hence its FLOPs."""

    def __init__(self, in_features: int, out_features: int, num_layers: int, lr_multiplier: float = 0.01):
        super().__init__()
        features = [in_features] + [out_features] * num_layers
        self.layers = torch.nn.ModuleList([core.Linear(features[i], features[i + 1], lr_multiplier=lr_multiplier)
                                           for i in range(num_layers)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = core.pixel_norm(z)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2) * math.sqrt(2)
        return x

#----------------------------------------------------------------------------
# (d) Analytic FLOPs.

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
            MappingNetwork, ReferenceMLP).
    Returns:
        FLOPs per sample at the module's current steps and inner_steps.
    """
    rtm = getattr(module, 'rtm', module)
    if isinstance(rtm, RecursiveTokenMapper):
        applications = rtm.steps * (rtm.inner_steps + 1)
        return _linear_flops(rtm.lift) + _linear_flops(rtm.readout) + applications * _block_flops(rtm.block, rtm.tokens, rtm.token_dim)
    layers = [m for name, m in module.named_modules()
              if name != 'embed' and isinstance(getattr(m, 'weight', None), torch.Tensor) and m.weight.ndim == 2]
    if not layers:
        raise TypeError(f'no fully-connected layers in {type(module).__name__}')
    return sum(_linear_flops(m) for m in layers)

#----------------------------------------------------------------------------
# (c) Autograd memory.

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
# Timing.

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each timed call of each function, after `warmup` calls of each. Within a repeat
    the functions run one after the other, in reverse order every other repeat (A B, B A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def paired_overhead(times: Dict[str, List[float]], arm: str, baseline: str) -> float:
    """Median over repeats of t_arm / t_baseline - 1, each ratio from one repeat: load that
    drifts over the run (other jobs on the machine) cancels in each pair."""
    return statistics.median(a / b for a, b in zip(times[arm], times[baseline])) - 1

#----------------------------------------------------------------------------
# Mappers.

def _build_mappers(official: bool, device: torch.device) -> Dict[str, dict]:
    """name -> dict(module, call, kind, H): the MLPs of MLP_LAYERS and RTM at every H of SWEEP_H."""
    mappers = {}
    for layers in MLP_LAYERS:
        if official:
            from training import networks
            module = networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=None, num_layers=layers, w_avg_beta=None)
        else:
            module = ReferenceMLP(Z_DIM, W_DIM, layers)
        mappers[f'MLP {layers} layers'] = dict(module=module, kind='mlp', H=None)
    for steps in SWEEP_H:
        mappers[f'RTM H={steps}'] = dict(module=_build_rtm(official, steps=steps), kind='rtm', H=steps)
    for m in mappers.values():
        m['module'].to(device)
        m['call'] = _caller(m['module'], official)
    return mappers


def _build_rtm(official: bool, **rtm_kwargs) -> torch.nn.Module:
    if official:
        from rtm_mapping import networks
        return networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=None, w_avg_beta=None, **rtm_kwargs)
    return RecursiveTokenMapper(Z_DIM, W_DIM, lr_multiplier=0.01, **rtm_kwargs)


def _caller(module: torch.nn.Module, official: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if official:
        return lambda z: module(z, None)
    return module


def _forward(mapper: dict, z: torch.Tensor) -> Callable[[], object]:
    module, call = mapper['module'], mapper['call']

    def run():
        with torch.no_grad():
            return call(z)
    module.eval()
    return run


def _mapper_loss(call: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return call(z).square().mean()


def _forward_backward(mapper: dict, z: torch.Tensor) -> Callable[[], object]:
    module, call = mapper['module'], mapper['call']

    def run():
        module.zero_grad(set_to_none=True)
        _mapper_loss(call, z).backward()
    module.train()
    return run


def bench_mappers(official: bool, device: torch.device, batch: int, repeats: int, warmup: int) -> dict:
    """Parts (a) and (d): mapper times, FLOPs, and time per FLOP against each MLP."""
    mappers = _build_mappers(official, device)
    z = torch.randn([batch, Z_DIM], device=device)
    forward = medians(time_interleaved({name: _forward(m, z) for name, m in mappers.items()}, repeats, warmup, device))
    forward_backward = medians(time_interleaved({name: _forward_backward(m, z) for name, m in mappers.items()}, repeats, warmup, device))
    rows = []
    for name, m in mappers.items():
        rows.append(dict(
            name              = name,
            kind              = m['kind'],
            H                 = m['H'],
            default           = m['H'] == core.DEFAULTS['steps'],
            params            = sum(p.numel() for p in m['module'].parameters()),
            flops_per_sample  = mapper_flops(m['module']),
            forward_ms        = forward[name] * 1e3,
            forward_backward_ms = forward_backward[name] * 1e3,
        ))
    for row in rows:
        row['seconds_per_flop'] = forward[row['name']] / (row['flops_per_sample'] * batch)
    for row in rows:
        for layers in MLP_LAYERS:
            mlp = _row(rows, f'MLP {layers} layers')
            row[f'time_vs_mlp{layers}'] = row['forward_ms'] / mlp['forward_ms']
            row[f'time_per_flop_vs_mlp{layers}'] = row['seconds_per_flop'] / mlp['seconds_per_flop']
    baseline = 'official training.networks.MappingNetwork' if official else 'rtm_mapping.bench.ReferenceMLP'
    return dict(batch=batch, baseline=baseline, rows=rows)


def _row(rows: List[dict], name: str) -> dict:
    return next(row for row in rows if row['name'] == name)

#----------------------------------------------------------------------------
# (c) Mapper training memory.

def bench_memory(official: bool, device: torch.device, batch: int) -> dict:
    """Saved bytes of one training forward (and, on CUDA, peak allocation of forward + backward)
    of RTM at H = 1 and H = MEMORY_H with the short gradient, and at H = MEMORY_H with full backpropagation."""
    variants = {
        'RTM H=1':                                  dict(steps=1,        grad_steps=1),
        f'RTM H={MEMORY_H}':                        dict(steps=MEMORY_H, grad_steps=1),
        f'RTM H={MEMORY_H}, full backpropagation':  dict(steps=MEMORY_H, grad_steps=MEMORY_H),
    }
    z = torch.randn([batch, Z_DIM], device=device)
    rows = []
    for name, kwargs in variants.items():
        module = _build_rtm(official, **kwargs).to(device).train()
        loss = functools.partial(_mapper_loss, _caller(module, official), z)
        kept = list(module.parameters()) + list(module.buffers())
        row = dict(name=name, bytes=saved_tensor_bytes(loss, kept), **kwargs)
        if device.type == 'cuda':
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            loss().backward()
            _sync(device)
            row['cuda_peak_bytes'] = torch.cuda.max_memory_allocated(device) - base
        rows.append(row)
    for row in rows:
        row['vs_h1'] = row['bytes'] / rows[0]['bytes']
    return dict(batch=batch, rows=rows)

#----------------------------------------------------------------------------
# (e) Dispatch: ops per call and batch-1 latency.

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


def _dispatch_mappers(official: bool, device: torch.device, steps: int, compile_mode: str) -> Dict[str, dict]:
    """The mappers of part (e), built as train.py --cfg=cifar builds its mapper (num_ws, w_avg tracked);
    RTM captured unless compile_mode is 'none'."""
    mappers = {}
    for layers in MLP_LAYERS:
        if official:
            from training import networks
            module = networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=NUM_WS, num_layers=layers)
        else:
            module = ReferenceMLP(Z_DIM, W_DIM, layers)
        mappers[f'MLP {layers} layers'] = dict(module=module, mode='eager')
    if official:
        from rtm_mapping import networks
        rtm = networks.MappingNetwork(z_dim=Z_DIM, c_dim=0, w_dim=W_DIM, num_ws=NUM_WS, steps=steps)
    else:
        rtm = RecursiveTokenMapper(Z_DIM, W_DIM, lr_multiplier=0.01, steps=steps)
    mappers[f'RTM H={steps} eager'] = dict(module=rtm, mode='eager')
    if compile_mode != 'none':
        mappers[f'RTM H={steps} captured'] = dict(module=copy.deepcopy(rtm), mode='captured')
    for m in mappers.values():
        m['module'].to(device)
        m['call'] = _caller(m['module'], official)
    return mappers


def _set_compile(module: torch.nn.Module, mode: str) -> None:
    getattr(module, 'rtm', module).set_compile(mode)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


def bench_dispatch(official: bool, device: torch.device, steps: int, repeats: int, warmup: int, compile_mode: str) -> dict:
    """Part (e): per mapper, the aten ops of one call at batch DISPATCH_BATCH (forward under no_grad, and
    train-mode forward + backward), on CUDA the host-side kernel launches, and the batch-1 forward latency.
    The captured RTM is compiled once, for the batch-1 forward: its compile time and graph count are recorded."""
    mappers = _dispatch_mappers(official, device, steps, compile_mode)
    z64 = torch.randn([DISPATCH_BATCH, Z_DIM], device=device)
    z1 = torch.randn([1, Z_DIM], device=device)
    rows, graphs_before = {}, _compiled_graphs()
    for name, m in mappers.items():
        row = rows[name] = dict(name=name, mode=m['mode'])
        if m['mode'] == 'eager':
            row['no_grad'] = count_dispatch(_forward(m, z64))
            row['train'] = count_dispatch(_forward_backward(m, z64))
        else:
            _set_compile(m['module'], compile_mode)
            m['module'].eval()
            start = time.perf_counter()
            _forward(m, z1)()
            _sync(device)
            row.update(compile_mode=compile_mode, compile_seconds=time.perf_counter() - start, graphs=_compiled_graphs() - graphs_before)
    latency = medians(time_interleaved({name: _forward(m, z1) for name, m in mappers.items()}, repeats, warmup, device))
    for name, m in mappers.items():
        rows[name]['batch1_forward_ms'] = latency[name] * 1e3
        if device.type == 'cuda':
            rows[name]['cuda_launches_batch1_forward'] = cuda_launches(_forward(m, z1))
    rtm_eager = rows[f'RTM H={steps} eager']['batch1_forward_ms']
    for row in rows.values():
        row['batch1_vs_rtm_eager'] = row['batch1_forward_ms'] / rtm_eager
    for row in rows.values():
        if row['mode'] == 'captured':   # graphs compiled in all: more than `graphs` would mean recompiles while timing
            row['graphs_total'] = _compiled_graphs() - graphs_before
    baseline = 'official training.networks.MappingNetwork' if official else 'rtm_mapping.bench.ReferenceMLP'
    return dict(batch=DISPATCH_BATCH, steps=steps, baseline=baseline, rows=list(rows.values()))

#----------------------------------------------------------------------------
# (b) Generators of a real checkout.

def _generator_settings(name: str, device: torch.device, channel_div: int, batch_div: int) -> dict:
    spec = dict(GENERATOR_CONFIGS[name])
    spec['channel_base'] //= channel_div
    spec['channel_max'] = max(1, spec['channel_max'] // channel_div)
    spec['batch'] = max(2, spec['batch'] // batch_div)
    spec['mbstd'] = min(spec['mbstd'], spec['batch'])
    spec['channel_div'] = channel_div
    spec['shrunk'] = channel_div != 1 or batch_div != 1
    spec['num_fp16_res'] = 4 if device.type == 'cuda' else 0
    spec['conv_clamp'] = 256 if device.type == 'cuda' else None
    return spec


def bench_generator(name: str, device: torch.device, channel_div: int, batch_div: int, repeats: int, warmup: int,
                    steps: int = core.DEFAULTS['steps'], compile_mode: str = 'none') -> dict:
    """Whole-generator forward and one generator training step, RTM (core.DEFAULTS but H = steps)
    against MLP, and RTM captured (set_compile(compile_mode)) unless compile_mode is 'none'."""
    import dnnlib

    spec = _generator_settings(name, device, channel_div, batch_div)
    image = dict(c_dim=0, img_resolution=spec['resolution'], img_channels=3)
    common = dict(z_dim=Z_DIM, w_dim=W_DIM, **image)
    synthesis_kwargs = dict(channel_base=spec['channel_base'], channel_max=spec['channel_max'],
                            num_fp16_res=spec['num_fp16_res'], conv_clamp=spec['conv_clamp'])
    generators = {
        'MLP': dnnlib.util.construct_class_by_name(class_name='training.networks.Generator', **common,
                                                   mapping_kwargs=dict(num_layers=spec['map']), synthesis_kwargs=synthesis_kwargs),
        'RTM': dnnlib.util.construct_class_by_name(class_name='rtm_mapping.networks.Generator', **common,
                                                   mapping_kwargs=dict(steps=steps), synthesis_kwargs=synthesis_kwargs),
    }
    generators['RTM'].synthesis.load_state_dict(generators['MLP'].synthesis.state_dict())
    if compile_mode != 'none':
        generators['RTM captured'] = copy.deepcopy(generators['RTM'])
        generators['RTM captured'].mapping.rtm.set_compile(compile_mode)
    D = dnnlib.util.construct_class_by_name(class_name='training.networks.Discriminator', **image, architecture=spec['architecture'],
                                            epilogue_kwargs=dict(mbstd_group_size=spec['mbstd']), **synthesis_kwargs)
    D.to(device).requires_grad_(False)
    z = torch.randn([spec['batch'], Z_DIM], device=device)
    c = torch.zeros([spec['batch'], 0], device=device)

    graphs_before = _compiled_graphs() if compile_mode != 'none' else 0
    for G in generators.values():
        G.to(device).eval().requires_grad_(False)
    forward_times = time_interleaved({arm: _generator_forward(G, z, c) for arm, G in generators.items()}, repeats, warmup, device)
    for G in generators.values():
        G.train().requires_grad_(True)
    step_times = time_interleaved({arm: _generator_step(G, D, z, c, spec, device) for arm, G in generators.items()}, repeats, warmup, device)
    forward_s, step_s = medians(forward_times), medians(step_times)
    rows = [dict(mapper                  = arm,
                 forward_ms_per_image    = forward_s[arm] * 1e3 / spec['batch'],
                 train_step_ms_per_image = step_s[arm] * 1e3 / spec['batch'],
                 mapper_params           = sum(p.numel() for p in G.mapping.parameters()),
                 mapper_flops_per_sample = mapper_flops(G.mapping))
            for arm, G in generators.items()]
    result = dict(settings=dict(spec, steps=steps, compile_mode=compile_mode), rows=rows,
                  forward_overhead=paired_overhead(forward_times, 'RTM', 'MLP'),
                  train_step_overhead=paired_overhead(step_times, 'RTM', 'MLP'),
                  seconds=dict(forward=forward_times, train_step=step_times))
    if compile_mode != 'none':
        result.update(captured_forward_overhead=paired_overhead(forward_times, 'RTM captured', 'MLP'),
                      captured_train_step_overhead=paired_overhead(step_times, 'RTM captured', 'MLP'),
                      captured_graphs=_compiled_graphs() - graphs_before)
    return result


def _generator_forward(G: torch.nn.Module, z: torch.Tensor, c: torch.Tensor) -> Callable[[], object]:
    """App. H: one forward of the whole generator, no gradient, constant noise (generate.py's default)."""
    def run():
        with torch.no_grad():
            return G(z, c, noise_mode='const')
    return run


def _generator_step(G: torch.nn.Module, D: torch.nn.Module, z: torch.Tensor, c: torch.Tensor, spec: dict,
                    device: torch.device) -> Callable[[], object]:
    """One generator step of the official training loop: the StyleGAN2Loss 'Gmain' phase (G, then D,
    backward into G), then Adam with train.py's settings. Path-length regularization ('Greg',
    lazy, every 4th step in train.py) is left out."""
    from training.loss import StyleGAN2Loss

    loss = StyleGAN2Loss(device=device, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                         style_mixing_prob=spec['style_mixing_prob'], pl_weight=0)
    opt = torch.optim.Adam(G.parameters(), lr=spec['lrate'], betas=(0.0, 0.99), eps=1e-8)

    def run():
        opt.zero_grad(set_to_none=True)
        loss.accumulate_gradients(phase='Gmain', real_img=None, real_c=None, gen_z=z, gen_c=c, sync=True, gain=1)
        opt.step()
    return run

#----------------------------------------------------------------------------
# Report.

def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                rtm_mapping=__version__, cpu=_cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if device.type == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def evaluate_targets(results: dict) -> List[dict]:
    """Each target of issues 5 and 14 with the measured value; `met` is None where the target was not
    measured at its own settings (no checkout, --quick, shrunk channels or batch, another H)."""
    device = results['meta']['device']
    targets = []
    cifar = results.get('generator', {}).get('cifar')
    if cifar is not None:
        at_settings = not cifar['settings']['shrunk'] and cifar['settings']['steps'] == core.DEFAULTS['steps']
        for arm, prefix in [('RTM', ''), ('RTM captured', 'captured_')]:
            for measure in ('forward', 'train_step'):
                limit = TARGETS[f'generator_{measure}_overhead' if measure == 'forward' else 'train_step_overhead'].get(device)
                value = cifar.get(f'{prefix}{measure}_overhead')
                if limit is None or value is None:
                    continue
                what = 'forward' if measure == 'forward' else 'training step'
                targets.append(dict(name=f'generator {what} overhead, {arm}, cifar, batch {cifar["settings"]["batch"]}, {device}',
                                    value=value, limit=limit, met=(value <= limit) if at_settings else None))
    memory = results.get('memory')
    if memory is not None:
        ratio = _row(memory['rows'], f'RTM H={MEMORY_H}')['vs_h1']
        targets.append(dict(name=f'mapper training memory, H={MEMORY_H} over H=1', value=ratio, limit=TARGETS['memory_ratio'],
                            met=ratio <= TARGETS['memory_ratio']))
    mapper = results.get('mapper')
    if mapper is not None:
        rtm = _row(mapper['rows'], f'RTM H={core.DEFAULTS["steps"]}')
        for layers in MLP_LAYERS:
            ratio = rtm[f'time_per_flop_vs_mlp{layers}']
            targets.append(dict(name=f'RTM time per FLOP over {layers}-layer MLP, mapper forward, batch {mapper["batch"]}',
                                value=ratio, limit=TARGETS['time_per_flop_ratio'],
                                met=(ratio <= TARGETS['time_per_flop_ratio']) if not results['meta']['quick'] else None))
    dispatch = results.get('dispatch')
    if dispatch is not None:
        rtm = _row(dispatch['rows'], f'RTM H={dispatch["steps"]} eager')
        at_settings = dispatch['steps'] == core.DEFAULTS['steps']
        for key, what in [('no_grad', 'forward under no_grad'), ('train', 'train-mode forward + backward')]:
            value, limit = rtm[key]['kernels'], TARGETS[f'kernels_{key}']
            targets.append(dict(name=f'RTM H={dispatch["steps"]} eager, kernel-launching ops, {what}, batch {dispatch["batch"]}',
                                value=value, limit=limit, met=(value <= limit) if at_settings else None))
    return targets


def _format_target(t: dict) -> Tuple[str, str]:
    if 'overhead' in t['name']:
        return f'{t["value"]:+.2%}', f'{t["limit"]:.0%}'
    if 'ops' in t['name']:
        return f'{t["value"]:,}', f'{t["limit"]:,}'
    return f'{t["value"]:.2f}x', f'{t["limit"]:.2f}x'


def _count(row: dict, key: str, field: str) -> str:
    return f'{row[key][field]:,}' if key in row else 'n/a'


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    out = []
    meta = results['meta']
    machine = meta['machine']
    out.append(f'Machine: {machine.get("gpu", machine["cpu"])} ({meta["device"]}, {machine["torch_threads"]} torch threads), '
               f'torch {machine["torch"]}, rtm-mapping {machine["rtm_mapping"]}.  ')
    out.append(f'Command: `{meta["command"]}`' + ('  \nDenormals flushed to zero (CPU).' if meta['flush_denormal'] else ''))
    mapper = results.get('mapper')
    if mapper is not None:
        out += ['', f'Mapper, batch {mapper["batch"]} (baseline: {mapper["baseline"]}); medians, ms per batch:', '',
                '| mapper | params | MFLOP / sample | forward ms | forward + backward ms | forward vs MLP-2 '
                '| time per FLOP vs MLP-2 | vs MLP-8 |',
                '|---|---:|---:|---:|---:|---:|---:|---:|']
        for r in mapper['rows']:
            name = r['name'] + (' (default)' if r['default'] else '')
            out.append(f'| {name} | {r["params"]:,} | {r["flops_per_sample"] / 1e6:.2f} | {r["forward_ms"]:.3f} | '
                       f'{r["forward_backward_ms"]:.3f} | {r["time_vs_mlp2"]:.2f}x | {r["time_per_flop_vs_mlp2"]:.2f}x | '
                       f'{r["time_per_flop_vs_mlp8"]:.2f}x |')
    dispatch = results.get('dispatch')
    if dispatch is not None:
        cuda = meta['device'] == 'cuda'
        out += ['', f'Dispatch (baseline: {dispatch["baseline"]}): aten ops per mapper call at batch {dispatch["batch"]} '
                '(kernel-launching ones, views apart; a captured call is not counted, it runs no aten ops one by one), '
                'and the batch-1 forward latency, median:', '',
                '| mapper | ops, no_grad forward | kernel ops, no_grad forward | kernel ops, train forward + backward '
                '| batch-1 forward ms | vs RTM eager |' + (' CUDA launches, batch-1 forward |' if cuda else ''),
                '|---|---:|---:|---:|---:|---:|' + ('---:|' if cuda else '')]
        for r in dispatch['rows']:
            out.append(f'| {r["name"]} | {_count(r, "no_grad", "ops")} | {_count(r, "no_grad", "kernels")} | '
                       f'{_count(r, "train", "kernels")} | {r["batch1_forward_ms"]:.3f} | {r["batch1_vs_rtm_eager"]:.2f}x |'
                       + (f' {r["cuda_launches_batch1_forward"]:,} |' if cuda else ''))
            if r['mode'] == 'captured':
                out.append(f'| (compile: mode {r["compile_mode"]!r}, {r["compile_seconds"]:.1f} s, {r["graphs"]} graph(s); '
                           f'{r["graphs_total"]} after timing) | | | | | |' + (' |' if cuda else ''))
    generator = results.get('generator')
    if generator:
        out += ['', 'Generator (official synthesis network), medians, ms per image:', '',
                '| config | batch | channel_base / max | mapper | forward | training step (G) |',
                '|---|---:|---:|---|---:|---:|']
        for name, g in generator.items():
            s = g['settings']
            for r in g['rows']:
                out.append(f'| {name}{" (shrunk)" if s["shrunk"] else ""} | {s["batch"]} | {s["channel_base"]} / {s["channel_max"]} | '
                           f'{r["mapper"]} H={s["steps"]} | {r["forward_ms_per_image"]:.3f} | {r["train_step_ms_per_image"]:.3f} |'
                           if r['mapper'] != 'MLP' else
                           f'| {name}{" (shrunk)" if s["shrunk"] else ""} | {s["batch"]} | {s["channel_base"]} / {s["channel_max"]} | '
                           f'MLP {s["map"]} layers | {r["forward_ms_per_image"]:.3f} | {r["train_step_ms_per_image"]:.3f} |')
            out.append(f'| {name} | | | RTM overhead (median of paired ratios) | {g["forward_overhead"]:+.2%} | {g["train_step_overhead"]:+.2%} |')
            if 'captured_forward_overhead' in g:
                out.append(f'| {name} | | | RTM captured overhead ({g["captured_graphs"]} graphs compiled) | '
                           f'{g["captured_forward_overhead"]:+.2%} | {g["captured_train_step_overhead"]:+.2%} |')
    memory = results.get('memory')
    if memory is not None:
        cuda = 'cuda_peak_bytes' in memory['rows'][0]
        out += ['', f'Mapper training memory, batch {memory["batch"]}: what autograd keeps for backward:', '',
                '| mapper | saved MiB | vs H=1 |' + (' CUDA peak MiB, forward + backward |' if cuda else ''),
                '|---|---:|---:|' + ('---:|' if cuda else '')]
        for r in memory['rows']:
            out.append(f'| {r["name"]} | {r["bytes"] / 2**20:.2f} | {r["vs_h1"]:.2f}x |'
                       + (f' {r["cuda_peak_bytes"] / 2**20:.2f} |' if cuda else ''))
    if results.get('imle'):
        out += [''] + imle_bench.markdown(results['imle'])
    for note in results.get('notes', []):
        out += ['', f'Note: {note}']
    if results['targets']:
        out += ['', 'Targets (issues 5 and 14):', '', '| target | measured | limit | met |', '|---|---:|---:|---|']
        for t in results['targets']:
            value, limit = _format_target(t)
            met = 'not at target settings' if t['met'] is None else ('yes' if t['met'] else 'NO')
            out.append(f'| {t["name"]} | {value} | {limit} | {met} |')
    return '\n'.join(out)

#----------------------------------------------------------------------------
# The report of scripts/gpu_bench.sh: this bench's JSON and train.py's speed, in one JSON and one table.

TRAIN_ARMS = ('mlp', 'rtm', 'rtm-compile')   # train.py --map=mlp, --map=rtm, --map=rtm --map-compile


def training_speed(run_dir: str) -> dict:
    """Seconds per kimg of a train.py run, from its stats.jsonl: the median over ticks 1, 2, ...
    (tick 0 is the first batch: start-up, custom-op and torch.compile time), and tick 0's seconds."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    if len(ticks) < 2:
        raise click.ClickException(f'{run_dir}/stats.jsonl has {len(ticks)} tick(s); the speed needs tick 0 and at least one more: train longer (--kimg).')
    steady = [t['Timing/sec_per_kimg']['mean'] for t in ticks[1:]]
    return dict(sec_per_kimg=statistics.median(steady), sec_per_kimg_ticks=steady, ticks=len(ticks) - 1,
                kimg=ticks[-1]['Progress/kimg']['mean'], tick0_sec=ticks[0]['Timing/sec_per_tick']['mean'])


def _merge(bench_jsons: List[str]) -> dict:
    """The results of several bench runs (each a part) as one: parts, notes and targets together."""
    merged = None
    for path in bench_jsons:
        with open(path) as f:
            results = json.load(f)
        if merged is None:
            merged = results
            continue
        for key in PARTS + OPT_IN_PARTS + ('flops',):
            if key in results:
                merged[key] = results[key]
        merged['notes'] += results['notes']
        merged['targets'] += results['targets']
        merged['meta']['command'] += ' && ' + results['meta']['command']
    return merged


def gpu_report(bench_jsons: List[str], runs: Dict[str, Optional[str]], stage_seconds: Dict[str, float],
               failed: List[str]) -> Tuple[dict, str]:
    """One JSON-able dict and one markdown table from the bench JSONs and the train.py run folders
    (TRAIN_ARMS; None where that run failed), with the seconds of each stage and the stages that failed."""
    results = _merge(bench_jsons) if bench_jsons else None
    training = {arm: training_speed(run_dir) for arm, run_dir in runs.items() if run_dir is not None}
    for speed in training.values():
        speed['overhead_vs_mlp'] = speed['sec_per_kimg'] / training['mlp']['sec_per_kimg'] - 1 if 'mlp' in training else None
    report = dict(machine=None if results is None else results['meta']['machine'], bench=results, training=training,
                  stage_seconds=stage_seconds, total_seconds=sum(stage_seconds.values()), failed_stages=failed)
    out = [] if results is None else [markdown(results), '']
    out += ['train.py --cfg=cifar --batch=64, seconds per kimg (median of ticks after tick 0):', '',
            '| mapper | sec/kimg | vs MLP | ticks | tick 0 s (start-up, compile) |', '|---|---:|---:|---:|---:|']
    for arm, s in training.items():
        vs = '' if s['overhead_vs_mlp'] is None else f'{s["overhead_vs_mlp"]:+.2%}'
        out.append(f'| {arm} | {s["sec_per_kimg"]:.3f} | {vs} | {s["ticks"]} | {s["tick0_sec"]:.1f} |')
    out += ['', 'Stages, seconds: ' + ', '.join(f'{name} {sec:.0f}' for name, sec in stage_seconds.items())
            + f'; total {report["total_seconds"]:.0f}.']
    if failed:
        out += ['', f'FAILED stages (see their logs): {", ".join(failed)}.']
    return report, '\n'.join(out)


def write_gpu_report(bench_jsons: List[str], runs: Dict[str, Optional[str]], stage_seconds: Dict[str, float], failed: List[str],
                     out_json: str, out_md: str) -> str:
    """gpu_report() written to out_json and out_md; returns the markdown."""
    report, table = gpu_report(bench_jsons, runs, stage_seconds, failed)
    with open(out_json, 'w') as f:
        json.dump(report, f, indent=2)
    with open(out_md, 'w') as f:
        f.write(table + '\n')
    return table

#----------------------------------------------------------------------------
# The command: set-up (settings, checkout), measurement (the parts), report (tables, JSON).

PARTS = ('mapper', 'generator', 'memory', 'dispatch')
OPT_IN_PARTS = ('imle',)    # run only with --part: RS-IMLE's full settings (rtm_mapping.imle.bench) are App. H's, for a GPU


def _full(key: str) -> str:
    return f'[default: {RUNS["full"][key]}; --quick: {RUNS["quick"][key]}]'


def _command_line(params: dict) -> str:
    """The command that reproduces this run, every option spelled out."""
    args = ['rtm-mapping', 'bench']
    for name, value in params.items():
        flag = '--' + name.replace('_', '-')
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (tuple, list)):
            args += [a for v in value for a in (flag, str(v))]
        else:
            args += [flag, str(value)]
    return ' '.join(shlex.quote(a) for a in args)


def _find_checkout(stylegan: Optional[str], notes: List[str]) -> Optional[str]:
    """The StyleGAN2-ADA checkout of --stylegan, else checkout.find()'s (${STYLEGAN2_ADA_ROOT}, else the
    current folder), put on sys.path; None, with a note saying why, when --stylegan is not given and
    there is none."""
    try:
        root = checkout.find(stylegan)
        if checkout.codebase(root) != 'stylegan2-ada':   # before anything of it is imported
            raise click.ClickException(f'{root} is a StyleGAN3 checkout; the generator part and the official MLP baseline '
                                       'build StyleGAN2-ADA\'s networks: pass a StyleGAN2-ADA checkout, or none')
        return checkout.use(root)
    except click.ClickException as err:
        if stylegan is not None:
            raise
        notes.append(f'no StyleGAN2-ADA checkout ({err.format_message()}): generator part (b) skipped, '
                     'MLP baseline is ReferenceMLP. Pass --stylegan to use one.')
        click.echo(f'Note: {notes[-1]}', err=True)
        return None


def run_settings(quick: bool, **given) -> dict:
    """The run's settings: each option given, else its RUNS default (full or --quick)."""
    run = dict(RUNS['quick' if quick else 'full'])
    run.update({key: value for key, value in given.items() if value is not None})
    return run


def measure(parts, configs, official: bool, device: torch.device, run: dict, paper512_channel_div: Optional[int], compile_mode: str) -> dict:
    """Run the parts asked for; returns their results by part name."""
    results = {}
    torch.manual_seed(0)
    if 'mapper' in parts:
        click.echo('(a, d) mappers ...', err=True)
        results['mapper'] = bench_mappers(official, device, run['batch'], run['repeats'], run['warmup'])
    if 'dispatch' in parts:
        click.echo('(e) dispatch ...', err=True)
        results['dispatch'] = bench_dispatch(official, device, run['map_h'], run['repeats'], run['warmup'], compile_mode)
    if 'memory' in parts:
        click.echo('(c) memory ...', err=True)
        results['memory'] = bench_memory(official, device, run['batch'])
    if 'generator' in parts and official:
        results['generator'] = {}
        for name in configs:
            channel_div = run['channel_div'] * ((paper512_channel_div or 1) if name == 'paper512' else 1)
            click.echo(f'(b) generator {name} ...', err=True)
            results['generator'][name] = bench_generator(name, device, channel_div, run['gen_batch_div'], run['gen_repeats'],
                                                         run['gen_warmup'], steps=run['map_h'], compile_mode=compile_mode)
    results['flops'] = {r['name']: r['flops_per_sample'] for r in results.get('mapper', {}).get('rows', [])} or \
        {name: mapper_flops(m['module']) for name, m in _build_mappers(official, torch.device('cpu')).items()}
    return results


@click.command()
@click.pass_context
@click.option('--device',       type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True, help='Device to measure on.')
@checkout.option
@click.option('--part',         type=click.Choice(PARTS + OPT_IN_PARTS), multiple=True, default=PARTS, show_default=True,
              help='Parts to run (repeatable); FLOPs always. Without a checkout, generator is skipped. imle: RS-IMLE, only when named.')
@click.option('--config',       type=click.Choice(list(GENERATOR_CONFIGS)), multiple=True, default=tuple(GENERATOR_CONFIGS),
              show_default=True, help='Generator configurations of part (b) (repeatable).')
@click.option('--batch',        type=click.IntRange(min=1), default=None, help=f'Mapper batch of (a) and (c)  {_full("batch")}')
@click.option('--repeats',      type=click.IntRange(min=1), default=None, help=f'Timed repeats of each mapper  {_full("repeats")}')
@click.option('--warmup',       type=click.IntRange(min=0), default=None, help=f'Warm-up calls of each mapper  {_full("warmup")}')
@click.option('--gen-repeats',  type=click.IntRange(min=1), default=None, help=f'Timed repeats of each generator  {_full("gen_repeats")}')
@click.option('--gen-warmup',   type=click.IntRange(min=0), default=None, help=f'Warm-up calls of each generator  {_full("gen_warmup")}')
@click.option('--map-h',        type=click.IntRange(min=1), default=None, help=f'RTM steps H of parts (b) and (e)  {_full("map_h")}')
@click.option('--compile-mode', type=click.Choice(('none',) + core.COMPILE_MODES), default='auto', show_default=True,
              help='torch.compile mode of the captured RTM in parts (b) and (e); auto = CUDA graphs on CUDA; none = eager only.')
@click.option('--paper512-channel-div', type=click.IntRange(min=1), default=None,
              help='Divide channel_base and channel_max of paper512 by this (recorded as shrunk)  [default: 1 = official]')
@click.option('--threads',      type=click.IntRange(min=1), default=None, help='torch CPU threads  [default: torch\'s choice]')
@click.option('--out',          type=click.Path(dir_okay=False), default='rtm-bench.json', show_default=True, help='JSON results file.')
@click.option('--quick',        is_flag=True, help='Tiny settings, a smoke test of the command (not a measurement).')
@imle_bench.options
def bench(ctx, device, stylegan, part, config, batch, repeats, warmup, gen_repeats, gen_warmup, map_h, compile_mode, paper512_channel_div,
          threads, out, quick, **imle_options):
    """Benchmark RTM against the MLP mapper, side by side, and check the targets of issues 5 and 14.

    \b
    Examples:
      rtm-mapping bench --stylegan ~/stylegan2-ada-pytorch --out bench.json
      rtm-mapping bench --device cuda --repeats 200 --warmup 20
      rtm-mapping bench --part dispatch --repeats 200
      rtm-mapping bench --quick --part mapper
      rtm-mapping bench --device cuda --part imle
    """
    # Set-up.
    run = run_settings(quick, batch=batch, repeats=repeats, warmup=warmup, gen_repeats=gen_repeats, gen_warmup=gen_warmup, map_h=map_h)
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda: torch sees no CUDA device here; run with --device cpu or on a machine with a GPU.')
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    # Denormal floats take a slow microcode path on x86 CPUs, and how many the synthesis network meets
    # depends on the styles w: unflushed, two generators differing only in w differ in time by tens of
    # percent (cifar, batch 64: 30 s against 24 s for the same network). Flushed, the time is the compute.
    flush_denormal = dev.type == 'cpu' and torch.set_flush_denormal(True)
    if flush_denormal:
        ctx.call_on_close(lambda: torch.set_flush_denormal(False))
    notes = []
    root = _find_checkout(stylegan, notes)
    results = dict(meta=dict(
        command  = _command_line(dict(ctx.params, stylegan=root)),
        argv     = sys.argv,
        date     = datetime.now(timezone.utc).isoformat(timespec='seconds'),
        device   = device,
        quick    = quick,
        stylegan = root,
        flush_denormal = flush_denormal,
        machine  = machine_info(dev),
        settings = dict(run, compile_mode=compile_mode, rtm=dict(core.DEFAULTS), sweep_h=list(SWEEP_H), mlp_layers=list(MLP_LAYERS),
                        memory_h=MEMORY_H, dispatch_batch=DISPATCH_BATCH),
    ))

    # Measurement.
    results.update(measure(part, config, root is not None, dev, run, paper512_channel_div, compile_mode))
    if 'imle' in part:
        results['imle'] = imle_bench.measure_imle(imle_bench.settings_from_options(dev, quick, imle_options))

    # Report.
    results['notes'] = notes
    results['targets'] = evaluate_targets(results) + (imle_bench.targets(results['imle']) if 'imle' in results else [])
    results['ratios'] = {t['name']: t['value'] for t in results['targets']}
    click.echo(markdown(results))
    with open(out, 'w') as f:
        json.dump(results, f, indent=2)
    click.echo(f'\nWrote {out}', err=True)

#----------------------------------------------------------------------------
