"""A hash-chained, append-only audit log: one JSON record per line.

Each record carries `seq` (1, 2, ...), `prev` (the previous record's `hash`; GENESIS for the first)
and `hash`, the SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII with \\u escapes) of the record without
`hash`. Editing a record changes its hash; removing or reordering records breaks the run of `seq`
and the `prev` links; a truncated or garbled line does not parse. `verify` names the first record
that fails, by line and seq.

The text of a prompt and of its output is kept only by a log made with `store_text=True`; otherwise
the TEXT_FIELDS are dropped from each record before it is written (their SHA-256 stay, if the caller
put them in). `AuditLog.append` is safe to call from several threads: each record is written and
flushed whole under a lock. A log opened on an existing file continues its chain, after checking
that the file's last record is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tisslm.core.errors import TissLMError

GENESIS = "0" * 64
TEXT_FIELDS = ("prompt", "output")  # the text itself; the log stores it only with store_text


def sha256_text(text: str | None) -> str | None:
    """The hex SHA-256 of a text's UTF-8 bytes (None for None)."""
    return None if text is None else hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash is taken over: sorted keys, no spaces, ASCII, without `hash`."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found: `ok` with the number of records, or the first bad record's line and seq."""

    ok: bool
    records: int  # records read intact before the first bad one (all of them when ok)
    line: int | None = None  # 1-based line of the first bad record
    seq: int | None = None  # its seq, when it has one
    problem: str | None = None  # altered, removed_or_reordered, garbled
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bad(records: int, line: int, seq: int | None, problem: str, message: str) -> VerifyResult:
    return VerifyResult(False, records, line, seq, problem, f"line {line}: {message}")


def verify(path: Path | str) -> VerifyResult:
    """Walk the chain of the log at `path`; FileNotFoundError if there is none."""
    path = Path(path)
    prev, expected, count = GENESIS, 1, 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            ok_shape = (
                isinstance(record, dict)
                and type(record.get("seq")) is int
                and isinstance(record.get("prev"), str)
                and isinstance(record.get("hash"), str)
            )
            if not raw.endswith(b"\n") or not ok_shape:
                seq = record.get("seq") if isinstance(record, dict) and type(record.get("seq")) is int else None
                return _bad(count, number, seq, "garbled", "truncated or garbled: not a whole audit record")
            seq = record["seq"]
            if record_hash(record) != record["hash"]:
                return _bad(count, number, seq, "altered", f"record seq {seq} was altered (its hash does not match)")
            if seq != expected:
                message = f"record seq {seq} where seq {expected} was expected: records removed or reordered"
                return _bad(count, number, seq, "removed_or_reordered", message)
            if record["prev"] != prev:
                message = f"record seq {seq} does not follow the record before it: records removed or reordered"
                return _bad(count, number, seq, "removed_or_reordered", message)
            prev, expected, count = record["hash"], expected + 1, count + 1
    return VerifyResult(True, count, message=f"{count} records, chain intact")


def _last_line(path: Path, block: int = 65536) -> bytes:
    """The file's last line (with its newline, if it has one), read from the end."""
    with path.open("rb") as file:
        end = file.seek(0, os.SEEK_END)
        position, tail = end, b""
        while position > 0:
            step = min(block, position)
            position -= step
            file.seek(position)
            tail = file.read(step) + tail
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                return tail[cut + 1 :]
        return tail


class AuditLog:
    """Appends hash-chained records to `path`, continuing the chain of a file already there."""

    def __init__(self, path: Path | str, store_text: bool = False):
        self.path, self.store_text = Path(path), store_text
        self._lock = threading.Lock()
        self.seq, self.prev = 0, GENESIS
        if self.path.is_file() and self.path.stat().st_size > 0:
            self.seq, self.prev = self._resume()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")

    def _resume(self) -> tuple[int, str]:
        """The seq and hash of the file's last record, which must be whole and intact."""
        line = _last_line(self.path)
        try:
            record = json.loads(line.decode("utf-8")) if line.endswith(b"\n") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or type(record.get("seq")) is not int or "hash" not in record:
            raise TissLMError(
                f"audit log {self.path}: its last line is not a whole record; check it with `tisslm audit verify`"
            )
        if record_hash(record) != record["hash"]:
            raise TissLMError(f"audit log {self.path}: its last record (seq {record['seq']}) was altered")
        return record["seq"], record["hash"]

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write `record` (less its text unless store_text) as the chain's next link; return it as written."""
        entry = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        if not self.store_text:
            for field in TEXT_FIELDS:
                entry.pop(field, None)
        with self._lock:
            entry["seq"], entry["prev"] = self.seq + 1, self.prev
            entry["hash"] = record_hash(entry)
            line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
            self._file.write(line.encode("ascii"))
            self._file.flush()
            self.seq, self.prev = entry["seq"], entry["hash"]
        return entry

    def close(self) -> None:
        with self._lock:
            self._file.close()
