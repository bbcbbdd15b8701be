"""A root caller whose workspace lies below a directory only root may enter (a mkdtemp() parent,
root's home): the sandbox still runs there, against the real bubblewrap, with the same isolation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import test_tisslang_security as security

from tisslm.agent.sandbox import LAUNCHER, SANDBOX_UID, closed_ancestor, make_sandbox
from tisslm.agent.workspace import Workspace

outside, workspace, run_script = security.outside, security.workspace, security.run_script  # the fixtures, shared


@pytest.mark.skipif(os.geteuid() != 0, reason="the 0700 parent only blocks the sandbox's uid when the caller is root")
@pytest.mark.parametrize("base", ["/tmp", "/var/tmp"])  # a private /tmp in the sandbox; the read-only root
def test_root_runs_commands_in_a_workspace_inside_a_0700_mkdtemp_directory(outside, base):
    top = Path(tempfile.mkdtemp(prefix="tiss-closed-", dir=base))  # 0700, root's: uid 65534 may not enter it
    try:
        (top / "secret.txt").write_text("root only\n")
        workspace = top / "ws"
        workspace.mkdir()
        mounts_before = Path("/proc/self/mountinfo").read_text()
        box = make_sandbox("bwrap", Workspace(workspace).root)  # the probe runs a command: no error here
        assert box.hidden == top
        engine, _ = run_script(
            f'RUN "id -u; grep CapEff /proc/self/status; pwd; echo made > made.txt; ls -A {top}; '
            f"cat {top}/secret.txt /etc/shadow; echo pwned > {outside}/new.txt; umount -l {top}; "
            f'touch {top}/planted; ls /proc/self/fd"',
            workspace,
        )
        out, err = engine.last_run.stdout.splitlines(), engine.last_run.stderr
        assert out[:3] == ["65534", "CapEff:\t0000000000000000", str(workspace)]
        assert out[3] == "ws"  # the rest of the 0700 directory stays hidden
        assert (workspace / "made.txt").read_text() == "made\n"  # RUN can write, and the file is the sandbox uid's
        assert (workspace / "made.txt").stat().st_uid == SANDBOX_UID
        assert "root only" not in "\n".join(out) and "No such file" in err and "Permission denied" in err
        assert not (outside / "new.txt").exists() and not (top / "planted").exists()
        # The covering tmpfs and what was written on it never reach the host.
        assert sorted(p.name for p in top.iterdir()) == ["secret.txt", "ws"]
        assert out[4:] == ["0", "1", "2", "3"]  # no file descriptor of the launcher leaks in (3: ls's own)
        assert Path("/proc/self/mountinfo").read_text() == mounts_before  # the host's mounts are untouched
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_closed_ancestor_names_the_topmost_directory_the_sandbox_uid_cannot_enter():
    top = Path(tempfile.mkdtemp(prefix="tiss-closed-"))  # 0700, the caller's; /tmp above it is open
    try:
        (top / "a" / "b").mkdir(parents=True)
        (top / "a").chmod(0o700)
        assert closed_ancestor(top / "a" / "b", uid=12345, gid=12345) == top
        os.chown(top, 12345, 12345)
        assert closed_ancestor(top / "a" / "b", uid=12345, gid=12345) == top / "a"  # the owner's x bit counts
        (top / "a").chmod(0o751)
        os.chown(top / "a", 0, 12345)
        assert closed_ancestor(top / "a" / "b", uid=12345, gid=12345) is None  # so does the group's
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_without_cap_sys_admin_the_launcher_fails_closed_naming_the_directory_and_the_fix(workspace):
    drop = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"]
    marker = workspace / "ran"
    argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        LAUNCHER,
        str(workspace),
        str(workspace),
        "65534",
        "/bin/touch",
        str(marker),
    ]
    done = subprocess.run(drop + argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 126 and not marker.exists()
    assert f"chmod o+x {workspace}" in done.stderr and "CAP_SYS_ADMIN" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the 0700 parent only blocks the sandbox's uid when the caller is root")
def test_a_bwrap_that_cannot_reach_the_workspace_is_explained(monkeypatch):
    from tisslm.agent.sandbox import Bubblewrap, SandboxError

    top = Path(tempfile.mkdtemp(prefix="tiss-closed-"))
    try:
        (top / "ws").mkdir()
        monkeypatch.setattr(Bubblewrap, "__init__", lambda self, ws: setattr(self, "workspace", ws) or None)
        monkeypatch.setattr(Bubblewrap, "hidden", None, raising=False)  # as if the launcher made no way in
        with pytest.raises(SandboxError) as failure:
            make_sandbox("bwrap", top / "ws")
        message = str(failure.value)
        assert "Can't find source path" in message and "Permission denied" in message
        assert "bwrap runs as uid 65534" in message and "chmod o+x" in message
    finally:
        shutil.rmtree(top, ignore_errors=True)


# Runs the sandboxes in a child subreaper: a process the launcher fails to reap is reparented to it, so
# what is left among its children is this test's alone (a test running beside it may leave its own
# timed-out sandbox's init to pid 1, as the sandbox module's docstring says).
SANDBOXES_UNDER_A_SUBREAPER = r"""
import ctypes, json, sys
from pathlib import Path
import psutil
from tisslm.agent.sandbox import Limits, make_sandbox
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
box = make_sandbox("bwrap", Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    result = box.run("true", Limits(timeout_s=10))
    if (result.exit_code, result.stderr) != (0, ""):
        sys.exit(f"sandbox {i}: exit {result.exit_code}: {result.stderr}")
print(json.dumps([[child.name(), child.status()] for child in psutil.Process().children()]))
"""


def test_hundreds_of_sandboxes_in_a_row_leave_no_process_behind(workspace):
    """bwrap exits before its sandbox's init does; orphaned, that init was left to pid 1, and a
    container's lazy init let them pile up as uid 65534's zombies until RLIMIT_NPROC (128 by default)
    refused a fork (EAGAIN) after 120 to 140 sandboxes. The launcher reaps them now."""
    result = subprocess.run([sys.executable, "-c", SANDBOXES_UNDER_A_SUBREAPER, str(workspace), "300"],
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []  # no bwrap, running or a zombie, outlived its launcher
