"""Forwarding: one durable FIFO queue per destination, drained by one thread each.

Why this shape:
- The queue is the directory ``spool/outbox/<dest>/`` (names sort in receipt order), rescanned
  about once a second, so instances put there by another process (``quarantine release``) are
  picked up by the running daemon, and nothing is lost on a crash.
- A destination never gets the same SOP Instance UID twice from us: a per-destination ledger of
  delivered UIDs (``spool/sent/<dest>.log``, fsynced) is consulted before each send and written
  before the outbox entry is removed. A dropped duplicate is audited (``duplicate-dropped``);
  the one exception is an operator's ``quarantine release --resend-duplicate``, marked in the
  entry's sidecar, which is sent and audited as such.
- Byte-for-byte: the stored file's dataset bytes are sent as they are, in their own transfer
  syntax (no decode, no re-encode); the association proposes exactly the (SOP Class, transfer
  syntax) pairs the queue holds. ``StreamedStoreRequest`` writes the request's PDUs from the
  file itself, because pynetdicom's per-PDU path cost as much as the PACS's whole store.
- ``associations`` persistent associations per destination (default 2; per presented calling AE
  title), one sender thread each, reopened when they fail; released after ``idle_release_s``
  without work. ``TCP_NODELAY`` is set on their sockets. A C-STORE waits for the peer's answer
  (Orthanc or DCMTK do not negotiate asynchronous operations), so one association is idle
  while the peer stores; a second overlaps that with the next transfer. The second sends only
  while ``extra_association_backlog_mb`` wait unsent: on large instances it is what lets
  forwarding keep up with screening, on a trickle of small ones it only costs the receiving
  side CPU (bench/RESULTS.md, "Streaming the forwarded C-STORE, and a second association for
  a backlog").
- Destination kinds: ``dicom`` (``DicomSender``), ``directory`` (``DirectorySender``) and
  ``dicomweb`` (``gateway.dicomweb.DicomWebSender``, STOW-RS): same queue, same outcomes.
- Failures back off exponentially (capped); a connection failure holds the whole destination,
  an instance refused by the peer holds only its study (others go on). After ``max_age_s`` an
  instance is dead-lettered to ``spool/dead/<dest>/``, audited and counted.
- Threads and state, in one paragraph: each association has a sender thread that claims the
  next sendable entry and sends it; a completer thread books each delivery (ledger fsync, then
  unlink, then the ``forwarded`` audit line) while the next C-STORE is already on the wire. The
  queue state they share (waiting entries, the ones in flight, the delivered ones not yet
  booked, the destination's hold) has one owner, the ``Forwarder``, and one lock (``_cond``);
  the only other lock makes the senders of a destination open their associations one at a time.
- Order: an instance is not sent while an earlier instance of its study is waiting, nor while an
  earlier instance from the same association is still being screened (``PendingOrder``). With
  one association instances also arrive in that order; with more, they start in that order
  and may finish out of it (DICOM receivers file instances by their UIDs, not by arrival).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from gateway.config import Config, DestinationConfig
from gateway.scp import set_nodelay
from gateway.spool import (
    SentLedger,
    SpoolLayout,
    fsync_dir,
    list_outbox,
    read_json,
    sop_from_outbox_name,
)

LOG = logging.getLogger("sentinel.forward")
RESCAN_S = 1.0
MAX_CONTEXTS = 120  # PS3.8 allows 128 presentation contexts; keep headroom
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class SendError(Exception):
    """A send that failed. ``connection`` True: the destination is unreachable (hold all).
    ``at_open`` True: no association could be opened (nothing of the instance was sent)."""

    def __init__(self, message: str, connection: bool, at_open: bool = False) -> None:
        super().__init__(message)
        self.connection = connection
        self.at_open = at_open


@dataclass
class Entry:
    name: str
    sop_uid: str
    seq: str
    meta: dict[str, Any]
    size: int = 0  # bytes of the stored file
    attempts: int = 0
    next_attempt: float = 0.0
    first_failure: float = 0.0

    @property
    def study(self) -> str:
        return str(self.meta.get("study_uid", ""))

    @property
    def assoc_id(self) -> str:
        return str(self.meta.get("assoc_id", ""))

    @property
    def enqueued_at(self) -> float:
        try:
            return float(self.meta.get("enqueued_at") or self.meta.get("received_at") or 0.0)
        except (TypeError, ValueError):
            return 0.0


def client_ssl_context(dest: DestinationConfig) -> ssl.SSLContext | None:
    """TLS for a DICOM destination: the peer's chain must lead to ``ca`` and, unless the
    destination says ``verify_hostname = false``, its certificate must name ``host``.

    Why the name too: a hospital CA signs certificates for modalities, workstations and other
    servers; with the chain alone, any of them (or whoever holds one's key) on the PACS's
    address or DNS name would receive the forwarded studies."""
    tls = dest.tls
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(str(tls.ca))
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.check_hostname = tls.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class DicomSender:
    """A persistent association to one DICOM destination, reopened as needed."""

    def __init__(self, dest: DestinationConfig, config_provider: Callable[[], Config],
                 open_lock: threading.Lock | None = None) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True  # stream the stored bytes as they are
        self.dest = dest
        self._config = config_provider
        # Senders of one destination open their associations one at a time: a PACS that limits
        # associations counts those still negotiating, and simultaneous requests could all be
        # refused where one at a time gets the allowed number accepted.
        self._open_lock = open_lock or threading.Lock()
        self._assoc: Any = None
        # the open association's request writer and response guard (tests read their counts)
        self._stream: StreamedStoreRequest | None = None
        self._guard: ResponsesToTheWaitingCall | None = None
        self._calling = ""
        self._contexts: list[tuple[str, str]] = []  # proposed pairs, most recent last

    def _open(self, calling_ae: str) -> None:
        with self._open_lock:
            self._negotiate(calling_ae)

    def _negotiate(self, calling_ae: str) -> None:
        cfg = self._config()
        ae = AE(ae_title=calling_ae)
        ae.maximum_pdu_size = 0
        ae.acse_timeout = cfg.timeouts.acse_s
        ae.dimse_timeout = cfg.timeouts.dimse_s
        ae.network_timeout = cfg.timeouts.network_s
        ae.connection_timeout = cfg.timeouts.connect_s
        for sop_class, ts in self._contexts[-MAX_CONTEXTS:]:
            ae.add_requested_context(sop_class, [ts])
        ssl_ctx = client_ssl_context(self.dest)
        assoc = ae.associate(
            self.dest.host,
            self.dest.port,
            ae_title=self.dest.ae_title,
            # server_hostname: the name the certificate must carry (SNI and check_hostname)
            tls_args=(ssl_ctx, self.dest.host) if ssl_ctx is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay_handler)],
        )
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
            raise SendError(
                f"association to {self.dest.host}:{self.dest.port} ({self.dest.ae_title}) {why}",
                connection=True, at_open=True,
            )
        self._stream = StreamedStoreRequest(assoc, assoc.dimse.send_msg)
        assoc.dimse.send_msg = self._stream
        self._guard = hand_back_responses(assoc)
        self._assoc = assoc
        self._calling = calling_ae

    def _accepted(self, sop_class: str, ts: str) -> bool:
        if self._assoc is None:
            return False
        return any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts
            for cx in self._assoc.accepted_contexts
        )

    def send(self, path: Path, meta: dict[str, Any]) -> None:
        fm = read_file_meta_info(path)
        sop_class = str(fm.MediaStorageSOPClassUID)
        ts = str(fm.TransferSyntaxUID)
        cfg = self._config()
        calling = cfg.listener.ae_title
        if self.dest.present_caller_ae and meta.get("calling_ae"):
            calling = str(meta["calling_ae"])
        if self._assoc is not None and (
            not self._assoc.is_established or self._calling != calling
        ):
            self.close()
        if not self._accepted(sop_class, ts):
            pair = (sop_class, ts)
            if pair not in self._contexts:
                self._contexts.append(pair)
                was_open = self._assoc is not None
                self.close()
                if was_open:
                    LOG.info("reopening association to %s for a new context", self.dest.name)
            if self._assoc is None:
                self._open(calling)
            if not self._accepted(sop_class, ts):
                raise SendError(
                    f"{self.dest.name} does not accept SOP Class {sop_class} in transfer syntax"
                    f" {ts}",
                    connection=False,
                )
        try:
            status = self._assoc.send_c_store(path)
        except (RuntimeError, OSError, ValueError, AttributeError) as exc:
            # abort, not release: a request may be cut off mid-PDU, and a peer that stopped
            # reading would not answer an A-RELEASE either
            self.close(abort=True)
            raise SendError(f"C-STORE to {self.dest.name} failed: {exc}", connection=True) from exc
        code = getattr(status, "Status", None)
        if code is None:
            self.close()
            raise SendError(f"no C-STORE response from {self.dest.name}", connection=True)
        if int(code) not in SUCCESS_STATUSES:
            raise SendError(
                f"{self.dest.name} answered C-STORE status 0x{int(code):04X}", connection=False
            )

    def close(self, abort: bool = False) -> None:
        """Release the association, or abort it (``abort``: a send is still in flight past the
        drain's deadline, and a release would wait for the PACS's answer to it)."""
        if self._assoc is not None:
            with contextlib.suppress(Exception):
                if self._assoc.is_established and not abort:
                    self._assoc.release()
                else:
                    self._assoc.abort()
            self._assoc = None

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_established


PENDING_STATUSES = (0xFF00, 0xFF01)  # more responses to the same request follow


class ResponsesToTheWaitingCall:
    """Hands the response a call waits for back to it when pynetdicom's association reactor
    took it; any other message goes on to pynetdicom's ``_serve_request`` as before.

    Why: on a requesting association pynetdicom runs a reactor thread that polls the DIMSE
    message queue every millisecond for requests from the peer, and ``send_c_store`` pauses it
    with a flag and an event that do not exclude a reactor already past its checkpoint. Such a
    reactor, or one that reaches the queue between the response's arrival and the waiting
    thread's wake-up, takes the C-STORE response, logs "Received unexpected C-STORE service
    message" and drops it; ``send_c_store`` then waits out the whole DIMSE timeout, the send
    fails and the instance is sent again. Measured: one benchmark run in about twenty stalled
    20 s that way (bench/RESULTS.md), more often under load, where threads wait longer for the
    GIL.

    Only the answer to the request in flight is handed back: the one whose Message ID Being
    Responded To is the last request's Message ID, while its call still waits (the request is
    recorded as it is sent, and forgotten when the call's blocking wait returns, answered or
    timed out). A stray or late response is dropped as pynetdicom drops it, so it can never
    pass for the answer to the next request.
    """

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._serve_request = assoc._serve_request
        self._send_msg = assoc.dimse.send_msg
        self._get_msg = assoc.dimse.get_msg
        self._awaited: int | None = None  # the Message ID of the request whose call waits
        self.handed_back = 0  # responses the reactor took (tests check the race is covered)

    def install(self) -> None:
        self._assoc._serve_request = self.serve_request
        self._assoc.dimse.send_msg = self.send_msg
        self._assoc.dimse.get_msg = self.get_msg

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if getattr(primitive, "MessageIDBeingRespondedTo", None) is None:  # a request
            self._awaited = getattr(primitive, "MessageID", None)
        self._send_msg(primitive, context_id)

    def get_msg(self, block: bool = False) -> Any:
        if not block:  # the reactor's poll
            return self._get_msg(block=False)
        # the call's wait for its answer, within the DIMSE timeout; a response to another
        # request (a stray one, or a late answer to an earlier call) is dropped, not returned
        timeout = self._assoc.dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        msg = None
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    context_id, msg = self._assoc.dimse.msg_queue.get(block=True, timeout=left)
                except queue.Empty:
                    msg = None
                    return None, None
                answers = getattr(msg, "MessageIDBeingRespondedTo", None)
                if msg is None or answers is None or answers == self._awaited:
                    return context_id, msg
                LOG.warning("dropped a response to message %s while waiting for the answer to "
                            "message %s", answers, self._awaited)
        finally:  # a pending status (C-FIND, C-GET, C-MOVE) is followed by more answers
            if getattr(msg, "Status", None) not in PENDING_STATUSES:
                self._awaited = None

    def serve_request(self, msg: Any, context_id: int) -> None:
        answers = getattr(msg, "MessageIDBeingRespondedTo", None)
        if answers is not None and answers == self._awaited:
            self.handed_back += 1
            self._assoc.dimse.msg_queue.put((context_id, msg))
            return
        self._serve_request(msg, context_id)


def hand_back_responses(assoc: Any) -> ResponsesToTheWaitingCall:
    """Install ``ResponsesToTheWaitingCall`` on an association this gateway requested (after
    any other wrapper of its ``send_msg``)."""
    guard = ResponsesToTheWaitingCall(assoc)
    guard.install()
    return guard


class StreamedStoreRequest:
    """Writes a C-STORE request's P-DATA-TF PDUs straight to the association's socket.

    Why: pynetdicom hands every PDU of a message, one at a time, to its DUL thread through two
    queues and its state machine, and reads the file in PDU-sized pieces in the caller's thread;
    the two threads pass the GIL back and forth for each. Against a PACS with Orthanc's default
    16 KB maximum PDU a 10 MB CR is 627 PDUs: 20 ms and 23 ms of CPU before the PACS can start
    storing it, where storescu takes 41 ms for the whole C-STORE (bench/RESULTS.md, "Streaming
    the forwarded C-STORE"). Here the sending thread frames the PDUs itself and writes up to
    1 MB of them per system call, reading the stored file into one reused buffer.

    What stays pynetdicom's: choosing the presentation context, building the request, the
    response and its timeout (``send_c_store`` is called as before), every other message, and
    all reading from the socket. Writing here is safe because on this association only the
    thread inside ``send_c_store`` sends while a request is outstanding; the DUL thread writes
    only what that thread asks it to, or an A-ABORT after a protocol error, which ends the
    association either way. Any other message, a request without a stored file (pynetdicom's
    private ``_dataset_path`` gone in a later version) or a TLS socket without ``sendmsg``
    falls back to pynetdicom's own ``send_msg``; ``tests/test_forward.py`` fails if the stream
    stops being used. The bytes sent are the same as pynetdicom's: the file's dataset as stored.
    A PACS that stops reading for the association's DIMSE timeout fails the send (TimeoutError,
    an OSError: the connection is shut down and the instance retried), as pynetdicom's wait for
    the answer would have; the socket itself stays blocking, as pynetdicom expects. A PACS
    without a maximum PDU gets PDVs of ``BUFFER`` bytes, so memory per send stays at 1 MB.
    """

    BUFFER = 1 << 20  # bytes read and written per system call: 64 PDUs at a 16 KB maximum PDU

    def __init__(self, assoc: Any, fallback: Callable[[Any, int], None]) -> None:
        self._assoc = assoc
        self._fallback = fallback
        self.streamed = 0  # requests written here (tests check the stream is used)

    def __call__(self, primitive: Any, context_id: int) -> None:
        dataset = getattr(primitive, "_dataset_path", None)
        sock = getattr(getattr(self._assoc.dul, "socket", None), "socket", None)
        max_pdu = int(self._assoc.acceptor.maximum_length or 0)
        if (not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is not None
                or not isinstance(dataset, tuple) or sock is None
                or isinstance(sock, ssl.SSLSocket) or 0 < max_pdu <= 6):
            self._fallback(primitive, context_id)
            return
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        command = encode(message.command_set, True, True)
        # a PDV item adds 6 bytes (length, context, flags); a PACS without a limit (0) or a very
        # large one gets PDVs of BUFFER bytes, which any limit of at least that allows
        fragment = min(max_pdu - 6, self.BUFFER) if max_pdu else self.BUFFER
        path, offset = dataset
        writer = _PduWriter(sock, context_id, float(self._assoc.dimse_timeout or 60.0))
        for start in range(0, len(command), fragment):
            last = start + fragment >= len(command)
            writer.add(0x03 if last else 0x01, memoryview(command)[start:start + fragment])
        with open(path, "rb") as f:
            length = f.seek(0, os.SEEK_END) - offset
            f.seek(offset)
            buffer = bytearray(max(fragment, self.BUFFER // fragment * fragment))
            sent = 0
            while sent < length:
                got = f.readinto(buffer)
                if not got:
                    raise OSError(f"{path} ended {length - sent} bytes early")
                view = memoryview(buffer)[:min(got, length - sent)]
                for start in range(0, len(view), fragment):
                    piece = view[start:start + fragment]
                    sent += len(piece)
                    writer.add(0x02 if sent >= length else 0x00, piece)
                writer.flush()  # before the buffer is read into again
        writer.flush()  # the command alone, where the dataset is empty
        self.streamed += 1


class _PduWriter:
    """P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5), collected and written with ``sendmsg``.

    Writes never block: a full socket is waited on with ``poll`` for at most ``stall_s`` at a
    time, so a peer that stops reading ends the send instead of holding the thread forever."""

    _HEADER = struct.Struct(">BBIIBB")  # type, reserved, PDU length, PDV length, context, flags

    def __init__(self, sock: Any, context_id: int, stall_s: float) -> None:
        self._sock = sock
        self._context_id = context_id
        self._stall_ms = max(1, int(stall_s * 1000))
        self._parts: list[bytes | memoryview] = []

    def add(self, flags: int, data: memoryview) -> None:
        n = len(data)
        self._parts += [self._HEADER.pack(0x04, 0, n + 6, n + 2, self._context_id, flags), data]

    def flush(self) -> None:
        parts, self._parts = self._parts, []
        first = 0
        poller = None
        while first < len(parts):
            try:  # IOV_MAX is 1024 on Linux
                sent = self._sock.sendmsg(parts[first:first + 1024], (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(self._sock, select.POLLOUT)
                if not poller.poll(self._stall_ms):
                    # the connection goes, not just the request: an A-ABORT queued behind our
                    # bytes would wait on the same full socket
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                    raise TimeoutError(
                        f"the peer read nothing for {self._stall_ms / 1000:g} s") from None
                continue
            while first < len(parts) and sent >= len(parts[first]):
                sent -= len(parts[first])
                first += 1
            if sent:
                parts[first] = memoryview(parts[first])[sent:]


def _nodelay_handler(event: Any) -> None:
    with contextlib.suppress(AttributeError):
        set_nodelay(event.assoc.dul.socket.socket)


class DirectorySender:
    """A local directory as destination: ``<path>/<StudyUID>/<SOPUID>.dcm``, written durably."""

    def __init__(self, dest: DestinationConfig) -> None:
        assert dest.path is not None
        self.dest = dest
        self.root = dest.path

    def send(self, path: Path, meta: dict[str, Any]) -> None:
        study = str(meta.get("study_uid") or "0")
        sop = sop_from_outbox_name(path.name)
        d = self.root / study
        try:
            d.mkdir(parents=True, exist_ok=True)
            target = d / f"{sop}.dcm"
            tmp = d / f".{sop}.{os.getpid()}.tmp"
            with path.open("rb") as fi, tmp.open("wb") as fo:
                while chunk := fi.read(1 << 20):
                    fo.write(chunk)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, target)
            fsync_dir(d)
        except OSError as exc:
            raise SendError(f"cannot write to {self.root}: {exc}", connection=True) from exc

    def close(self, abort: bool = False) -> None:
        """Nothing to release."""

    @property
    def is_open(self) -> bool:
        return False


if TYPE_CHECKING:
    from gateway.dicomweb import DicomWebSender

    Sender = DicomSender | DirectorySender | DicomWebSender
else:
    Sender = Any


def _make_sender(dest: DestinationConfig, config_provider: Callable[[], Config],
                 open_lock: threading.Lock) -> Sender:
    """The sender for a destination's kind (gateway.dicomweb imports ``requests`` and this
    module's SendError, so it is imported only where a DICOMweb destination exists)."""
    if dest.kind == "dicom":
        return DicomSender(dest, config_provider, open_lock)
    if dest.kind == "dicomweb":
        from gateway.dicomweb import DicomWebSender

        return DicomWebSender(dest, config_provider)
    if dest.kind == "orthanc-rest":  # an Orthanc's REST API (POST /instances)
        from gateway.orthanc_plugin import OrthancRestSender

        return OrthancRestSender(dest, config_provider)
    return DirectorySender(dest)


