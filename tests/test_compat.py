"""stylegan2_ada_patch.compat: NVIDIA's code on today's stack (SciPy >= 1.18, setuptools >= 81, PyTorch 2.x).
The FID test needs STYLEGAN2_ADA_ROOT; run it on both stacks (.ci/run does): the value must not move."""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import scipy
import scipy.linalg

from stylegan2_ada_patch import compat

# The official compute_fid on the feature statistics of _stats() below, computed on SciPy 1.17.1 (which still
# has sqrtm(disp=False)), numpy 2.4, Python 3.11, 2 BLAS threads. SciPy 1.18.1 through compat.sqrtm_with_disp
# gives the same float, bit for bit, with the same BLAS threads; another thread count moves the 12th digit
# (OMP_NUM_THREADS=1: 116.94506465022), hence the 1e-9 relative tolerance.
FID_REFERENCE_SCIPY_1_17 = 116.94506464966692


def _stats(seed, shift):
    """Feature statistics as metric_utils.FeatureStats.get_mean_cov() returns them: 300 correlated 48-d features."""
    rs = np.random.RandomState(seed)            # Legacy RandomState: the same numbers on every numpy.
    x = rs.randn(300, 48) @ rs.randn(48, 48) * 0.3 + shift
    return types.SimpleNamespace(get_mean_cov=lambda: (x.mean(0), np.cov(x, rowvar=False)))


def test_official_fid_equals_the_scipy_1_17_value(stylegan_root, monkeypatch):
    from metrics import frechet_inception_distance, metric_utils
    monkeypatch.setattr(frechet_inception_distance, 'scipy', scipy)     # The real SciPy, even if an earlier apply() replaced it; restored after.
    monkeypatch.setattr(metric_utils, 'compute_feature_stats_for_dataset', lambda **kwargs: _stats(1, 0.0))
    monkeypatch.setattr(metric_utils, 'compute_feature_stats_for_generator', lambda **kwargs: _stats(2, 0.1))
    needed = compat.fix_fid_sqrtm()
    assert needed == ('disp' not in str(__import__('inspect').signature(scipy.linalg.sqrtm)))
    fid = frechet_inception_distance.compute_fid(types.SimpleNamespace(rank=0), max_real=None, num_gen=None)
    assert fid == pytest.approx(FID_REFERENCE_SCIPY_1_17, rel=1e-9, abs=0)


def test_sqrtm_with_disp_returns_the_root_and_scipy_1_17s_error_estimate():
    rs = np.random.RandomState(0)
    b = rs.randn(6, 6)
    a = b @ b.T + 6 * np.eye(6)

    def sqrtm_without_disp(A):                   # What SciPy >= 1.18 offers.
        return scipy.linalg.sqrtm(A)
    sqrtm = compat.sqrtm_with_disp(sqrtm_without_disp)
    root = sqrtm(a)
    np.testing.assert_allclose(root @ root, a, rtol=1e-10)
    root2, error = sqrtm(a, disp=False)
    assert np.array_equal(root, root2)
    assert error == np.linalg.norm(root @ root - a, 'fro') ** 2 / np.linalg.norm(a, 'fro') and error < 1e-20


def test_pkg_resources_stand_in_when_setuptools_has_none(tmp_path):
    """StyleGAN3's ops do `from pkg_resources import parse_version` at import; a module of ours stands for them."""
    ops = tmp_path / 'torch_utils' / 'ops'
    ops.mkdir(parents=True)
    for folder in (ops.parent, ops):
        (folder / '__init__.py').write_text('')
    (ops / 'conv2d_gradfix.py').write_text('from pkg_resources import parse_version\nNEW_API = parse_version("2.15.0+cu132") >= parse_version("1.11.0a")\n')
    script = textwrap.dedent('''
        import sys, importlib.abc
        class _NoPkgResources(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == 'pkg_resources':
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _NoPkgResources())
        from stylegan2_ada_patch import compat
        assert compat.fix_pkg_resources() is True and compat.fix_pkg_resources() is False
        from torch_utils.ops import conv2d_gradfix
        assert conv2d_gradfix.NEW_API
        from pkg_resources import parse_version
        assert parse_version('1.11.0a') > parse_version('1.10.2')
        try:
            import pkg_resources
            pkg_resources.require('torch')
        except AttributeError as err:
            assert 'setuptools<81' in str(err)
        else:
            raise AssertionError('the stand-in must say what it is')
        print('ok')
    ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, cwd=root,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)])))
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_no_stand_in_where_the_official_code_does_not_import_pkg_resources(stylegan_root):
    assert compat.fix_pkg_resources() is False      # StyleGAN2-ADA's ops do not import it


def test_apply_fixes_what_the_stack_needs_once(stylegan_root, capsys, monkeypatch):
    from metrics import frechet_inception_distance
    from torch_utils import misc
    monkeypatch.setattr(misc, 'InfiniteSampler', misc.InfiniteSampler)                           # Both restored after the test.
    monkeypatch.setattr(frechet_inception_distance, 'scipy', frechet_inception_distance.scipy)
    first = compat.apply()
    assert capsys.readouterr().err.splitlines() == [f'rtm-mapping: {message} for this run.' for message in first]
    assert compat.apply() == [] and capsys.readouterr().err == ''
    sampler = misc.InfiniteSampler(list(range(10)), seed=1)                 # TypeError on PyTorch 2 without the fix
    assert next(iter(sampler)) in range(10)
    root, error = frechet_inception_distance.scipy.linalg.sqrtm(np.eye(3) * 4, disp=False)    # TypeError on SciPy 1.18
    np.testing.assert_allclose(root, 2 * np.eye(3))
    assert error == 0
