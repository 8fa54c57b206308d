"""The quarantine store: put/list/get/release/purge/expire round trip with real DICOM files,
crash leftovers recovered, UIDs that could escape the folder refused, operator actions audited."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.audit import AuditLog, verify
from gateway.quarantine import (
    SIDECAR_INVALID,
    SIDECAR_MISSING,
    NotQuarantined,
    Quarantine,
    QuarantineRecord,
    check_uid,
    new_record,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_dicom(
    path: Path, sop_uid: str, study_uid: str, rows: int = 96, cols: int = 80, seed: int = 0
) -> Path:
    """A small 12-bit CR instance with a smooth gradient plus noise, written as a real file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.Modality = "CR"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID-0042"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    pixels = 1000 + 10 * yy + 5 * xx + rng.integers(0, 50, size=(rows, cols))
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def record_for(sop_uid: str, study_uid: str, **overrides: object) -> QuarantineRecord:
    values: dict[str, object] = {
        "sop_uid": sop_uid,
        "study_uid": study_uid,
        "series_uid": study_uid + ".1",
        "sop_class": CR_STORAGE,
        "modality": "CR",
        "reason": "flagged",
        "score": 0.91,
        "p_cnn": 0.88,
        "p_rf": 0.95,
        "threshold": 0.5,
        "rule": "chest-cr",
        "bundle_id": "fixture-1",
        "calling_ae": "CR_ROOM1",
        "peer": "127.0.0.1",
        "destinations": ("pacs", "archive"),
        "received_at": "2026-11-25T10:00:00.000Z",
    }
    values.update(overrides)
    return new_record(**values)


@pytest.fixture()
def spooled(tmp_path: Path) -> Path:
    return make_dicom(tmp_path / "spool" / "incoming" / "1.2.3.4.dcm", "1.2.3.4", "1.2.3")


def test_put_list_get_round_trip(tmp_path: Path, spooled: Path) -> None:
    original = spooled.read_bytes()
    q = Quarantine(tmp_path / "quarantine")
    held = q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    assert held == tmp_path / "quarantine" / "1.2.3" / "1.2.3.4.dcm"
    assert held.read_bytes() == original and not spooled.exists()
    sidecar = json.loads(held.with_suffix(".json").read_text())
    assert sidecar["reason"] == "flagged" and sidecar["destinations"] == ["pacs", "archive"]
    (record,) = q.list()
    assert record == q.get("1.2.3.4") == QuarantineRecord.from_json(record.to_json())
    assert record.destinations == ("pacs", "archive") and record.score == 0.91
    assert q.get("9.9.9") is None
    assert not list(held.parent.glob(".*.tmp"))  # no temp files left behind


def test_put_twice_is_idempotent(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    for score in (0.7, 0.8):
        src = make_dicom(tmp_path / "in" / "1.5.dcm", "1.5", "1.4")
        q.put(src, record_for("1.5", "1.4", score=score))
    (record,) = q.list()
    assert record.score == 0.8


def test_release_enqueues_the_same_bytes_and_audits(tmp_path: Path, spooled: Path) -> None:
    original = spooled.read_bytes()
    log = AuditLog(tmp_path / "audit.jsonl")
    q = Quarantine(tmp_path / "q", audit=log)
    q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    sent: list[tuple[bytes, tuple[str, ...]]] = []
    q.release(
        "1.2.3.4",
        reason="false positive, checked with the modality",
        actor="alice",
        enqueue=lambda path, rec: sent.append((path.read_bytes(), rec.destinations)),
    )
    assert sent == [(original, ("pacs", "archive"))]
    assert q.list() == [] and not (tmp_path / "q" / "1.2.3").exists()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["destination"], e["actor"]) for e in events] == [
        ("released", "pacs", "alice"),
        ("released", "archive", "alice"),
    ]
    assert verify(tmp_path / "audit.jsonl").ok


