"""Where `RUN` executes: `/bin/sh -c CMD` in a bubblewrap sandbox, with rlimits and timeouts.

A RUN command may have been written by a model, so the sandbox assumes it is hostile:

- bubblewrap gives it new user, pid, ipc, uts, cgroup and network namespaces (no network at all,
  loopback included: the sandbox's loopback is its own), a read-only view of `/`, a private
  `/tmp`, empty `/home`, `/root` and `/run` (home directories and daemon sockets such as
  docker.sock stay out of reach: a network namespace does not stop Unix sockets in the file
  system), the workspace as the only writable directory, uid/gid 65534 with every capability
  dropped, a clean environment, `--new-session` (no TIOCSTI into the caller's terminal) and
  `--die-with-parent`.
- A root caller is not a safe identity even inside a user namespace: uid 0 outside still owns
  /etc/shadow and /root. So when the engine runs as root, bwrap itself is started as uid/gid 65534
  (Popen's user/group), which owns nothing on the host; the workspace is handed to that uid
  (workspace.py). A non-root caller runs bwrap as itself, the usual unprivileged bubblewrap setup.
- rlimits (CPU seconds, address space, processes, file size, open files) are set by `prlimit` on
  the bwrap process and inherited by everything inside. Process counts are charged per user
  namespace, so a fork bomb meets its limit inside the sandbox and nowhere else.
- The pid namespace makes cleanup total: when the command exits, or when the timeout kills
  bwrap's process group, the namespace's init dies and the kernel kills every process left in
  it, grandchildren and `setsid` escapees included.
- stdout and stderr are read as they come and only the first `output_bytes` of each are kept
  (with a truncated flag): an endless `yes` costs a capped buffer, not the machine's memory.

Fails closed: `make_sandbox("bwrap")` runs a probe and raises if bubblewrap or user namespaces
are unavailable; only `--sandbox none`, asked for by name, runs commands without isolation (still
with the rlimits, the timeout and the process-group kill, and a clean environment).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tisslm.core.errors import TissLMError

SANDBOX_UID = 65534  # nobody/nogroup: owns nothing on the host
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HIDDEN = ("/home", "/root", "/run")  # replaced by empty tmpfs inside the sandbox
POLL_S = 0.1  # how often the output loop looks at the process while no output arrives


class SandboxError(TissLMError):
    """The requested isolation is unavailable or a command could not start in it (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Limits:
    """Per-command limits; the engine lowers `timeout_s` to what is left of the run's budget."""

    timeout_s: float = 60.0
    cpu_s: int = 60
    memory_bytes: int = 4 << 30  # address space: generous, since runtimes reserve far more than they touch
    processes: int = 128
    file_size_bytes: int = 256 << 20
    open_files: int = 256
    output_bytes: int = 1 << 20  # kept per stream; the rest is read and dropped


@dataclass(frozen=True)
class RunResult:
    command: str
    exit_code: int  # 128 + signal number when killed by a signal, as a shell reports it
    stdout: str
    stderr: str
    duration: float
    timed_out: bool
    truncated: bool


class Sandbox:
    """No isolation (`--sandbox none`): a clean environment, rlimits, the timeout, the group kill."""

    profile = "none"

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace).resolve()

    def command_line(self, command: str, status_fd: int) -> list[str]:
        return ["/bin/sh", "-c", command]

    def popen_options(self) -> dict:
        return {}

    def run(self, command: str, limits: Limits) -> RunResult:
        prlimit = [
            "prlimit",
            f"--cpu={limits.cpu_s}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_size_bytes}",
            f"--nofile={limits.open_files}",
            "--",
        ]
        status_read, status_write = os.pipe()
        argv = prlimit + self.command_line(command, status_write)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.workspace,
                env={"PATH": SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"},
                start_new_session=True,  # its own process group, killed whole on timeout
                pass_fds=(status_write,),
                **self.popen_options(),
            )
        except OSError as err:
            os.close(status_read)
            raise SandboxError(f"cannot start the command: {err}") from None
        finally:
            os.close(status_write)
        with os.fdopen(status_read, "rb") as status:
            stdout, stderr, total, timed_out = _communicate(proc, start + limits.timeout_s, limits.output_bytes)
            duration = time.monotonic() - start
            started = self.profile != "bwrap" or b'"child-pid"' in status.read()
        if not started:
            raise SandboxError(f"bubblewrap could not set up the sandbox: {stderr.decode(errors='replace').strip()}")
        code = proc.returncode
        return RunResult(
            command=command,
            exit_code=128 - code if code < 0 else code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            duration=duration,
            timed_out=timed_out,
            truncated=total > len(stdout) + len(stderr),
        )


class Bubblewrap(Sandbox):
    profile = "bwrap"

    def command_line(self, command: str, status_fd: int) -> list[str]:
        ws = str(self.workspace)
        hidden = [arg for path in HIDDEN for arg in ("--tmpfs", path)]
        return [
            "bwrap",
            "--unshare-user",
            "--unshare-all",  # pid, ipc, uts, cgroup and net as well
            "--die-with-parent",
            "--new-session",
            "--ro-bind", "/", "/",
            "--proc", "/proc",
            "--dev", "/dev",
            "--tmpfs", "/tmp",
            *hidden,
            "--bind", ws, ws,  # after the tmpfs mounts, so a workspace under /tmp or /home stays visible
            "--chdir", ws,
            "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL",
            "--hostname", "tiss",
            "--json-status-fd", str(status_fd),  # says whether bwrap got as far as starting the command
            "--clearenv",
            "--setenv", "PATH", SANDBOX_PATH,
            "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "TMPDIR", "/tmp",
            "--",
            "/bin/sh", "-c", command,
        ]  # fmt: skip

    def popen_options(self) -> dict:
        if os.geteuid() == 0:
            return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}
        return {}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _communicate(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, int, bool]:
    """Read both streams until they close or the deadline passes; keep `cap` bytes of each.

    Returns (stdout, stderr, total bytes seen, timed out). The process is reaped either way, and its
    process group is killed once the command has exited: leftovers of `--sandbox none` go with it.
    """
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total, timed_out, exited = 0, False, False
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not exited and proc.poll() is not None:
                exited = True
                _kill_group(proc)
            for key, _ in selector.select(min(left, POLL_S)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                total += len(chunk)
                buffer = kept[key.fileobj]
                buffer += chunk[: max(0, cap - len(buffer))]
    if not timed_out:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    _kill_group(proc)
    proc.wait()
    for stream in kept:
        stream.close()
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), total, timed_out


def make_sandbox(profile: str, workspace: Path) -> Sandbox:
    """The sandbox for `--sandbox PROFILE`; for bwrap, proven to work by a probe, or SandboxError."""
    if profile == "none":
        return Sandbox(workspace)
    if profile != "bwrap":
        raise TissLMError(f"--sandbox {profile!r}: expected bwrap or none")
    for tool in ("bwrap", "prlimit"):
        if shutil.which(tool) is None:
            raise SandboxError(
                f"{tool} not found: install it (Debian: apt-get install bubblewrap util-linux), "
                "or pass --sandbox none to run commands without isolation"
            )
    sandbox = Bubblewrap(workspace)
    probe = sandbox.run("true", Limits(timeout_s=30))
    if probe.exit_code != 0:
        raise SandboxError(f"the bubblewrap sandbox does not work here: {probe.stderr.strip()}")
    return sandbox


def sandbox_description(sandbox: Sandbox, limits: Limits) -> dict:
    """What the audit log records about the isolation a command ran under."""
    return {"profile": sandbox.profile, "workspace": str(sandbox.workspace), "limits": asdict(limits)}
