"""The report of scripts/gpu_bench.sh: its bench JSONs and train.py's speed, in one JSON and one table.

    python -m rtm_mapping.bench.gpu_report WORKDIR 'FAILED STAGES' NAME=SECONDS ...

reads WORKDIR/bench-*.json (one per bench stage, in name order) and WORKDIR/train-ARM/*/stats.jsonl (one
per train.py run of TRAIN_ARMS), and writes WORKDIR/gpu-bench.json and WORKDIR/gpu-bench.md.
"""

import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

import click

from rtm_mapping.bench import report

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


def gpu_report(bench_jsons: List[str], runs: Dict[str, Optional[str]], stage_seconds: Dict[str, float],
               failed: List[str]) -> Tuple[dict, str]:
    """One JSON-able dict and one markdown table from the bench JSONs and the train.py run folders
    (TRAIN_ARMS; None where that run failed), with the seconds of each stage and the stages that failed."""
    results = report.merge(bench_jsons) if bench_jsons else None
    training = {arm: training_speed(run_dir) for arm, run_dir in runs.items() if run_dir is not None}
    for speed in training.values():
        speed['overhead_vs_mlp'] = speed['sec_per_kimg'] / training['mlp']['sec_per_kimg'] - 1 if 'mlp' in training else None
    out = dict(machine=None if results is None else results['meta']['machine'], bench=results, training=training,
               stage_seconds=stage_seconds, total_seconds=sum(stage_seconds.values()), failed_stages=failed)
    lines = [] if results is None else [report.markdown(results), '']
    lines += ['train.py seconds per kimg (median of ticks after tick 0):', '',
              '| mapper | sec/kimg | vs MLP | ticks | tick 0 s (start-up, compile) |', '|---|---:|---:|---:|---:|']
    for arm, s in training.items():
        vs = '' if s['overhead_vs_mlp'] is None else f'{s["overhead_vs_mlp"]:+.2%}'
        lines.append(f'| {arm} | {s["sec_per_kimg"]:.3f} | {vs} | {s["ticks"]} | {s["tick0_sec"]:.1f} |')
    lines += ['', 'Stages, seconds: ' + ', '.join(f'{name} {sec:.0f}' for name, sec in stage_seconds.items())
              + f'; total {out["total_seconds"]:.0f}.']
    if failed:
        lines += ['', f'FAILED stages (see their logs): {", ".join(failed)}.']
    return out, '\n'.join(lines)


def write_gpu_report(bench_jsons: List[str], runs: Dict[str, Optional[str]], stage_seconds: Dict[str, float], failed: List[str],
                     out_json: str, out_md: str) -> str:
    """gpu_report() written to out_json and out_md; returns the markdown."""
    data, table = gpu_report(bench_jsons, runs, stage_seconds, failed)
    with open(out_json, 'w') as f:
        json.dump(data, f, indent=2)
    with open(out_md, 'w') as f:
        f.write(table + '\n')
    return table


def from_workdir(work: str, failed: List[str], stage_seconds: Dict[str, float]) -> str:
    """write_gpu_report() of a gpu_bench.sh WORKDIR: its bench-*.json, the last run of each train-ARM stage that did not fail."""
    jsons = sorted(glob.glob(os.path.join(work, 'bench-*.json')))
    runs = {}
    for arm in TRAIN_ARMS:
        found = sorted(glob.glob(os.path.join(work, f'train-{arm}', '*', 'stats.jsonl')))
        runs[arm] = os.path.dirname(found[-1]) if found and f'train-{arm}' not in failed else None
    return write_gpu_report(jsons, runs, stage_seconds, failed, os.path.join(work, 'gpu-bench.json'), os.path.join(work, 'gpu-bench.md'))


def main(argv: List[str]) -> None:
    work, failed, stages = argv[0], argv[1].split(), dict(s.split('=') for s in argv[2:])
    print(from_workdir(work, failed, {name: float(sec) for name, sec in stages.items()}))


if __name__ == '__main__':
    main(sys.argv[1:])
