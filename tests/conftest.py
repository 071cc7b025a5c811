"""Shared fixtures. Tests that need NVIDIA's code skip unless STYLEGAN2_ADA_ROOT (or STYLEGAN3_ROOT)
points at a checkout of NVlabs/stylegan2-ada-pytorch (or NVlabs/stylegan3); it is never vendored
here (NVIDIA Source Code License)."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

SKIP_REASON = ('needs a StyleGAN2-ADA checkout: set STYLEGAN2_ADA_ROOT to a clone (or export) of '
               'NVlabs/stylegan2-ada-pytorch to run it')
SKIP_REASON_STYLEGAN3 = ('needs a StyleGAN3 checkout: set STYLEGAN3_ROOT to a clone (or export) of '
                         'NVlabs/stylegan3 to run it')

# StyleGAN3's torch_utils/ops import pkg_resources (gone from setuptools >= 81): tests/shims has a stand-in, put on the
# path only where setuptools has none (through PYTHONPATH it comes before site-packages and would shadow the real one).
SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shims')
SHIM_PATHS = [SHIMS] if importlib.util.find_spec('pkg_resources') is None else []

# Modules that belong to one checkout: the official packages and scripts, and our adapters that import them.
CHECKOUT_MODULES = ('dnnlib', 'legacy', 'torch_utils', 'training', 'metrics', 'train', 'calc_metrics', 'generate',
                    'gen_images', 'gen_video', 'style_mixing', 'projector', 'dataset_tool',
                    'rtm_mapping.networks', 'rtm_mapping.networks_stylegan2', 'rtm_mapping.networks_stylegan3')


@pytest.fixture(scope='session')
def stylegan_root():
    """Path of the StyleGAN2-ADA checkout, put on sys.path; skips the test when there is none."""
    root = os.environ.get('STYLEGAN2_ADA_ROOT')
    if not root:
        pytest.skip(SKIP_REASON)
    from stylegan2_ada_patch import checkout
    root = checkout.validate(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


def _checkout_modules(extra=()):
    return {name: module for name, module in sys.modules.items()
            if any(name == top or name.startswith(top + '.') for top in CHECKOUT_MODULES + extra)}


_stylegan3_modules = dict()   # StyleGAN3's modules between tests, imported once per session


@pytest.fixture
def stylegan3_root():
    """Path of the StyleGAN3 checkout. For the test, its dnnlib, torch_utils, training, metrics (and our
    adapters) are the ones imported, and sys.path starts with it; StyleGAN2-ADA's modules and sys.path
    come back afterwards. Skips the test when there is none."""
    root = os.environ.get('STYLEGAN3_ROOT')
    if not root:
        pytest.skip(SKIP_REASON_STYLEGAN3)
    from stylegan2_ada_patch import checkout
    root = checkout.validate(root)
    saved_modules, saved_path = _checkout_modules(), list(sys.path)
    had_pkg_resources = 'pkg_resources' in sys.modules
    for name in saved_modules:
        del sys.modules[name]
    sys.modules.update(_stylegan3_modules)
    other = os.environ.get('STYLEGAN2_ADA_ROOT')
    sys.path[:] = [root] + [p for p in sys.path if not (other and p == os.path.abspath(other))] + SHIM_PATHS
    try:
        yield root
    finally:
        _stylegan3_modules.clear()
        _stylegan3_modules.update(_checkout_modules(extra=() if had_pkg_resources else ('pkg_resources',)))
        for name in _stylegan3_modules:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


# Prepended to the code run_stock runs: importing our packages fails, as where rtm-mapping is not installed.
_NOT_INSTALLED = textwrap.dedent('''
    import sys, importlib.abc
    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('rtm_mapping', 'stylegan2_ada_patch'):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _NotInstalled())
''')


def run_stock(script: str, cwd, root, argv=()) -> str:
    """Run Python code, with sys.argv[1:] = argv, in a fresh process that has only the checkout at root (and
    tests/shims where there is no pkg_resources) on its path: rtm-mapping cannot be imported. Returns stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *SHIM_PATHS]), PYTHONDONTWRITEBYTECODE='1')
    code = _NOT_INSTALLED + textwrap.dedent(script)
    out = subprocess.run([sys.executable, '-c', code, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='session')
def write_images():
    """write_images(folder, count, resolution=16, seed=0) writes a folder of random RGB PNGs, which
    training.dataset.ImageFolderDataset reads directly, and returns the folder."""
    def write(folder, count, resolution=16, seed=0):
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True)
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(folder / f'{i:03d}.png')
        return folder
    return write

