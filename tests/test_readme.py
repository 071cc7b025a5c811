"""The README's commands and examples, run as a user would."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import copy_checkout

from rtm_mapping.cli import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()


def blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, '.ci', 'run')).read().strip().splitlines()[-1]
    assert ci in [line.strip() for block in blocks('bash') for line in block.splitlines()]
    script = open(os.path.join(ROOT, 'scripts', 'test.sh')).read()
    assert ci == 'bash scripts/test.sh' and 'torch==2.13.0' in script and 'pytest' in script


def test_core_example_runs():
    example, = [b for b in blocks('python') if 'from rtm_mapping import RecursiveTokenMapper' in b]
    scope = {}
    exec(example, scope)
    assert tuple(scope['w'].shape) == (8, 512) and scope['rtm'].steps == 32


def test_generator_example_runs(stylegan_root, tmp_path, monkeypatch):
    example, = [b for b in blocks('python') if 'networks.Generator(' in b]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(example.replace('/path/to/stylegan2-ada-pytorch', stylegan_root), scope)
    assert tuple(scope['img'].shape) == (4, 3, 32, 32) and (tmp_path / 'G.pkl').stat().st_size > 0


def test_quick_start_main_job(stylegan_root, tmp_path):
    """The quick start after its set-up part: scripts/demo.sh on a copy of the checkout, with this interpreter
    (no PATH lookups). Without a checkout it would clone NVIDIA's: tests/test_official.py covers that part."""
    quick, = [line for block in blocks('bash') for line in block.splitlines() if 'scripts/demo.sh' in line]
    assert quick.startswith('python -m venv .venv && ') and quick.endswith('bash scripts/demo.sh')
    root = copy_checkout(stylegan_root, tmp_path / 'stylegan2-ada-pytorch')
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh'), str(root), str(tmp_path / 'work')],
                         env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir, = glob.glob(str(tmp_path / 'work' / 'runs' / '*'))
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        G_kwargs = json.load(f)['G_kwargs']
    assert G_kwargs['class_name'] == 'rtm_mapping.networks.Generator' and G_kwargs['mapping_kwargs']['steps'] == 16
    assert os.path.isfile(os.path.join(run_dir, 'fakes000000.png'))
    assert len(os.listdir(tmp_path / 'work' / 'generated')) == 4


@pytest.mark.parametrize('command', list(COMMANDS))
def test_every_command_is_documented_and_has_help(command):
    assert f'`{command}`' in README
    result = CliRunner().invoke(main, [command, '--help'])
    assert result.exit_code == 0 and result.output.startswith(f'Usage: main {command} '), result.output


def test_the_command_runs_as_a_module_and_lists_every_command():
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split('Commands:')[1]
    assert [line.split()[0] for line in listed.splitlines() if line.startswith('  ') and line[2] != ' '] == list(COMMANDS)


def _figures():
    spec = importlib.util.spec_from_file_location('figures', os.path.join(ROOT, 'scripts', 'figures.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_figures_are_those_of_their_jsons():
    """Every table of measured figures in README.md and docs/performance.md is generated (scripts/figures.py) and is
    what its JSON gives (docs/bench/*.json, docs/mode-coverage.json): a figure can change only with its JSON."""
    figures = _figures()
    for document in figures.DOCUMENTS:
        text = open(os.path.join(ROOT, document), encoding='utf-8').read()
        found = figures.blocks(text)
        assert found and text.count('<!-- figures:') == text.count('<!-- /figures -->') == sum(map(len, found.values())), document
        for name, bodies in found.items():
            for body in bodies:
                assert body == figures.render(name), \
                    f'{document}: the {name} table is not what its JSON gives; run `python scripts/figures.py --render-only`'
