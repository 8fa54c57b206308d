"""Storage Commitment SCU towards a destination that supports it (``commitment = true``).

Why: for such a destination, "delivered" is not the C-STORE's Success but the PACS's own
commitment. A modality's commitment request (gateway.commitment) that lists an instance sent to
it therefore waits until the PACS has committed it too, and a PACS that reports a failure makes
the instance fail towards the modality (and is audited as an alert).

Commitment is asked for on demand, for the instances a modality's open request waits on: the
modality's request is the durable record, so nothing here needs its own queue to survive a
crash. What the PACS answered is durable (``spool/committed/<dest>.log`` and
``spool/commit-refused/<dest>.log``, fsynced ledgers like the sent ledger). An N-ACTION left
without a report for ``commitment.pacs_report_timeout_s`` is asked again with a new Transaction
UID; a report for any transaction is accepted from the destination (after a restart too), but
only from an association whose calling AE title is the destination's and, when the
destination's host is an IP address, whose peer is that address: a report is a claim that the
archive holds the images, and nobody else may make it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    commitment_ae,
    ref_items,
)
from gateway.config import Config, DestinationConfig, host_ip
from gateway.spool import SentLedger, SpoolLayout, valid_uid

LOG = logging.getLogger("sentinel.commitment")

COMMITTED = "committed"
REFUSED = "refused"
AWAITING = "awaiting"

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110


def send_commit_request(cfg: Config, dest: DestinationConfig, txn: str,
                        refs: list[tuple[str, str]]) -> int:
    """One N-ACTION Request Storage Commitment to ``dest``; the PACS's status.

    Raises ConnectionError when no association could be opened or nothing was answered."""
    from gateway.forward import client_ssl_context

    ae = commitment_ae(cfg)
    ssl_ctx = client_ssl_context(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(ssl_ctx, dest.host) if ssl_ctx is not None else None)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {dest.name} for storage commitment")
    from gateway.forward import hand_back_responses

    hand_back_responses(assoc)  # the reactor race: the answer must reach the waiting call
    try:
        ds = Dataset()
        ds.TransactionUID = txn
        ds.ReferencedSOPSequence = ref_items(refs)
        status, _reply = assoc.send_n_action(ds, 1, STORAGE_COMMITMENT_PUSH,
                                             STORAGE_COMMITMENT_INSTANCE)
        if "Status" not in status:
            raise ConnectionError(f"{dest.name} did not answer the N-ACTION")
        return int(status.Status)
    finally:
        with contextlib.suppress(Exception):
            assoc.release()


CommitRequester = Callable[[Config, DestinationConfig, str, list[tuple[str, str]]], int]


class PacsCommitment:
    """What each commitment destination committed or refused, and the asking."""

    def __init__(self, config_provider: Callable[[], Config], layout: SpoolLayout, audit: Any,
                 requester: CommitRequester = send_commit_request,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config_provider
        self.layout = layout
        self._audit = audit
        self._request = requester
        self._clock = clock
        self._lock = threading.Lock()
        self._ledgers: dict[tuple[str, str], SentLedger] = {}
        self._wanted: dict[str, dict[str, str]] = {}  # dest -> uid -> SOP class
        self._asked: dict[tuple[str, str], float] = {}  # (dest, uid) -> last N-ACTION time
        self._outstanding: dict[str, str] = {}  # transaction UID -> dest
        self._hold_until: dict[str, float] = {}  # dest -> next try after a failed N-ACTION
        self._failures: dict[str, int] = {}

    # -- ledgers -----------------------------------------------------------------------------

    def _ledger(self, kind: str, dest: str) -> SentLedger:
        key = (kind, dest)
        with self._lock:
            ledger = self._ledgers.get(key)
            if ledger is None:
                path = (self.layout.committed_log(dest) if kind == COMMITTED
                        else self.layout.commit_refused_log(dest))
                days = self._config().retention.sent_ledger_days
                ledger = SentLedger(path, days * 86400)
                self._ledgers[key] = ledger
            return ledger

    def status(self, dest: str, uid: str) -> str:
        """Committed, refused, or still awaited by ``dest``."""
        if self._ledger(REFUSED, dest).sent_at(uid) is not None:
            return REFUSED
        if self._ledger(COMMITTED, dest).sent_at(uid) is not None:
            return COMMITTED
        return AWAITING

    def close(self) -> None:
        with self._lock:
            for ledger in self._ledgers.values():
                ledger.close()
            self._ledgers.clear()

    # -- asking --------------------------------------------------------------------------------

    def want(self, dest: str, sop_class: str, uid: str) -> None:
        """An open modality request waits on ``uid`` at ``dest``: ask the PACS (in ``tick``)."""
        with self._lock:
            self._wanted.setdefault(dest, {})[uid] = sop_class

    def tick(self) -> None:
        """Send the N-ACTIONs due: instances wanted and not asked within the report timeout."""
        cfg = self._config()
        now = self._clock()
        timeout = cfg.commitment.pacs_report_timeout_s
        with self._lock:
            batches: dict[str, list[tuple[str, str]]] = {}
            for dest, wanted in self._wanted.items():
                if self._hold_until.get(dest, 0.0) > now:
                    continue
                due = [(cls, uid) for uid, cls in wanted.items()
                       if now - self._asked.get((dest, uid), -1e18) >= timeout]
                if due:
                    batches[dest] = due[: cfg.commitment.max_instances]
            self._wanted = {}
        for dest_name, refs in batches.items():
            dest = cfg.destinations.get(dest_name)
            if dest is None or not dest.commitment:
                continue
            txn = generate_uid()
            try:
                status = self._request(cfg, dest, txn, refs)
                if status != STATUS_SUCCESS:
                    raise ConnectionError(f"{dest_name} answered the N-ACTION 0x{status:04X}")
            except Exception as exc:
                n = self._failures[dest_name] = self._failures.get(dest_name, 0) + 1
                fw = cfg.forwarding
                delay = min(fw.backoff_max_s, fw.backoff_initial_s * 2 ** min(n - 1, 30))
                with self._lock:
                    self._hold_until[dest_name] = now + delay
                LOG.warning("storage commitment request to %s failed (next in %.0fs): %s",
                            dest_name, delay, exc)
                continue
            self._failures.pop(dest_name, None)
            with self._lock:
                self._outstanding[txn] = dest_name
                for _cls, uid in refs:
                    self._asked[(dest_name, uid)] = now
            LOG.info("asked %s to commit %d instance(s) (transaction %s)", dest_name,
                     len(refs), txn)

    # -- the PACS's report (an association thread) -------------------------------------------

    def on_report(self, calling_ae: str, peer: str, event_type: int,
                  info: Dataset | None) -> int:
        """Record an N-EVENT-REPORT from a commitment destination; its status."""
        cfg = self._config()
        dests = [d for d in cfg.destinations.values()
                 if d.kind == "dicom" and d.commitment and d.ae_title == calling_ae
                 and _same_host(d.host, peer)]
        if not dests or info is None:
            why = "not a commitment destination" if not dests else "no event information"
            LOG.warning("storage commitment report from %r at %s refused: %s", calling_ae,
                        peer, why)
            self._audit_safe("commit-refused", calling_ae=calling_ae, peer=peer, reason=why,
                             status=f"0x{STATUS_PROCESSING_FAILURE:04X}")
            return STATUS_PROCESSING_FAILURE
        try:
            txn = str(info.get("TransactionUID", "") or "")
            done = [str(i.get("ReferencedSOPInstanceUID", "") or "")
                    for i in info.get("ReferencedSOPSequence", None) or []]
            failed = [(str(i.get("ReferencedSOPInstanceUID", "") or ""),
                       int(i.get("FailureReason", STATUS_PROCESSING_FAILURE) or 0))
                      for i in info.get("FailedSOPSequence", None) or []]
        except Exception as exc:
            self._audit_safe("commit-refused", calling_ae=calling_ae, peer=peer,
                             reason=f"undecodable report: {type(exc).__name__}",
                             status=f"0x{STATUS_PROCESSING_FAILURE:04X}")
            return STATUS_PROCESSING_FAILURE
        with self._lock:
            name = self._outstanding.pop(txn, None)
        dest = next((d for d in dests if d.name == name), dests[0])
        committed = self._ledger(COMMITTED, dest.name)
        refused = self._ledger(REFUSED, dest.name)
        for uid in done:
            if valid_uid(uid):
                committed.add(uid)
        for uid, code in failed:
            if not valid_uid(uid):
                continue
            refused.add(uid)
            LOG.error("%s refused to commit %s (0x%04X)", dest.name, uid, code)
            self._audit_safe("commit-failed", destination=dest.name, sop_uid=uid,
                             transaction_uid=txn if valid_uid(txn) else None,
                             reason="pacs-refused", status=f"0x{code:04X}")
        self._audit_safe("commit-reported", destination=dest.name, calling_ae=calling_ae,
                         transaction_uid=txn if valid_uid(txn) else None,
                         success=len(done), failed=len(failed))
        return STATUS_SUCCESS

    def _audit_safe(self, event: str, **fields: Any) -> None:
        try:
            self._audit.append(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:
            LOG.exception("audit append failed for %s", event)


def _same_host(host: str, peer: str) -> bool:
    """The peer is the destination's address (when the destination is configured by IP)."""
    want = host_ip(host)
    if want is None:
        return True  # a host name: the [[callers]] allow-list is the address check
    return host_ip(peer) == want
