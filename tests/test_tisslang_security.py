"""The TissLang sandbox against hostile scripts, each test against the real bubblewrap sandbox."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from tisslm.agent.checks import check
from tisslm.agent.interpreter import Engine, ScriptFailure
from tisslm.agent.parser import parse
from tisslm.agent.review import Reviewer
from tisslm.agent.sandbox import SANDBOX_UID, Limits, SandboxError, make_sandbox
from tisslm.agent.workspace import Workspace, WorkspaceRefusal

HOSTILE_TIMEOUT_S = 2.0


# Every hostile test runs twice: with the workspace on a path anyone may walk, and inside a 0700
# directory (a mkdtemp() parent, as root's home is), which uid 65534 cannot enter: there a root
# caller's sandbox reaches the workspace through the launcher's private mount namespace.
pytestmark = pytest.mark.parametrize("workspace", ["open", "closed"], indirect=True)


@pytest.fixture
def workspace(request):
    """A fresh workspace under /tmp, or (param "closed") in a subdirectory of a 0700 directory there
    (pytest's tmp_path sits below a 0700 directory too, but the same for every test)."""
    top = Path(tempfile.mkdtemp(prefix="tiss-ws-"))  # mode 0700
    path = top / "project" / "ws" if getattr(request, "param", "open") == "closed" else top
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def outside():
    """A world-writable directory outside the workspace, on the read-only root (not under /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="tiss-outside-", dir="/var/tmp"))
    path.chmod(0o777)
    (path / "victim.txt").write_text("precious\n")
    (path / "victim.txt").chmod(0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_script(
    text: str,
    workspace: Path,
    sandbox: str = "bwrap",
    timeout_s: float = HOSTILE_TIMEOUT_S,
    processes: int = Limits.processes,
    **options,
):
    """Parse, check and run `text` (the #TISS! header is added); returns the engine and what it said."""
    script = parse("#TISS!\n" + text)
    assert check(script, options.get("variables", {})) == []
    owner = (SANDBOX_UID, SANDBOX_UID) if sandbox == "bwrap" and os.geteuid() == 0 else None
    space = Workspace(workspace, owner)
    space.hand_over()
    said: list[str] = []
    options.setdefault("reviewer", Reviewer("approve", interactive=False))
    options.setdefault("say", said.append)
    engine = Engine(
        script,
        space,
        make_sandbox(sandbox, space.root),
        limits=Limits(timeout_s=timeout_s, cpu_s=10, processes=processes),
        **options,
    )
    engine.run()
    return engine, "\n".join(said)


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(cmdline)
    return found


# ---- READ and WRITE stay in the workspace --------------------------------------------------------


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a/../../escape.txt"])
def test_read_and_write_refuse_traversal_and_absolute_paths(workspace, path):
    for statement in (f'READ "{path}" AS x', f'WRITE "{path}" <<EOF\npwned\nEOF'):
        with pytest.raises(ScriptFailure) as failure:
            run_script(statement, workspace)
        assert failure.value.kind == "refused" and failure.value.span.line == 2
    assert not (workspace.parent / "escape.txt").exists()


def test_symlinks_that_point_out_are_refused(workspace, outside):
    (workspace / "link.txt").symlink_to(outside / "victim.txt")
    (workspace / "linkdir").symlink_to(outside)
    (workspace / "inside.txt").write_text("fine\n")
    (workspace / "ok-link").symlink_to("inside.txt")  # a link that stays inside is followed
    engine, _ = run_script('READ "ok-link" AS x', workspace)
    assert engine.variables["x"] == "fine\n"
    for statement in (
        'READ "link.txt" AS x',
        'WRITE "link.txt" <<EOF\npwned\nEOF',
        'WRITE "linkdir/new.txt" <<EOF\nx\nEOF',
    ):
        with pytest.raises(ScriptFailure, match="outside the workspace") as failure:
            run_script(statement, workspace)
        assert failure.value.kind == "refused"
    assert (outside / "victim.txt").read_text() == "precious\n" and not (outside / "new.txt").exists()


def test_a_symlink_planted_by_a_command_does_not_lead_write_out(workspace, outside):
    script = f'RUN "ln -s {outside} planted"\nWRITE "planted/victim.txt" <<EOF\npwned\nEOF\n'
    with pytest.raises(ScriptFailure, match="outside the workspace"):
        run_script(script, workspace)
    assert (outside / "victim.txt").read_text() == "precious\n"


def test_write_is_atomic_and_size_capped(workspace):
    space = Workspace(workspace, max_bytes=10)
    space.write("a.txt", "short")
    with pytest.raises(WorkspaceRefusal, match="over the 10-byte limit"):
        space.write("a.txt", "much too long for the cap")
    assert (workspace / "a.txt").read_text() == "short"
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".")] == []  # no temp file left


# ---- RUN cannot touch the host -------------------------------------------------------------------


