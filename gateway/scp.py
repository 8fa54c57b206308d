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
  otherwise stall ~40 ms on delayed ACKs).
- Nothing a peer declares is buffered unchecked (issue 20: one unauthenticated connection
  declaring a 900 MiB PDU grew the daemon by 822 MB). pynetdicom reads a PDU whole, so every
  read goes through ``_PduReader``: before the association is established any PDU is capped at
  64 KiB (an A-ASSOCIATE-RQ), after it a P-DATA-TF at the maximum we advertised
  (``limits.max_pdu_kb``, always bounded) and anything else at 64 KiB; a longer declaration
  closes the connection after its 6-byte header. The request must be complete within
  ``timeouts.acse_s`` of the connect (no slow-loris slot holding), a PDU body that stalls for
  ``timeouts.network_s`` ends the connection, and a DIMSE message may hold at most
  ``IN_MEMORY_MESSAGE_LIMIT`` bytes in memory (datasets of C-STOREs stream to disk).
- Open TCP connections are counted when accepted, before any byte is read or any TLS handshake
  runs (``limits.max_connections``, ``limits.max_connections_per_address``); an excess one is
  closed at once. The TLS handshake runs in the connection's own thread under the same
  ``acse_s`` deadline, not in the accept loop where one silent peer would stall every other.
- The allow-list (calling AE title + source address, and optionally the client certificate's
  name, ``listener.tls.require_cert_matches_ae``) and association limits (overall and per
  caller) are enforced during association negotiation, answered with A-ASSOCIATE-RJ and the
  standard reason. Every refusal and abort, at any stage, is audited with its reason.
- Past the spool's disk watermark the answer is 0xA700 (Out of Resources).
"""

from __future__ import annotations

import contextlib
import functools
import io
import ipaddress
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

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway.commitment import STORAGE_COMMITMENT_PUSH
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

# Longest PDU read before the association is established (an A-ASSOCIATE-RQ: 128 presentation
# contexts with a handful of transfer syntaxes each stay far below), and of any PDU other than
# P-DATA-TF after it (release and abort PDUs carry 4 bytes).
SMALL_PDU_LIMIT = 64 * 1024
# Bytes one DIMSE message may hold in memory: its command set, or the dataset of a message that
# is not a C-STORE (those stream to spool/tmp). A command set is a few hundred bytes.
IN_MEMORY_MESSAGE_LIMIT = 1024 * 1024
# Complete DIMSE messages waiting for the association's thread. A peer that waits for answers
# (no asynchronous operations are negotiated) never has more than one; each queued C-STORE
# holds an open file in spool/tmp.
MAX_QUEUED_MESSAGES = 8
_READ_CHUNK = 256 * 1024  # one recv_into; pynetdicom's own loop reads 4 KiB at a time
# DUL states in which an association is (or was just) established: P-DATA-TF may arrive.
_DATA_STATES = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})
_PDU_TYPES = frozenset(range(0x01, 0x08))


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
class _Connection:
    """One accepted TCP connection, counted from accept() until its socket is closed."""

    peer: str
    opened: float = field(default_factory=time.monotonic)
    counted: bool = True


@dataclass
class _AssocState:
    assoc_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    counted: bool = False
    bytes_in: int = 0
    too_large: bool = False
    requested: bool = False  # an A-ASSOCIATE-RQ was decoded on this connection
    ended: bool = False  # refused or aborted by us, and audited: audit it once
    conn: _Connection | None = None


class _Refused(OSError):
    """Raised into pynetdicom's DUL to end a connection we refused (it catches OSError)."""


_LOG_QUIET = threading.local()