def test_release_needs_a_reason_and_keeps_the_instance_when_enqueue_fails(
    tmp_path: Path, spooled: Path
) -> None:
    q = Quarantine(tmp_path / "q")
    q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    with pytest.raises(ValueError, match="reason"):
        q.release("1.2.3.4", reason="  ", actor="alice", enqueue=lambda p, r: None)

    def broken(path: Path, record: QuarantineRecord) -> None:
        raise OSError("outbox disk full")

    with pytest.raises(OSError, match="disk full"):
        q.release("1.2.3.4", reason="ok", actor="alice", enqueue=broken)
    assert [r.sop_uid for r in q.list()] == ["1.2.3.4"]  # still held, nothing lost
    with pytest.raises(NotQuarantined):
        q.release("7.7.7", reason="ok", actor="alice", enqueue=lambda p, r: None)


def test_release_to_other_destinations(tmp_path: Path, spooled: Path) -> None:
    q = Quarantine(tmp_path / "q")
    q.put(spooled, record_for("1.2.3.4", "1.2.3", destinations=()))
    with pytest.raises(ValueError, match="no recorded destination"):
        q.release("1.2.3.4", reason="ok", actor="bob", enqueue=lambda p, r: None)
    seen: list[tuple[str, ...]] = []
    q.release(
        "1.2.3.4",
        reason="ok",
        actor="bob",
        enqueue=lambda p, r: seen.append(r.destinations),
        destinations=["research"],
    )
    assert seen == [("research",)]


