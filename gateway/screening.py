"""Screening workers: route each acknowledged instance, score it, then forward or quarantine.

Why a fixed pool with one Detector per thread: LiteRT interpreters are not thread-safe, and a
thread per instance would cost a model load each time. The pool is bounded (``detector.workers``)
and fed by an in-memory queue of small records; the spool directory is the durable queue, so
after a restart everything in ``incoming/`` and ``work/`` is submitted again.

The header is parsed once per instance (large values deferred, so a big or hostile Pixel Data
is not read until the detector asks for it); the rules, the audit fields and the detector all
use that one Dataset. An instance the detector cannot read or score follows the configured
policy: quarantine with the reason by default, never a silent forward.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from detector.preprocess import parse_dicom
from detector.scoring import apply_cnn_gate, apply_line_ramp
from gateway.config import Config
from gateway.rules import Association, decide
from gateway.spool import (
    SpoolLayout,
    fsync_dir,
    next_seq,
    place_in_outboxes,
    read_meta,
    valid_uid,
)

LOG = logging.getLogger("sentinel.screening")
UNKNOWN_STUDY = "0"  # quarantine folder for instances whose Study UID cannot be read


@dataclass(frozen=True)
class WorkItem:
    path: Path  # in spool/incoming (or spool/work when recovered)
    sop_uid: str
    seq: str
    assoc_id: str


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class PendingOrder:
    """Receipt order per association of instances not yet resolved by a worker.

    The forwarder asks ``blocks(assoc_id, seq)`` before sending an item, so an instance is never
    forwarded ahead of an earlier one from the same association still being screened: order is
    kept within a study without serialising the workers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heaps: dict[str, list[str]] = {}
        self._done: dict[str, set[str]] = {}

    def add(self, assoc_id: str, seq: str) -> None:
        if not assoc_id:
            return
        with self._lock:
            heapq.heappush(self._heaps.setdefault(assoc_id, []), seq)

    def resolve(self, assoc_id: str, seq: str) -> None:
        if not assoc_id:
            return
        with self._lock:
            heap = self._heaps.get(assoc_id)
            if heap is None:
                return
            done = self._done.setdefault(assoc_id, set())
            done.add(seq)
            while heap and heap[0] in done:
                done.discard(heapq.heappop(heap))
            if not heap:
                self._heaps.pop(assoc_id, None)
                self._done.pop(assoc_id, None)

    def blocks(self, assoc_id: str, seq: str) -> bool:
        """True when an earlier instance of the same association is still being screened."""
        if not assoc_id:
            return False
        with self._lock:
            heap = self._heaps.get(assoc_id)
            return bool(heap) and heap[0] < seq

    def __len__(self) -> int:
        with self._lock:
            return sum(len(h) - len(self._done.get(a, ())) for a, h in self._heaps.items())


