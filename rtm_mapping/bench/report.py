"""The markdown of a bench JSON: the machine and command, each part's table (the part renders it), the
notes, and the targets. Works from the saved JSON alone, so earlier runs can be merged and re-rendered."""

import json
from typing import List

from rtm_mapping.bench.parts import PARTS
from rtm_mapping.bench.targets import formatted, verdict


def load(path: str) -> dict:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def merge(paths: List[str]) -> dict:
    """The results of several bench runs (each of some parts) as one: the first run's meta, every part,
    every note and target, and the commands joined with &&."""
    merged = None
    for path in paths:
        results = load(path)
        if merged is None:
            merged = results
            continue
        for key in list(PARTS) + ['flops']:
            if key in results:
                merged[key] = results[key]
        merged['notes'] += results['notes']
        merged['targets'] += results['targets']
        merged['meta']['command'] += ' && ' + results['meta']['command']
    return merged


def header(meta: dict) -> List[str]:
    machine = meta['machine']
    threads = machine['torch_threads']
    return [f'Machine: {machine.get("gpu", machine["cpu"])} ({meta["device"]}, {threads} torch thread{"s" if threads != 1 else ""}), '
            f'torch {machine["torch"]}, rtm-mapping {machine["rtm_mapping"]}.  ',
            f'Command: `{meta["command"]}`' + ('  \nDenormals flushed to zero (CPU).' if meta['flush_denormal'] else '')]


def targets_table(targets: List[dict]) -> List[str]:
    out = ['| target | measured | limit | met |', '|---|---:|---:|---|']
    for t in targets:
        value, limit = formatted(t)
        out.append(f'| {t["name"]} | {value} | {limit} | {verdict(t["met"])} |')
    return out


def markdown(results: dict) -> str:
    """The results as markdown: header, one table per part (in the order of PARTS), notes, targets."""
    out = header(results['meta'])
    for name, part in PARTS.items():
        if results.get(name):
            out += [''] + part.markdown(results[name], results['meta'])
    for note in results.get('notes', []):
        out += ['', f'Note: {note}']
    if results['targets']:
        out += ['', 'Targets (each part\'s TARGETS, rtm_mapping/bench/parts/):', ''] + targets_table(results['targets'])
    return '\n'.join(out)