def test_run_cannot_write_or_delete_outside_the_workspace(workspace, outside):
    command = (
        f"echo pwned > {outside}/new.txt; rm -f {outside}/victim.txt; echo pwned >> {outside}/victim.txt; "
        "touch /etc/tiss-pwned; echo inside > mine.txt"
    )
    engine, _ = run_script(f'RUN "{command}"', workspace)
    assert "Read-only file system" in engine.last_run.stderr
    assert (outside / "victim.txt").read_text() == "precious\n"
    assert not (outside / "new.txt").exists() and not Path("/etc/tiss-pwned").exists()
    assert (workspace / "mine.txt").read_text() == "inside\n"  # the workspace itself is writable


def test_run_as_an_unprivileged_user_without_capabilities_or_secrets(workspace):
    engine, _ = run_script('RUN "id -u; grep CapEff /proc/self/status; ls -A /root /home; cat /etc/shadow"', workspace)
    out = engine.last_run.stdout
    assert out.splitlines()[0] == "65534"
    assert "CapEff:\t0000000000000000" in out
    assert "Permission denied" in engine.last_run.stderr and engine.last_run.exit_code != 0


def test_no_network_not_even_to_the_hosts_loopback(workspace):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        arrived, done = [], threading.Event()

        def accept():
            while not done.is_set():
                try:
                    arrived.append(listener.accept()[0].recv(100))
                except TimeoutError:
                    continue

        watcher = threading.Thread(target=accept)
        watcher.start()
        connect = f'python3 -c \'import socket; socket.create_connection((\\"127.0.0.1\\", {port}), timeout=1).sendall(b\\"hi\\")\''
        sandboxed, _ = run_script(f'RUN "{connect}"', workspace)
        control, _ = run_script(f'RUN "{connect}"', workspace, sandbox="none")  # proves the probe can connect
        time.sleep(0.3)  # let the listener take the control's connection
        done.set()
        watcher.join()
    assert sandboxed.last_run.exit_code != 0 and "Errno" in sandboxed.last_run.stderr
    assert control.last_run.exit_code == 0
    assert arrived == [b"hi"]  # only the unsandboxed control got through


def test_the_callers_environment_is_not_visible(workspace, monkeypatch):
    monkeypatch.setenv("TISS_TEST_SECRET", "hunter2")
    engine, _ = run_script('RUN "env; cat /proc/1/environ"', workspace)
    assert "hunter2" not in engine.last_run.stdout + engine.last_run.stderr
    assert "TISS_TEST_SECRET" not in engine.last_run.stdout
    assert "PATH=" in engine.last_run.stdout


# ---- resource abuse is stopped and leaves nothing behind ------------------------------------------


def _assert_host_healthy(marker: str) -> None:
    deadline = time.monotonic() + 2  # the kernel reaps a dying pid namespace asynchronously
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(marker) == []
    assert subprocess.run(["true"], timeout=5).returncode == 0  # the host can still start processes


def test_fork_bomb_is_contained(workspace):
    """RLIMIT_NPROC counts every process of the sandbox's uid, which all sandboxes share: a bomb at
    the default limit would leave none for the sandboxes that other tests run meanwhile (EAGAIN),
    so this one is capped lower; the containment is the same mechanism at any limit."""
    marker = f"bomb-{uuid.uuid4().hex}"
    start = time.monotonic()
    engine, _ = run_script(
        f'TRY {{\n RUN "f() {{ f | f & }}; f; sleep 60 # {marker}"\n}} CATCH {{\n LOG "stopped"\n}}',
        workspace,
        processes=32,
    )
    assert time.monotonic() - start < HOSTILE_TIMEOUT_S + 3
    assert engine.last_run.timed_out
    _assert_host_healthy(marker)


def test_background_sleepers_die_with_the_command(workspace):
    marker = f"sleep-{uuid.uuid4().hex}"
    start = time.monotonic()
    engine, _ = run_script(
        f'RUN "sh -c \\"sleep 347; : {marker}\\" & setsid sh -c \\"sleep 348; : {marker}\\" & echo started"', workspace
    )
    assert engine.last_run.stdout == "started\n" and not engine.last_run.timed_out
    assert time.monotonic() - start < HOSTILE_TIMEOUT_S
    _assert_host_healthy(marker)


def test_endless_output_is_capped_and_stopped(workspace):
    marker = f"yes-{uuid.uuid4().hex}"
    with pytest.raises(ScriptFailure) as failure:
        run_script(f'RUN "yes {marker}"', workspace)
    assert failure.value.kind == "timeout"
    _assert_host_healthy(marker)
    box = make_sandbox("bwrap", workspace)
    result = box.run(f"yes {marker}", Limits(timeout_s=1, output_bytes=4096))
    assert result.timed_out and result.truncated and len(result.stdout) == 4096
    _assert_host_healthy(marker)


def test_shell_metacharacters_in_a_variable_are_inert(workspace):
    nasty = "$(touch pwned1); touch pwned2 `touch pwned3` | rm -rf . && echo \"x' 'y\" > pwned4 # \\n"
    (workspace / "keep.txt").write_text("kept\n")
    engine, _ = run_script('RUN "printf %s {{nasty}}"', workspace, variables={"nasty": nasty})
    assert engine.last_run.stdout == nasty
    assert sorted(p.name for p in workspace.iterdir()) == ["keep.txt"]


def test_the_sandbox_fails_closed_when_bubblewrap_is_missing(workspace, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="bwrap not found"):
        make_sandbox("bwrap", workspace)