class Screening:
    """The bounded worker pool.

    ``detector_factory`` builds one detector (``score_dataset(ds, threshold)``, ``bundle_id``)
    per worker; ``swap_detectors`` installs new ones atomically on a config reload.
    ``on_enqueued(destination)`` wakes that destination's forwarder.
    """

    def __init__(
        self,
        config_provider: Callable[[], Config],
        audit: Any,
        quarantine: Any,
        metrics: Any,
        on_enqueued: Callable[[str], None],
        order: PendingOrder,
    ) -> None:
        self._config = config_provider
        self._audit = audit
        self._quarantine = quarantine
        self._metrics = metrics
        self._on_enqueued = on_enqueued
        self.order = order
        self.layout = SpoolLayout(config_provider().state_dir)
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._detectors: list[Any] = []
        self._busy = 0
        self._busy_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, detectors: list[Any], workers: int | None = None) -> None:
        """Start ``workers`` threads (default: one per detector). A worker without a detector
        can still route ``pass``/``reject``; an instance it must screen takes the error policy.
        """
        n = len(detectors) if workers is None else workers
        self._detectors = [detectors[i] if i < len(detectors) else None for i in range(n)]
        for i in range(n):
            t = threading.Thread(target=self._run, args=(i,), name=f"screen-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def swap_detectors(self, detectors: list[Any]) -> None:
        """Install freshly loaded detectors; each worker takes its own with its next instance."""
        n = len(self._detectors)
        self._detectors = [detectors[i] if i < len(detectors) else None for i in range(n)]

    @property
    def bundle_id(self) -> str:
        return str(getattr(self._detectors[0], "bundle_id", "") or "") if self._detectors else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the items in hand; leave the rest on disk for the next start."""
        # Drop what is queued (still durable in incoming/), then stop each worker.
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def depth(self) -> int:
        with self._busy_lock:
            return self._queue.qsize() + self._busy

    # -- intake ------------------------------------------------------------------------------

    def submit(self, path: Path, sop_uid: str, seq: str, assoc_id: str) -> None:
        self.order.add(assoc_id, seq)
        self._queue.put(WorkItem(path=path, sop_uid=sop_uid, seq=seq, assoc_id=assoc_id))

    def recover(self) -> int:
        """Submit everything acknowledged but not yet resolved (after a crash or restart)."""
        items: list[WorkItem] = []
        for directory in (self.layout.work, self.layout.incoming):
            for p in directory.glob("*.dcm"):
                meta = read_meta(p)
                sop = str(meta.get("sop_uid") or p.stem.split("~", 1)[0])
                items.append(
                    WorkItem(path=p, sop_uid=sop, seq=str(meta.get("seq") or next_seq()),
                             assoc_id=str(meta.get("assoc_id") or ""))
                )
            for side in directory.glob("*.json"):
                if not side.with_suffix(".dcm").exists():
                    with contextlib.suppress(OSError):
                        side.unlink()
        items.sort(key=lambda i: i.seq)
        for it in items:
            self.submit(it.path, it.sop_uid, it.seq, it.assoc_id)
        return len(items)

    # -- the worker --------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        mine = self._detectors[index]  # this worker alone uses it, so it alone may close it
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._detectors[index] is not mine:  # swapped by a reload
                    close_detector(mine)
                    mine = self._detectors[index]
                with self._busy_lock:
                    self._busy += 1
                try:
                    self.process(item, mine)
                except Exception:
                    # The instance stays on disk (incoming/ or work/) and is retried at restart.
                    LOG.exception("screening failed for %s; left in the spool", item.sop_uid)
                finally:
                    self.order.resolve(item.assoc_id, item.seq)
                    with self._busy_lock:
                        self._busy -= 1
        finally:
            close_detector(mine)
            if self._detectors[index] is not mine:
                close_detector(self._detectors[index])

    def _claim(self, item: WorkItem) -> tuple[Path, dict[str, Any]] | None:
        """Move the instance from incoming/ to work/ so a later resend of the same SOP UID
        (which lands in incoming/ again) is screened on its own, never confused with this one."""
        src = item.path
        if src.parent == self.layout.work:
            return (src, read_meta(src)) if src.exists() else None
        dst = self.layout.work / f"{item.sop_uid}~{item.seq}.dcm"
        side = src.with_suffix(".json")
        if read_meta(src).get("seq") not in (None, item.seq):
            return None  # replaced by a newer copy, which has its own queue entry
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.replace(side, dst.with_suffix(".json"))
        return dst, read_meta(dst)

    def process(self, item: WorkItem, detector: Any) -> str:
        """Screen one instance end to end; return the outcome ("forwarded", "quarantined")."""
        claimed = self._claim(item)
        if claimed is None:
            return "skipped"
        path, meta = claimed
        lines: list[tuple[str, dict[str, Any]]] = []  # received and scored: one fsync
        try:
            outcome = screen(self._config(), path, meta, item.sop_uid, detector,
                             lambda event, **fields: lines.append((event, fields)),
                             self._metrics)
        finally:  # written before the instance moves on, as the plugin writes them before
            self._audit_lines(lines)  # answering; a crash before this re-screens from work/
        if outcome.action == "quarantine":
            hold(self._quarantine, path, meta, outcome, self._audit_safe, self._metrics)
            side = path.with_suffix(".json")
            with contextlib.suppress(FileNotFoundError):
                side.unlink()
                fsync_dir(side.parent)
            return "quarantined"
        return self._forward(path, meta, outcome, item)

    # -- outcomes ----------------------------------------------------------------------------

    def _forward(self, path: Path, meta: dict[str, Any], outcome: Outcome,
                 item: WorkItem) -> str:
        entry = {
            **meta,
            **{k: v for k, v in outcome.ids.items() if v},
            "sop_uid": item.sop_uid,
            "seq": item.seq,
            "assoc_id": item.assoc_id,
            "rule": outcome.rule,
        }
        place_in_outboxes(self.layout, outcome.destinations, path, entry, remove_src=True,
                          sync_src_dir=False)
        for d in outcome.destinations:
            self._on_enqueued(d)
        return "forwarded"

    def _audit_safe(self, event: str, **fields: Any) -> None:
        self._audit_lines([(event, fields)])

    def _audit_lines(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        """Append ``lines`` with one write and one fsync. A failed append is logged and the
        instance goes on (the spool, not the audit, is what keeps it)."""
        if not lines:
            return
        try:
            self._audit.append_many(lines)
        except Exception:
            LOG.exception("audit append failed for %s", ", ".join(e for e, _ in lines))


@dataclass(frozen=True)
class Outcome:
    """What screening decided for one instance, before anything is done with it.

    Why apart from acting on it: ``sentinel serve`` then forwards the spooled file or holds it,
    while the Orthanc plugin (gateway.orthanc_plugin) lets Orthanc store it or refuses it; both
    decide by this one code. ``fields``: the audit fields of the instance (SOP, caller, and the
    identifiers that could be read); ``ids``: study, series, SOP class and modality ("" where
    unreadable).
    """

    action: str  # "forward" or "quarantine"
    rule: str  # the rule's name, for the audit log and the quarantine record
    destinations: tuple[str, ...]
    fields: dict[str, Any]
    ids: dict[str, str]
    reason: str = ""  # why held: "flagged", "rejected-by-rule", or the error's reason
    score: Any = None  # the detector's Score, where one was computed
    bundle_id: str = ""


def screen(cfg: Config, path: Path, meta: dict[str, Any], sop_uid: str, detector: Any,
           audit: Callable[..., None], metrics: Any = None) -> Outcome:
    """Route one instance by the rules, score it if they say so, and decide; audits
    ``received`` and ``scored``. ``meta``: what the receiver recorded (calling_ae, called_ae,
    peer, the negotiated sop_class). The error policy (``[detector] on_error``) applies to an
    instance that cannot be read or scored."""
    assoc = Association(
        calling_ae=str(meta.get("calling_ae", "")),
        called_ae=str(meta.get("called_ae", "")),
        peer=str(meta.get("peer", "")),
    )
    base: dict[str, Any] = {"sop_uid": sop_uid, "calling_ae": assoc.calling_ae,
                            "peer": assoc.peer}
    try:
        ds = parse_dicom(path)
        parse_elements(ds)
    except Exception as exc:
        LOG.warning("instance %s unreadable: %s", sop_uid, type(exc).__name__)
        return _on_error(cfg, base, {}, "unreadable", cfg.default, audit)
    meta_class = str(meta.get("sop_class", "") or "")
    ids = {
        "study_uid": _uid(ds, "StudyInstanceUID"),
        "series_uid": _uid(ds, "SeriesInstanceUID"),
        "sop_class": _uid(ds, "SOPClassUID") or (meta_class if valid_uid(meta_class) else ""),
        "modality": _code_string(ds, "Modality"),
    }
    base.update({k: v for k, v in ids.items() if v})
    # The negotiated context's SOP class (the SCP records it): a pass must agree with it.
    decision = decide(cfg, ds, assoc, sop_class=meta_class, path=path)
    rule = decision.rule
    modality = ids["modality"]
    audit("received", rule=rule.name, **base,
          **({"detail": decision.override} if decision.override else {}))
    if metrics is not None:
        metrics.received(modality, assoc.calling_ae)
    if decision.action == "reject":
        return Outcome("quarantine", rule.name, decision.destinations, base, ids,
                       reason="rejected-by-rule")
    if decision.action == "pass":
        return Outcome("forward", rule.name, decision.destinations, base, ids)

    t0 = time.perf_counter()
    try:
        if detector is None:
            raise RuntimeError("no detector loaded")
        threshold = decision.threshold_for(getattr(detector, "threshold", None))
        score = apply_line_ramp(apply_cnn_gate(
            detector.score_dataset(ds, threshold=threshold, line_gate=cfg.detector.line_gate),
            cfg.detector.cnn_gate), cfg.detector.line_ramp)
    except Exception as exc:
        reason = str(getattr(exc, "reason", "") or "detector-error")
        LOG.warning("instance %s not scored: %s (%s)", sop_uid, reason, type(exc).__name__)
        if metrics is not None:
            metrics.screen_error(modality, reason)
        return _on_error(cfg, base, ids, reason, rule, audit,
                         decision.destinations, str(getattr(detector, "bundle_id", "")))
    latency_ms = (time.perf_counter() - t0) * 1000.0
    verdict = "flagged" if score.flagged else "clean"
    if score.flagged and decision.shadow:
        verdict = "flagged-shadow"
    audit(
        "scored", rule=rule.name, score=float(score.score), p_cnn=float(score.p_cnn),
        p_rf=float(score.p_rf), threshold=float(score.threshold), bundle_id=score.bundle_id,
        verdict=verdict, latency_ms=round(latency_ms, 3), **base,
        **({} if score.grid_peaks is None else {"grid_peaks": float(score.grid_peaks)}),
        **({} if score.line_peak is None else {
            "line_peak": float(score.line_peak), "line_gate": float(score.line_gate)}),
        **({} if score.cnn_gate is None else {
            "cnn_peak": float(score.cnn_peak), "cnn_gate": float(score.cnn_gate)}),
        **({} if score.line_ramp is None else {"line_ramp": float(score.line_ramp)}),
    )
    if metrics is not None:
        metrics.scored(modality, assoc.calling_ae, bool(score.flagged), latency_ms / 1e3)
    if score.flagged and not decision.shadow:
        return Outcome("quarantine", rule.name, decision.destinations, base, ids,
                       reason="flagged", score=score, bundle_id=score.bundle_id)
    return Outcome("forward", rule.name, decision.destinations, base, ids, score=score,
                   bundle_id=score.bundle_id)


def _on_error(cfg: Config, base: dict[str, Any], ids: dict[str, str], reason: str, rule: Any,
              audit: Callable[..., None], destinations: tuple[str, ...] | None = None,
              bundle_id: str = "") -> Outcome:
    """An instance that could not be read or scored: the configured policy, never silence."""
    dests = rule.destinations if destinations is None else destinations
    ids = {k: ids.get(k, "") for k in ("study_uid", "series_uid", "sop_class", "modality")}
    if cfg.detector.on_error == "forward":
        audit("scored", rule=rule.name, verdict="error", error=reason, bundle_id=bundle_id,
              **base)
        return Outcome("forward", rule.name, dests, base, ids)
    return Outcome("quarantine", rule.name, dests, base, ids, reason=reason, bundle_id=bundle_id)


def quarantine_record(outcome: Outcome, meta: dict[str, Any]) -> Any:
    """The quarantine sidecar record of an instance screening decided to hold."""
    from gateway.quarantine import new_record

    score, ids = outcome.score, outcome.ids
    study = ids.get("study_uid") or UNKNOWN_STUDY

    def part(name: str) -> float | None:
        value = None if score is None else getattr(score, name)
        return None if value is None else float(value)

    return new_record(
        sop_uid=str(outcome.fields["sop_uid"]),
        study_uid=study if valid_uid(study) else UNKNOWN_STUDY,
        series_uid=ids.get("series_uid", ""),
        sop_class=ids.get("sop_class", "") or str(meta.get("sop_class", "")),
        modality=ids.get("modality", ""),
        reason=outcome.reason,
        score=part("score"),
        p_cnn=part("p_cnn"),
        p_rf=part("p_rf"),
        threshold=part("threshold"),
        grid_peaks=part("grid_peaks"),
        line_peak=part("line_peak"),
        line_gate=part("line_gate"),
        cnn_peak=part("cnn_peak") if part("cnn_gate") is not None else None,
        cnn_gate=part("cnn_gate"),
        line_ramp=part("line_ramp"),
        rule=outcome.rule,
        bundle_id=outcome.bundle_id,
        calling_ae=str(meta.get("calling_ae", "")),
        peer=str(meta.get("peer", "")),
        destinations=tuple(outcome.destinations),
        received_at=iso(float(meta.get("received_at") or time.time())),
    )


def hold(quarantine: Any, path: Path, meta: dict[str, Any], outcome: Outcome,
         audit: Callable[..., None], metrics: Any = None) -> None:
    """Move the instance at ``path`` into the quarantine with its record; audit it."""
    quarantine.put(path, quarantine_record(outcome, meta))
    audit("quarantined", rule=outcome.rule, reason=outcome.reason, **outcome.fields)
    if metrics is not None:
        caller = str(meta.get("calling_ae", ""))
        metrics.quarantined(outcome.ids.get("modality", ""), caller, outcome.reason)
        if outcome.reason == "rejected-by-rule":
            metrics.rejected(caller, outcome.ids.get("modality", ""), "rule")


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double, Pixel Data


def close_detector(detector: Any) -> None:
    """Stop a detector's scoring process, if it has one (a thread-local Detector has not)."""
    close = getattr(detector, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            LOG.exception("could not close a detector")


def parse_elements(ds: Dataset) -> None:
    """Convert every element except pixel data now, inside the caller's ``try``.

    Why: pydicom converts raw elements lazily, so a bad VR or a value of impossible length
    raises on first access (rule matching, audit fields), outside any handler; the instance
    would stay in spool/work and fail again at every restart although the modality got Success.
    Converted here, such an instance is ``unreadable`` like any other parse failure and takes
    the error policy. Pixel Data stays deferred (the detector reads it frame by frame).
    """
    for tag in list(ds.keys()):
        if tag in _PIXEL_TAGS:
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                parse_elements(item)


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    return value if valid_uid(value) else ""


_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def _code_string(ds: Dataset, keyword: str) -> str:
    """A CS value (e.g. Modality) only when it is one: it goes into the audit log and into
    metric labels. Why checked: a corrupted length makes an element swallow the ones after it
    (patient name and ID included; found by tests/test_fuzz.py), and an unchecked value would
    carry them into the log, or explode the label set."""
    value = str(ds.get(keyword, "") or "").strip()
    return value if _CODE_STRING.fullmatch(value) else ""