@dataclass
class _Stats:
    depth: int = 0
    oldest_age: float = 0.0
    dead: int = 0
    sent: int = 0
    failures: int = 0
    last_error: str = ""
    held_until: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Forwarder:
    """The queue runner for one destination."""

    def __init__(
        self,
        dest: DestinationConfig,
        config_provider: Callable[[], Config],
        audit: Any,
        metrics: Any,
        blocks: Callable[[str, str], bool] = lambda a, s: False,
    ) -> None:
        self.dest = dest
        self._config = config_provider
        self._audit = audit
        self._metrics = metrics
        self._blocks = blocks
        cfg = config_provider()
        self.layout = SpoolLayout(cfg.state_dir)
        self.layout.create((dest.name,))
        self.dir = self.layout.outbox(dest.name)
        self.ledger = SentLedger(
            self.layout.sent_log(dest.name), cfg.retention.sent_ledger_days * 86400
        )
        # Held by whichever sender is opening an association (a PACS counts associations still
        # negotiating against its limit); it guards no queue state.
        self._open_lock = threading.Lock()
        self.senders: list[Sender] = [
            _make_sender(dest, config_provider, self._open_lock) for _ in range(dest.associations)
        ]
        # The queue state below is shared by the sender threads and the completer; every read
        # and change of it holds ``_cond`` (one lock), and no send or fsync happens under it.
        # An outbox entry moves through three places, in one of them at a time:
        #   _entries (waiting; also while in flight)  -> _completing (delivered, its ledger line
        #   and unlink not yet done: not re-read by a rescan, not sent twice)  -> gone.
        # _in_flight marks the entries a sender is sending now (name -> SOP UID).
        self._entries: dict[str, Entry] = {}
        self._order: list[str] = []
        self._in_flight: dict[str, str] = {}
        self._completing: dict[str, str] = {}  # outbox name -> SOP UID
        self._cond = threading.Condition()
        self._wake = False
        self._stop = False
        self._last_scan = 0.0
        self._threads: list[threading.Thread] = []
        # Bookkeeping after a successful send (ledger fsync, unlink, audit) runs on a
        # completer thread, overlapping the next C-STORE instead of delaying it.
        self._done: queue.Queue[tuple[Entry, float, str | None] | None] = queue.Queue()
        self._completer: threading.Thread | None = None
        self._dest_attempts = 0
        self._dest_hold_until = 0.0
        self._last_publish = 0.0
        self.stats = _Stats(dead=len(list_outbox(self.layout.dead(dest.name))))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def sender(self) -> Sender:
        """The first sender (the only one with ``associations = 1``)."""
        return self.senders[0]

    def start(self) -> None:
        for k, sender in enumerate(self.senders):
            name = f"forward-{self.dest.name}" + (f"-{k + 1}" if len(self.senders) > 1 else "")
            thread = threading.Thread(target=self._run, args=(sender, k), name=name,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        self._completer = threading.Thread(
            target=self._complete_loop, name=f"forward-done-{self.dest.name}", daemon=True
        )
        self._completer.start()

    def notify(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the send in progress, release the association; the queue stays on disk.
        Returns within ``timeout`` (one deadline for senders and completer alike)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._completer is not None:
            self._done.put(None)
            self._completer.join(max(0.0, deadline - time.monotonic()))
        for sender, thread in zip(self.senders, self._threads, strict=False):
            # a send still in flight is not acknowledged: its instance stays in the outbox and
            # is sent again at the next start (idempotent per SOP Instance UID)
            sender.close(abort=thread.is_alive())
        for sender in self.senders[len(self._threads):]:
            sender.close()
        self.ledger.close()

    def alive(self) -> bool:
        """Every sender thread and the completer are running (the daemon's health check)."""
        threads = [*self._threads, self._completer]
        return bool(self._threads) and all(t is not None and t.is_alive() for t in threads)

    def depth(self) -> int:
        """Instances waiting (exact, read by health and status lines)."""
        return len(self._entries)

    # -- queue -------------------------------------------------------------------------------

    def _rescan(self) -> None:
        """Re-read the outbox directory (caller holds ``_cond``)."""
        names = [n for n in list_outbox(self.dir) if n not in self._completing]
        present = set(names)
        for gone in [n for n in self._entries if n not in present]:
            del self._entries[gone]
        for n in names:
            if n not in self._entries:
                meta = read_json(self.dir / (n[:-4] + ".json"))
                size = 0
                with contextlib.suppress(OSError):
                    size = (self.dir / n).stat().st_size
                self._entries[n] = Entry(name=n, sop_uid=sop_from_outbox_name(n),
                                         seq=n.split("-", 1)[0], meta=meta, size=size)
        self._order = names  # list_outbox returns them sorted (receipt order)
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        """Queue depth and oldest age to the metrics, at most every 0.2 s (cheap on a deep
        backlog: the outbox is FIFO, so the oldest entries are the first few in order)."""
        mono = time.monotonic()
        if not force and self._entries and mono - self._last_publish < 0.2:
            return
        self._last_publish = mono
        now = time.time()
        self.stats.depth = len(self._entries)
        ages = [now - e.enqueued_at for n in self._order[:16]
                if (e := self._entries.get(n)) is not None and e.enqueued_at]
        self.stats.oldest_age = max(ages) if ages else 0.0
        if self._metrics is not None:
            self._metrics.queue(self.dest.name, self.stats.depth, self.stats.oldest_age,
                                self.stats.dead)

    def _next(self, now: float, rank: int = 0) -> tuple[Entry | None, float]:
        """The first sendable entry in FIFO order, or None and when to look again.

        ``rank``: the sender's place among the destination's associations. The first always
        sends; sender k > 0 only while k x ``extra_association_backlog_mb`` wait unsent, so a
        trickle of small instances keeps to one association (a new entry wakes every sender)."""
        wait = RESCAN_S
        if now < self._dest_hold_until:
            return None, min(wait, self._dest_hold_until - now)
        if rank and not self._backlog_reaches(rank * self.dest.extra_association_backlog_mb):
            return None, wait
        held_studies: set[str] = set()
        held_assocs: set[str] = set()
        for n in self._order:
            e = self._entries.get(n)
            if e is None or n in self._in_flight:
                continue
            if e.sop_uid in self._in_flight.values():  # a second copy: wait for the first
                continue
            study = e.study
            if (study and study in held_studies) or (e.assoc_id and e.assoc_id in held_assocs):
                continue
            if e.next_attempt > now or self._blocks(e.assoc_id, e.seq):
                if study:
                    held_studies.add(study)
                if e.assoc_id:
                    held_assocs.add(e.assoc_id)
                # a backed-off entry: wait for its time; one blocked by screening: poll soon
                wait = min(wait, e.next_attempt - now if e.next_attempt > now else 0.02)
                continue
            return e, 0.0
        return None, wait

    def _backlog_reaches(self, megabytes: float) -> bool:
        """At least ``megabytes`` of the queue are waiting and not in flight (holds ``_cond``)."""
        need = megabytes * 1e6
        waiting = 0
        for name, entry in self._entries.items():
            if name not in self._in_flight:
                waiting += entry.size
                if waiting >= need:
                    return True
        return need <= 0

    def _run(self, sender: Sender, rank: int) -> None:
        """One sender thread: claim the next sendable entry, send it, repeat."""
        last_work = time.monotonic()
        refusals = 0  # this sender's own failures while another association worked
        while True:
            with self._cond:
                if self._stop:
                    return
                mono = time.monotonic()
                if self._wake or mono - self._last_scan >= RESCAN_S:
                    self._wake = False
                    self._rescan()
                    self._last_scan = mono
                entry, wait = self._next(time.time(), rank)
                if entry is None:
                    self._expire_while_held()
                    idle = self._config().forwarding.idle_release_s
                    if sender.is_open and time.monotonic() - last_work > idle:
                        sender.close()
                    if not self._wake and not self._stop:
                        self._cond.wait(max(0.005, wait))
                    continue
                self._in_flight[entry.name] = entry.sop_uid
            try:
                alone = self._deliver(entry, sender)
            finally:
                with self._cond:
                    self._in_flight.pop(entry.name, None)
            last_work = time.monotonic()
            refusals = refusals + 1 if alone else 0
            if alone:  # rest this sender; the others carry the queue meanwhile
                with self._cond:
                    if not self._stop:
                        self._cond.wait(self._backoff(refusals))

    # -- one delivery ------------------------------------------------------------------------

    def _remove(self, entry: Entry) -> None:
        """Drop an entry and its files (caller holds ``_cond``)."""
        for suffix in (".dcm", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / (entry.name[:-4] + suffix))
        self._entries.pop(entry.name, None)
        with contextlib.suppress(ValueError):
            self._order.remove(entry.name)

    def _deliver(self, entry: Entry, sender: Sender) -> bool:
        """Send one entry and record the outcome. True when only this sender could not open its
        association while another association to the destination is open: a PACS that accepts
        fewer associations than ``associations`` asks for. The entry then goes back to the queue
        untouched (no attempt counted, the destination not held) and the caller rests."""
        base = {
            "sop_uid": entry.sop_uid,
            "study_uid": entry.study or None,
            "destination": self.dest.name,
        }
        fields = {k: v for k, v in base.items() if v}
        if not entry.meta.get("resend_duplicate") and self._drop_if_delivered(entry, fields):
            return False
        path = self.dir / entry.name
        t0 = time.perf_counter()
        try:
            # a DICOMweb sender returns the server's warning about a stored instance, if any
            warning = sender.send(path, entry.meta)
        except FileNotFoundError:
            with self._cond:
                self._remove(entry)  # taken away from outside (e.g. a purge); nothing to send
            return False
        except SendError as exc:
            others = [s for s in self.senders if s is not sender]
            # Only a refused *opening* rests this sender alone: an association that fails
            # mid-C-STORE is a failure of the instance or of the link and counts as usual
            # (so an instance that makes the PACS abort is still backed off and dead-lettered).
            if exc.at_open and (self._open_lock.locked() or any(s.is_open for s in others)):
                LOG.warning("an extra association to %s failed while another works (does it "
                            "accept %d from us?): %s", self.dest.name, len(self.senders), exc)
                return True
            with self._cond:
                self._failed(entry, exc, fields)
            return False
        except Exception as exc:  # a bug or a malformed file: treat as the instance's failure
            with self._cond:
                self._failed(entry, SendError(f"{type(exc).__name__}: {exc}", False), fields)
            return False
        latency_ms = (time.perf_counter() - t0) * 1000.0
        with self._cond:
            self._completing[entry.name] = entry.sop_uid
            self._entries.pop(entry.name, None)
            with contextlib.suppress(ValueError):
                self._order.remove(entry.name)
            self._dest_attempts = 0
            self.stats.sent += 1
        received_at = entry.meta.get("received_at")
        total_ms = None
        if isinstance(received_at, int | float):
            total_ms = round((time.time() - float(received_at)) * 1000.0, 3)
        if self._metrics is not None:
            self._metrics.forwarded(
                self.dest.name, str(entry.meta.get("modality", "")),
                str(entry.meta.get("calling_ae", "")), total_ms,
            )
        self._done.put((entry, latency_ms, warning))
        with self._cond:
            self._publish()
        return False

    def _drop_if_delivered(self, entry: Entry, fields: dict[str, Any]) -> bool:
        """Drop an entry whose SOP Instance UID this destination already has (idempotency per
        UID: a modality's resend, a crash before the outbox entry went); True when dropped.

        Audited, not only logged: what is dropped may be an operator's release of a different
        object under the same UID (a tampered copy of an instance delivered before), and the
        audit log has to say that it never left. ``sentinel quarantine release`` refuses such a
        release up front; this covers the race where the first copy is delivered after it."""
        with self._cond:
            sent_now = entry.sop_uid in self._completing.values()
        sent_at = None if sent_now else self.ledger.sent_at(entry.sop_uid)
        if not sent_now and sent_at is None:
            return False
        released = bool(entry.meta.get("released_from_quarantine"))
        when = "moments ago" if sent_at is None else "at " + datetime.fromtimestamp(
            sent_at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        (LOG.warning if released else LOG.info)(
            "%s already delivered to %s %s; dropping the %s", entry.sop_uid, self.dest.name,
            when, "copy released from quarantine" if released else "duplicate")
        with self._cond:
            self._remove(entry)
            self._publish()
        self._audit_safe(
            "duplicate-dropped",
            reason=f"SOP Instance UID already delivered to {self.dest.name} {when}",
            detail=("released from quarantine; not sent (sentinel quarantine release "
                    "--resend-duplicate sends a second object under the UID)") if released
            else "received again; not sent",
            calling_ae=str(entry.meta.get("calling_ae", "")) or None, **fields,
        )
        return True

    def _complete_loop(self) -> None:
        """Record each delivery: ledger (fsync) first, then remove the outbox entry, audit."""
        while True:
            item = self._done.get()
            if item is None:
                return
            entry, latency_ms, warning = item
            try:
                self.ledger.add(entry.sop_uid)
            except OSError:
                LOG.exception("could not record delivery of %s in the ledger", entry.sop_uid)
            for suffix in (".dcm", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / (entry.name[:-4] + suffix))
            with self._cond:
                self._completing.pop(entry.name, None)
            fields = {"sop_uid": entry.sop_uid, "study_uid": entry.study or None,
                      "destination": self.dest.name}
            detail = ("released from quarantine with --resend-duplicate: sent even if the UID "
                      "was delivered before") if entry.meta.get("resend_duplicate") else None
            if warning:
                LOG.warning("%s stored by %s with a warning: %s", entry.sop_uid, self.dest.name,
                            warning)
                detail = f"{detail}; {warning}" if detail else warning
            self._audit_safe(
                "forwarded", latency_ms=round(latency_ms, 3),
                status="warning" if warning else "ok",
                calling_ae=str(entry.meta.get("calling_ae", "")) or None,
                modality=str(entry.meta.get("modality", "")) or None,
                detail=detail, **fields,
            )

    def _backoff(self, attempts: int) -> float:
        fw = self._config().forwarding
        return float(min(fw.backoff_max_s, fw.backoff_initial_s * (2 ** max(0, attempts - 1))))

    def _failed(self, entry: Entry, exc: SendError, fields: dict[str, Any]) -> None:
        now = time.time()
        self.stats.failures += 1
        self.stats.last_error = str(exc)
        if self._metrics is not None:
            self._metrics.forward_failed(self.dest.name)
        if exc.connection:
            self._dest_attempts += 1
            delay = self._backoff(self._dest_attempts)
            self._dest_hold_until = now + delay
            LOG.warning("destination %s unavailable (attempt %d, retry in %.1fs): %s",
                        self.dest.name, self._dest_attempts, delay, exc)
            self._audit_safe("forward-failed", attempts=self._dest_attempts, error=str(exc),
                             **fields)
            self._expire_while_held()
            return
        entry.attempts += 1
        entry.first_failure = entry.first_failure or now
        delay = self._backoff(entry.attempts)
        entry.next_attempt = now + delay
        LOG.warning("%s refused by %s (attempt %d, retry in %.1fs): %s", entry.sop_uid,
                    self.dest.name, entry.attempts, delay, exc)
        self._audit_safe("forward-failed", attempts=entry.attempts, error=str(exc), **fields)
        self._maybe_dead_letter(entry, str(exc))

    def _expire_while_held(self) -> None:
        """Dead-letter entries past the maximum age even while the destination is down."""
        if not self._entries:
            return
        if self._dest_attempts == 0 and not any(e.attempts for e in self._entries.values()):
            return
        for e in list(self._entries.values()):
            if e.name in self._in_flight:
                continue
            if e.attempts or self._dest_attempts:
                self._maybe_dead_letter(e, self.stats.last_error or "unreachable")

    def _maybe_dead_letter(self, entry: Entry, error: str) -> None:
        max_age = self._config().forwarding.max_age_s
        if not entry.enqueued_at or time.time() - entry.enqueued_at < max_age:
            return
        dead = self.layout.dead(self.dest.name)
        dead.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".dcm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.dir / (entry.name[:-4] + suffix), dead / (entry.name[:-4] + suffix))
        fsync_dir(dead)
        fsync_dir(self.dir)
        self._entries.pop(entry.name, None)
        with contextlib.suppress(ValueError):
            self._order.remove(entry.name)
        self.stats.dead += 1
        LOG.error("%s dead-lettered for %s after %.0fs: %s", entry.sop_uid, self.dest.name,
                  time.time() - entry.enqueued_at, error)
        self._audit_safe(
            "dead-letter", sop_uid=entry.sop_uid, destination=self.dest.name,
            attempts=max(entry.attempts, self._dest_attempts), error=error,
            study_uid=entry.study or None,
        )
        if self._metrics is not None:
            self._metrics.dead_lettered(self.dest.name)
        self._publish()

    def _audit_safe(self, event: str, **fields: Any) -> None:
        clean = {k: v for k, v in fields.items() if v is not None}
        try:
            self._audit.append(event, **clean)
        except Exception:
            LOG.exception("audit append failed for %s", event)
