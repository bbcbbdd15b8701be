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

The head. A chain alone cannot tell a log whose last records were cut off from a shorter log, so
every append also rewrites, atomically (temp file, then rename), a head file beside the log
(`<log>.head`): the seq and hash of the last record and the hash of the first, signed with
HMAC-SHA256 under the audit key. `verify` walks the chain, then requires the head: records cut
from the end (the head is ahead of the log), a head missing, altered or signed with another key,
and records appended by anyone without the key (the log is ahead of its head) all fail. The key
is TISSLM_AUDIT_KEY when set, else the key file (TISSLM_AUDIT_KEY_FILE, by default
$XDG_CONFIG_HOME/tisslm/audit.key, ~/.config when unset), made on first use with 32 random bytes
and mode 0600; a key file others may read is refused. Keep the key where whoever can write the
log cannot read it (another user, a secret store): with the key, the log and its head can be
rewritten consistently, and nothing here can tell. Deleting the log and its head together leaves
nothing to verify.

Written records and heads are flushed, not fsynced: a crash between a record and its head leaves
the head one record behind, which `verify` reports (`head_behind`) rather than passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
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
    # altered, removed_or_reordered, garbled (the chain); no_key, head_missing, head_garbled,
    # head_forged, truncated, head_behind, head_mismatch (the head)
    problem: str | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bad(records: int, line: int, seq: int | None, problem: str, message: str) -> VerifyResult:
    return VerifyResult(False, records, line, seq, problem, f"line {line}: {message}")


# ---- the head: a signed checkpoint of the chain's end ----

KEY_ENV, KEY_FILE_ENV = "TISSLM_AUDIT_KEY", "TISSLM_AUDIT_KEY_FILE"
HEAD_SUFFIX = ".head"


def head_path(path: Path | str) -> Path:
    """Where the head of the log at `path` is kept: beside it, `<name>.head`."""
    path = Path(path)
    return path.with_name(path.name + HEAD_SUFFIX)


def key_file() -> Path:
    """TISSLM_AUDIT_KEY_FILE, else $XDG_CONFIG_HOME/tisslm/audit.key (~/.config when unset)."""
    if named := os.environ.get(KEY_FILE_ENV):
        return Path(named)
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "tisslm" / "audit.key"


def audit_key(create: bool = False) -> bytes | None:
    """The key heads are signed with: TISSLM_AUDIT_KEY, else the key file's contents (made with
    mode 0600 when `create` and missing). None when there is none; TissLMError for a key file that
    others may read or that is empty."""
    if value := os.environ.get(KEY_ENV):
        return value.encode("utf-8")
    path = key_file()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TissLMError(
            f"audit key file {path}: readable or writable by others (mode {mode & 0o777:o}); chmod 600 it"
        )
    key = path.read_bytes().strip()
    if not key:
        raise TissLMError(f"audit key file {path}: empty")
    return key


def key_id(key: bytes) -> str:
    """Which key signed a head, without revealing it: the first 16 hex of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


def _head_mac(key: bytes, head: dict[str, Any]) -> str:
    # `canonical` leaves out a field named "hash": the last hash is signed as "last".
    body = {"seq": head.get("seq"), "last": head.get("hash"), "first": head.get("first"), "key_id": head.get("key_id")}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def signed_head(key: bytes, seq: int, last: str, first: str) -> dict[str, Any]:
    """The head of a chain of `seq` records whose first hash is `first` and last `last`."""
    head: dict[str, Any] = {"seq": seq, "hash": last, "first": first, "key_id": key_id(key)}
    head["mac"] = _head_mac(key, head)
    return head


def write_head(path: Path, head: dict[str, Any]) -> None:
    """Replace the head file at `path` atomically (temp file in its directory, then rename)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temp.write_text(json.dumps(head, sort_keys=True) + "\n", encoding="ascii")
    os.replace(temp, path)


def read_head(path: Path) -> dict[str, Any] | None:
    """The head at `path`, or None when it is not a head (garbled); FileNotFoundError when missing."""
    try:
        head = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    shape = {"seq": int, "hash": str, "first": str, "key_id": str, "mac": str}
    if not isinstance(head, dict) or any(type(head.get(k)) is not t for k, t in shape.items()):
        return None
    return head


