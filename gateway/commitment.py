"""Storage Commitment SCP (Push Model): commit only what truly reached the PACS.

Why a screening gateway must do this itself: a modality frees an image once the archive
commits it (N-EVENT-REPORT, Success). If the gateway committed what it had only spooled and the
image were later quarantined or dead-lettered, the modality would delete the only trustworthy
copy. So an N-ACTION request is answered at once (the request is durable), and its report waits
until every listed instance is *settled*:

- **Success**: forwarded to every destination of its rule (in a destination's sent ledger, no
  copy waiting in any outbox, none dead-lettered).
- **Failure 0x0110 (processing failure)**: quarantined (flagged, rejected by a rule, or not
  screenable) or dead-lettered. The reason stays in the audit log (``commit-reported``), never
  on the wire. A quarantined instance waits ``commitment.quarantine_hold_s`` first: a reviewer's
  release within the hold queues it again, and it then counts as Success once delivered.
- **Failure 0x0112 (no such object instance)**: the gateway holds no trace of it.

Where each instance is comes from the spool itself (``InstanceLocator``), not from a second
bookkeeping that could disagree with it after a crash. The places are read in the order an
instance moves through them (incoming, work, outboxes, then quarantine, then again the outboxes,
then ledgers and dead letters), and every move copies before it deletes, so a reading taken
while an instance moves finds it in one place or the next, never in none.

Requests survive SIGKILL: each is written (fsync, rename, fsync of the directory) to
``<state>/commit/open/<transaction uid>.json`` before the N-ACTION is answered Success, and is
removed only after its report was accepted. A crash between the two sends the report again
(a modality files reports by Transaction UID). The report goes on a new association to the
caller's configured port (``[[callers]] port``, ``host`` or else the address the request came
from), proposing the SCP role for the Storage Commitment class (PS3.4 J.3.3); a failed report
is retried with the forwarding backoff until ``forwarding.max_age_s`` after the request, then
audited as abandoned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from gateway.config import CallerConfig, Config
from gateway.spool import (
    SpoolLayout,
    fsync_dir,
    list_outbox,
    sop_from_outbox_name,
    valid_uid,
    write_json_durable,
)

LOG = logging.getLogger("sentinel.commitment")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance
ACTION_REQUEST_COMMIT = 1
EVENT_ALL_SUCCESS = 1
EVENT_FAILURES = 2
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_INSTANCE = 0x0112

# N-ACTION response statuses (PS3.7 10.1.4, PS3.4 J.3.2)
STATUS_SUCCESS = 0x0000
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_DUPLICATE_INVOCATION = 0x0210
STATUS_RESOURCE_LIMITATION = 0x0213
STATUS_PROCESSING_FAILURE = 0x0110

PENDING = "pending"
DELIVERED = "delivered"
QUARANTINED = "quarantined"
DEAD = "dead-letter"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CommitmentRequest:
    """One N-ACTION Request Storage Commitment, as made durable."""

    transaction_uid: str
    calling_ae: str
    peer: str
    requested_at: float
    refs: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID), in request order

    def to_json(self) -> dict[str, Any]:
        return {"transaction_uid": self.transaction_uid, "calling_ae": self.calling_ae,
                "peer": self.peer, "requested_at": self.requested_at,
                "refs": [list(r) for r in self.refs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommitmentRequest:
        refs = tuple((str(c), str(u)) for c, u in data["refs"])
        return cls(str(data["transaction_uid"]), str(data["calling_ae"]), str(data["peer"]),
                   float(data["requested_at"]), refs)


class RequestRefused(ValueError):
    """An N-ACTION the gateway will not take on; ``status`` is its N-ACTION status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request(action_type: int, info: Dataset | None, calling_ae: str, peer: str,
                  max_instances: int, now: float) -> CommitmentRequest:
    """Validate an N-ACTION's Action Information into a request, or raise RequestRefused.

    Nothing in it is trusted: every UID must be a valid UID (they name files under the state
    directory), the list must be non-empty and at most ``max_instances`` long."""
    if action_type != ACTION_REQUEST_COMMIT:
        raise RequestRefused(STATUS_NO_SUCH_ACTION, f"action type {action_type} (only 1)")
    if info is None:
        raise RequestRefused(STATUS_MISSING_ATTRIBUTE, "no action information")
    try:
        txn = str(info.get("TransactionUID", "") or "")
        seq = info.get("ReferencedSOPSequence")
    except Exception as exc:  # a dataset pydicom cannot decode
        raise RequestRefused(STATUS_INVALID_ARGUMENT, f"undecodable: {type(exc).__name__}") \
            from exc
    if not txn:
        raise RequestRefused(STATUS_MISSING_ATTRIBUTE, "no Transaction UID")
    if not valid_uid(txn):
        raise RequestRefused(STATUS_INVALID_ARGUMENT, "invalid Transaction UID")
    if not seq:
        raise RequestRefused(STATUS_MISSING_ATTRIBUTE, "empty Referenced SOP Sequence")
    if len(seq) > max_instances:
        raise RequestRefused(STATUS_RESOURCE_LIMITATION,
                             f"{len(seq)} instances (commitment.max_instances {max_instances})")
    refs = []
    try:
        for item in seq:
            cls_uid = str(item.get("ReferencedSOPClassUID", "") or "")
            sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
            if not (valid_uid(cls_uid) and valid_uid(sop_uid)):
                raise RequestRefused(STATUS_INVALID_ARGUMENT,
                                     "an item without valid SOP Class and Instance UIDs")
            refs.append((cls_uid, sop_uid))
    except RequestRefused:
        raise
    except Exception as exc:
        raise RequestRefused(STATUS_INVALID_ARGUMENT, f"undecodable item: {type(exc).__name__}") \
            from exc
    return CommitmentRequest(txn, calling_ae, peer, now, tuple(refs))


