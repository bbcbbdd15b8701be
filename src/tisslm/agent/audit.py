"""The audit log of a run: the project's one audit log (`tisslm.safety.audit`), hash-chained and
anchored by a signed head, so `tisslm audit verify` checks an agent run as it checks a server.

It answers "what did the agent do?" after the fact: the script's hash, every node executed with its
span, each command with the sandbox profile, exit code, duration and hashes of its output, the
hash of every file written, and every approval with who gave it. Outputs are hashed rather than
stored, so the log stays small and holds no secrets a command printed, yet proves what was seen.
Each record is `{"time", "event", **fields}` plus the chain's `seq`, `prev` and `hash`; values
JSON cannot hold are written as their `str`. The log must lie outside the workspace: the sandbox
can write there and could rewrite history.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tisslm.core.errors import TissLMError
from tisslm.safety import audit as chained


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def default_audit_path(script: Path) -> Path:
    """$XDG_STATE_HOME/tisslm/tiss/<script>-<utc time>.jsonl (~/.local/state when unset)."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return state / "tisslm" / "tiss" / f"{script.stem}-{stamp}-{os.getpid()}.jsonl"


class AuditLog(chained.AuditLog):
    """The safety audit log, refused inside the workspace, with `record(event, **fields)` for the engine.

    Every field is kept (the engine records hashes, never a command's output): `store_text` is on.
    """

    def __init__(self, path: str | Path, workspace: Path, key: bytes | None = None):
        resolved = Path(path).resolve()
        if resolved.is_relative_to(workspace.resolve()):
            raise TissLMError(f"--audit {path}: inside the workspace, where the sandbox could rewrite it")
        super().__init__(resolved, store_text=True, key=key)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        line = {"time": round(time.time(), 3), "event": event, **fields}
        return self.append(json.loads(json.dumps(line, default=str)))


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
