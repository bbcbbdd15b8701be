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
  /etc/shadow and /root. So when the engine runs as root, bwrap itself runs as uid/gid 65534 with
  no supplementary groups (the launcher below drops to it), which owns nothing on the host; the
  workspace is handed to that uid (workspace.py). A non-root caller runs bwrap as itself, the usual
  unprivileged bubblewrap setup.
- uid 65534 must be able to walk the workspace's path, since bwrap (running as that uid) resolves
  its bind source by path, `--bind-fd` included. A root caller's workspace often lies below a
  directory only root may enter (a `mkdtemp()` parent, /root). Then the launcher (below), still as
  root, enters a private mount namespace of its own, covers the topmost directory that uid 65534
  cannot enter with an empty tmpfs (mode 0755), recreates the path below it and bind-mounts the
  workspace (opened as a directory fd before the tmpfs hides it) back at the same path, then drops
  to uid/gid 65534 and execs prlimit + bwrap exactly as before. The host's mounts are untouched (the
  namespace is private and dies with the command); the sandbox sees the workspace at its real path,
  and nothing else of the hidden directory. Without CAP_SYS_ADMIN (a container without it) the
  launcher fails closed with a message naming the directory and the fix.
- bwrap exits as soon as its sandbox's init reports the command's exit status, before that init
  has exited: the init is orphaned and left to pid 1, which in a container may reap it late. Those
  zombies count against RLIMIT_NPROC of their uid (65534 for every root caller's sandbox): 120 to
  140 sandboxes in a row once met a limit of 128 (EAGAIN). So bwrap is always started through a
  small launcher (`LAUNCHER`, a `python -I -S` of a few milliseconds) that makes itself a child
  subreaper, runs prlimit + bwrap as its child (after the mount namespace and the drop to uid 65534
  where those apply), reaps every process that ends up below it, and only then exits with bwrap's
  status: a finished command leaves no process behind. (A timeout's kill takes the launcher too:
  that one sandbox's init is still left to pid 1.)
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
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tisslm.core.errors import TissLMError

SANDBOX_UID = 65534  # nobody/nogroup: owns nothing on the host
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HIDDEN = ("/home", "/root", "/run")  # replaced by empty tmpfs inside the sandbox
POLL_S = 0.1  # how often the output loop looks at the process while no output arrives

# Run by `python -I -S -c LAUNCHER WORKSPACE HIDE UID ARGV...` (see the module's docstring): becomes a
# child subreaper and forks; the child gives uid UID a path to WORKSPACE in a private mount namespace
# (HIDE: the topmost directory on the way that UID cannot enter; "" for none), drops to UID ("" keeps
# the caller's) and execs ARGV; the parent reaps everything below it, then exits with the child's
# status (128 + signal number if a signal killed it). Exit status 126 when the child cannot set up.
LAUNCHER = r"""
import ctypes, os, sys
workspace, hide, uid, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
def must(result, what):
    if result != 0:
        error = os.strerror(ctypes.get_errno())
        sys.stderr.write(f"tiss sandbox launcher: {what}: {error}; {hide} is closed to uid {uid}: "
                         f"chmod o+x {hide}, or use a workspace outside it\n")
        os._exit(126)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit(f"tiss sandbox launcher: cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
child = os.fork()
if child == 0:
    if hide:
        must(libc.unshare(0x00020000), "cannot make a private mount namespace (needs CAP_SYS_ADMIN)")
        must(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "cannot make the mounts private")
        try:
            fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            sys.stderr.write(f"tiss sandbox launcher: cannot open the workspace {workspace}: {err.strerror}\n")
            os._exit(126)
        must(libc.mount(b"tmpfs", hide.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"mode=0755,size=1m"),
             f"cannot cover {hide}")
        os.makedirs(workspace, mode=0o755, exist_ok=True)  # on the new tmpfs, root's: nothing to race with
        must(libc.mount(f"/proc/self/fd/{fd}".encode(), workspace.encode(), None, MS_BIND | MS_REC, None),
             f"cannot bind {workspace}")
        os.close(fd)
    if uid:
        os.setgroups([])
        os.setresgid(int(uid), int(uid), int(uid))
        os.setresuid(int(uid), int(uid), int(uid))
    os.execv(argv[0], argv)  # an absolute path: nothing may be imported now (the interpreter may be in /root)
status = 0
while True:  # bwrap, then the sandbox's init it leaves behind (reparented here), then nothing
    try:
        pid, wait_status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        status = os.waitstatus_to_exitcode(wait_status)
os._exit(128 - status if status < 0 else status)
"""


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

    def launch(self, argv: list[str]) -> list[str]:
        """The argv that starts `argv` (the prlimit + sandbox command line)."""
        return argv

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
        argv = self.launch(prlimit + self.command_line(command, status_write))
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


def closed_ancestor(path: Path, uid: int = SANDBOX_UID, gid: int = SANDBOX_UID) -> Path | None:
    """The topmost directory on the way to `path` (itself included) that `uid`/`gid`, without
    supplementary groups, may not enter (no search permission by its mode bits); None if none."""
    for directory in (*reversed(path.parents), path):
        info = directory.stat()
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


class Bubblewrap(Sandbox):
    profile = "bwrap"

    def __init__(self, workspace: Path):
        super().__init__(workspace)
        # Where a root caller's sandbox uid could not reach the workspace, the launcher makes a way.
        self.hidden = closed_ancestor(self.workspace) if os.geteuid() == 0 else None

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

    def launch(self, argv: list[str]) -> list[str]:
        """Through the launcher: it reaps what bwrap leaves behind and, for a root caller, drops to
        SANDBOX_UID (after making a way to the workspace where `hidden` is closed to that uid)."""
        hidden = "" if self.hidden is None else str(self.hidden)
        uid = str(SANDBOX_UID) if os.geteuid() == 0 else ""
        program = shutil.which(argv[0]) or argv[0]
        return [sys.executable, "-I", "-S", "-c", LAUNCHER, str(self.workspace), hidden, uid, program, *argv[1:]]


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
        raise SandboxError(f"the bubblewrap sandbox does not work here: {probe.stderr.strip()}{_hint(probe.stderr)}")
    return sandbox


def _hint(stderr: str) -> str:
    """What to do about a probe failure whose cause is known."""
    if "Can't find source path" in stderr and "Permission denied" in stderr and os.geteuid() == 0:
        return (
            f" (bwrap runs as uid {SANDBOX_UID} when started by root, and that uid cannot reach the "
            "workspace: put it under a directory every user may enter, or chmod o+x the directory that is closed)"
        )
    return ""


def sandbox_description(sandbox: Sandbox, limits: Limits) -> dict:
    """What the audit log records about the isolation a command ran under."""
    return {"profile": sandbox.profile, "workspace": str(sandbox.workspace), "limits": asdict(limits)}
