"""Part `mapper`: the mapper alone at batch --batch, forward (no_grad) and forward + backward, RTM at
each H of SWEEP_H against the MLP at each depth of MLP_LAYERS; FLOPs per sample, and RTM's time per FLOP
against each MLP's."""

from typing import Dict, List

import torch

from rtm_mapping import core
from rtm_mapping.bench import mappers, probes
from rtm_mapping.bench.settings import Settings
from rtm_mapping.bench.targets import Limit

TITLE = 'mapper time and time per FLOP'
SWEEP_H = (1, 8, 16, 32)    # core.DEFAULTS['steps'] is the default configuration.

TARGETS = {
    'time_per_flop_ratio': Limit(1.5, 'ratio'),     # RTM at the default H over each MLP, mapper forward.
}


def measure(run: Settings) -> dict:
    built = mappers.build(run.official, run.device, steps=SWEEP_H)
    z = torch.randn([run.batch, mappers.Z_DIM], device=run.device)
    forward = probes.medians(probes.time_interleaved({name: m.forward(z) for name, m in built.items()}, run.repeats, run.warmup, run.device))
    forward_backward = probes.medians(probes.time_interleaved({name: m.forward_backward(z) for name, m in built.items()},
                                                              run.repeats, run.warmup, run.device))
    rows = []
    for name, m in built.items():
        flops = probes.mapper_flops(m.module)
        rows.append(dict(
            name                = name,
            kind                = m.kind,
            H                   = m.steps,
            default             = m.steps == core.DEFAULTS['steps'],
            params              = sum(p.numel() for p in m.module.parameters()),
            flops_per_sample    = flops,
            forward_ms          = forward[name] * 1e3,
            forward_backward_ms = forward_backward[name] * 1e3,
            seconds_per_flop    = forward[name] / (flops * run.batch),
        ))
    by_name = {row['name']: row for row in rows}
    for row in rows:
        for layers in mappers.MLP_LAYERS:
            mlp = by_name[f'MLP {layers} layers']
            row[f'time_vs_mlp{layers}'] = row['forward_ms'] / mlp['forward_ms']
            row[f'time_per_flop_vs_mlp{layers}'] = row['seconds_per_flop'] / mlp['seconds_per_flop']
    return dict(batch=run.batch, baseline=mappers.baseline(run.official), rows=rows)


def flops(official: bool) -> Dict[str, int]:
    """FLOPs per sample of each mapper of this part (analytic: recorded by every run, whatever its parts)."""
    return {name: probes.mapper_flops(m.module) for name, m in mappers.build(official, torch.device('cpu'), steps=SWEEP_H).items()}


def targets(result: dict, run: Settings) -> List[dict]:
    rtm = next(row for row in result['rows'] if row['name'] == f'RTM H={core.DEFAULTS["steps"]}')
    limit = TARGETS['time_per_flop_ratio']
    return [limit.judge(f'RTM time per FLOP over {layers}-layer MLP, mapper forward, batch {result["batch"]}',
                        rtm[f'time_per_flop_vs_mlp{layers}'], at_settings=not run.quick)
            for layers in mappers.MLP_LAYERS]


def markdown(result: dict, meta: dict) -> List[str]:
    out = [f'Mapper, batch {result["batch"]} (baseline: {result["baseline"]}); medians, ms per batch:', '',
           '| mapper | params | MFLOP / sample | forward ms | forward + backward ms | forward vs MLP-2 '
           '| time per FLOP vs MLP-2 | vs MLP-8 |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in result['rows']:
        name = r['name'] + (' (default)' if r['default'] else '')
        out.append(f'| {name} | {r["params"]:,} | {r["flops_per_sample"] / 1e6:.2f} | {r["forward_ms"]:.3f} | '
                   f'{r["forward_backward_ms"]:.3f} | {r["time_vs_mlp2"]:.2f}x | {r["time_per_flop_vs_mlp2"]:.2f}x | '
                   f'{r["time_per_flop_vs_mlp8"]:.2f}x |')
    return out
