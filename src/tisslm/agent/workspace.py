"""READ and WRITE, confined to the workspace.

The engine runs these itself, outside the sandbox and possibly as root, on paths that a model may
have written; and earlier RUN commands may have planted symlinks. So a path is refused unless it
is relative, has no `..` component, and still lies inside the workspace after every symlink is
resolved. No RUN is in flight while READ or WRITE runs (PARALLEL holds RUN only), so nothing can
swap a link between the check and the use. Reads refuse anything but a regular file (a FIFO would
block the engine forever); writes go to a temporary sibling and are renamed into place, so a
reader never sees half a file; both are size-capped.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_write_bytes

MAX_FILE_BYTES = 10 << 20


class WorkspaceRefusal(TissLMError):
    """A READ or WRITE that would leave the workspace, or is too large: a security refusal (exit 1)."""

    exit_code = 1


class Workspace:
    """The directory a run may change. `owner` (uid, gid) is who must own what WRITE creates."""

    def __init__(self, root: str | Path, owner: tuple[int, int] | None = None, max_bytes: int = MAX_FILE_BYTES):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise TissLMError(f"--workspace {root}: not a directory")
        self.owner, self.max_bytes = owner, max_bytes

    def resolve(self, path: str) -> Path:
        """The real path of `path` inside the workspace, or WorkspaceRefusal naming why not."""
        pure = PurePosixPath(path)
        if not path or pure.is_absolute():
            raise WorkspaceRefusal(f"{path!r}: only paths relative to the workspace are allowed")
        if ".." in pure.parts:
            raise WorkspaceRefusal(f"{path!r}: '..' is not allowed in a path")
        try:
            real = (self.root / pure).resolve()
        except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13
            raise WorkspaceRefusal(f"{path!r}: cannot resolve ({err})") from None
        if not real.is_relative_to(self.root):
            raise WorkspaceRefusal(f"{path!r}: resolves to {real}, outside the workspace {self.root} (symlink)")
        return real

    def read(self, path: str) -> str:
        real = self.resolve(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            raise WorkspaceRefusal(f"{path!r}: cannot read ({err.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise WorkspaceRefusal(f"{path!r}: not a regular file")
            if info.st_size > self.max_bytes:
                raise WorkspaceRefusal(f"{path!r}: {info.st_size} bytes, over the {self.max_bytes}-byte limit")
            return f.read(self.max_bytes + 1).decode("utf-8", errors="replace")

    def write(self, path: str, text: str) -> Path:
        data = text.encode("utf-8")
        if len(data) > self.max_bytes:
            raise WorkspaceRefusal(f"{path!r}: {len(data)} bytes, over the {self.max_bytes}-byte limit")
        real = self.resolve(path)
        if real.is_dir():
            raise WorkspaceRefusal(f"{path!r}: is a directory")
        created = [p for p in (real.parent, *real.parent.parents) if p.is_relative_to(self.root) and not p.exists()]
        atomic_write_bytes(real, data)
        if self.owner:
            for p in (real, *created):
                os.chown(p, *self.owner, follow_symlinks=False)
        return real

    def exists(self, path: str) -> bool:
        """`FILE "p" EXISTS`: false for a path outside the workspace rather than an error."""
        try:
            return self.resolve(path).exists()
        except WorkspaceRefusal:
            return False

    def hand_over(self) -> None:
        """Give the workspace to `owner`, so the sandbox's uid may change it.

        Only entries the caller owns are changed, symlinks are never followed, and a file with
        more than one hard link is left alone (a link could point at a file elsewhere on the disk).
        """
        if not self.owner:
            return
        me = os.geteuid()
        entries = [self.root]
        for directory, dirs, files in os.walk(self.root):
            entries += [Path(directory) / name for name in (*dirs, *files)]
        for path in entries:
            info = path.lstat()
            if info.st_uid == me and (stat.S_ISDIR(info.st_mode) or info.st_nlink == 1):
                os.chown(path, *self.owner, follow_symlinks=False)
