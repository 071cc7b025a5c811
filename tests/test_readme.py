"""The README's commands and examples, run as a user would."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()


def blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, '.ci', 'run')).read().strip().splitlines()[-1]
    assert ci in [line.strip() for block in blocks('bash') for line in block.splitlines()]
    assert 'pytest' in ci and 'torch==2.13.0' in ci


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
    """The quick start after its set-up part: scripts/demo.sh on a copy of the checkout."""
    quick, = [line for block in blocks('bash') for line in block.splitlines() if 'scripts/demo.sh' in line]
    assert quick.startswith('python -m venv .venv && ') and '"$STYLEGAN2_ADA_ROOT"' in quick
    root = tmp_path / 'stylegan2-ada-pytorch'
    shutil.copytree(stylegan_root, root, ignore=shutil.ignore_patterns('__pycache__', '*.rtm-orig'))
    venv = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))  # as if activated
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'demo.sh'), str(root), str(tmp_path / 'work')],
                         capture_output=True, text=True, timeout=1500, env=venv)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(os.listdir(tmp_path / 'work' / 'generated')) == 4


@pytest.mark.parametrize('command', ['patch', 'train', 'make-dataset', 'cpu', 'sweep-h', 'detectors', 'bench', 'swap', 'info', 'set-h'])
def test_every_documented_command_has_help(command):
    assert f'`{command}`' in README
    out = subprocess.run([sys.executable, '-m', 'rtm_mapping.cli', command, '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'Usage:' in out.stdout, out.stderr
