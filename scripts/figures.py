"""Regenerate the measured tables of README.md and docs/performance.md, in one command:

    STYLEGAN2_ADA_ROOT=~/stylegan2-ada-pytorch python scripts/figures.py [PART ...]

Each PART of FIGURES (default: those the documents show) is measured by `rtm-mapping bench` on this machine, with the
options below, into docs/bench/cpu-PART.json. Then every block of the DOCUMENTS between
`<!-- figures: NAME -->` and `<!-- /figures -->` is rewritten from the JSONs: NAME is a part (its table,
as `bench` prints it, with the command and machine), `targets` (every part's targets), or an experiment
of EXPERIMENTS (its table from the JSON it wrote; rerun it yourself, it takes longer). With --render-only
nothing is measured. tests/test_readme.py fails when a block differs from what its JSON gives, and
tests/test_bench.py when the kernel counts of cpu-dispatch.json are not what the code dispatches.
"""

import os
import re
import subprocess
import sys
from typing import Dict, List

import click

from rtm_mapping.bench import report
from rtm_mapping.bench.parts import PARTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ('README.md', os.path.join('docs', 'performance.md'))

# part: `rtm-mapping bench` options, besides --part and --out. One torch thread where a machine shared with
# other jobs makes threads wait for each other more than they compute.
FIGURES = {
    'dispatch':     ['--threads', '1', '--repeats', '200', '--warmup', '20'],
    'mapper':       ['--threads', '1', '--repeats', '20', '--warmup', '3'],
    'memory':       [],
    'generator':    ['--config', 'cifar', '--gen-repeats', '3', '--gen-warmup', '1'],
}

# Experiments whose table a document shows: the JSON they wrote (`rtm-mapping mode-coverage --out DIR` writes
# DIR/mode-coverage.json; the full run takes about 15 CPU-minutes).
EXPERIMENTS = {
    'mode-coverage':    os.path.join(ROOT, 'docs', 'mode-coverage.json'),
}

BLOCK = re.compile(r'(<!-- figures: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)', re.S)


def json_path(part: str) -> str:
    """Where the JSON of a part is, relative to the repository."""
    return os.path.join('docs', 'bench', f'cpu-{part}.json')


def _load(part: str) -> dict:
    return report.load(os.path.join(ROOT, json_path(part)))


def measure(part: str, stylegan: str) -> None:
    """`rtm-mapping bench --part PART` with FIGURES' options, into json_path(PART)."""
    cmd = [sys.executable, '-m', 'rtm_mapping.cli', 'bench', '--stylegan', stylegan, '--part', part, *FIGURES[part], '--out', json_path(part)]
    click.echo(' '.join(cmd), err=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _provenance(meta: dict) -> str:
    machine = meta['machine']
    command = meta['command'].replace(meta['stylegan'], '$STYLEGAN2_ADA_ROOT') if meta.get('stylegan') else meta['command']
    load = f', load average {machine["load_average"][0]:.1f}' if machine.get('load_average') else ''
    threads = machine['torch_threads']
    return (f'Measured {meta["date"][:10]} on {machine.get("gpu", machine["cpu"])} ({meta["device"]}, {machine["cpu_count"]} cores{load}, '
            f'{threads} torch thread{"s" if threads != 1 else ""}), torch {machine["torch"]}: `{command}`'
            + ('; denormals flushed to zero.' if meta['flush_denormal'] else '.'))


def _interval(s: dict) -> str:
    return f'{s["median"]:.2f} [{s["low"]:.2f}, {s["high"]:.2f}]'


def mode_coverage_table(results: dict) -> List[str]:
    """KL to uniform and recall of each mapper on each dataset: medians over seeds [bootstrap interval]."""
    datasets = list(results['summary'])
    out = ['| mapper | ' + ' | '.join(f'{d} KL | {d} recall' for d in datasets) + ' |', '|---|' + '---:|---:|' * len(datasets)]
    for mapper in results['mappers']:
        cells = [_interval(results['summary'][d][mapper]['metrics'][metric]) for d in datasets for metric in ('kl_uniform', 'recall')]
        out.append(f'| {mapper} | ' + ' | '.join(cells) + ' |')
    return out


def render(name: str) -> str:
    """The body of a block: a part's table or `targets`, from the JSONs of FIGURES, or an experiment's table."""
    if name in EXPERIMENTS:
        return '\n'.join(mode_coverage_table(report.load(EXPERIMENTS[name]))) + '\n'
    if name == 'targets':
        targets = [t for part in FIGURES if os.path.isfile(os.path.join(ROOT, json_path(part))) for t in _load(part)['targets']]
        return '\n'.join(report.targets_table(targets)) + '\n'
    results = _load(name)
    return '\n'.join([_provenance(results['meta']), ''] + PARTS[name].markdown(results[name], results['meta'])) + '\n'


def blocks(text: str) -> Dict[str, List[str]]:
    """name -> bodies of the blocks of that name in a document."""
    found = {}
    for m in BLOCK.finditer(text):
        found.setdefault(m['name'], []).append(m['body'])
    return found


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m['name']) + m.group(4), text)


@click.command()
@click.argument('parts', nargs=-1, type=click.Choice(list(FIGURES)))
@click.option('--stylegan', envvar='STYLEGAN2_ADA_ROOT', metavar='DIR', help='StyleGAN2-ADA checkout  [default: $STYLEGAN2_ADA_ROOT]')
@click.option('--render-only', is_flag=True, help='Measure nothing; rewrite the blocks from the JSONs there are.')
def main(parts, stylegan, render_only):
    """Measure the parts (default: those the documents show) and rewrite the figure blocks of the documents."""
    texts = {}
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding='utf-8') as f:
            texts[document] = f.read()
    if not render_only:
        if not stylegan:
            raise click.UsageError('the figures are of the official networks: pass --stylegan or set STYLEGAN2_ADA_ROOT to a StyleGAN2-ADA checkout.')
        shown = {name for text in texts.values() for name in blocks(text)}
        for part in parts or [part for part in FIGURES if part in shown]:
            measure(part, stylegan)
    for document, text in texts.items():
        path = os.path.join(ROOT, document)
        new = rewrite(text)
        if new != text:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(new)
            click.echo(f'Rewrote the figures of {document}', err=True)


if __name__ == '__main__':
    main()
