"""Part `memory`: mapper training memory, the bytes autograd keeps for backward, of RTM at H = 1 and
H = MEMORY_H with the short gradient (paper §3.2: only the last step is differentiated), and at
H = MEMORY_H with full backpropagation through every step; on CUDA also the peak allocation."""

import functools
from typing import List

import torch

from rtm_mapping.bench import mappers, probes
from rtm_mapping.bench.settings import Settings
from rtm_mapping.bench.targets import Limit

TITLE = 'mapper training memory'
MEMORY_H = 16

TARGETS = {
    'memory_ratio': Limit(1.3, 'ratio'),    # Saved bytes, H = MEMORY_H over H = 1, short gradient.
}

VARIANTS = {
    'RTM H=1':                                  dict(steps=1,        grad_steps=1),
    f'RTM H={MEMORY_H}':                        dict(steps=MEMORY_H, grad_steps=1),
    f'RTM H={MEMORY_H}, full backpropagation':  dict(steps=MEMORY_H, grad_steps=MEMORY_H),
}


def measure(run: Settings) -> dict:
    z = torch.randn([run.batch, mappers.Z_DIM], device=run.device)
    rows = []
    for name, kwargs in VARIANTS.items():
        m = mappers.rtm(run.official, name=name, **kwargs)
        m.module.to(run.device).train()
        loss = functools.partial(m.loss, z)
        kept = list(m.module.parameters()) + list(m.module.buffers())
        row = dict(name=name, bytes=probes.saved_tensor_bytes(loss, kept), **kwargs)
        if run.device.type == 'cuda':
            probes.sync(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
            base = torch.cuda.memory_allocated(run.device)
            loss().backward()
            probes.sync(run.device)
            row['cuda_peak_bytes'] = torch.cuda.max_memory_allocated(run.device) - base
        rows.append(row)
    for row in rows:
        row['vs_h1'] = row['bytes'] / rows[0]['bytes']
    return dict(batch=run.batch, rows=rows)


def targets(result: dict, run: Settings) -> List[dict]:
    ratio = next(row for row in result['rows'] if row['name'] == f'RTM H={MEMORY_H}')['vs_h1']
    return [TARGETS['memory_ratio'].judge(f'mapper training memory, H={MEMORY_H} over H=1', ratio)]


def markdown(result: dict, meta: dict) -> List[str]:
    cuda = 'cuda_peak_bytes' in result['rows'][0]
    out = [f'Mapper training memory, batch {result["batch"]}: what autograd keeps for backward:', '',
           '| mapper | saved MiB | vs H=1 |' + (' CUDA peak MiB, forward + backward |' if cuda else ''),
           '|---|---:|---:|' + ('---:|' if cuda else '')]
    for r in result['rows']:
        out.append(f'| {r["name"]} | {r["bytes"] / 2**20:.2f} | {r["vs_h1"]:.2f}x |'
                   + (f' {r["cuda_peak_bytes"] / 2**20:.2f} |' if cuda else ''))
    return out
