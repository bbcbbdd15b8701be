"""The audit log: the hash chain of `tisslm.safety.audit`, `tisslm audit verify`, and a real server's log."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from serving import ServerProcess, save_tiny_model

from tisslm.core.errors import TissLMError
from tisslm.safety.audit import GENESIS, AuditLog, audit_key, head_path, record_hash, signed_head, verify


def write_log(path: Path, count: int = 5, store_text: bool = False) -> list[dict]:
    log = AuditLog(path, store_text=store_text)
    try:
        return [log.append({"route": "/v1/completions", "n": i, "prompt": f"secret {i}"}) for i in range(count)]
    finally:
        log.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def audit_verify(path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tisslm.cli", "audit", "verify", str(path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


# ---- the chain ----


def test_records_are_chained_from_genesis(tmp_path):
    records = write_log(tmp_path / "a.jsonl")
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert all(record_hash(r) == r["hash"] for r in records)
    assert [json.loads(line) for line in lines(tmp_path / "a.jsonl")] == records
    result = verify(tmp_path / "a.jsonl")
    assert result.ok and result.records == 5 and result.line is None


def test_text_is_stored_only_when_asked(tmp_path):
    assert all("prompt" not in r for r in write_log(tmp_path / "a.jsonl"))
    assert "secret" not in (tmp_path / "a.jsonl").read_text()
    assert [r["prompt"] for r in write_log(tmp_path / "b.jsonl", store_text=True)][:2] == ["secret 0", "secret 1"]


def test_an_edited_record_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path)
    rows = lines(path)
    record = json.loads(rows[2])
    record["n"] = 99
    rows[2] = json.dumps(record) + "\n"
    path.write_text("".join(rows))
    result = verify(path)
    assert (result.ok, result.line, result.seq, result.problem, result.records) == (False, 3, 3, "altered", 2)


def test_a_removed_record_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path)
    rows = lines(path)
    del rows[1]
    path.write_text("".join(rows))
    result = verify(path)
    assert (result.ok, result.line, result.problem) == (False, 2, "removed_or_reordered")
    assert "seq 2 was expected" in result.message


def test_swapped_records_and_a_removed_last_link_are_caught(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path)
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_text("".join(rows))
    assert (verify(path).ok, verify(path).line) == (False, 2)
    # A record rewritten whole, with a fresh hash, still breaks the link of the one after it.
    write_log(tmp_path / "b.jsonl")
    rows = lines(tmp_path / "b.jsonl")
    forged = json.loads(rows[1]) | {"n": 42}
    forged["hash"] = record_hash(forged)
    rows[1] = json.dumps(forged) + "\n"
    (tmp_path / "b.jsonl").write_text("".join(rows))
    result = verify(tmp_path / "b.jsonl")
    assert (result.ok, result.line, result.seq, result.problem) == (False, 3, 3, "removed_or_reordered")


@pytest.mark.parametrize("tail", [b"garbage\n", b'{"seq": 6, "prev": "x"', b"\xff\xfe\n"])
def test_garbage_and_truncated_lines_are_caught(tmp_path, tail):
    path = tmp_path / "a.jsonl"
    write_log(path)
    with path.open("ab") as file:
        file.write(tail)
    result = verify(path)
    assert (result.ok, result.line, result.problem, result.records) == (False, 6, "garbled", 5)


def test_a_reopened_log_continues_the_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    first = write_log(path, count=3)
    log = AuditLog(path)
    fourth = log.append({"route": "/v1/models"})
    log.close()
    assert (fourth["seq"], fourth["prev"]) == (4, first[-1]["hash"])
    assert verify(path).ok and verify(path).records == 4


def test_a_log_whose_last_record_is_bad_is_not_continued(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, count=3)
    path.write_text(path.read_text().replace('"n":2', '"n":7'))
    with pytest.raises(TissLMError, match="seq 3"):
        AuditLog(path)
    path.write_text(path.read_text() + '{"seq": 4')
    with pytest.raises(TissLMError, match="not a whole record"):
        AuditLog(path)


def test_concurrent_appends_keep_the_chain(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")

    def append_many(worker: int) -> None:
        for i in range(50):
            log.append({"worker": worker, "i": i})

    threads = [threading.Thread(target=append_many, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    result = verify(tmp_path / "a.jsonl")
    assert result.ok and result.records == 400


# ---- `tisslm audit verify` ----


def test_audit_verify_exit_codes(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path)
    intact = audit_verify(path)
    assert intact.returncode == 0 and "5 records, chain intact" in intact.stdout
    assert len(intact.stdout.strip().splitlines()) == 1
    rows = lines(path)
    record = json.loads(rows[2]) | {"route": "/v1/chat/completions"}
    path.write_text("".join([*rows[:2], json.dumps(record) + "\n", *rows[3:]]))
    altered = audit_verify(path)
    assert altered.returncode == 1 and "line 3" in altered.stderr and "seq 3" in altered.stderr
    as_json = json.loads(audit_verify(path, "--json").stdout)
    assert (as_json["ok"], as_json["line"], as_json["seq"], as_json["problem"]) == (False, 3, 3, "altered")
    missing = audit_verify(tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr


# ---- a real server's log ----


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_the_server_records_each_request_and_a_restart_continues(tmp_path):
    model, log_path = save_tiny_model(tmp_path / "model"), tmp_path / "audit.jsonl"
    server = ServerProcess(model, "--audit-log", str(log_path), workdir=tmp_path)
    try:
        url = server.url
        completion = httpx.post(
            f"{url}/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 8, "seed": 1}, timeout=60
        ).json()
        chat_body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body, timeout=60) as response:
            assert response.status_code == 200
            streamed = "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in response.iter_lines()
                if line.startswith("data: {") and json.loads(line[6:])["choices"]
            )
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"prompt": ""}, timeout=10).status_code == 400
        httpx.get(f"{url}/health", timeout=10)  # not audited
    finally:
        server.stop()
    records = [json.loads(line) for line in lines(log_path)]
    assert [(r["seq"], r["route"], r["status"]) for r in records] == [
        (1, "/v1/completions", 200),
        (2, "/v1/chat/completions", 200),
        (3, "/v1/models", 200),
        (4, "/v1/completions", 400),
    ]
    first = records[0]
    assert first["prompt_sha256"] == sha("def add(a, b):")
    assert first["output_sha256"] == sha(completion["choices"][0]["text"])
    assert first["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert first["completion_tokens"] == completion["usage"]["completion_tokens"]
    assert first["params"]["max_tokens"] == 8 and "prompt" not in first["params"]
    assert first["decisions"] == [] and first["key_id"] is None and first["client"].startswith("127.0.0.1:")
    assert records[1]["output_sha256"] == sha(streamed) and records[1]["params"]["stream"] is True
    assert records[2]["prompt_sha256"] is None and records[2]["params"] is None
    assert "def add" not in log_path.read_text() and "hello there" not in log_path.read_text()
    assert audit_verify(log_path).returncode == 0

    server = ServerProcess(model, "--audit-log", str(log_path), "--audit-text", workdir=tmp_path)
    try:
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "x = ", "max_tokens": 4}, timeout=60)
    finally:
        server.stop()
    fifth = json.loads(lines(log_path)[-1])
    assert (fifth["seq"], fifth["prev"], fifth["prompt"]) == (5, records[-1]["hash"], "x = ")
    assert sha(fifth["output"]) == fifth["output_sha256"]
    intact = audit_verify(log_path)
    assert intact.returncode == 0 and "5 records" in intact.stdout

    rows = lines(log_path)
    (tmp_path / "removed.jsonl").write_text("".join(rows[:1] + rows[2:]))
    removed = audit_verify(tmp_path / "removed.jsonl")
    assert removed.returncode == 1 and "line 2" in removed.stderr and "seq 2 was expected" in removed.stderr


# ---- the head: truncation from the end ----


def test_records_cut_from_the_end_are_detected(tmp_path):
    """The chain alone passes a log cut short; its signed head does not."""
    path = tmp_path / "a.jsonl"
    write_log(path)
    rows = lines(path)
    path.write_text("".join(rows[:3]))
    result = verify(path)
    assert (result.ok, result.problem, result.records, result.seq) == (False, "truncated", 3, 4)
    assert "2 record(s) cut from the end" in result.message
    path.write_text("")  # every record gone, the head left
    assert verify(path).problem == "truncated"
    with pytest.raises(TissLMError, match="cut from the end"):
        AuditLog(path)  # a server would not continue it either


def test_a_consistent_truncation_without_the_key_is_caught_by_the_signature(tmp_path):
    """The attacker cuts the log and rewrites its head to match, with every field right but the MAC."""
    path = tmp_path / "a.jsonl"
    write_log(path)
    rows = lines(path)
    path.write_text("".join(rows[:3]))
    head = json.loads(head_path(path).read_text())
    third = json.loads(rows[2])
    head |= {"seq": 3, "hash": third["hash"]}
    head_path(path).write_text(json.dumps(head))
    assert (verify(path).ok, verify(path).problem) == (False, "head_forged")
    # Signed with a key of their own: refused by its key id, and by its MAC if they copy ours.
    forged = signed_head(b"attacker's key", 3, third["hash"], head["first"])
    head_path(path).write_text(json.dumps(forged))
    assert verify(path).problem == "head_forged" and "another key" in verify(path).message
    forged["key_id"] = head["key_id"]
    head_path(path).write_text(json.dumps(forged))
    assert verify(path).problem == "head_forged" and "signature does not match" in verify(path).message
    # With the key (its holder), the same cut verifies: what the head cannot catch, said in docs/safety.md.
    head_path(path).write_text(json.dumps(signed_head(audit_key(), 3, third["hash"], head["first"])))
    assert verify(path).ok


def test_a_tampered_missing_or_stale_head_fails(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path)
    good = head_path(path).read_text()
    head = json.loads(good)
    for change in ({"seq": 9}, {"hash": "0" * 64}, {"first": "f" * 64}, {"mac": "0" * 64}):
        head_path(path).write_text(json.dumps(head | change))
        assert (verify(path).ok, verify(path).problem) == (False, "head_forged"), change
    head_path(path).write_text("not json")
    assert verify(path).problem == "head_garbled"
    head_path(path).unlink()
    assert verify(path).problem == "head_missing"
    with pytest.raises(TissLMError, match="no head file"):
        AuditLog(path)
    head_path(path).write_text(good)
    assert verify(path).ok
    # Records chained on without the key: the chain holds, the head has not seen them.
    rows = lines(path)
    extra = {"route": "/v1/completions", "seq": 6, "prev": json.loads(rows[-1])["hash"]}
    extra["hash"] = record_hash(extra)
    path.write_text("".join(rows) + json.dumps(extra) + "\n")
    assert (verify(path).ok, verify(path).problem, verify(path).seq) == (False, "head_behind", 6)
    # A head copied from another log with as many records is not this log's.
    other = AuditLog(tmp_path / "b.jsonl")
    for i in range(5):
        other.append({"route": "/v1/models", "n": i})
    other.close()
    other = tmp_path / "b.jsonl"
    path.write_text("".join(rows))
    head_path(path).write_text(head_path(other).read_text())
    assert verify(path).problem == "head_mismatch"


def test_the_key_comes_from_the_environment_or_a_private_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TISSLM_AUDIT_KEY_FILE", str(tmp_path / "keys" / "audit.key"))
    path = tmp_path / "a.jsonl"
    write_log(path)
    key_file = tmp_path / "keys" / "audit.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text().strip()) == 64
    assert verify(path).ok
    assert not verify(path, key=b"another key").ok
    monkeypatch.setenv("TISSLM_AUDIT_KEY", "from the environment")
    assert verify(path).problem == "head_forged"  # the environment's key wins over the file
    monkeypatch.delenv("TISSLM_AUDIT_KEY")
    key_file.chmod(0o644)
    with pytest.raises(TissLMError, match="chmod 600"):
        verify(path)
    key_file.unlink()
    result = verify(path)
    assert (result.ok, result.problem) == (False, "no_key")  # fails closed without the key
    cli = audit_verify(path)
    assert cli.returncode == 1 and "no audit key" in cli.stderr
