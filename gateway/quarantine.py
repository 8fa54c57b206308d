"""The quarantine: flagged instances held on disk, one folder per study, until a person decides.

Layout: ``<root>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (the bytes as received, moved, never
re-encoded) plus ``<SOPInstanceUID>.json`` (a ``QuarantineRecord``: why, score and its parts,
rule, bundle, caller, times, destinations).

Crash safety of ``put`` (the order is the point):
 1. the sidecar is written tmp -> fsync -> rename -> fsync(study dir);
 2. the instance is moved with one atomic ``rename`` from the spool (the commit point), then the
    study dir and the spool dir are fsync'd.
A crash before step 2 leaves the instance in the spool (the daemon screens it again after restart
and calls ``put`` again, which overwrites the sidecar) and at most a sidecar without an instance,
which ``list`` ignores and ``recover`` removes. A crash after step 2 leaves a complete entry. The
instance is never in neither place. ``release`` and ``purge`` remove the instance first and the
sidecar last, so a crash half-way leaves the same harmless "sidecar without instance" state.
An instance found without a valid sidecar (deleted or edited by hand) is still listed, with
reason ``sidecar-missing`` or ``sidecar-invalid`` and the UIDs read from its header: nothing in
the quarantine is invisible.

UIDs become path parts, so they are checked first: digits and dots only, at most 64 characters
(the DICOM UI rule); anything else (``..``, ``/``, letters) is refused with ``ValueError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog, parse_time, utc_now_iso

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
SIDECAR_MISSING = "sidecar-missing"
SIDECAR_INVALID = "sidecar-invalid"


def check_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` when it is safe as a file name (digits and dots, <= 64 chars), else raise."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        raise ValueError(
            f"{what} {uid!r} is not a DICOM UID (digits and dots only, at most 64 characters); "
            "refused as a path part"
        )
    return uid


class NotQuarantined(LookupError):
    """The SOP Instance or Study UID is not in the quarantine."""


@dataclass(frozen=True)
class QuarantineRecord:
    """Why one instance is held, and what is needed to send it on after review."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    modality: str
    reason: str  # "flagged" or a detector error reason ("unreadable", "too-large", ...)
    score: float | None
    p_cnn: float | None
    p_rf: float | None
    threshold: float | None
    rule: str
    bundle_id: str
    calling_ae: str
    peer: str
    destinations: tuple[str, ...]
    received_at: str  # UTC ISO 8601
    quarantined_at: str  # UTC ISO 8601
    # the bundle's stride-grid gate feature (detector.scoring); None without a gate, and in
    # sidecars written before bundles had one
    grid_peaks: float | None = None
    # the resampling-line score and the site's line gate (detector.resample_lines); None where
    # the site has no line gate. A line at or above the gate flags an image whatever its score.
    line_peak: float | None = None
    line_gate: float | None = None
    # the detector CNN's highest probability and the site's CNN gate
    # (detector.scoring.apply_cnn_gate); None where the site has no CNN gate
    cnn_peak: float | None = None
    cnn_gate: float | None = None
    # the site's line ramp (detector.scoring.apply_line_ramp); None where the site has none
    line_ramp: float | None = None

    def __post_init__(self) -> None:
        check_uid(self.sop_uid, "SOPInstanceUID")
        check_uid(self.study_uid, "StudyInstanceUID")
        object.__setattr__(self, "destinations", tuple(self.destinations))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuarantineRecord:
        data: dict[str, Any] = json.loads(text)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"quarantine sidecar lacks {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """tmp -> fsync -> rename -> fsync(dir): the file is either the old one or the whole new one.
    (Also the review console's users file, with ``mode`` 0o600.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _move_durably(src: Path, dst: Path) -> None:
    """Atomic rename into place; across filesystems, copy to a temp file beside ``dst`` first."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        src.unlink()
    _fsync_dir(dst.parent)
    _fsync_dir(src.parent)


def _record_from_header(dcm: Path, reason: str) -> QuarantineRecord:
    """A record for an instance whose sidecar is gone, from its own header (UIDs only)."""
    import pydicom  # lazy: only needed for this rare repair path

    try:
        ds = pydicom.dcmread(dcm, stop_before_pixels=True, force=True)
    except Exception:  # an unreadable instance (often why it is held): list it all the same
        ds = pydicom.Dataset()
    mtime = datetime.fromtimestamp(dcm.stat().st_mtime, UTC)
    when = mtime.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return QuarantineRecord(
        sop_uid=dcm.stem,
        study_uid=dcm.parent.name,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_class=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        reason=reason,
        score=None,
        p_cnn=None,
        p_rf=None,
        threshold=None,
        rule="",
        bundle_id="",
        calling_ae="",
        peer="",
        destinations=(),
        received_at=when,
        quarantined_at=when,
    )


class Quarantine:
    """The quarantine folder. With ``audit`` given, release, purge and expire are audited here
    (``put`` is audited by its caller, which knows the verdict and latency)."""

    def __init__(self, root: Path, audit: AuditLog | None = None) -> None:
        self.root = Path(root)
        self.audit = audit

    # -- paths -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _dir_lock(self) -> Iterator[None]:
        """Serialise creating and removing study folders (threads and processes: flock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        # read-only and world-readable: whichever account creates it, the daemon can lock it
        fd = os.open(self.root / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _dir(self, study_uid: str) -> Path:
        return self.root / check_uid(study_uid, "StudyInstanceUID")

    def has_study(self, study_uid: str) -> bool:
        """Whether the quarantine holds a folder for this Study Instance UID."""
        return self._dir(study_uid).is_dir()

    def _find(self, sop_uid: str) -> Path | None:
        """The .dcm of a quarantined SOP Instance UID, whatever study it is filed under."""
        check_uid(sop_uid, "SOPInstanceUID")
        if not self.root.is_dir():
            return None
        for study in self.root.iterdir():
            dcm = study / f"{sop_uid}.dcm"
            if dcm.is_file():
                return dcm
        return None

    def instance_path(self, sop_uid: str) -> Path:
        """Where the held instance's bytes are (for ``show``); NotQuarantined if absent."""
        dcm = self._find(sop_uid)
        if dcm is None:
            raise NotQuarantined(f"SOP Instance {sop_uid} is not in the quarantine at {self.root}")
        return dcm

    # -- operations --------------------------------------------------------------------------

    def put(self, src: Path, record: QuarantineRecord) -> Path:
        """Move the spooled instance ``src`` into the quarantine with its sidecar; return where.

        Idempotent per SOP Instance UID: putting the same instance again replaces the entry.
        """
        study = self._dir(record.study_uid)
        dcm = study / f"{record.sop_uid}.dcm"
        if not Path(src).is_file():
            raise FileNotFoundError(f"quarantine put: {src} does not exist (nothing to hold)")
        # A release/purge must not remove the folder under our feet: not before the sidecar is
        # in it, and not between the move and the fsync of the folder that makes the move
        # durable (a purge of the study racing this put removed the folder there, and the
        # fsync raised FileNotFoundError for an instance that was purged as asked).
        with self._dir_lock():
            if not study.is_dir():
                study.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            _write_atomic(study / f"{record.sop_uid}.json", record.to_json().encode())
            _move_durably(Path(src), dcm)
        return dcm

    def _entries(self) -> Iterator[tuple[Path, Path]]:
        if not self.root.is_dir():
            return
        for study in sorted(self.root.iterdir()):
            if not study.is_dir() or not _UID.fullmatch(study.name):
                continue
            for dcm in sorted(study.glob("*.dcm")):
                if _UID.fullmatch(dcm.stem):
                    yield dcm, dcm.with_suffix(".json")

    def _load(self, dcm: Path, sidecar: Path) -> QuarantineRecord:
        """The sidecar's record; one from the instance's header when the sidecar is missing, or
        unreadable, or names another instance than its file (edited by hand)."""
        if not sidecar.is_file():
            return _record_from_header(dcm, SIDECAR_MISSING)
        try:
            record = QuarantineRecord.from_json(sidecar.read_text())
        except (ValueError, TypeError):
            return _record_from_header(dcm, SIDECAR_INVALID)
        if (record.sop_uid, record.study_uid) != (dcm.stem, dcm.parent.name):
            return _record_from_header(dcm, SIDECAR_INVALID)
        return record

    def list(self) -> list[QuarantineRecord]:
        """Every held instance, oldest first."""
        records = []
        for dcm, sidecar in self._entries():
            with contextlib.suppress(FileNotFoundError):  # released or purged meanwhile
                records.append(self._load(dcm, sidecar))
        return sorted(records, key=lambda r: (r.quarantined_at, r.sop_uid))

    def get(self, sop_uid: str) -> QuarantineRecord | None:
        dcm = self._find(sop_uid)
        return None if dcm is None else self._load(dcm, dcm.with_suffix(".json"))

    def get_in_study(self, study_uid: str, sop_uid: str) -> QuarantineRecord | None:
        """``get`` when the study is known (an audit line names it): one folder, not a search
        of every study's (the review console's index follows the audit log with this)."""
        dcm = self._dir(study_uid) / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        try:
            return self._load(dcm, dcm.with_suffix(".json")) if dcm.is_file() else None
        except FileNotFoundError:  # released or purged meanwhile
            return None

    def _remove(self, dcm: Path) -> None:
        """Instance first, sidecar last (see the module docstring), then an empty study dir."""
        dcm.unlink(missing_ok=True)  # an enqueue may have moved it already
        _fsync_dir(dcm.parent)
        dcm.with_suffix(".json").unlink(missing_ok=True)
        _fsync_dir(dcm.parent)
        self._remove_if_empty(dcm.parent)

    def _remove_if_empty(self, study: Path) -> None:
        with self._dir_lock(), contextlib.suppress(OSError):  # not empty: keep it
            study.rmdir()
            _fsync_dir(self.root)

    def release(
        self,
        sop_uid: str,
        *,
        reason: str,
        actor: str,
        enqueue: Callable[[Path, QuarantineRecord], None],
        destinations: Sequence[str] | None = None,
        sudo_user: str | None = None,
        outcomes: Mapping[str, str] | None = None,
    ) -> QuarantineRecord:
        """Send a held instance on without re-scoring, then remove it from the quarantine.

        ``enqueue(path, record)`` must queue the bytes durably (copy them) before it returns; a
        crash after it and before the removal leaves the instance both queued and held, and a
        second release queues the same SOP Instance UID again (forwarding is idempotent per UID).
        ``destinations`` overrides the ones recorded at quarantine time; ``enqueue`` sends to
        ``record.destinations`` of the record it is given. Each destination's ``released`` event
        carries ``outcome``: ``outcomes[destination]``, else ``queued`` (what the forwarder then
        does is its own event: ``forwarded``, ``duplicate-dropped``, ``dead-letter``).
        ``actor`` is the account that acts; ``sudo_user`` only what SUDO_USER claimed.
        """
        if not reason or not reason.strip():
            raise ValueError("release needs a non-empty reason (it goes into the audit log)")
        dcm = self.instance_path(sop_uid)
        record = self._load(dcm, dcm.with_suffix(".json"))
        if destinations is not None:
            record = replace(record, destinations=tuple(destinations))
        if not record.destinations:
            raise ValueError(
                f"SOP Instance {sop_uid} has no recorded destination: name one (--destination)"
            )
        enqueue(dcm, record)
        self._remove(dcm)
        if self.audit is not None:
            for destination in record.destinations:
                self.audit.append(
                    "released",
                    sop_uid=record.sop_uid,
                    study_uid=record.study_uid,
                    series_uid=record.series_uid,
                    destination=destination,
                    actor=actor,
                    **({"sudo_user": sudo_user} if sudo_user else {}),
                    reason=reason,
                    outcome=(outcomes or {}).get(destination, "queued"),
                )
        return record

    def purge(self, uid: str, *, actor: str, reason: str,
              sudo_user: str | None = None) -> list[QuarantineRecord]:
        """Delete one instance (SOP Instance UID) or a whole study (Study Instance UID)."""
        if not reason or not reason.strip():
            raise ValueError("purge needs a non-empty reason (it goes into the audit log)")
        study = self.root / check_uid(uid)
        if not study.is_dir():
            return [self._purge_one(self.instance_path(uid), actor=actor, reason=reason,
                                    sudo_user=sudo_user)]
        purged = [
            self._purge_one(dcm, actor=actor, reason=reason, sudo_user=sudo_user)
            for dcm, _ in list(self._entries())
            if dcm.parent == study
        ]
        self._remove_if_empty(study)  # strays of an interrupted put: recover() at start-up
        return purged

    def _purge_one(self, dcm: Path, *, actor: str, reason: str,
                   sudo_user: str | None = None) -> QuarantineRecord:
        record = self._load(dcm, dcm.with_suffix(".json"))
        self._remove(dcm)
        if self.audit is not None:
            self.audit.append(
                "purged",
                sop_uid=record.sop_uid,
                study_uid=record.study_uid,
                series_uid=record.series_uid,
                actor=actor,
                **({"sudo_user": sudo_user} if sudo_user else {}),
                reason=reason,
            )
        return record

    def expire(
        self,
        older_than: timedelta,
        now: datetime | None = None,
        *,
        actor: str = "retention",
        reason: str | None = None,
        sudo_user: str | None = None,
    ) -> list[QuarantineRecord]:
        """Purge every instance quarantined more than ``older_than`` ago (retention by age)."""
        now = now or datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        cutoff = now - older_than
        reason = reason or f"retention: held longer than {older_than / timedelta(days=1):g} days"
        purged = []
        for dcm, sidecar in list(self._entries()):
            record = self._load(dcm, sidecar)
            if parse_time(record.quarantined_at) < cutoff:
                purged.append(self._purge_one(dcm, actor=actor, reason=reason,
                                              sudo_user=sudo_user))
        return purged

    def recover(self) -> list[Path]:
        """Remove sidecars and temp files left by an interrupted put/release/purge; return them.

        Safe at any time the daemon is not in the middle of ``put`` (call it at start-up).
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for study in self.root.iterdir():
            if not study.is_dir():
                continue
            before = len(removed)
            for path in study.iterdir():
                stray_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
                orphan = path.suffix == ".json" and not path.with_suffix(".dcm").exists()
                if stray_tmp or orphan:
                    path.unlink()
                    removed.append(path)
            if len(removed) > before:
                _fsync_dir(study)
        return removed


def new_record(**values: Any) -> QuarantineRecord:
    """Build a record with ``quarantined_at`` defaulting to now (convenience for the daemon)."""
    values.setdefault("quarantined_at", utc_now_iso())
    return QuarantineRecord(**values)
