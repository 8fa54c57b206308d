"""The audit log: append-only JSON lines, each chained to the one before by SHA-256.

Why it looks like this
- One JSON object per line, so ``grep`` and ``jq`` work and a torn write damages one line only.
- Every line carries ``prev``: the SHA-256 (hex) of the previous line's bytes (the line without
  its newline; 64 zeros for the first line). Editing, deleting, inserting or reordering a line
  breaks the link at that place, and ``verify`` names the line.
- Every line also ends with ``hash``: the SHA-256 of the line's own bytes up to that field (the
  line as it would read without ``,"hash":"..."``). It lets ``verify`` name the *edited* line
  itself, not just the line after it.
- Field names come from a whitelist of non-PHI names (UIDs, AE titles, scores, ...). A key that
  is not on it raises ``ValueError``: this is how patient names and IDs stay out of the log.
  Free-text fields (reason, detail, error) are capped in length; callers must not put DICOM
  attribute values in them.
- Durability: ``append`` returns only after its line is fsync'd. Lines are written with one
  ``write()`` per batch, which a power loss or (rarely, for a write that spans pages) a SIGKILL
  can cut short. Such a torn last line (no newline) is reported by ``verify`` as bad; the next
  append seals it with a newline and chains over its bytes, so appending never stops, nothing
  is deleted, and ``verify`` from then on lists it under ``torn_lines`` (a crash, not a break).
- Concurrency: ``fcntl.flock`` on the file around "read the last line, hash it, append", so the
  daemon and the CLI can write the same file; within a process, group commit (appends arriving
  during a write go out together in the next write + fsync), so busy threads share fsyncs.

What the chain cannot prove: that lines were not cut off the *end* of the file, or that someone
with write access did not rewrite the whole tail consistently. ``verify`` reports the hash of the
last line (``head``); record it elsewhere (a ticket, a second host) to anchor the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
LOG = logging.getLogger("sentinel.audit")

EVENTS: frozenset[str] = frozenset(
    {
        "association",
        "received",
        "rejected",
        "scored",
        "forwarded",
        "forward-failed",
        "dead-letter",
        # the forwarder did not send an instance because its SOP Instance UID was already
        # delivered to that destination (idempotency per UID): audited, because an operator's
        # release may be what was dropped
        "duplicate-dropped",
        "quarantined",
        "released",
        "purged",
        "config-loaded",
        "config-rejected",
        # Storage Commitment (gateway.commitment): a request taken on or refused, its report
        # (with counts), each instance reported as failed (with the reason kept off the wire),
        # and a report given up after forwarding.max_age_s
        "commit-requested",
        "commit-refused",
        "commit-reported",
        "commit-failed",
        "commit-abandoned",
        # the review console (gateway.console): an image or heat map shown to a user (PHI
        # access: actor, sop_uid, time), sign-ins, lockouts, account changes, and a release
        # waiting for a second reviewer
        "image-viewed",
        "console-login",
        "console-login-failed",
        "console-locked",
        "console-user",
        "release-requested",
        # a webhook alert given up (past forwarding.max_age_s, or unreadable): moved to
        # <state>/alerts/dead/ and recorded here, so a lost alert is itself on the record
        "alert-dead",
    }
)

# Names only; the values are UIDs, AE titles, addresses, numbers and short operator text.
FIELDS: frozenset[str] = frozenset(
    {
        "calling_ae",
        "called_ae",
        "peer",
        "study_uid",
        "series_uid",
        "sop_uid",
        "sop_class",
        "modality",
        "score",
        "p_cnn",
        "p_rf",
        "grid_peaks",
        "line_peak",  # the resampling-line score, with the site's line_gate beside it
        "line_gate",
        "cnn_peak",  # the detector CNN's highest probability, with the site's cnn_gate beside it
        "cnn_gate",
        "line_ramp",  # the site's line ramp below its line_gate (detector.scoring)
        "threshold",
        "bundle_id",
        "rule",
        "destination",
        "latency_ms",
        "actor",  # the account of the real uid of an operator command
        "sudo_user",  # what SUDO_USER said beside it: a claim the caller controls
        "reason",
        "outcome",  # what an operator action actually did (e.g. queued, queued-duplicate)
        "verdict",
        "status",
        "detail",
        "config_path",
        "attempts",
        "error",
        "suppressed",  # refusals of the same kind from the same peer left out of the audit
        "transaction_uid",  # a Storage Commitment request's Transaction UID
        "instances",  # how many instances a commitment request listed
        "success",  # how many of them were reported committed
        "failed",  # how many of them were reported failed
    }
)

# Keys the log writes itself; a caller cannot set them.
_RESERVED = ("time", "event", "prev", "hash")
MAX_TEXT = 1000  # characters per string value: a message, never a dump of a dataset
_HASH_SUFFIX_LEN = len(',"hash":""}') + 64


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now_iso() -> str:
    """UTC time as ISO 8601 with milliseconds and a 'Z' (the log's one time format)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time; a time without a zone is taken as UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _clean_value(key: str, value: Any) -> str | int | float | bool | None:
    """Accept JSON scalars only (numpy scalars become Python ones); refuse anything else."""
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > MAX_TEXT:
            return value[: MAX_TEXT - 3] + "..."
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {key!r}: {value} is not a finite number")
        return value
    raise ValueError(
        f"audit field {key!r}: {type(value).__name__} is not allowed "
        "(use a string, number, boolean or None)"
    )


def encode_line(event: str, time: str, prev: str, fields: dict[str, Any]) -> bytes:
    """The bytes of one audit line (no newline): the record, then its own ``hash``."""
    body = json.dumps(
        {"time": time, "event": event, **fields, "prev": prev},
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    ).encode("ascii")
    return body[:-1] + b',"hash":"' + _sha256(body).encode("ascii") + b'"}'


def _check_record(event: str, fields: dict[str, Any]) -> dict[str, Any]:
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; known: {', '.join(sorted(EVENTS))}")
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ValueError(
            f"audit fields {unknown} are not on the non-PHI whitelist "
            f"(gateway.audit.FIELDS); log UIDs and AE titles, never patient data"
        )
    return {k: _clean_value(k, v) for k, v in fields.items()}


def _last_line(fd: int, size: int) -> tuple[bytes, bool]:
    """The file's last line (without newline) and whether it is complete (ends in a newline)."""
    if size == 0:
        return b"", True
    complete = os.pread(fd, 1, size - 1) == b"\n"
    pos = size - 1 if complete else size
    buf = b""  # always the bytes [pos, end of the last line)
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        nl = buf.rfind(b"\n")
        if nl >= 0:
            return buf[nl + 1 :], complete
    return buf, complete


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Pending:
    """One append waiting for the group commit that writes it."""

    event: str
    fields: dict[str, Any]
    record: dict[str, Any] | None = None
    error: BaseException | None = None
    done: bool = False


class AuditLog:
    """Appends hash-chained audit lines to one file; safe across threads and processes.

    Group commit: appends that arrive while a write is in progress are queued; the next thread to
    write takes the whole queue and writes it as one ``write`` + one ``fsync``. Every caller still
    returns only after its own line is on disk, but under load many lines share one ``fsync``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False
        self._listeners: tuple[Callable[[dict[str, Any]], None], ...] = ()

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` with a copy of each record after its line is durably written.

        Why here: the audit is the one place every event passes through (gateway.alerts feeds on
        it), and a listener sees only what the log really holds. Listeners run in the appending
        thread, after the write, so they must be quick; what they raise is logged and dropped:
        an observer can never make an audit append fail.
        """
        with self._cond:
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        with self._cond:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def _notify(self, record: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(dict(record))
            except Exception:
                LOG.exception("audit listener %r failed on a %r record (ignored)",
                              listener, record.get("event"))

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event durably (fsync) and return the record as written.

        Raises ValueError for an unknown event, a field name off the whitelist, or a value that
        is not a JSON scalar; OSError when the line could not be written.
        """
        return self.append_many([(event, fields)])[0]

    def append_many(self, events: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Write several events durably, in this order, sharing one write and one fsync; return
        the records as written. Why: the Orthanc plugin answers the modality only after an
        instance's lines are on disk, and one fsync per instance instead of two or three is
        most of its audit cost. Raises as ``append`` (nothing is written if one is invalid)."""
        if not events:
            return []
        items = []
        for event, fields in events:
            for key in _RESERVED:
                if key in fields:
                    raise ValueError(f"audit field {key!r} is written by the log itself")
            items.append(_Pending(event, _check_record(event, fields)))
        with self._cond:
            self._queue.extend(items)  # one batch takes the whole queue: these stay together
            while not items[-1].done:
                if self._writing:
                    self._cond.wait()
                    continue
                batch, self._queue, self._writing = self._queue, [], True
                self._cond.release()
                try:
                    self._write_batch(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    for pending in batch:
                        pending.done = True
                    self._cond.notify_all()
        records = []
        for item in items:
            if item.error is not None:
                raise item.error
            assert item.record is not None
            records.append(item.record)
        if self._listeners:
            for record in records:
                self._notify(record)
        return records

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Under ``flock``: read the last line, chain the batch onto it, one write, one fsync."""
        try:
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # other processes: the CLI, a second daemon
                size = os.fstat(fd).st_size
                last, complete = _last_line(fd, size)
                prev = _sha256(last) if size else GENESIS
                # A torn last line is sealed with a newline and chained over, not removed.
                data = [b"" if complete else b"\n"]
                for item in batch:
                    time = utc_now_iso()
                    line = encode_line(item.event, time, prev, item.fields)
                    data.append(line + b"\n")
                    item.record = {"time": time, "event": item.event, **item.fields, "prev": prev}
                    prev = _sha256(line)
                _write_all(fd, b"".join(data))
                os.fsync(fd)
            finally:
                os.close(fd)  # also releases the flock
            if created:
                _fsync_dir(self.path.parent)
        except BaseException as exc:  # every caller in the batch learns its line is not written
            for item in batch:
                item.record, item.error = None, exc
            raise


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify``: ``first_bad_line`` is 1-based; ``head`` is the last good line's
    SHA-256 (record it elsewhere to detect lines cut off the end); ``torn_lines`` are writes cut
    short by a crash that a later append sealed and chained over (evidence of a crash, not a
    break in the chain)."""

    ok: bool
    lines_checked: int
    first_bad_line: int | None
    reason: str
    head: str = GENESIS
    torn_lines: tuple[int, ...] = ()


NOT_A_RECORD = "not a complete JSON record (a torn write, or edited by hand)"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _check_line(line: bytes, record: dict[str, Any], expected_prev: str) -> str | None:
    """Why this parsed line is bad, or None when it is intact and linked to the line before."""
    own = record.get("hash")
    if not isinstance(own, str) or len(line) < _HASH_SUFFIX_LEN:
        return "has no 'hash' field (not written by the audit log)"
    suffix = f',"hash":"{own}"}}'.encode()
    if not line.endswith(suffix) or _sha256(line[: -len(suffix)] + b"}") != own:
        return "its content does not match its own hash (the line was edited)"
    if record.get("prev") != expected_prev:
        return (
            "'prev' does not match the SHA-256 of the line before it "
            "(a line before it was removed, inserted, moved or rewritten)"
        )
    if record.get("event") not in EVENTS:
        return f"unknown event {record.get('event')!r}"
    extra = set(record) - FIELDS - set(_RESERVED)
    if extra:
        return f"fields off the whitelist: {sorted(extra)}"
    return None


def _lines_up_to(f: Any, limit: int) -> Iterator[bytes]:
    """The lines of ``f`` that lie within its first ``limit`` bytes."""
    left = limit
    while left > 0:
        raw = f.readline(left)
        if not raw:
            return
        left -= len(raw)
        yield raw


def verify(path: Path, limit: int | None = None) -> VerifyResult:
    """Check every line's own hash and its link to the previous line; stop at the first bad one.

    A line that is not a JSON record counts as a sealed torn write (listed in ``torn_lines``)
    only when the next line is a valid record chained over its bytes, which is what ``append``
    writes after a crash; otherwise it is the first bad line. A last line without its newline is
    a torn write nobody has sealed yet, reported as bad (it is also what cutting the end of the
    last line looks like). Raises OSError when the file cannot be read.

    ``limit``: check only the first ``limit`` bytes (a size taken by ``locked_size`` while no
    append was in progress), so that a check beside a running writer never mistakes the line
    being written for a torn one.
    """
    expected = GENESIS
    torn: list[int] = []
    suspect: int | None = None  # a non-record line, waiting for the next line to chain over it
    n = 0

    def bad(line_no: int, why: str) -> VerifyResult:
        return VerifyResult(False, n, line_no, f"line {line_no}: {why}", expected, tuple(torn))

    with open(path, "rb") as f:
        for n, raw in enumerate(f if limit is None else _lines_up_to(f, limit), start=1):
            if not raw.endswith(b"\n"):
                return bad(n, "the last line has no newline (a torn write: crash mid-append)")
            line = raw[:-1]
            record = _parse(line)
            if record is None:
                if suspect is not None:
                    return bad(suspect, NOT_A_RECORD)
                suspect, expected = n, _sha256(line)
                continue
            if suspect is not None:
                if record.get("prev") != expected:
                    return bad(suspect, NOT_A_RECORD + "; the next line does not chain over it")
                torn.append(suspect)
                suspect = None
            why = _check_line(line, record, expected)
            if why:
                return bad(n, why)
            expected = _sha256(line)
    if suspect is not None:
        return bad(suspect, NOT_A_RECORD)
    reason = f"{n} lines, chain intact"
    if torn:
        reason += f"; torn writes from a crash, sealed and chained over, at lines {torn}"
    return VerifyResult(True, n, None, reason, expected, tuple(torn))


def locked_size(path: Path) -> int:
    """The file's size between two appends (taken under a shared ``flock``, which ``append``'s
    exclusive one excludes): every byte before it belongs to a complete write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def find_line_hash(path: Path, digest: str) -> int | None:
    """The 1-based number of the line whose SHA-256 is ``digest`` (a ``head`` written down
    earlier), or None: if it is gone, lines up to it were removed or rewritten."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if _sha256(raw.rstrip(b"\n")) == digest.lower():
                return n
    return None


def query(
    path: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    event: str | None = None,
    calling_ae: str | None = None,
    study_uid: str | None = None,
    verdict: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records that match every given filter, in file order.

    ``since`` is inclusive, ``until`` exclusive; naive datetimes are taken as UTC. Lines that
    do not parse are skipped here: ``verify`` is the tool that reports them.
    """
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    wanted = {"event": event, "calling_ae": calling_ae, "study_uid": study_uid, "verdict": verdict}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if any(record.get(k) != v for k, v in wanted.items()):
                continue
            if since is not None or until is not None:
                try:
                    when = parse_time(str(record.get("time", "")))
                except ValueError:
                    continue
                if since is not None and when < since:
                    continue
                if until is not None and when >= until:
                    continue
            yield record
