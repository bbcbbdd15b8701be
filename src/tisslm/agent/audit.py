"""The audit log of a run: one JSON object per line, flushed as it happens.

It answers "what did the agent do?" after the fact: the script's hash, every node executed with its
span, each command with the sandbox profile, exit code, duration and hashes of its output, the
hash of every file written, and every approval with who gave it. Outputs are hashed rather than
stored, so the log stays small and holds no secrets a command printed, yet proves what was seen.
The log must lie outside the workspace: the sandbox can write there and could rewrite history.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tisslm.core.errors import TissLMError


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def default_audit_path(script: Path) -> Path:
    """$XDG_STATE_HOME/tisslm/tiss/<script>-<utc time>.jsonl (~/.local/state when unset)."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return state / "tisslm" / "tiss" / f"{script.stem}-{stamp}-{os.getpid()}.jsonl"


class AuditLog:
    def __init__(self, path: str | Path, workspace: Path):
        self.path = Path(path).resolve()
        if self.path.is_relative_to(workspace.resolve()):
            raise TissLMError(f"--audit {path}: inside the workspace, where the sandbox could rewrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def record(self, event: str, **fields: Any) -> None:
        line = {"time": round(time.time(), 3), "event": event, **fields}
        self._file.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
