"""The README's commands and examples, run as a user would."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from rtm_mapping.cli import COMMANDS

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
    root = tmp_path / 'stylegan2-ada-pytorch'
    shutil.copytree(stylegan_root, root, ignore=shutil.ignore_patterns('__pycache__', '*.rtm-orig'))
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh'), str(root), str(tmp_path / 'work')],
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(os.listdir(tmp_path / 'work' / 'generated')) == 4


@pytest.mark.parametrize('command', list(COMMANDS))
def test_every_command_is_documented_and_has_help(command):
    assert f'`{command}`' in README
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', command, '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'Usage:' in out.stdout, out.stderr
