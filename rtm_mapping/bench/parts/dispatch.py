"""Part `dispatch`: what one mapper call dispatches, and its batch-1 latency, where a call is bound by
dispatch and kernel launches rather than arithmetic. A GPU pays per launched kernel, and RTM calls its
shared block H (L + 1) = 32 times per call.

Per mapper (the 2- and 8-layer MLP, RTM eager, RTM captured by torch.compile unless --compile-mode none),
built as train.py --cfg=cifar builds its mapper: the aten ops of one call at batch BATCH (forward under
no_grad, and train-mode forward + backward), counted with a TorchDispatchMode (views apart); on CUDA the
host-side kernel launches; and the batch-1 forward latency. The captured RTM is compiled once, for the
batch-1 forward: its compile time and graph count are recorded.
"""

import copy
import time
from typing import Dict, List

import torch

from rtm_mapping import core
from rtm_mapping.bench import mappers, probes
from rtm_mapping.bench.settings import Settings
from rtm_mapping.bench.targets import Limit

TITLE = 'ops and kernel launches per call, batch-1 latency'
BATCH = 64                  # Op counts at the training batch of train.py --cfg=cifar; latency at batch 1.
NUM_WS = 8                  # The mapper as train.py --cfg=cifar builds it (32 px: 8 ws, w_avg tracked).

TARGETS = {
    'kernels_no_grad':  Limit(600, 'count'),    # RTM eager at the default H, batch BATCH, forward under no_grad.
    'kernels_train':    Limit(750, 'count'),    # The same, train-mode forward + backward.
}


def kernel_counts(mapper: mappers.Mapper, z: torch.Tensor) -> Dict[str, dict]:
    """dict(no_grad=..., train=...): probes.count_dispatch of an eval forward under no_grad and of a
    train-mode forward + backward."""
    return dict(no_grad=probes.count_dispatch(mapper.forward(z)), train=probes.count_dispatch(mapper.forward_backward(z)))


def measure(run: Settings) -> dict:
    steps = run.map_h
    rtm = mappers.rtm(run.official, num_ws=NUM_WS, name=f'RTM H={steps} eager', steps=steps)
    built = [mappers.mlp(run.official, layers, num_ws=NUM_WS) for layers in mappers.MLP_LAYERS] + [rtm]
    modes = {m.name: 'eager' for m in built}
    if run.compile_mode != 'none':
        captured = mappers.Mapper(name=f'RTM H={steps} captured', module=copy.deepcopy(rtm.module), kind='rtm', steps=steps,
                                  official=run.official)
        built.append(captured)
        modes[captured.name] = 'captured'
    for m in built:
        m.module.to(run.device)
    z64 = torch.randn([BATCH, mappers.Z_DIM], device=run.device)
    z1 = torch.randn([1, mappers.Z_DIM], device=run.device)
    rows, graphs_before = {}, probes.compiled_graphs()
    for m in built:
        row = rows[m.name] = dict(name=m.name, mode=modes[m.name])
        if row['mode'] == 'eager':
            row.update(kernel_counts(m, z64))
        else:
            m.rtm.set_compile(run.compile_mode)
            start = time.perf_counter()
            m.forward(z1)()
            probes.sync(run.device)
            row.update(compile_mode=run.compile_mode, compile_seconds=time.perf_counter() - start,
                       graphs=probes.compiled_graphs() - graphs_before)
    latency = probes.medians(probes.time_interleaved({m.name: m.forward(z1) for m in built}, run.repeats, run.warmup, run.device))
    for m in built:
        rows[m.name]['batch1_forward_ms'] = latency[m.name] * 1e3
        if run.device.type == 'cuda':
            rows[m.name]['cuda_launches_batch1_forward'] = probes.cuda_launches(m.forward(z1))
    for row in rows.values():
        row['batch1_vs_rtm_eager'] = row['batch1_forward_ms'] / rows[rtm.name]['batch1_forward_ms']
        if row['mode'] == 'captured':   # graphs compiled in all: more than `graphs` would mean recompiles while timing
            row['graphs_total'] = probes.compiled_graphs() - graphs_before
    return dict(batch=BATCH, steps=steps, baseline=mappers.baseline(run.official), rows=list(rows.values()))


def targets(result: dict, run: Settings) -> List[dict]:
    rtm = next(row for row in result['rows'] if row['name'] == f'RTM H={result["steps"]} eager')
    at_settings = result['steps'] == core.DEFAULTS['steps']
    return [TARGETS[f'kernels_{key}'].judge(f'RTM H={result["steps"]} eager, kernel-launching ops, {what}, batch {result["batch"]}',
                                            rtm[key]['kernels'], at_settings=at_settings)
            for key, what in [('no_grad', 'forward under no_grad'), ('train', 'train-mode forward + backward')]]


def _count(row: dict, key: str, field: str) -> str:
    return f'{row[key][field]:,}' if key in row else 'n/a'


def markdown(result: dict, meta: dict) -> List[str]:
    cuda = meta['device'] == 'cuda'
    out = [f'Dispatch (baseline: {result["baseline"]}): aten ops per mapper call at batch {result["batch"]} '
           '(kernel-launching ones, views apart; a captured call is not counted, it runs no aten ops one by one), '
           'and the batch-1 forward latency, median:', '',
           '| mapper | ops, no_grad forward | kernel ops, no_grad forward | kernel ops, train forward + backward '
           '| batch-1 forward ms | vs RTM eager |' + (' CUDA launches, batch-1 forward |' if cuda else ''),
           '|---|---:|---:|---:|---:|---:|' + ('---:|' if cuda else '')]
    for r in result['rows']:
        out.append(f'| {r["name"]} | {_count(r, "no_grad", "ops")} | {_count(r, "no_grad", "kernels")} | '
                   f'{_count(r, "train", "kernels")} | {r["batch1_forward_ms"]:.3f} | {r["batch1_vs_rtm_eager"]:.2f}x |'
                   + (f' {r["cuda_launches_batch1_forward"]:,} |' if cuda else ''))
        if r['mode'] == 'captured':
            out.append(f'| (compile: mode {r["compile_mode"]!r}, {r["compile_seconds"]:.1f} s, {r["graphs"]} graph(s); '
                       f'{r["graphs_total"]} after timing) | | | | | |' + (' |' if cuda else ''))
    return out