class RequestStore:
    """Open requests on disk, one durable JSON file each (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "commit" / "open"

    def _path(self, txn: str) -> Path:
        if not valid_uid(txn):  # also keeps the name inside the directory
            raise ValueError(f"invalid Transaction UID {txn!r}")
        return self.dir / f"{txn}.json"

    def get(self, txn: str) -> CommitmentRequest | None:
        try:
            return CommitmentRequest.from_json(json.loads(self._path(txn).read_text()))
        except FileNotFoundError:
            return None

    def put(self, request: CommitmentRequest) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_json_durable(self._path(request.transaction_uid), request.to_json())

    def remove(self, txn: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(txn))
            fsync_dir(self.dir)

    def load_all(self) -> list[CommitmentRequest]:
        """Every open request; an unreadable file is set aside (``.bad``), never fatal."""
        out = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(CommitmentRequest.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                LOG.error("commitment request %s unreadable (%s); set aside as .bad",
                          path.name, type(exc).__name__)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_suffix(".bad"))
        return out


@dataclass(frozen=True)
class Located:
    """Where one instance is now: ``state`` is one of the module's states; ``reason`` is the
    quarantine reason or the dead destination (for the audit log only); ``awaiting`` names the
    commitment destinations that hold it but have not committed it yet."""

    state: str
    reason: str = ""
    awaiting: tuple[str, ...] = ()


class InstanceLocator:
    """Finds instances in the spool, the quarantine, the sent ledgers and the dead letters.

    ``ledgers()`` returns, per destination, an object with ``sent_at(uid) -> float | None``
    (the running forwarders' SentLedger); it is called per reading, so a reload's new
    forwarders are seen. For the destinations ``pacs_commits()`` names (``commitment = true``),
    delivered means committed by that PACS too: ``pacs.status(dest, uid)``."""

    def __init__(self, layout: SpoolLayout, quarantine_root: Path,
                 ledgers: Callable[[], Mapping[str, Any]],
                 pacs: Any = None, pacs_commits: Callable[[], set[str]] = set) -> None:
        self.layout = layout
        self.quarantine_root = quarantine_root
        self.ledgers = ledgers
        self.pacs = pacs
        self.pacs_commits = pacs_commits

    def _pending(self, wanted: set[str]) -> set[str]:
        found: set[str] = set()
        for directory in (self.layout.incoming, self.layout.work):
            for name in _names(directory, ".dcm"):
                uid = name[:-4].split("~", 1)[0]  # work/ names are <uid>~<seq>.dcm
                if uid in wanted:
                    found.add(uid)
        found |= self._in_outboxes(wanted)
        return found

    def _in_outboxes(self, wanted: set[str]) -> set[str]:
        found = set()
        root = self.layout.outbox_root
        for dest in _subdirs(root):
            for name in list_outbox(root / dest):
                uid = sop_from_outbox_name(name)
                if uid in wanted:
                    found.add(uid)
        return found

    def _quarantined(self, wanted: set[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for study in _subdirs(self.quarantine_root):
            for name in _names(self.quarantine_root / study, ".dcm"):
                uid = name[:-4]
                if uid in wanted:
                    reason = "quarantined"
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        side = self.quarantine_root / study / f"{uid}.json"
                        reason = str(json.loads(side.read_text()).get("reason") or reason)
                    found[uid] = reason
        return found

    def _dead(self, wanted: set[str], ledgers: Mapping[str, Any]) -> dict[str, str]:
        """Dead-lettered UIDs, unless the same destination delivered it later (a resend)."""
        found: dict[str, str] = {}
        root = self.layout.dead_root
        for dest in _subdirs(root):
            for name in _names(root / dest, ".dcm"):
                uid = sop_from_outbox_name(name)
                if uid not in wanted:
                    continue
                ledger = ledgers.get(dest)
                sent = ledger.sent_at(uid) if ledger is not None else None
                with contextlib.suppress(OSError):
                    if sent is not None and sent > (root / dest / name).stat().st_mtime:
                        continue
                found[uid] = f"dead-letter:{dest}"
        return found

    def locate(self, uids: Iterable[str]) -> dict[str, Located]:
        wanted = set(uids)
        out: dict[str, Located] = {u: Located(PENDING) for u in self._pending(wanted)}
        rest = wanted - out.keys()
        if rest:
            for uid, reason in self._quarantined(rest).items():
                out[uid] = Located(QUARANTINED, reason)
            rest -= out.keys()
        if rest:  # released from the quarantine between the two readings: queued again
            for uid in self._in_outboxes(rest):
                out[uid] = Located(PENDING)
            rest -= out.keys()
        if rest:
            ledgers = dict(self.ledgers())
            dead = self._dead(rest, ledgers)
            for uid in rest:
                sent_to = [d for d, lg in ledgers.items() if lg.sent_at(uid) is not None]
                if uid in dead:
                    out[uid] = Located(DEAD, dead[uid])
                elif sent_to:
                    out[uid] = self._committed(uid, sent_to)
                else:
                    out[uid] = Located(UNKNOWN)
        return out

    def _committed(self, uid: str, sent_to: list[str]) -> Located:
        """Delivered, unless a commitment destination refused it or has yet to commit it."""
        if self.pacs is None:
            return Located(DELIVERED)
        commits = self.pacs_commits()
        awaiting = []
        for dest in sent_to:
            if dest not in commits:
                continue
            status = self.pacs.status(dest, uid)
            if status == "refused":
                return Located(DEAD, f"refused-by-pacs:{dest}")
            if status != "committed":
                awaiting.append(dest)
        return Located(PENDING, awaiting=tuple(awaiting)) if awaiting else Located(DELIVERED)


def _subdirs(root: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _names(directory: Path, suffix: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.endswith(suffix)]
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class Settlement:
    """The report a request is ready for, or None in ``ready`` while it must wait."""

    ready: bool
    success: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str, int, str], ...] = ()  # class, uid, FailureReason, why


def settle(request: CommitmentRequest, where: Mapping[str, Located], now: float,
           quarantine_hold_s: float) -> Settlement:
    """Decide whether a request can be reported, and how (see the module docstring)."""
    held = now - request.requested_at < quarantine_hold_s
    success, failed = [], []
    for cls_uid, uid in request.refs:
        loc = where.get(uid, Located(UNKNOWN))
        if loc.state == PENDING or (loc.state == QUARANTINED and held):
            return Settlement(False)
        if loc.state == DELIVERED:
            success.append((cls_uid, uid))
        elif loc.state == UNKNOWN:
            failed.append((cls_uid, uid, FAILURE_NO_SUCH_INSTANCE, "unknown"))
        else:
            failed.append((cls_uid, uid, FAILURE_PROCESSING, loc.reason or loc.state))
    return Settlement(True, tuple(success), tuple(failed))


def ref_items(refs: Iterable[tuple[str, ...]]) -> list[Dataset]:
    """Referenced SOP items of (class, instance[, FailureReason]) tuples."""
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref[0]
        item.ReferencedSOPInstanceUID = ref[1]
        if len(ref) > 2:
            item.FailureReason = int(ref[2])
        items.append(item)
    return items


def report_dataset(request: CommitmentRequest, settlement: Settlement) -> tuple[Dataset, int]:
    """The N-EVENT-REPORT Event Information and its Event Type ID (PS3.4 J.3.3)."""
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    if settlement.success:
        ds.ReferencedSOPSequence = ref_items(settlement.success)
    if settlement.failed:
        ds.FailedSOPSequence = ref_items((c, u, code) for c, u, code, _why in settlement.failed)
    return ds, (EVENT_FAILURES if settlement.failed else EVENT_ALL_SUCCESS)


def commitment_ae(cfg: Config) -> Any:
    """A pynetdicom AE for one outbound Storage Commitment association, with our timeouts."""
    from pynetdicom import AE

    ae = AE(ae_title=cfg.listener.ae_title)
    ae.acse_timeout = cfg.timeouts.acse_s
    ae.dimse_timeout = cfg.timeouts.dimse_s
    ae.network_timeout = cfg.timeouts.network_s
    ae.connection_timeout = cfg.timeouts.connect_s
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    return ae


def send_report(cfg: Config, caller: CallerConfig, peer: str, ds: Dataset,
                event_type: int) -> int:
    """Send one N-EVENT-REPORT on a new association to the caller; return the peer's status.

    Raises ConnectionError when no association could be opened or the peer did not answer."""
    from pynetdicom import build_role

    ae = commitment_ae(cfg)
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    host = caller.host or peer
    assoc = ae.associate(host, caller.port, ae_title=caller.ae_title, ext_neg=[role])
    if not assoc.is_established:
        raise ConnectionError(f"no association with {caller.ae_title} at {host}:{caller.port}")
    from gateway.forward import hand_back_responses

    hand_back_responses(assoc)  # the reactor race: the answer must reach the waiting call
    try:
        status, _reply = assoc.send_n_event_report(
            ds, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        if "Status" not in status:
            raise ConnectionError(f"{caller.ae_title} did not answer the N-EVENT-REPORT")
        return int(status.Status)
    finally:
        with contextlib.suppress(Exception):
            assoc.release()


ReportSender = Callable[[Config, CallerConfig, str, Dataset, int], int]


@dataclass
class _Open:
    request: CommitmentRequest
    attempts: int = 0
    next_attempt: float = 0.0


class CommitmentService:
    """Takes N-ACTION requests (``request``, in the association's thread) and reports them
    (one background thread). ``audit`` has ``append(event, **fields)``."""

    POLL_S = 1.0

    def __init__(self, config_provider: Callable[[], Config], locator: InstanceLocator,
                 audit: Any, sender: ReportSender = send_report,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config_provider
        self.locator = locator
        self.pacs = locator.pacs  # gateway.commitment_scu.PacsCommitment, or None
        self._audit = audit
        self._send = sender
        self._clock = clock
        self.store = RequestStore(config_provider().state_dir)
        self._open: dict[str, _Open] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> int:
        """Load the requests left open by an earlier run; start reporting. Returns their count."""
        for req in self.store.load_all():
            self._open[req.transaction_uid] = _Open(req)
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()
        return len(self._open)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def open_count(self) -> int:
        with self._cond:
            return len(self._open)

    # -- N-ACTION (association thread) -------------------------------------------------------

    def request(self, action_type: int, info: Dataset | None, calling_ae: str,
                peer: str) -> int:
        """Validate, make durable, audit; return the N-ACTION status. Never raises."""
        cfg = self._config()
        now = self._clock()
        try:
            callers = cfg.find_caller(calling_ae)
            if not any(c.commitment for c in callers):
                raise RequestRefused(STATUS_NOT_AUTHORIZED,
                                     "caller not allowed storage commitment")
            req = parse_request(action_type, info, calling_ae, peer,
                                cfg.commitment.max_instances, now)
            with self._cond:
                existing = self._open.get(req.transaction_uid)
                if existing is not None:
                    if existing.request.calling_ae != calling_ae:
                        raise RequestRefused(STATUS_DUPLICATE_INVOCATION,
                                             "Transaction UID open for another caller")
                    return STATUS_SUCCESS  # a repeat of an open request: one report
                self.store.put(req)
                self._open[req.transaction_uid] = _Open(req)
                self._cond.notify_all()
        except RequestRefused as exc:
            LOG.warning("storage commitment request from %r refused: %s", calling_ae,
                        exc.reason)
            self._audit_safe("commit-refused", calling_ae=calling_ae, peer=peer,
                             reason=exc.reason, status=f"0x{exc.status:04X}")
            return exc.status
        except OSError as exc:
            LOG.error("storage commitment request not saved: %s", exc)
            self._audit_safe("commit-refused", calling_ae=calling_ae, peer=peer,
                             reason=f"not saved: {type(exc).__name__}",
                             status=f"0x{STATUS_PROCESSING_FAILURE:04X}")
            return STATUS_PROCESSING_FAILURE
        self._audit_safe("commit-requested", calling_ae=calling_ae, peer=peer,
                         transaction_uid=req.transaction_uid, instances=len(req.refs))
        return STATUS_SUCCESS

    # -- reporting (background thread) -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(self.POLL_S)
                if self._stop:
                    return
                due = [o for o in self._open.values() if o.next_attempt <= self._clock()]
            self._process_each(due)
            if self.pacs is not None:
                try:
                    self.pacs.tick()
                except Exception:
                    LOG.exception("storage commitment requests to destinations")

    def process_all(self) -> None:
        """One pass over every open request (tests; the run loop takes the due ones)."""
        with self._cond:
            items = list(self._open.values())
        self._process_each(items)

    def _process_each(self, items: list[_Open]) -> None:
        """Report what is settled: the spool is read once for all of them, not per request."""
        if not items:
            return
        where = self.locator.locate({uid for item in items for _c, uid in item.request.refs})
        for item in items:
            try:
                self.process(item, where)
            except Exception:  # a bug must not stop reporting for every other request
                LOG.exception("storage commitment %s", item.request.transaction_uid)

    def process(self, item: _Open, where: Mapping[str, Located] | None = None) -> None:
        """Report one request if it is settled (``where``: a reading that covers its UIDs)."""
        cfg = self._config()
        req = item.request
        now = self._clock()
        if where is None:
            where = self.locator.locate(uid for _c, uid in req.refs)
        if self.pacs is not None:
            for cls_uid, uid in req.refs:
                for dest in where[uid].awaiting:
                    self.pacs.want(dest, cls_uid, uid)
        settlement = settle(req, where, now, cfg.commitment.quarantine_hold_s)
        if not settlement.ready:
            return
        callers = [c for c in cfg.find_caller(req.calling_ae) if c.commitment and c.port]
        ds, event_type = report_dataset(req, settlement)
        try:
            if not callers:
                raise ConnectionError(f"{req.calling_ae} has no [[callers]] entry with "
                                      "commitment = true and a port")
            status = self._send(cfg, callers[0], req.peer, ds, event_type)
            if status != 0:
                raise ConnectionError(f"{req.calling_ae} answered 0x{status:04X}")
        except Exception as exc:
            self._report_failed(item, cfg, now, f"{type(exc).__name__}: {exc}")
            return
        self.store.remove(req.transaction_uid)
        with self._cond:
            self._open.pop(req.transaction_uid, None)
        for _c, uid, code, why in settlement.failed:
            self._audit_safe("commit-failed", calling_ae=req.calling_ae, sop_uid=uid,
                             transaction_uid=req.transaction_uid, reason=why,
                             status=f"0x{code:04X}")
        self._audit_safe(
            "commit-reported", calling_ae=req.calling_ae, transaction_uid=req.transaction_uid,
            instances=len(req.refs), success=len(settlement.success),
            failed=len(settlement.failed), attempts=item.attempts + 1,
        )
        LOG.info("storage commitment %s reported to %s: %d committed, %d failed",
                 req.transaction_uid, req.calling_ae, len(settlement.success),
                 len(settlement.failed))

    def _report_failed(self, item: _Open, cfg: Config, now: float, error: str) -> None:
        req = item.request
        item.attempts += 1
        fw = cfg.forwarding
        if now - req.requested_at >= fw.max_age_s:
            self.store.remove(req.transaction_uid)
            with self._cond:
                self._open.pop(req.transaction_uid, None)
            LOG.error("storage commitment %s abandoned after %d attempts: %s",
                      req.transaction_uid, item.attempts, error)
            self._audit_safe("commit-abandoned", calling_ae=req.calling_ae,
                             transaction_uid=req.transaction_uid, attempts=item.attempts,
                             error=error)
            return
        delay = min(fw.backoff_max_s, fw.backoff_initial_s * 2 ** min(item.attempts - 1, 30))
        item.next_attempt = now + delay
        LOG.warning("storage commitment report %s to %s failed (attempt %d, next in %.0fs): %s",
                    req.transaction_uid, req.calling_ae, item.attempts, delay, error)

    def _audit_safe(self, event: str, **fields: Any) -> None:
        try:
            self._audit.append(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:
            LOG.exception("audit append failed for %s", event)
