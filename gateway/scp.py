"""The Storage SCP: accept instances from allowed callers and spool them durably, nothing more.

Why it does so little: the modality's Success (0x0000) is a promise that the instance is safe.
The C-STORE handler therefore only makes the received bytes durable (fsync the file pynetdicom
streamed to disk, write the caller sidecar, rename both into ``spool/incoming``, fsync the
directory) and hands a small record to the screening queue; detection and forwarding run
elsewhere. Anything that is not on disk gets a failure status, never Success.

Design points, each measured or required:
- Datasets are streamed to ``spool/tmp`` as they arrive (pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET``), so a large instance is never held whole in memory, and the
  final rename stays on one filesystem. The file is stored exactly as received (preamble, file
  meta, then the dataset bytes as sent, in the negotiated transfer syntax), so forwarding can be
  byte-for-byte.
- ``TCP_NODELAY`` on every accepted socket (pynetdicom 3.0.4 never sets it; loopback C-STOREs
  otherwise stall ~40 ms on delayed ACKs) and ``maximum_pdu_size = 0``.
- The allow-list (calling AE title + source address) and association limits (overall and per
  caller) are enforced during association negotiation, answered with A-ASSOCIATE-RJ and the
  standard reason, and audited.
- Past the spool's disk watermark the answer is 0xA700 (Out of Resources).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.config import Config
from gateway.spool import (
    SpoolLayout,
    free_bytes,
    fsync_dir,
    next_seq,
    set_meta_xattr,
    valid_uid,
    write_json_durable,
)

LOG = logging.getLogger("sentinel.scp")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: Refused: Not Authorized (a "reject" rule)
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21
RJ_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
RJ_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised
RJ_NO_REASON = (0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason (address)
RJ_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, presentation provider, local limit exceeded


@dataclass(frozen=True)
class StoredInstance:
    """What the SCP hands to the screening queue: an acknowledged instance on disk."""

    path: Path
    sop_uid: str
    sop_class: str
    calling_ae: str
    called_ae: str
    peer: str
    received_at: float
    seq: str = ""  # receipt order (sortable); forwarding keeps it within an association
    assoc_id: str = ""


@dataclass
class _AssocState:
    assoc_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    counted: bool = False
    bytes_in: int = 0
    too_large: bool = False


class _PolicyACSE(ACSE):
    """ACSE that runs the gateway's admission policy before pynetdicom's own negotiation."""

    def __init__(self, assoc: Any, receiver: StorageReceiver) -> None:
        super().__init__(assoc)
        self._receiver = receiver

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        self.requestor.ae_title = rq.calling_ae_title
        rejection = self._receiver._admit(self.assoc, rq.calling_ae_title, rq.called_ae_title)
        if rejection is not None:
            self.send_reject(*rejection)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle on a DICOM socket (the 40 ms delayed-ACK stall on loopback)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    tls = config.listener.tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class StorageReceiver:
    """The listening Storage + Verification SCP.

    ``config_provider`` returns the current Config (it changes on reload: callers, limits,
    rules and the watermark take effect for the next association or instance without a
    restart; the listener address, AE title and TLS need one). ``on_stored`` is called in the
    association's thread after an instance is durable; it must be quick (put on a queue).
    ``audit`` has ``append(event, **fields)``; ``metrics`` may be None.
    """

    def __init__(
        self,
        config_provider: Callable[[], Config],
        on_stored: Callable[[StoredInstance], None],
        audit: Any,
        metrics: Any = None,
        early_rule: Callable[[Config, str, str, str, str], Any] | None = None,
    ) -> None:
        self._config = config_provider
        self._on_stored = on_stored
        self._audit = audit
        self._metrics = metrics
        self._early_rule = early_rule
        cfg = config_provider()
        self.layout = SpoolLayout(cfg.state_dir)
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._total = 0
        self._accepting = True
        self._server: Any = None
        self._ae: AE | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind and serve in background threads; return the bound (host, port)."""
        cfg = self._config()
        self.layout.create()
        # Stream datasets into spool/tmp (same filesystem as incoming: rename, not copy).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Accept every storage SOP Class in the transfer syntax the caller proposes first (its
        # preference, normally the file's own). pynetdicom's default negotiation would pick by
        # *our* order and can hand a JPEG file an uncompressed context the caller cannot fill
        # (DCMTK storescu then fails "unable to convert"), or invite lossy re-compression.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        _dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
            tempfile.NamedTemporaryFile, dir=str(self.layout.tmp), prefix="rx-"
        )
        ae = AE(ae_title=cfg.listener.ae_title)
        ae.maximum_pdu_size = cfg.limits.max_pdu_bytes  # 0: unlimited (measured fastest)
        ae.acse_timeout = cfg.timeouts.acse_s
        ae.dimse_timeout = cfg.timeouts.dimse_s
        ae.network_timeout = cfg.timeouts.network_s
        # Our own admission check counts and audits; pynetdicom's is only a backstop.
        ae.maximum_associations = cfg.limits.max_associations + 1
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._ae = ae
        self._server = ae.start_server(
            (cfg.listener.host, cfg.listener.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=server_ssl_context(cfg),
        )
        host, port = self._server.server_address[:2]
        LOG.info("listening as %s on %s:%d", cfg.listener.ae_title, host, port)
        return host, port

    def stop_accepting(self) -> None:
        """Refuse new associations from now on (drain); running ones continue."""
        with self._lock:
            self._accepting = False

    def active_associations(self) -> int:
        with self._lock:
            return self._total

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ae is None or not [a for a in self._ae.active_associations if a.is_acceptor]:
                return True
            time.sleep(0.05)
        return False

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- admission ---------------------------------------------------------------------------

    def _admit(self, assoc: Any, calling_raw: str, called_raw: str) -> tuple[int, int, int] | None:
        """Decide on an association request; None admits it (and counts it)."""
        cfg = self._config()
        calling = str(calling_raw).strip()
        called = str(called_raw).strip()
        peer = _peer(assoc)
        state = _state(assoc)
        state.calling_ae, state.called_ae, state.peer = calling, called, peer
        reason = ""
        rejection: tuple[int, int, int] | None = None
        callers = cfg.find_caller(calling)
        if not self._accepting:
            rejection, reason = RJ_LIMIT, "draining"
        elif called != cfg.listener.ae_title:
            rejection, reason = RJ_CALLED_AE, "called-ae-not-recognised"
        elif not callers:
            rejection, reason = RJ_CALLING_AE, "calling-ae-not-allowed"
        elif not any(c.allows(peer) for c in callers):
            rejection, reason = RJ_NO_REASON, "address-not-allowed"
        else:
            with self._lock:
                if self._total >= cfg.limits.max_associations:
                    rejection, reason = RJ_LIMIT, "association-limit"
                elif self._active.get(calling, 0) >= cfg.limits.max_associations_per_caller:
                    rejection, reason = RJ_LIMIT, "caller-association-limit"
                else:
                    self._active[calling] = self._active.get(calling, 0) + 1
                    self._total += 1
                    state.counted = True
        if rejection is not None:
            LOG.warning("association refused: caller %r from %s: %s", calling, peer, reason)
            self._audit_safe(
                "rejected", calling_ae=calling, called_ae=called, peer=peer, reason=reason
            )
            if self._metrics is not None:
                # a title off the allow-list is the sender's choice: one label for all of
                # them keeps the series bounded (the audit line above names it)
                self._metrics.rejected(calling if callers else "UNKNOWN", "", reason)
        return rejection

    def _on_conn_open(self, event: Any) -> None:
        assoc = event.assoc
        with contextlib.suppress(AttributeError):
            set_nodelay(assoc.dul.socket.socket)
        assoc._sentinel = _AssocState()
        assoc.acse = _PolicyACSE(assoc, self)
        self._guard_pdu_length(assoc)

    def _guard_pdu_length(self, assoc: Any) -> None:
        """Refuse a PDU longer than we could ever accept before reading it.

        pynetdicom reads a PDU whole into memory, whatever length the peer declares and
        whatever maximum we advertised; a hostile 4 GB PDU would be buffered. The DUL reads a
        PDU's body with one ``recv(length)`` call: a longer one than the advertised maximum
        (or, when unlimited, than the maximum instance) closes the connection instead.
        """
        cfg = self._config()
        limits = cfg.limits
        ceiling = limits.max_pdu_bytes or limits.max_instance_bytes
        ceiling = max(ceiling + 64 * 1024, 1024 * 1024)  # headers, large A-ASSOCIATE-RQs
        sock = getattr(getattr(assoc, "dul", None), "socket", None)
        if sock is None:
            return
        recv = sock.recv
        receiver = self

        def guarded_recv(nr_bytes: int) -> bytes:
            if nr_bytes > ceiling:
                st = _state(assoc)
                LOG.warning("closing connection from %s: PDU of %d bytes declared (limit %d)",
                            st.peer or _peer(assoc), nr_bytes, ceiling)
                receiver._audit_safe("rejected", calling_ae=st.calling_ae or None,
                                     peer=st.peer or _peer(assoc), reason="pdu-too-large")
                raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {ceiling}")
            return recv(nr_bytes)  # type: ignore[no-any-return]

        sock.recv = guarded_recv

    def _on_established(self, event: Any) -> None:
        st = _state(event.assoc)
        self._audit_safe(
            "association", calling_ae=st.calling_ae, called_ae=st.called_ae, peer=st.peer,
            status="accepted",
        )

    def _on_conn_close(self, event: Any) -> None:
        st = _state(event.assoc)
        if st.counted:
            with self._lock:
                st.counted = False
                self._total -= 1
                n = self._active.get(st.calling_ae, 1) - 1
                if n <= 0:
                    self._active.pop(st.calling_ae, None)
                else:
                    self._active[st.calling_ae] = n

    def _on_data(self, event: Any) -> None:
        """Count bytes of the instance in progress; abort one that passes the size limit."""
        st = _state(event.assoc)
        st.bytes_in += len(event.data)
        if not st.too_large and st.bytes_in > self._config().limits.max_instance_bytes:
            st.too_large = True
            LOG.warning("aborting association from %r: instance over the size limit",
                        st.calling_ae)
            self._audit_safe(
                "rejected", calling_ae=st.calling_ae, peer=st.peer, reason="instance-too-large"
            )
            with contextlib.suppress(OSError, AttributeError):
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    # -- the C-STORE handler: spool only ---------------------------------------------------

    def _on_store(self, event: Any) -> int:
        cfg = self._config()
        st = _state(event.assoc)
        st.bytes_in = 0
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        tmp_path: Path | None = getattr(req, "_dataset_path", None)
        tmp_file = getattr(req, "_dataset_file", None)
        if tmp_path is None or tmp_file is None:
            return STATUS_CANNOT_UNDERSTAND
        too_large = st.too_large
        with contextlib.suppress(OSError):
            too_large = too_large or (
                os.fstat(tmp_file.fileno()).st_size > cfg.limits.max_instance_bytes
            )
        if too_large:
            # The data handler aborts such an association, but bytes already buffered can still
            # complete a C-STORE: refuse it here too, so an over-size instance is never kept.
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            return STATUS_OUT_OF_RESOURCES
        if not valid_uid(sop_uid):
            self._audit_safe("rejected", calling_ae=st.calling_ae, peer=st.peer,
                             reason="invalid-sop-instance-uid")
            return STATUS_CANNOT_UNDERSTAND
        if self._early_rule is not None:
            rule = self._early_rule(cfg, st.calling_ae, st.called_ae, st.peer, sop_class)
            if rule is not None and rule.action == "reject":
                self._audit_safe("rejected", calling_ae=st.calling_ae, peer=st.peer,
                                 sop_uid=sop_uid, sop_class=sop_class, rule=rule.name,
                                 reason="rule")
                if self._metrics is not None:
                    self._metrics.rejected(st.calling_ae, "", "rule")
                return STATUS_NOT_AUTHORIZED
        try:
            if free_bytes(self.layout.tmp) < cfg.state.min_free_bytes:
                self._audit_safe("rejected", calling_ae=st.calling_ae, peer=st.peer,
                                 sop_uid=sop_uid, reason="spool-full")
                if self._metrics is not None:
                    self._metrics.rejected(st.calling_ae, "", "spool-full")
                return STATUS_OUT_OF_RESOURCES
            now = time.time()
            seq = next_seq()
            tmp_file.flush()
            final = self.layout.incoming / f"{sop_uid}.dcm"
            meta = {
                "sop_uid": sop_uid,
                "sop_class": sop_class,
                "calling_ae": st.calling_ae,
                "called_ae": st.called_ae,
                "peer": st.peer,
                "received_at": now,
                "seq": seq,
                "assoc_id": st.assoc_id,
            }
            # The metadata rides on the file's inode (same fsync); a sidecar only where the
            # filesystem has no user xattrs. Both are durable before the rename.
            if not set_meta_xattr(tmp_file.fileno(), meta):
                write_json_durable(final.with_suffix(".json"), meta, sync_dir=False)
            os.fsync(tmp_file.fileno())
            os.replace(tmp_path, final)
            fsync_dir(self.layout.incoming)
        except OSError as exc:
            LOG.error("could not spool instance %s: %s", sop_uid, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            return STATUS_OUT_OF_RESOURCES
        if self._metrics is not None:
            self._metrics.acknowledged(st.calling_ae)
        self._on_stored(
            StoredInstance(
                path=final, sop_uid=sop_uid, sop_class=sop_class, calling_ae=st.calling_ae,
                called_ae=st.called_ae, peer=st.peer, received_at=now, seq=seq,
                assoc_id=st.assoc_id,
            )
        )
        return STATUS_SUCCESS

    def _audit_safe(self, event: str, **fields: Any) -> None:
        try:
            self._audit.append(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:  # the audit must never take the receiver down
            LOG.exception("audit append failed for %s", event)


def _state(assoc: Any) -> _AssocState:
    st = getattr(assoc, "_sentinel", None)
    if st is None:
        st = _AssocState()
        assoc._sentinel = st
    return st


def _peer(assoc: Any) -> str:
    try:
        return str(assoc.requestor.address)
    except (ValueError, AttributeError):
        return ""
