"""The audit log: the chain verifies, every kind of tampering is named by line, PHI stays out,
and concurrent writers (threads and processes) keep one valid chain."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import GENESIS, AuditLog, encode_line, query, verify

REPO = Path(__file__).resolve().parents[1]


def _write_log(path: Path, n: int = 6) -> list[bytes]:
    log = AuditLog(path)
    for i in range(n):
        log.append("received", sop_uid=f"1.2.3.{i}", study_uid="1.2.3", calling_ae="MODALITY1")
    return path.read_bytes().splitlines()


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_good_chain_verifies_and_links_each_line(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    lines = _write_log(path, 5)
    result = verify(path)
    assert result.ok and result.first_bad_line is None and result.lines_checked == 5
    assert result.head == hashlib.sha256(lines[-1]).hexdigest()
    records = [json.loads(line) for line in lines]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(lines, records[1:], strict=False):
        assert after["prev"] == hashlib.sha256(before).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"])


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    assert verify(path).ok and verify(path).lines_checked == 0


def test_missing_log_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nope.jsonl")


def test_edited_field_names_that_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path)
    lines[2] = lines[2].replace(b'"MODALITY1"', b'"MODALITY2"')
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 3
    assert "edited" in result.reason and "line 3" in result.reason


def test_edit_with_recomputed_own_hash_is_caught_by_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path)
    record = json.loads(lines[2])
    forged = encode_line(
        "received",
        record["time"],
        record["prev"],
        {"sop_uid": "9.9.9", "study_uid": "1.2.3", "calling_ae": "MODALITY1"},
    )
    lines[2] = forged
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 4 and "prev" in result.reason


def test_deleted_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path)
    del lines[3]
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 4 and "removed" in result.reason


def test_swapped_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path)
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 2


def test_truncated_last_line_is_named_and_appending_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a torn write: the last line lost its end and its newline
    result = verify(path)
    assert not result.ok and result.first_bad_line == 4 and "torn" in result.reason

    AuditLog(path).append("config-loaded", config_path="/etc/sentinel.toml")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 5
    fragment = data[:-40].splitlines()[-1]
    assert json.loads(lines[4])["prev"] == hashlib.sha256(fragment).hexdigest()
    result = verify(path)  # sealed and chained over: a crash on record, not a broken chain
    assert result.ok and result.torn_lines == (4,) and "torn" in result.reason
    assert result.lines_checked == 5


def test_non_record_line_not_chained_over_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path)
    lines.insert(2, b'{"event": "received", "sop_uid": "1.2.3.99"')  # a hand-made fragment
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 3 and "not a complete" in result.reason
    lines[2] = b"{}"  # a valid JSON object, but not an audit record
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 3 and "hash" in result.reason
    _rewrite(path, [*lines[:2], b"garbage"])  # a non-record last line with its newline
    assert verify(path).first_bad_line == 3


def test_injected_phi_field_is_reported_even_when_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 2)
    prev = hashlib.sha256(lines[-1]).hexdigest()
    lines.append(encode_line("received", "2026-01-01T00:00:00.000Z", prev, {"patient_name": "X"}))
    _rewrite(path, lines)
    result = verify(path)
    assert not result.ok and result.first_bad_line == 3 and "patient_name" in result.reason


@pytest.mark.parametrize("key", ["patient_name", "PatientName", "patient_id", "birth_date"])
def test_phi_like_keys_are_refused(tmp_path: Path, key: str) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="whitelist"):
        log.append("received", sop_uid="1.2", **{key: "DOE^JOHN"})
    assert not (tmp_path / "audit.jsonl").exists()


def test_unknown_event_reserved_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="unknown audit event"):
        log.append("coffee-break")
    with pytest.raises(ValueError, match="written by the log"):
        log.append("received", prev="0" * 64)
    with pytest.raises(ValueError, match="not allowed"):
        log.append("received", detail={"PatientName": "DOE^JOHN"})
    with pytest.raises(ValueError, match="finite"):
        log.append("scored", score=float("nan"))


def test_numpy_scalars_and_long_text_are_normalised(tmp_path: Path) -> None:
    import numpy as np

    log = AuditLog(tmp_path / "audit.jsonl")
    record = log.append("scored", score=np.float32(0.25), attempts=np.int64(3), detail="x" * 5000)
    assert record["score"] == 0.25 and record["attempts"] == 3 and len(record["detail"]) == 1000
    log.append("released", reason='two\nlines "quoted" \u00e9', actor="op")  # stays one line
    assert len((tmp_path / "audit.jsonl").read_bytes().splitlines()) == 2
    assert verify(tmp_path / "audit.jsonl").ok


def test_concurrent_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)

    def writer(k: int) -> None:
        for i in range(50):
            log.append("scored", sop_uid=f"1.{k}.{i}", score=0.1)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify(path)
    assert result.ok and result.lines_checked == 300


def test_two_processes_and_a_thread_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = (
        "import sys; from pathlib import Path; from gateway.audit import AuditLog\n"
        "log = AuditLog(Path(sys.argv[1]))\n"
        "for i in range(150): log.append('forwarded', sop_uid=f'2.{sys.argv[2]}.{i}')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(k)], cwd=REPO)
        for k in range(2)
    ]
    log = AuditLog(path)
    for i in range(100):
        log.append("received", sop_uid=f"3.{i}")
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    result = verify(path)
    assert result.ok and result.lines_checked == 400


def test_query_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("association", calling_ae="CR1", peer="10.0.0.1")
    log.append("scored", calling_ae="CR1", study_uid="1.1", verdict="clean", score=0.1)
    log.append("scored", calling_ae="DX2", study_uid="1.2", verdict="flagged", score=0.9)
    log.append("quarantined", calling_ae="DX2", study_uid="1.2", sop_uid="1.2.1")

    assert [r["event"] for r in query(path, calling_ae="DX2")] == ["scored", "quarantined"]
    assert [r["study_uid"] for r in query(path, event="scored")] == ["1.1", "1.2"]
    assert [r["score"] for r in query(path, verdict="flagged")] == [0.9]
    assert len(list(query(path, study_uid="1.2", event="quarantined"))) == 1
    now = datetime.now(UTC)
    assert len(list(query(path, since=now - timedelta(minutes=5)))) == 4
    assert list(query(path, since=now + timedelta(minutes=5))) == []
    assert list(query(path, until=now - timedelta(minutes=5))) == []
    naive_past = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)
    assert len(list(query(path, since=naive_past))) == 4


def test_group_commit_shares_fsyncs_under_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slow disk (2 ms per fsync) and 8 writers, lines share fsyncs; each caller still
    returns only after its line is synced, and the chain stays valid."""
    import os
    import time

    real_fsync = os.fsync
    calls: list[int] = []

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)
        time.sleep(0.002)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    threads = [
        threading.Thread(target=lambda k=k: [log.append("received", sop_uid=f"1.{k}.{i}")
                                             for i in range(40)])
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verify(path).ok and verify(path).lines_checked == 320
    assert len(calls) <= 160  # at least two lines per fsync on average


def test_write_error_reaches_the_caller_and_the_log_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the log's folder should be")
    log = AuditLog(blocker / "audit.jsonl")
    with pytest.raises(OSError):
        log.append("received", sop_uid="1.2")
    blocker.unlink()
    log.append("received", sop_uid="1.3")
    assert verify(blocker / "audit.jsonl").lines_checked == 1


def test_listeners_see_each_durable_record_and_cannot_break_the_audit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """gateway.alerts feeds on add_listener: a record reaches listeners after its write, a
    listener that raises is logged and skipped, and the append still succeeds."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    seen: list[dict[str, object]] = []

    def broken(record: dict[str, object]) -> None:
        raise RuntimeError("listener bug")

    def listener(record: dict[str, object]) -> None:
        assert path.read_bytes().count(b"\n") >= 1  # already on disk
        seen.append(record)

    log.add_listener(broken)
    log.add_listener(listener)
    record = log.append("quarantined", sop_uid="1.2.3", reason="flagged")
    assert record["event"] == "quarantined"
    assert [r["sop_uid"] for r in seen] == ["1.2.3"]
    assert "listener bug" in caplog.text
    log.remove_listener(listener)
    log.append("received", sop_uid="1.2.4")
    assert len(seen) == 1 and verify(path).ok


def test_verify_with_limit_checks_only_the_bytes_before_it(tmp_path: Path) -> None:
    from gateway.audit import locked_size

    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    size = locked_size(path)
    with path.open("ab") as f:
        f.write(b'{"half a line')  # an append in progress, seen mid-write
    assert not verify(path).ok
    result = verify(path, limit=size)
    assert result.ok and result.lines_checked == 3
