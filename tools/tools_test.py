"""tools/shared and tools/bazel from the outside: every refusal names the fix and changes nothing.

Each test builds a throwaway superproject with a `./` submodule in a temp folder, the way this
repository is laid out, and runs the real scripts (copied there) against it.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}


def run(cwd: Path, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with a neutral git identity; fail the test on an unexpected exit status."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **GIT_ENV, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, "git", "-c", "protocol.file.allow=always", *args, check=check)


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def commit_file(repo: Path, name: str, text: str) -> str:
    """Write a file, commit it, return the commit."""
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-qm", f"write {name}")
    return head(repo)


@pytest.fixture
def superproject(tmp_path: Path) -> Path:
    """main with tools/shared and a shared/ submodule (URL ./) pinned once by tools/shared bump."""
    main = tmp_path / "main"
    (main / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "shared", main / "tools" / "shared")
    git(main, "init", "-q", "-b", "main")
    git(main, "add", "tools")
    git(main, "commit", "-qm", "tools")
    shared = main / "shared"
    shared.mkdir()
    git(shared, "init", "-q", "-b", "shared")
    commit_file(shared, "core.py", "VERSION = 1\n")
    git(main, "submodule", "add", "-q", "./", "shared")
    git(main, "reset", "-q", "shared")
    git(main, "commit", "-qm", "submodule", "--", ".gitmodules")
    run(main, "tools/shared", "bump")
    return main


def test_bump_pins_and_records_the_shared_line(superproject):
    shared_commit = commit_file(superproject / "shared", "core.py", "VERSION = 2\n")
    out = run(superproject, "tools/shared", "bump").stdout
    assert "pinned shared/" in out
    tree = git(superproject, "ls-tree", "HEAD", "shared").stdout.split()
    assert tree[1:3] == ["commit", shared_commit]
    git(superproject, "merge-base", "--is-ancestor", shared_commit, "HEAD")  # reachable from main
    assert "Shared-Pin: " + shared_commit in git(superproject, "log", "-1", "--format=%B").stdout
    assert "every pin move is a fast-forward" in run(superproject, "tools/shared", "check").stdout


def test_status_lists_unpinned_shared_commits(superproject):
    commit_file(superproject / "shared", "core.py", "VERSION = 3\n")
    out = run(superproject, "tools/shared", "status").stdout
    assert "not the pin" in out and "write core.py" in out and "tools/shared bump" in out


def test_a_fresh_clone_checks_shared_out_with_no_network(superproject, tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(superproject), str(clone))
    assert "not initialised" in run(clone, "tools/shared", "status").stdout
    run(clone, "tools/shared", "init")
    assert (clone / "shared" / "core.py").read_text() == "VERSION = 1\n"
    run(clone, "tools/shared", "check")


def test_non_fast_forward_bump_is_refused_and_leaves_main_untouched(superproject):
    shared = superproject / "shared"
    pinned = head(shared)
    git(shared, "checkout", "-q", "--orphan", "rewrite")
    other = commit_file(shared, "core.py", "REWRITTEN = True\n")
    before = head(superproject)
    refused = run(superproject, "tools/shared", "bump", check=False)
    assert refused.returncode != 0
    assert "not a fast-forward" in refused.stderr and "--force" in refused.stderr
    assert head(superproject) == before
    assert git(superproject, "ls-tree", "HEAD", "shared").stdout.split()[2] == pinned
    run(superproject, "tools/shared", "bump", "--force", "history rewritten on purpose", other)
    assert "Shared-Pin-Forced: history rewritten on purpose" in git(superproject, "log", "-1", "--format=%B").stdout
    run(superproject, "tools/shared", "check")


def test_check_refuses_a_pin_not_reachable_from_main(superproject):
    shared = superproject / "shared"
    unreachable = commit_file(shared, "core.py", "VERSION = 4\n")
    git(superproject, "fetch", "-q", git(shared, "rev-parse", "--absolute-git-dir").stdout.strip(), unreachable)
    git(superproject, "update-index", "--cacheinfo", f"160000,{unreachable},shared")
    git(superproject, "commit", "-qm", "pin without recording the shared line")
    refused = run(superproject, "tools/shared", "check", check=False)
    assert refused.returncode != 0
    assert "not reachable from main" in refused.stderr and "tools/shared bump" in refused.stderr


def test_check_refuses_a_pin_move_that_is_not_a_fast_forward(superproject):
    shared = superproject / "shared"
    git(shared, "checkout", "-q", "--orphan", "rewrite")
    other = commit_file(shared, "core.py", "REWRITTEN = True\n")
    git(superproject, "fetch", "-q", git(shared, "rev-parse", "--absolute-git-dir").stdout.strip(), other)
    git(superproject, "update-index", "--cacheinfo", f"160000,{other},shared")
    tree = git(superproject, "write-tree").stdout.strip()
    merge = git(superproject, "commit-tree", tree, "-p", "HEAD", "-p", other, "-m", "sneaky pin").stdout.strip()
    git(superproject, "reset", "-q", "--soft", merge)
    refused = run(superproject, "tools/shared", "check", check=False)
    assert refused.returncode != 0 and "not a fast-forward" in refused.stderr


def test_bazel_names_the_fix_when_shared_is_not_checked_out(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "bazel", workspace / "tools" / "bazel")
    (workspace / ".gitmodules").write_text('[submodule "shared"]\n\tpath = shared\n\turl = ./\n')
    refused = run(workspace, "tools/bazel", "--version", check=False)
    assert refused.returncode == 1
    assert "shared/" in refused.stderr and "tools/shared init" in refused.stderr


def test_bazel_bootstrap_refuses_without_root_and_creates_nothing():
    # Under /tmp: the test's own temp folder sits below folders only root may enter.
    top = Path(tempfile.mkdtemp(prefix="tools-test-"))
    top.chmod(0o755)
    workspace = top / "ws"
    shutil.copytree(TOOLS, workspace / "tools", ignore=shutil.ignore_patterns("*_test.py", "__pycache__"))
    cache = top / "buildenv"
    nobody = pwd.getpwnam("nobody")
    refused = subprocess.run(
        [str(workspace / "tools" / "bazel"), "--version"], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "TELEPAY_BUILDENV_DIR": str(cache), "TELEPAY_BAZEL_OFFLINE": "1"},
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
    )
    try:
        assert refused.returncode == 1, refused.stderr
        assert "as root" in refused.stderr and "bazelisk" in refused.stderr
        assert not cache.exists()
    finally:
        shutil.rmtree(top)