#----------------------------------------------------------------------------
# Pickles of two rtm-mapping versions whose cores differ, for the tests that load both in one process.

# Another version's core: the RTM's readout doubled and the mapper's output (core.StyleMapping) tripled, so that
# an adapter that ran with the other pickle's core, or rebuilt its RTM from it (legacy.load_network_pkl(force_fp16=True)),
# gives another w.
OTHER_CORE_EDITS = [
    ('        return self.readout(z_h.flatten(1))\n', '        return 2 * self.readout(z_h.flatten(1))\n'),
    ('        x = self.rtm(x)\n', '        x = 3 * self.rtm(x)\n'),
]


def other_core_version(folder) -> str:
    """A copy of the rtm_mapping package under `folder` with OTHER_CORE_EDITS in its core.py; returns the
    folder to put first on PYTHONPATH to import it instead of the installed package."""
    import shutil

    import rtm_mapping
    package = os.path.join(str(folder), 'rtm_mapping')
    shutil.copytree(os.path.dirname(os.path.abspath(rtm_mapping.__file__)), package, ignore=shutil.ignore_patterns('__pycache__'))
    with open(os.path.join(package, 'core.py'), encoding='utf-8') as f:
        core = f.read()
    for old, new in OTHER_CORE_EDITS:
        assert core.count(old) == 1, f'core.py no longer has {old.strip()!r}: update OTHER_CORE_EDITS'
        core = core.replace(old, new)
    with open(os.path.join(package, 'core.py'), 'w', encoding='utf-8') as f:
        f.write(core)
    return str(folder)


_WRITE_SNAPSHOTS = '''
    import copy, json, pickle, sys, torch, dnnlib, rtm_mapping.core
    print(rtm_mapping.core.__file__)
    for spec in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        G = dnnlib.util.construct_class_by_name(**spec['G']).eval().requires_grad_(False)
        D = dnnlib.util.construct_class_by_name(**spec['D'])
        z, c = torch.randn(4, G.z_dim), torch.zeros(4, G.c_dim)
        with open(spec['path'], 'wb') as f:
            pickle.dump(dict(G=G, D=D, G_ema=copy.deepcopy(G), augment_pipe=None, training_set_kwargs=None), f)
        torch.save(dict(z=z, c=c, w=G.mapping(z, c)), spec['path'] + '.ref')
'''


