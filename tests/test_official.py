"""`rtm-mapping get-stylegan`: clone at a commit, reuse that clone, never write into another folder.
Uses a small local git repository in place of NVIDIA's (no network here)."""

import subprocess

import pytest
from click.testing import CliRunner

from stylegan2_ada_patch import official


def git(*args, cwd):
    return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def upstream(tmp_path):
    """A repository with two commits; returns (path, first commit, second commit)."""
    repo = tmp_path / 'upstream'
    repo.mkdir()
    git('init', '--quiet', cwd=repo)
    (repo / 'train.py').write_text('first\n')
    git('add', '.', cwd=repo)
    git('commit', '--quiet', '-m', 'one', cwd=repo)
    first = git('rev-parse', 'HEAD', cwd=repo)
    (repo / 'train.py').write_text('second\n')
    git('commit', '--quiet', '-am', 'two', cwd=repo)
    return repo, first, git('rev-parse', 'HEAD', cwd=repo)


def get(*args):
    return CliRunner().invoke(official.get_stylegan, [str(a) for a in args])


def test_clones_the_requested_commit_and_reuses_it(upstream, tmp_path):
    repo, first, _ = upstream
    dest = tmp_path / 'clone'
    result = get(dest, '--url', repo, '--commit', first)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(dest) and (dest / 'train.py').read_text() == 'first\n'
    assert git('rev-parse', 'HEAD', cwd=dest) == first
    again = get(dest, '--url', repo, '--commit', first)
    assert again.exit_code == 0 and again.output.strip() == str(dest)


def test_never_writes_into_another_folder(upstream, tmp_path):
    repo, first, second = upstream
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep\n')
    result = get(mine, '--url', repo, '--commit', first)
    assert result.exit_code == 1 and 'nothing was changed' in result.output
    assert [p.name for p in mine.iterdir()] == ['notes.txt']
    dest = tmp_path / 'clone'
    assert get(dest, '--url', repo, '--commit', second).exit_code == 0
    result = get(dest, '--url', repo, '--commit', first)                 # a clone, but at another commit
    assert result.exit_code == 1 and first[:7] in result.output and (dest / 'train.py').read_text() == 'second\n'


def test_a_failed_clone_leaves_nothing(tmp_path):
    dest = tmp_path / 'clone'
    result = get(dest, '--url', tmp_path / 'no-such-repo')
    assert result.exit_code == 1 and 'git clone' in result.output
    assert list(tmp_path.iterdir()) == []


def test_tested_commits_are_the_ones_ci_uses():
    """CI runs against ../shared/official, exact copies at these commits (its README says which)."""
    import os
    readme = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'official', 'README.md')
    if not os.path.isfile(readme):
        pytest.skip('no ../shared/official here (CI has it)')
    text = open(readme, encoding='utf-8').read()
    for codebase in official.CODEBASES.values():
        assert codebase.commit in text and codebase.repo in text
