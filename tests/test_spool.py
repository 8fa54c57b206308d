"""The spool: durable outbox placement, sequence order, sent ledger, external enqueue."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gateway.spool import (
    SentLedger,
    SpoolLayout,
    enqueue_outbox,
    list_outbox,
    place_in_outboxes,
    sop_from_outbox_name,
    valid_uid,
)


def test_valid_uid_refuses_path_tricks() -> None:
    assert valid_uid("1.2.840.10008.1.2")
    for bad in ("", "../etc", "1.2/3", "1..2", "1.2.", "a.b", "1" * 65):
        assert not valid_uid(bad)


def test_place_links_into_each_outbox_and_removes_source(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path)
    layout.create(("a", "b"))
    src = layout.work / "1.2.3~x.dcm"
    src.write_bytes(b"DICOM-BYTES")
    src.with_suffix(".json").write_text("{}")
    placed = place_in_outboxes(layout, ("a", "b"), src, {"sop_uid": "1.2.3", "seq": "00042",
                                                         "study_uid": "9.9"})
    assert not src.exists() and not src.with_suffix(".json").exists()
    assert [p.parent.name for p in placed] == ["a", "b"]
    for p in placed:
        assert p.name == "00042-1.2.3.dcm" and p.read_bytes() == b"DICOM-BYTES"
        meta = json.loads(p.with_suffix(".json").read_text())
        assert meta["study_uid"] == "9.9" and meta["destination"] == p.parent.name
    assert os.stat(placed[0]).st_ino == os.stat(placed[1]).st_ino  # one copy on disk
    assert sop_from_outbox_name(placed[0].name) == "1.2.3"
    with pytest.raises(ValueError, match="valid UID"):
        place_in_outboxes(layout, ("a",), placed[0], {"sop_uid": "../x"})


def test_enqueue_outbox_moves_and_orders(tmp_path: Path) -> None:
    names = []
    for i in range(3):
        src = tmp_path / f"q{i}.dcm"
        src.write_bytes(b"x%d" % i)
        p = enqueue_outbox(tmp_path / "state", "pacs", src, {"sop_uid": f"1.2.{i}"})
        assert not src.exists() and p.exists()
        names.append(p.name)
    listed = list_outbox(tmp_path / "state" / "spool" / "outbox" / "pacs")
    assert listed == names == sorted(names)  # FIFO by name


def test_sent_ledger_survives_reopen_and_expires(tmp_path: Path) -> None:
    path = tmp_path / "sent" / "pacs.log"
    led = SentLedger(path, retention_s=3600)
    led.add("1.2.3")
    led.add("1.2.3")
    assert "1.2.3" in led and len(led) == 1
    led.close()
    with path.open("a") as fh:  # an old entry beyond retention, and a corrupt line
        fh.write(f"1.2.4\t{time.time() - 7200:.3f}\ngarbage\n")
    led2 = SentLedger(path, retention_s=3600)
    assert "1.2.3" in led2 and "1.2.4" not in led2
    assert "garbage" not in path.read_text()
    led2.close()


def test_clear_tmp(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path)
    layout.create()
    (layout.tmp / "rx-partial.dcm").write_bytes(b"half")
    assert layout.clear_tmp() == 1 and not any(layout.tmp.iterdir())


def test_receipt_metadata_on_the_inode_or_sidecar(tmp_path: Path) -> None:
    from gateway.spool import read_meta, set_meta_xattr

    p = tmp_path / "1.2.3.dcm"
    with p.open("wb") as fh:
        fh.write(b"data")
        on_inode = set_meta_xattr(fh.fileno(), {"calling_ae": "CR1", "seq": "7"})
    moved = tmp_path / "moved.dcm"
    os.replace(p, moved)  # the xattr travels with the inode through the rename
    if on_inode:
        assert read_meta(moved) == {"calling_ae": "CR1", "seq": "7"}
    side = tmp_path / "2.dcm"
    side.write_bytes(b"x")
    side.with_suffix(".json").write_text('{"calling_ae": "CR2"}')
    assert read_meta(side) == {"calling_ae": "CR2"}  # filesystems without user xattrs
    assert read_meta(tmp_path / "absent.dcm") == {}


def test_stale_partial_receives_swept(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path)
    layout.create()
    old, fresh = layout.tmp / "rx-old.dcm", layout.tmp / "rx-live.dcm"
    old.write_bytes(b"aborted")
    fresh.write_bytes(b"arriving")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert layout.clear_stale_tmp(600) == 1
    assert not old.exists() and fresh.exists()


def test_sent_ledger_memory_is_bounded_by_its_retention(tmp_path: Path) -> None:
    """Issue 20, defect 6c: a long-running forwarder's ledger forgets (in memory and on disk)
    what is older than the retention, as a restart would, instead of growing for ever."""
    path = tmp_path / "sent" / "pacs.log"
    led = SentLedger(path, retention_s=0.5)
    for i in range(50):
        led.add(f"1.2.{i}")
    assert len(led) == 50 and "1.2.0" in led
    time.sleep(0.7)
    for i in range(50, 60):
        led.add(f"1.2.{i}")
    assert "1.2.0" not in led and "1.2.55" in led
    assert len(led._uids) == 10  # the expired 50 are gone from memory
    led.close()


def test_sent_ledger_cap_keeps_idempotency_for_the_whole_window(tmp_path: Path) -> None:
    """Past ``max_cached`` entries the oldest leave memory but not the ledger: a lookup that
    misses memory consults the file, so every UID of the retention window is still known."""
    path = tmp_path / "sent" / "pacs.log"
    led = SentLedger(path, retention_s=3600, max_cached=100)
    for i in range(2500):  # past the first Bloom filter's capacity (1024): it is rebuilt larger
        led.add(f"1.3.{i}")
    assert len(led._uids) <= 100 and len(led) == 2500
    assert all(f"1.3.{i}" in led for i in range(0, 2500, 37))
    reads = 0
    real_read = led._read

    def counting_read(cutoff: float):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return real_read(cutoff)

    led._read = counting_read  # type: ignore[method-assign]
    assert not any(f"2.9.{i}" in led for i in range(2000))  # new UIDs: no file read, or rare
    assert reads <= 20
    sent_at = led.sent_at("1.3.0")
    assert sent_at is not None and abs(sent_at - time.time()) < 60
    led.close()
    led2 = SentLedger(path, retention_s=3600, max_cached=100)  # a restart: still bounded
    assert len(led2._uids) <= 100 and "1.3.0" in led2 and "1.3.2499" in led2
    led2.close()


def test_sent_ledger_file_is_compacted_while_running(tmp_path: Path) -> None:
    path = tmp_path / "sent" / "pacs.log"
    led = SentLedger(path, retention_s=0.3)
    for i in range(3000):
        led.add(f"1.4.{i}")
    time.sleep(0.4)
    for i in range(3000, 6000):
        led.add(f"1.4.{i}")
    led.close()
    lines = path.read_text().splitlines()
    assert len(lines) < 4500  # the first 3000, expired, were compacted away while running
    assert lines[-1].startswith("1.4.5999\t")


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "/etc", "x" * 65, "a\0b"])
def test_spool_paths_refuse_destination_names_that_leave_their_directory(
        tmp_path: Path, name: str) -> None:
    """Issue 20, defect 5 (defence in depth): whatever a caller passes, an outbox, dead-letter
    or ledger path is a plain name inside its directory under the state directory."""
    layout = SpoolLayout(tmp_path / "state")
    for make in (layout.outbox, layout.dead, layout.sent_log):
        with pytest.raises(ValueError, match="destination"):
            make(name)
    src = tmp_path / "x.dcm"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="destination"):
        place_in_outboxes(layout, (name,), src, {"sop_uid": "1.2"}, remove_src=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["x.dcm"]