def test_purge_instance_and_study_are_audited(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    q = Quarantine(tmp_path / "q", audit=log)
    for sop in ("1.2.3.1", "1.2.3.2", "1.2.3.3"):
        q.put(make_dicom(tmp_path / "in" / f"{sop}.dcm", sop, "1.2.3"), record_for(sop, "1.2.3"))
    q.put(make_dicom(tmp_path / "in" / "5.1.dcm", "5.1", "5"), record_for("5.1", "5"))

    assert [r.sop_uid for r in q.purge("1.2.3.2", actor="carol", reason="duplicate")] == [
        "1.2.3.2"
    ]
    purged = q.purge("1.2.3", actor="carol", reason="study withdrawn")
    assert sorted(r.sop_uid for r in purged) == ["1.2.3.1", "1.2.3.3"]
    assert not (tmp_path / "q" / "1.2.3").exists()
    assert [r.sop_uid for r in q.list()] == ["5.1"]
    with pytest.raises(NotQuarantined):
        q.purge("1.2.3.2", actor="carol", reason="again")
    with pytest.raises(ValueError, match="reason"):
        q.purge("5.1", actor="carol", reason="")
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["purged"] * 3
    assert {e["reason"] for e in events} == {"duplicate", "study withdrawn"}
    assert verify(tmp_path / "audit.jsonl").ok


def test_expire_purges_by_age(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    q = Quarantine(tmp_path / "q", audit=log)
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    for sop, days in (("1.1", 100), ("1.2", 89), ("1.3", 91)):
        when = (now - timedelta(days=days)).isoformat(timespec="milliseconds")
        record = record_for(sop, "1", quarantined_at=when.replace("+00:00", "Z"))
        q.put(make_dicom(tmp_path / "in" / f"{sop}.dcm", sop, "1"), record)
    purged = q.expire(timedelta(days=90), now=now)
    assert sorted(r.sop_uid for r in purged) == ["1.1", "1.3"]
    assert [r.sop_uid for r in q.list()] == ["1.2"]
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {(e["actor"], e["reason"]) for e in events} == {
        ("retention", "retention: held longer than 90 days")
    }


@pytest.mark.parametrize(
    "uid", ["..", "../etc", "1.2/../../x", "1.2.3a", "/abs", "", "1..2", "1." * 40 + "1", "1 2"]
)
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    q = Quarantine(tmp_path / "q")
    with pytest.raises(ValueError, match="not a DICOM UID"):
        check_uid(uid)
    with pytest.raises(ValueError):
        record_for("1.2.3.4", uid)
    with pytest.raises(ValueError):
        q.purge(uid, actor="x", reason="y")
    with pytest.raises(ValueError):
        q.get(uid)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("forged", ['"../../1"', '"7.7.7"', "garbage"])
def test_edited_sidecar_is_listed_from_the_header(
    tmp_path: Path, spooled: Path, forged: str
) -> None:
    q = Quarantine(tmp_path / "q")
    held = q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    sidecar = held.with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace('"1.2.3.4"', forged))
    (record,) = q.list()
    assert record.reason == SIDECAR_INVALID and record.sop_uid == "1.2.3.4"
    assert record.modality == "CR" and record.score is None


def test_crash_between_sidecar_and_move_is_recovered(tmp_path: Path, spooled: Path) -> None:
    """Simulate a crash after step 1 of put: a sidecar without its instance, the instance still
    in the spool. list() ignores the stray sidecar, recover() removes it, put again works."""
    q = Quarantine(tmp_path / "q")
    stray = tmp_path / "q" / "1.2.3" / "1.2.3.4.json"
    stray.parent.mkdir(parents=True)
    stray.write_text(record_for("1.2.3.4", "1.2.3").to_json())
    (stray.parent / ".1.2.3.4.json.tmp").write_text("{")
    assert q.list() == [] and q.get("1.2.3.4") is None
    assert sorted(p.name for p in q.recover()) == [".1.2.3.4.json.tmp", "1.2.3.4.json"]
    q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    assert [r.sop_uid for r in q.list()] == ["1.2.3.4"]


def test_instance_without_sidecar_is_still_listed(tmp_path: Path, spooled: Path) -> None:
    q = Quarantine(tmp_path / "q")
    held = q.put(spooled, record_for("1.2.3.4", "1.2.3"))
    held.with_suffix(".json").unlink()
    (record,) = q.list()
    assert record.reason == SIDECAR_MISSING and record.sop_uid == "1.2.3.4"
    assert record.series_uid == "1.2.3.1" and record.modality == "CR"


def test_put_of_a_missing_file_leaves_nothing(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    with pytest.raises(FileNotFoundError):
        q.put(tmp_path / "gone.dcm", record_for("1.2.3.4", "1.2.3"))
    assert q.list() == [] and q.recover() == []


def test_real_nema_cr_round_trip(tmp_path: Path, nema_dir: Path) -> None:
    src = tmp_path / "spool" / "RG1.dcm"
    src.parent.mkdir()
    shutil.copyfile(nema_dir / "RG1_UNCR.dcm", src)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    digest = src.read_bytes()
    q = Quarantine(tmp_path / "q")
    rec = record_for(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    held = q.put(src, rec)
    assert held.read_bytes() == digest
    assert q.get(str(ds.SOPInstanceUID)) == rec


def test_put_racing_purge_of_the_same_study_loses_nothing(tmp_path: Path) -> None:
    """The daemon quarantines instances of a study while an operator purges that study: every
    instance ends either purged (and returned) or held, never both, never neither."""
    import contextlib
    import threading

    q = Quarantine(tmp_path / "q")
    sops = [f"1.9.{i}" for i in range(30)]
    sources = [make_dicom(tmp_path / "in" / f"{sop}.dcm", sop, "1.9", rows=8, cols=8)
               for sop in sops]
    purged: list[str] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def putter() -> None:
        try:
            for sop, src in zip(sops, sources, strict=True):
                q.put(src, record_for(sop, "1.9"))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    def purger() -> None:
        while not done.is_set():
            with contextlib.suppress(NotQuarantined):  # the study folder is gone right now
                purged.extend(r.sop_uid for r in q.purge("1.9", actor="op", reason="race"))

    threads = [threading.Thread(target=putter), threading.Thread(target=purger)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r.sop_uid for r in q.list()]
    assert errors == []
    assert sorted(purged + held) == sorted(sops) and not set(purged) & set(held)


def test_sidecars_from_before_the_gate_still_load() -> None:
    """grid_peaks (the bundle's stride-grid gate feature) round-trips; a sidecar written before
    bundles had a gate has no such key and still loads (None), a sidecar without a required
    key is still refused."""
    rec = record_for("1.2.3.4", "1.2.3", grid_peaks=1.46)
    assert QuarantineRecord.from_json(rec.to_json()).grid_peaks == 1.46
    old = json.loads(rec.to_json())
    del old["grid_peaks"]
    assert QuarantineRecord.from_json(json.dumps(old)).grid_peaks is None
    del old["score"]
    with pytest.raises(ValueError, match="lacks"):
        QuarantineRecord.from_json(json.dumps(old))