def write_snapshots(specs, cwd, root, package=None) -> None:
    """In a fresh process, build each spec's G (global seed 0) and D by class name, with the installed
    rtm_mapping or the copy on `package`, and write a snapshot to spec['path'] and G's w for fixed
    (z, c) to spec['path'] + '.ref'. specs: [dict(G=G_kwargs with class_name, D=..., path=...), ...]."""
    import json
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(([package] if package else []) + [str(root), *SHIM_PATHS]), PYTHONDONTWRITEBYTECODE='1')
    out = subprocess.run([sys.executable, '-c', textwrap.dedent(_WRITE_SNAPSHOTS), json.dumps(specs)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    expected = os.path.join(package, 'rtm_mapping') if package else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert out.stdout.strip().startswith(os.path.abspath(expected)), (out.stdout, expected)


# Loads the snapshots given as arguments, in that order, each plainly and with force_fp16=True (which rebuilds G and
# G_ema from their init_kwargs with the adapter's core); then checks that every G, G_ema and rebuilt G_ema gives
# the w its own pickle was written with.
LOAD_SNAPSHOTS = '''
    import sys, torch, legacy
    loaded = []
    for path in sys.argv[1:]:
        with open(path, 'rb') as f:
            data = legacy.load_network_pkl(f)
        with open(path, 'rb') as f:
            rebuilt = legacy.load_network_pkl(f, force_fp16=True)
        loaded.append((path, [('G', data['G']), ('G_ema', data['G_ema']), ('rebuilt G_ema', rebuilt['G_ema'])]))
    for path, nets in loaded:
        ref = torch.load(path + '.ref')
        for name, G in nets:
            w = G.mapping(ref['z'], ref['c'])
            assert torch.equal(w, ref['w']), f'{path}: {name} runs with another core: w off by {(w - ref["w"]).abs().max()}'
    print('ok', len(loaded))
'''


def check_two_core_versions(tmp_path, root, specs, adapters):
    """Snapshots of `specs` written by this rtm-mapping and by one whose core differs (other_core_version), then
    loaded in one fresh process in either order, with the stock checkout only and with rtm-mapping installed (its
    `adapters` imported first): each reproduces its own w."""
    ours = [dict(spec, path=str(tmp_path / f'ours-{i}.pkl')) for i, spec in enumerate(specs)]
    other = [dict(spec, path=str(tmp_path / f'other-{i}.pkl')) for i, spec in enumerate(specs)]
    write_snapshots(ours, tmp_path, root)
    write_snapshots(other, tmp_path, root, package=other_core_version(tmp_path / 'other-version'))
    for a, b in zip(ours, other):   # the cores differ in behaviour, on the same weights
        w_a, w_b = torch.load(a['path'] + '.ref')['w'], torch.load(b['path'] + '.ref')['w']
        torch.testing.assert_close(w_b, 6 * w_a)
    paths = [spec['path'] for spec in ours + other]
    for order in (paths, paths[len(ours):] + paths[:len(ours)]):
        assert run_stock(LOAD_SNAPSHOTS, tmp_path, root, argv=order).split() == ['ok', str(len(order))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *SHIM_PATHS]), PYTHONDONTWRITEBYTECODE='1')
    code = ''.join(f'import {name}\n' for name in adapters) + textwrap.dedent(LOAD_SNAPSHOTS)
    out = subprocess.run([sys.executable, '-c', code, *paths[len(ours):], *paths[:len(ours)]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ['ok', str(len(paths))], out.stdout[-2000:] + out.stderr[-3000:]


#----------------------------------------------------------------------------
# Helpers shared by the test files (import them from conftest).

OFFICIAL_ROOTS = {'stylegan2-ada': ('STYLEGAN2_ADA_ROOT', SKIP_REASON), 'stylegan3': ('STYLEGAN3_ROOT', SKIP_REASON_STYLEGAN3)}


def official_root(codebase):
    """The checkout of a codebase that its environment variable names, validated; skips the test when there is
    none. Unlike the stylegan_root and stylegan3_root fixtures, it imports nothing of it."""
    name, reason = OFFICIAL_ROOTS[codebase]
    if not os.environ.get(name):
        pytest.skip(reason)
    from stylegan2_ada_patch import checkout
    return checkout.validate(os.environ[name])


def copy_checkout(root, dest, ignore=()):
    """A private copy of an official checkout at dest, so that a test never touches the user's files."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns('__pycache__', '*.rtm-orig', *ignore))
    return dest


def run_patch(*args):
    """`rtm-mapping patch ARGS` in this process: (exit code, output)."""
    from stylegan2_ada_patch import patcher
    result = CliRunner().invoke(patcher.patch, [str(a) for a in args])
    return result.exit_code, result.output


def training_options(output):
    """(the "Training options:" JSON, the "Output directory:") that a train.py run or dry run prints."""
    text = output[output.index('Training options:') + len('Training options:'):]
    return json.loads(text[:text.index('\n}\n') + 2]), output.split('Output directory:')[1].split('\n')[0].strip()


def original_init(cls):
    """The constructor of a persistent class, under persistence's Decorator."""
    return cls.__mro__[1].__init__


def snapshot(G, D):
    """A pickle's dict as training_loop.py writes it, G_ema a copy of G."""
    return dict(G=G, D=D, G_ema=copy.deepcopy(G).eval(), augment_pipe=None, training_set_kwargs=None)


def stock_snapshot(G, D):
    """snapshot() of official networks as a trained pickle holds them: eval mode, no gradients, and a G_ema whose
    w_avg differs from G's (as an exponential moving average would)."""
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        G_ema.mapping.w_avg.normal_()
    return dict(G=G.eval().requires_grad_(False), D=D.eval().requires_grad_(False), G_ema=G_ema.eval().requires_grad_(False),
                augment_pipe=None, training_set_kwargs=None)


# Runs train.py's main() once per argument list in one process: train.py, torch and NVIDIA's code imported once.
_TRAIN_PY_RUNS = textwrap.dedent('''
    import contextlib, io, json, sys
    sys.argv = ['train.py']
    import train
    results = []
    for argv in json.load(sys.stdin):
        out = io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                train.main(argv, prog_name='train.py')
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        results.append([code, out.getvalue()])
    print(json.dumps(results))
''')


def train_py_runs(root, runs, env=None, timeout=600):
    """[(exit code, output)] of `python train.py ARGS` in the checkout at root for each ARGS of runs (output:
    stdout and stderr together), all in one fresh process. train.py's main() runs in click's standalone mode
    each time, as from the command line; only the imports are shared."""
    out = subprocess.run([sys.executable, '-c', _TRAIN_PY_RUNS], input=json.dumps([[str(a) for a in args] for args in runs]),
                         cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [tuple(result) for result in json.loads(out.stdout.splitlines()[-1])]
