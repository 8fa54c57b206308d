"""What the console shows without reading the whole quarantine or audit log per page.

Why an index: a page of a 100,000-instance quarantine must not read 100,000 sidecars. The
console reads them once at start (``QuarantineIndex.rebuild``), then follows the audit log
(``AuditFollower``): every ``quarantined``, ``released`` and ``purged`` line, whoever wrote it
(the gateway, the CLI, this console), updates the index from that one instance's sidecar. The
same pass counts events per hour for the health page. The index lives in an in-memory SQLite
database (stdlib), so the list filters and pages with SQL and indexes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit import parse_time
from gateway.quarantine import Quarantine, QuarantineRecord

LOG = logging.getLogger("sentinel.console")
COLUMNS = ("sop_uid", "study_uid", "series_uid", "modality", "calling_ae", "reason", "score",
           "threshold", "rule", "bundle_id", "quarantined_at")
FILTERS = ("modality", "caller", "reason", "min_score", "since", "until", "study")
HOURS_KEPT = 24 * 14  # health counters per hour, two weeks


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


class QuarantineIndex:
    """The held instances' list fields, in SQLite; thread-safe (one lock)."""

    def __init__(self, quarantine: Quarantine) -> None:
        self.quarantine = quarantine
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE TABLE held (sop_uid TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT, "
            "modality TEXT, calling_ae TEXT, reason TEXT, score REAL, threshold REAL, rule TEXT, "
            "bundle_id TEXT, quarantined_at TEXT)")
        for col in ("quarantined_at", "study_uid", "modality", "calling_ae", "reason"):
            self._db.execute(f"CREATE INDEX held_{col} ON held ({col})")
        self._lock = threading.Lock()
        self.ready = False
        self.built_in_s: float | None = None

    def _row(self, r: QuarantineRecord) -> tuple[Any, ...]:
        return tuple(getattr(r, c) for c in COLUMNS)

    def rebuild(self) -> int:
        """Read every sidecar once (slow on a large quarantine: done in the background)."""
        t0 = time.perf_counter()
        records = self.quarantine.list()
        with self._lock:
            self._db.execute("DELETE FROM held")
            self._db.executemany(f"INSERT OR REPLACE INTO held VALUES ({','.join('?' * 11)})",
                                 [self._row(r) for r in records])
            self._db.commit()
        self.built_in_s = time.perf_counter() - t0
        self.ready = True
        return len(records)

    def upsert(self, record: QuarantineRecord) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO held VALUES ({','.join('?' * 11)})",
                             self._row(record))
            self._db.commit()

    def remove(self, sop_uid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM held WHERE sop_uid = ?", (sop_uid,))
            self._db.commit()

    def study_of(self, sop_uid: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT study_uid FROM held WHERE sop_uid = ?",
                                   (sop_uid,)).fetchone()
        return None if row is None else str(row[0])

    def sops_of_study(self, study_uid: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT sop_uid FROM held WHERE study_uid = ? "
                                    "ORDER BY quarantined_at", (study_uid,)).fetchall()
        return [str(r[0]) for r in rows]

    def choices(self, column: str) -> list[str]:
        """Distinct values of a filter column (for the filter form's drop-downs)."""
        assert column in ("modality", "calling_ae", "reason")
        with self._lock:
            rows = self._db.execute(
                f"SELECT DISTINCT {column} FROM held ORDER BY {column} LIMIT 200").fetchall()
        return [str(r[0]) for r in rows if r[0]]

    def page(self, filters: dict[str, str], page: int = 1, per_page: int = 50) -> Page:
        """Newest first; ``filters`` keys are FILTERS (empty values ignored)."""
        where, args = [], []
        for key, col in (("modality", "modality"), ("caller", "calling_ae"),
                         ("reason", "reason"), ("study", "study_uid")):
            if filters.get(key):
                where.append(f"{col} = ?")
                args.append(filters[key])
        if filters.get("min_score"):
            where.append("score >= ?")
            args.append(float(filters["min_score"]))
        if filters.get("since"):
            where.append("quarantined_at >= ?")
            args.append(filters["since"])
        if filters.get("until"):
            where.append("quarantined_at < ?")
            args.append(filters["until"])
        sql_where = f" WHERE {' AND '.join(where)}" if where else ""
        page = max(1, page)
        with self._lock:
            total = int(self._db.execute(f"SELECT COUNT(*) FROM held{sql_where}",
                                         args).fetchone()[0])
            cur = self._db.execute(
                f"SELECT {','.join(COLUMNS)} FROM held{sql_where} "
                "ORDER BY quarantined_at DESC, sop_uid LIMIT ? OFFSET ?",
                [*args, per_page, (page - 1) * per_page])
            rows = [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]
        return Page(rows, total, page, per_page)


def _hour(time_text: str) -> str | None:
    try:
        return parse_time(time_text).astimezone(UTC).strftime("%Y-%m-%dT%H")
    except ValueError:
        return None


@dataclass
class HealthCounts:
    """Events per hour (received, screened, flagged, forwarded, quarantined, dead-letter) and
    screened/flagged per modality and per caller per hour, from the audit log."""

    hours: dict[str, Counter[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        keys: list[str] = []
        if event in ("received", "forwarded", "quarantined", "dead-letter"):
            keys.append(str(event))
        elif event == "scored" and record.get("verdict") in ("clean", "flagged",
                                                              "flagged-shadow"):
            flagged = str(record["verdict"]).startswith("flagged")
            for kind, value in (("mod", record.get("modality")), ("ae", record.get("calling_ae"))):
                name = str(value or "?")
                keys.append(f"screened|{kind}|{name}")
                if flagged:
                    keys.append(f"flagged|{kind}|{name}")
            keys.append("screened")
            if flagged:
                keys.append("flagged")
        if not keys:
            return
        hour = _hour(str(record.get("time", "")))
        if hour is None:
            return
        with self.lock:
            self.hours.setdefault(hour, Counter()).update(keys)
            if len(self.hours) > HOURS_KEPT:
                for old in sorted(self.hours)[: len(self.hours) - HOURS_KEPT]:
                    del self.hours[old]

    def series(self, hours: int, now: datetime | None = None) -> list[tuple[str, Counter[str]]]:
        """The last ``hours`` hours, oldest first, empty hours included."""
        now = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
        out = []
        with self.lock:
            for i in range(hours - 1, -1, -1):
                h = (now - timedelta(hours=i)).strftime("%Y-%m-%dT%H")
                out.append((h, Counter(self.hours.get(h, Counter()))))
        return out


class AuditFollower:
    """Reads the audit log from the start, then follows it (a thread polling every second):
    health counts from every line; index updates from lines after ``index_from`` (the log's
    size when the index was rebuilt; earlier lines are already in the sidecars it read)."""

    def __init__(self, audit_path: Path, index: QuarantineIndex, health: HealthCounts,
                 poll_s: float = 1.0) -> None:
        self.path = Path(audit_path)
        self.index = index
        self.health = health
        self.poll_s = poll_s
        self.offset = 0
        self.index_from = 0
        self.caught_up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-follow", daemon=True)
        self._poll_lock = threading.Lock()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            self.index_from = self.path.stat().st_size
        except FileNotFoundError:
            self.index_from = 0
        try:
            n = self.index.rebuild()
            LOG.info("quarantine index: %d instances in %.1f s", n, self.index.built_in_s or 0)
        except Exception:
            LOG.exception("quarantine index rebuild failed")
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:
                LOG.exception("following the audit log failed")
            self._stop.wait(self.poll_s)

    def poll(self) -> int:
        """Read complete lines added since the last call; returns how many. Also called by a
        request after an operator action, so the next page already shows it."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self.caught_up = True
            return 0
        if size < self.offset:  # replaced or cut: start over (counts and index)
            LOG.warning("audit log %s shrank; reading it again", self.path)
            self.offset, self.health.hours = 0, {}
            self.index_from = size
            self.index.rebuild()
        n = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line being written: read it next time
                end = self.offset + len(raw)
                self._apply(raw, indexed=end > self.index_from)
                self.offset = end
                n += 1
        self.caught_up = True
        return n

    def _apply(self, raw: bytes, *, indexed: bool) -> None:
        try:
            record = json.loads(raw)
        except ValueError:
            return
        if not isinstance(record, dict):
            return
        self.health.add(record)
        event = record.get("event")
        if indexed and event in ("quarantined", "released", "purged"):
            sop, study = record.get("sop_uid"), record.get("study_uid")
            if isinstance(sop, str) and isinstance(study, str):
                try:
                    held = self.index.quarantine.get_in_study(study, sop)
                except ValueError:
                    held = None
                if held is None:
                    self.index.remove(sop)
                else:
                    self.index.upsert(held)
        for listener in self.listeners:
            listener(record)