def check_head(path: Path, key: bytes, records: int, first: str, last: str) -> tuple[str, str, int | None] | None:
    """(problem, message, first missing seq) when the head of the log at `path`, whose intact chain
    holds `records` records from `first` to `last`, does not vouch for it; None when it does."""
    where = head_path(path)
    if not where.is_file():
        if records == 0:
            return None  # an empty log and no head: nothing was ever written
        return "head_missing", f"no head file {where.name}: the log's end cannot be vouched for", None
    head = read_head(where)
    if head is None:
        return "head_garbled", f"head file {where.name} is not a head", None
    if head["key_id"] != key_id(key):
        return "head_forged", f"head file {where.name} was signed with another key (key id {head['key_id']})", None
    if not hmac.compare_digest(head["mac"], _head_mac(key, head)):
        return "head_forged", f"head file {where.name}: its signature does not match (the head was altered)", None
    if head["seq"] > records:
        missing = head["seq"] - records
        message = (
            f"the log ends at seq {records} but its head says seq {head['seq']}: {missing} record(s) cut from the end"
        )
        return "truncated", message, records + 1
    if head["seq"] < records:
        message = (
            f"records after seq {head['seq']} are not vouched for by the head: appended without the key,"
            " or the writer stopped between a record and its head"
        )
        return "head_behind", message, head["seq"] + 1
    if head["seq"] > 0 and (head["hash"] != last or head["first"] != first):
        return "head_mismatch", f"the log's records are not those its head signed (seq {records})", records
    return None


def verify(path: Path | str, key: bytes | None = None) -> VerifyResult:
    """Walk the chain of the log at `path`, then check it against its signed head (key: by default
    `audit_key()`); FileNotFoundError if there is no log. A TissLMError for an unreadable key file."""
    path = Path(path)
    chain = _verify_chain(path)
    if not chain.ok:
        return chain
    key = key if key is not None else audit_key()
    if key is None:
        message = f"no audit key ({KEY_ENV} or {key_file()}): the head, and so truncation, cannot be checked"
        return VerifyResult(False, chain.records, None, None, "no_key", message)
    found = check_head(path, key, chain.records, *_ends(path))
    if found is not None:
        problem, message, seq = found
        return VerifyResult(False, chain.records, None, seq, problem, message)
    return VerifyResult(True, chain.records, message=f"{chain.records} records, chain intact, head signed and matching")


def _ends(path: Path) -> tuple[str, str]:
    """The hashes of the first and last records of a log whose chain is intact (GENESIS when empty)."""
    with path.open("rb") as file:
        first_line = file.readline()
    if not first_line:
        return GENESIS, GENESIS
    return json.loads(first_line)["hash"], json.loads(_last_line(path))["hash"]


def _verify_chain(path: Path) -> VerifyResult:
    """Walk the chain of the log at `path`: every record's hash, seq and link."""
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
    """Appends hash-chained records to `path`, continuing the chain of a file already there, and
    keeps its signed head (`<path>.head`) in step; `key` defaults to `audit_key(create=True)`.

    A log is continued only when its last record is intact and its head vouches for it: one cut
    short, or with a head missing or forged, is refused (check it with `tisslm audit verify`)."""

    def __init__(self, path: Path | str, store_text: bool = False, key: bytes | None = None):
        self.path, self.store_text = Path(path), store_text
        self.head_path = head_path(self.path)
        self._key = key if key is not None else audit_key(create=True)
        self._lock = threading.Lock()
        self.seq, self.prev, self.first = 0, GENESIS, GENESIS
        if self.path.is_file() and self.path.stat().st_size > 0:
            self.seq, self.prev = self._resume()
            self.first = _ends(self.path)[0]
        found = check_head(self.path, self._key, self.seq, self.first, self.prev)
        if found is not None:
            raise TissLMError(f"audit log {self.path}: {found[1]}; check it with `tisslm audit verify`")
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
            if self.seq == 1:
                self.first = self.prev
            write_head(self.head_path, signed_head(self._key, self.seq, self.prev, self.first))
        return entry

    def close(self) -> None:
        with self._lock:
            self._file.close()