class _QuietRefusals(logging.Filter):
    """Drop pynetdicom's errors and tracebacks for a connection we ended on purpose.

    The DUL logs every failed or short read as an error with a traceback; for our own
    refusals the gateway has already logged one warning and written the audit line. The flag
    is per thread, and each connection has its own DUL thread, which ends with it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_LOG_QUIET, "active", False)


class _PduReader:
    """pynetdicom's PDU reads for one connection, bounded in length and in time.

    Replaces ``AssociationSocket.recv``: the DUL reads a PDU as ``recv(6)`` (type, reserved,
    length), then ``recv(length)``, and buffers the whole body. Here the header is checked
    before the body is read: a declared length above the limit for this PDU type and phase
    refuses the connection (``pdu-too-large``), so at most the limit is ever buffered. Reads go
    with ``recv_into`` into one buffer per connection, reused, and the DUL copies out of the
    view returned (measured: as fast as pynetdicom's own 4 KiB loop; a fresh zeroed buffer per
    256 KiB PDU received ~35% slower from a pynetdicom sender).
    """

    def __init__(self, receiver: StorageReceiver, assoc: Any, sock: socket.socket,
                 conn: _Connection, acse_s: float, network_s: float) -> None:
        self._receiver = receiver
        self._assoc = assoc
        self._sock = sock
        self._deadline = conn.opened + acse_s
        self._network_s = network_s
        self._body: int | None = None  # length announced by the header just read
        self._established = False
        self._buf = memoryview(bytearray(4096))  # grows to the longest PDU allowed, once

    def _data_phase(self) -> bool:
        """True once the association is established (sticky: release and abort follow)."""
        if not self._established:
            try:
                state = self._assoc.dul.state_machine.current_state
            except AttributeError:
                return False
            if state in _DATA_STATES:
                self._established = True
                self._sock.settimeout(self._network_s)
        return self._established

    def limit(self, pdu_type: int) -> int:
        if pdu_type == 0x04 and self._data_phase():
            return int(self._assoc.acceptor.maximum_length or SMALL_PDU_LIMIT)
        return SMALL_PDU_LIMIT

    def recv(self, nr_bytes: int) -> memoryview:
        """What pynetdicom's DUL asked for; valid until the next call (it copies at once)."""
        if self._body is None:  # a PDU header
            data = self._read(nr_bytes)
            if len(data) == 6 and data[0] in _PDU_TYPES:
                length = int.from_bytes(data[2:6], "big")
                limit = self.limit(data[0])
                if length > limit:
                    phase = "advertised" if data[0] == 0x04 and self._established else (
                        "before association" if not self._established else "for this PDU")
                    self._refuse("pdu-too-large", f"PDU type 0x{data[0]:02X} declares {length} "
                                 f"bytes; the limit {phase} is {limit}")
                self._body = length
            return data
        expected, self._body = self._body, None
        if nr_bytes != expected:  # not pynetdicom's read pattern: never read past a limit
            self._refuse("pdu-too-large", f"read of {nr_bytes} bytes after a header of "
                         f"{expected}")
        data = self._read(nr_bytes)
        if not self._established:
            # the request is in: the answer (A-ASSOCIATE-AC/RJ) is sent under the network
            # timeout, not under what is left of the request's deadline
            self._sock.settimeout(self._network_s)
        return data

    def _read(self, n: int) -> memoryview:
        if n > len(self._buf):  # within the limit: the header was checked
            self._buf = memoryview(bytearray(max(n, self.limit(0x04))))
        view = self._buf
        got = 0
        while got < n:
            if not self._data_phase():
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._timed_out()
                self._sock.settimeout(left)
            try:
                k = self._sock.recv_into(view[got:n], min(n - got, _READ_CHUNK))
            except TimeoutError:
                self._timed_out()
            if not k:
                break
            got += k
        return view[:got]

    def _timed_out(self) -> None:
        if self._established:
            self._refuse("network-timeout",
                         f"no data for {self._network_s:g} s in the middle of a PDU")
        self._refuse("association-request-timeout",
                     "no complete association request within timeouts.acse_s")

    def _refuse(self, reason: str, detail: str) -> None:
        self._receiver._end(self._assoc, reason, detail)
        raise _Refused(detail)


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


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with the gateway's connection admission.

    ``verify_request`` runs in the accept loop for every new connection, before a thread is
    started, a byte is read or a TLS handshake begins: it counts the connection or closes it.
    ``get_request`` wraps TLS without handshaking (pynetdicom's handshakes in the accept loop,
    where one peer that never speaks stalls every other connection); the connection's own
    thread handshakes under the ``acse_s`` deadline.
    """

    receiver: StorageReceiver
    request_queue_size = 128  # a burst of refused connections must not crowd out a modality
    block_on_close = False  # shutdown must not wait for handshakes in progress
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.receiver._open_connection(request, client_address)


class _Handler(RequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.receiver._serve_connection(self)


class RefusalThrottle:
    """At most one audit line per (peer, reason) every ``window_s`` for refusals in the accept
    loop, with the count of those left out in the next one.

    Why: the accept loop refuses a connection flood, and each audit line is an fsync. Auditing
    every refused connection would pace the accept loop (and every honest caller behind it) at
    the disk's fsync rate, which is what the flood wants; the metrics still count every one.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._last: dict[tuple[str, str], float] = {}
        self._skipped: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, str], now: float) -> int | None:
        """None: leave this one out of the audit; else write it, with this many left out."""
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.window_s:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            if len(self._last) > 4096:  # many peers: forget those whose window is over
                self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
            self._last[key] = now
            return self._skipped.pop(key, 0)


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
        on_commit: Callable[[int, Any, str, str], int] | None = None,
        on_commit_report: Callable[[str, str, int, Any], int] | None = None,
    ) -> None:
        self._config = config_provider
        self._on_commit = on_commit
        self._on_commit_report = on_commit_report
        self._on_stored = on_stored
        self._audit = audit
        self._metrics = metrics
        self._early_rule = early_rule
        cfg = config_provider()
        self.layout = SpoolLayout(cfg.state_dir)
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._total = 0
        self._connections = 0
        self._per_address: dict[str, int] = {}
        self._accepted: dict[int, _Connection] = {}  # id(socket) -> counted, not yet served
        self._refusals = RefusalThrottle()
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
        dul_log = logging.getLogger("pynetdicom.dul")
        if not any(isinstance(f, _QuietRefusals) for f in dul_log.filters):
            dul_log.addFilter(_QuietRefusals())
        ae = AE(ae_title=cfg.listener.ae_title)
        ae.maximum_pdu_size = cfg.limits.max_pdu_bytes  # bounded: see _PduReader
        ae.acse_timeout = cfg.timeouts.acse_s
        ae.dimse_timeout = cfg.timeouts.dimse_s
        ae.network_timeout = cfg.timeouts.network_s
        # Our own admission counts connections and associations and audits; pynetdicom's
        # (which counts connection threads) is only a backstop above ours.
        ae.maximum_associations = cfg.limits.max_connections + 1
        # Storage SOP Classes need no supported context: the unrestricted storage service
        # accepts each in the caller's first transfer syntax without looking at this list
        # (pynetdicom.presentation.negotiate_unrestricted). Listing all ~130 of them with every
        # transfer syntax cost ~55 ms of CPU per association, for nothing: pynetdicom
        # deep-copies the list into each new association (bench/RESULTS.md).
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self._on_commit is not None or self._on_commit_report is not None:
            # N-ACTION from modalities; N-EVENT-REPORT from a PACS that reports on an association
            # of its own, proposing the SCP role for itself (PS3.4 J.3.3): accept either role.
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, ALL_TRANSFER_SYNTAXES,
                                     scu_role=True, scp_role=True)
        handlers = [
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_N_EVENT_REPORT, self._on_n_event_report),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._ae = ae
        server = ae.make_server(
            (cfg.listener.host, cfg.listener.port),
            evt_handlers=handlers,
            ssl_context=server_ssl_context(cfg),
            server_class=_Server,
            request_handler=_Handler,
        )
        server.receiver = self
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer",
                                  daemon=True)
        thread.start()
        ae._servers.append(server)  # server.shutdown() removes it from there
        self._server = server
        host, port = server.server_address[:2]
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
        state.requested = True
        reason = ""
        detail: str | None = None
        rejection: tuple[int, int, int] | None = None
        callers = cfg.find_caller(calling)
        tls = cfg.listener.tls
        if not self._accepting:
            rejection, reason = RJ_LIMIT, "draining"
        elif called != cfg.listener.ae_title:
            rejection, reason = RJ_CALLED_AE, "called-ae-not-recognised"
        elif not callers:
            rejection, reason = RJ_CALLING_AE, "calling-ae-not-allowed"
        elif not any(c.allows(peer) for c in callers):
            rejection, reason = RJ_NO_REASON, "address-not-allowed"
        elif tls is not None and tls.require_cert_matches_ae and calling not in (
                names := certificate_names(assoc)):
            rejection, reason = RJ_CALLING_AE, "certificate-ae-mismatch"
            detail = "certificate names: " + (", ".join(names) or "(no certificate)")
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
            state.ended = True
            self._audit_safe(
                "rejected", calling_ae=calling, called_ae=called, peer=peer, reason=reason,
                detail=detail,
            )
            if self._metrics is not None:
                # a title off the allow-list is the sender's choice: one label for all of
                # them keeps the series bounded (the audit line above names it)
                self._metrics.rejected(calling if callers else "UNKNOWN", "", reason)
        return rejection

    # -- connections: counted at accept, bounded until admitted ------------------------------

    def _open_connection(self, request: Any, client_address: Any) -> bool:
        """Count a new TCP connection, or refuse it (closed unread) past the limits.

        Runs in the accept loop: quick, no reads. Audited, since a flood of connections is
        exactly what an operator must be able to see afterwards.
        """
        limits = self._config().limits
        peer = _normal_address(client_address[0] if client_address else "")
        reason = ""
        with self._lock:
            if self._connections >= limits.max_connections:
                reason = "connection-limit"
                detail = f"{self._connections} connections open (limits.max_connections)"
            elif self._per_address.get(peer, 0) >= limits.max_connections_per_address:
                reason = "address-connection-limit"
                detail = (f"{self._per_address[peer]} connections open from this address "
                          "(limits.max_connections_per_address)")
            else:
                self._connections += 1
                self._per_address[peer] = self._per_address.get(peer, 0) + 1
                self._accepted[id(request)] = _Connection(peer)
                return True
        if self._metrics is not None:
            self._metrics.rejected("UNKNOWN", "", reason)
        suppressed = self._refusals.admit((peer, reason), time.monotonic())
        if suppressed is None:  # this window's line is written: counted only, not fsynced
            return False
        LOG.warning("connection from %s closed unread: %s", peer, reason)
        self._audit_safe("rejected", peer=peer, reason=reason, detail=detail,
                         suppressed=suppressed or None)
        return False

    def _release_connection(self, conn: _Connection) -> None:
        with self._lock:
            if not conn.counted:
                return
            conn.counted = False
            self._connections -= 1
            _count_down(self._per_address, conn.peer)

    def open_connections(self) -> int:
        """TCP connections open now (admitted or not yet), for tests and metrics."""
        with self._lock:
            return self._connections

    def _serve_connection(self, handler: _Handler) -> None:
        """The connection's thread: TLS handshake, then pynetdicom's association, guarded."""
        sock = handler.request
        with self._lock:
            conn = self._accepted.pop(id(sock), None)
        if conn is None:  # not through verify_request (cannot happen with _Server)
            conn = _Connection(_normal_address(handler.client_address[0]), counted=False)
        cfg = self._config()
        started = False
        try:
            set_nodelay(sock)
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(max(0.001, conn.opened + cfg.timeouts.acse_s - time.monotonic()))
                try:
                    sock.do_handshake()
                except (OSError, ValueError) as exc:
                    LOG.warning("TLS handshake with %s failed: %s", conn.peer, exc)
                    self._audit_safe("rejected", peer=conn.peer, reason="tls-handshake-failed",
                                     detail=str(exc)[:300])
                    if self._metrics is not None:
                        self._metrics.rejected("UNKNOWN", "", "tls-handshake-failed")
                    return
            if self._ae is not None:
                self._ae.maximum_associations = cfg.limits.max_connections + 1
            assoc = handler._create_association()
            # the maximum we advertise and enforce on this association (reloads apply to new
            # associations only)
            assoc.acceptor.maximum_length = cfg.limits.max_pdu_bytes
            st = _state(assoc)
            st.peer, st.conn = conn.peer, conn
            assoc.acse = _PolicyACSE(assoc, self)
            reader = _PduReader(self, assoc, sock, conn, cfg.timeouts.acse_s,
                                cfg.timeouts.network_s)
            assoc.dul.socket.recv = reader.recv  # type: ignore[method-assign]
            run = assoc.run

            def run_then_release() -> None:
                try:
                    run()
                finally:
                    with contextlib.suppress(OSError):
                        sock.close()
                    self._release_association(st)
                    self._release_connection(conn)

            assoc.run = run_then_release  # type: ignore[method-assign]
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": handler.client_address})
            assoc.start()
            started = True
        finally:
            if not started:
                with contextlib.suppress(OSError):
                    sock.close()
                self._release_connection(conn)

    def _end(self, assoc: Any, reason: str, detail: str) -> None:
        """Refuse or abort a connection now: log and audit it once, shut the socket down.

        Called from the connection's DUL thread; the socket's shutdown makes the peer see
        the end at once (its further sends are reset), whatever pynetdicom does next.
        """
        st = _state(assoc)
        _LOG_QUIET.active = True  # this connection's DUL thread: see _QuietRefusals
        if not st.ended:
            st.ended = True
            LOG.warning("ending connection from %s (caller %r): %s: %s",
                        st.peer or _peer(assoc), st.calling_ae, reason, detail)
            self._audit_safe("rejected", calling_ae=st.calling_ae or None,
                             called_ae=st.called_ae or None, peer=st.peer or _peer(assoc),
                             reason=reason, detail=detail)
            if self._metrics is not None:
                self._metrics.rejected(st.calling_ae if st.counted else "UNKNOWN", "", reason)
        with contextlib.suppress(OSError, AttributeError):
            assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    def _on_established(self, event: Any) -> None:
        st = _state(event.assoc)
        self._audit_safe(
            "association", calling_ae=st.calling_ae, called_ae=st.called_ae, peer=st.peer,
            status="accepted",
        )

    def _on_conn_close(self, event: Any) -> None:
        assoc = event.assoc
        st = _state(assoc)
        self._release_association(st)
        if not st.requested:
            # Closed before any association request was decoded. pynetdicom's association
            # thread would wait out acse_s for one: wake it, so the connection's slot frees now.
            conn = st.conn
            if (not st.ended and conn is not None and self._config().timeouts.acse_s
                    <= time.monotonic() - conn.opened + 0.05):
                self._end(assoc, "association-request-timeout",
                          "no association request within timeouts.acse_s")
            with contextlib.suppress(AttributeError):
                assoc.dul.to_user_queue.put(None)

    def _release_association(self, st: _AssocState) -> None:
        with self._lock:
            if not st.counted:
                return
            st.counted = False
            self._total -= 1
            _count_down(self._active, st.calling_ae)

    def _on_data(self, event: Any) -> None:
        """Bound what one association makes us hold, before each PDU is decoded.

        The instance in progress may not pass ``max_instance_mb`` (it streams to disk, but the
        disk is shared); a DIMSE message may not hold more than IN_MEMORY_MESSAGE_LIMIT in
        memory (command fragments that never end, or a dataset that is not a C-STORE's); and
        at most MAX_QUEUED_MESSAGES complete messages may wait for the association's thread.
        """
        assoc = event.assoc
        st = _state(assoc)
        st.bytes_in += len(event.data)
        if not st.too_large and st.bytes_in > self._config().limits.max_instance_bytes:
            st.too_large = True
            self._end(assoc, "instance-too-large",
                      f"more than {self._config().limits.max_instance_bytes} bytes")
            return
        dimse = getattr(assoc, "dimse", None)
        msg = getattr(dimse, "message", None)
        if msg is not None:
            held = _buffered(getattr(msg, "encoded_command_set", None))
            if getattr(msg, "_data_set_file", None) is None:
                held += _buffered(getattr(msg, "data_set", None))
            if held > IN_MEMORY_MESSAGE_LIMIT:
                self._end(assoc, "message-too-large",
                          f"{held} bytes of one DIMSE message held in memory")
                return
        queued = getattr(getattr(dimse, "msg_queue", None), "qsize", lambda: 0)()
        if queued > MAX_QUEUED_MESSAGES:
            self._end(assoc, "too-many-outstanding-messages",
                      f"{queued} messages sent without waiting for answers")

    # -- the C-STORE handler: spool only ---------------------------------------------------

    def _on_store(self, event: Any) -> int:
        cfg = self._config()
        st = _state(event.assoc)
        st.bytes_in = 0
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        # The SOP class of the negotiated presentation context, not the request's own claim: a
        # rule's pass holds only when the dataset names the same class (gateway.rules).
        sop_class = str(getattr(getattr(event, "context", None), "abstract_syntax", "")
                        or req.AffectedSOPClassUID or "")
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

    # -- Storage Commitment: the request only; gateway.commitment reports it ------------------

    def _on_n_action(self, event: Any) -> tuple[int, None]:
        st = _state(event.assoc)
        req = event.request
        if self._on_commit is None or str(req.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # No such SOP Class
        try:
            info = event.action_information
        except Exception:  # undecodable Action Information: the service refuses it
            info = None
        return self._on_commit(int(req.ActionTypeID or 0), info, st.calling_ae, st.peer), None

    def _on_n_event_report(self, event: Any) -> tuple[int, None]:
        """A commitment destination's report of what it committed (gateway.commitment_scu)."""
        st = _state(event.assoc)
        req = event.request
        if (self._on_commit_report is None
                or str(req.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH):
            return 0x0118, None  # No such SOP Class
        try:
            info = event.event_information
        except Exception:
            info = None
        return self._on_commit_report(st.calling_ae, st.peer, int(req.EventTypeID or 0),
                                      info), None

    def _audit_safe(self, event: str, **fields: Any) -> None:
        try:
            self._audit.append(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:  # the audit must never take the receiver down
            LOG.exception("audit append failed for %s", event)


def _count_down(counts: dict[str, int], key: str) -> None:
    """One less open under ``key``; the key leaves the map at zero, so that the per-caller and
    per-address maps hold only what is open (their keys are the peers' choice)."""
    n = counts.get(key, 1) - 1
    if n <= 0:
        counts.pop(key, None)
    else:
        counts[key] = n


def _state(assoc: Any) -> _AssocState:
    st = getattr(assoc, "_sentinel", None)
    if st is None:
        st = _AssocState()
        assoc._sentinel = st
    return st


def _peer(assoc: Any) -> str:
    try:
        return _normal_address(str(assoc.requestor.address))
    except (ValueError, AttributeError):
        return ""


def _normal_address(address: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4 (one count and one audit form per host)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _buffered(obj: Any) -> int:
    """Bytes written so far to an in-memory buffer (0 for anything else)."""
    if isinstance(obj, io.BytesIO):
        return obj.getbuffer().nbytes
    return 0


def certificate_names(assoc: Any) -> tuple[str, ...]:
    """The verified client certificate's subject CN and SAN DNS names (stripped), if any.

    These are what ``listener.tls.require_cert_matches_ae`` compares with the calling AE
    title: a certificate then vouches for the AE title, not only for the hospital's CA.
    """
    try:
        sock = assoc.dul.socket.socket
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    except (AttributeError, OSError, ValueError):
        cert = None
    if not cert:
        return ()
    names = [str(value) for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    names += [str(value) for key, value in cert.get("subjectAltName", ()) if key == "DNS"]
    return tuple(n.strip() for n in names)
