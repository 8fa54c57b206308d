"""Forwarding: byte-for-byte, order, idempotency per SOP UID, outage and recovery, dead letter.

A pynetdicom capture SCP records the exact dataset bytes and calling AE title it receives (the
byte-for-byte proof); a real Orthanc is the PACS for the outage test.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.pdu import P_DATA_TF

from gateway.audit import AuditLog
from gateway.config import Config, load_config
from gateway.forward import DicomSender, Forwarder, SendError
from gateway.metrics import Metrics
from gateway.spool import enqueue_outbox, list_outbox
from tests.dcmtk import free_port, require_dcmtk
from tests.dicom_factory import (
    dataset_bytes,
    jpeg_lossless,
    make_series,
    pixel_sha256,
    sop_uid_of,
)
from tests.gateway_harness import metric, wait_until, write_config
from tests.orthanc import OrthancServer, require_orthanc


class CaptureSCP:
    """A Storage SCP that keeps what arrives: (calling AE, SOP UID, transfer syntax, bytes)."""

    def __init__(self, ssl_context: Any = None, store_delay_s: float = 0.0,
                 max_associations: int = 10, max_pdu: int = 0) -> None:
        self.port = free_port()
        self.received: list[tuple[str, str, str, bytes]] = []
        self.associations: set[int] = set()  # the associations that carried a C-STORE
        self.most_at_once = 0  # the most C-STOREs in progress together
        self._busy = 0
        self._delay = store_delay_s  # a PACS that takes its time to store
        self._lock = threading.Lock()
        # each P-DATA-TF PDU's length field: what "maximum length received" bounds (PS3.8 D.1)
        self.pdu_lengths: list[int] = []
        self._saved = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = False  # keep the raw bytes in memory here
        ae = AE(ae_title="CAPTURE")
        ae.maximum_pdu_size = max_pdu  # what the sender must fragment to (0: unlimited)
        ae.maximum_associations = max_associations  # more are rejected (A-ASSOCIATE-RJ)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store),
                                                     (evt.EVT_PDU_RECV, self._pdu)],
                                       ssl_context=ssl_context)

    def _pdu(self, event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            self.pdu_lengths.append(event.pdu.pdu_length)

    def _store(self, event: Any) -> int:
        with self._lock:
            self._busy += 1
            self.most_at_once = max(self.most_at_once, self._busy)
            self.associations.add(id(event.assoc))
        time.sleep(self._delay)
        with self._lock:
            self._busy -= 1
            self.received.append((
                str(event.assoc.requestor.ae_title).strip(),
                str(event.request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                event.encoded_dataset(include_meta=False),
            ))
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()
        _config.STORE_RECV_CHUNKED_DATASET = self._saved


def make_config(tmp_path: Path, dest: str, forwarding: str | None = None,
                dimse_s: float | None = None) -> Config:
    """The gateway config of a test with destination ``dest``; ``dimse_s`` shortens the
    harness's 20 s DIMSE timeout for tests that wait one out."""
    kw: dict[str, Any] = {}
    if forwarding is not None:
        kw["forwarding"] = forwarding
    p = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=free_port(),
                     destinations=dest, **kw)
    if dimse_s is not None:
        p.write_text(p.read_text().replace("dimse_s = 20", f"dimse_s = {dimse_s}"))
    return load_config(p)


def enqueue_copy(cfg: Config, dest: str, f: Path, tmp_path: Path, **meta: str) -> None:
    """Queue a copy of ``f`` the way the screening workers (or a release) do."""
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    staged = tmp_path / "staged" / f.name
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, staged)
    enqueue_outbox(cfg.state_dir, dest, staged, {
        "sop_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID),
        "modality": str(ds.Modality), **meta,
    })


@pytest.fixture()
def capture() -> Iterator[CaptureSCP]:
    scp = CaptureSCP()
    yield scp
    scp.stop()


def test_byte_for_byte_in_order_once(capture: CaptureSCP, tmp_path: Path, nema_dir: Path) -> None:
    require_dcmtk()
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {capture.port}\n'
            'ae_title = "CAPTURE"\n')
    cfg = make_config(tmp_path, dest)
    series = make_series(tmp_path / "in", 4, rows=128, cols=128)
    jpeg = jpeg_lossless(series[0], tmp_path / "in" / "jpegll.dcm")
    jpeg_ds = pydicom.dcmread(jpeg, stop_before_pixels=True)
    j2k = nema_dir / "RG1_J2KR.dcm"
    files = [*series, jpeg, j2k]
    # the JPEG copy keeps the SOP UID of series[0]: give it its own for this test
    jpeg_uid = "1.2.826.0.1.3680043.8.498.999" + str(abs(hash(str(tmp_path))) % 10**9)
    jpeg_copy = pydicom.dcmread(jpeg)
    jpeg_copy.SOPInstanceUID = jpeg_uid
    jpeg_copy.file_meta.MediaStorageSOPInstanceUID = jpeg_uid
    jpeg_copy.save_as(jpeg, enforce_file_format=True)
    fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path), Metrics())
    for f in files:
        enqueue_copy(cfg, "pacs", f, tmp_path)
    fw.start()
    try:
        assert wait_until(lambda: len(capture.received) == len(files), 60)
        by_uid = {uid: (calling, ts, data) for calling, uid, ts, data in capture.received}
        for f in files:
            calling, ts, data = by_uid[sop_uid_of(f)]
            assert data == dataset_bytes(f), f"{f.name} not forwarded byte for byte"
            assert ts == str(pydicom.dcmread(f, stop_before_pixels=True).file_meta
                             .TransferSyntaxUID)
            assert calling == "SENTINEL"
        assert str(jpeg_ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
        # order within the study is the order queued
        got = [uid for _c, uid, _t, _d in capture.received if uid in
               {sop_uid_of(s) for s in series}]
        assert got == [sop_uid_of(s) for s in series]
        # the forwarding socket does not wait on Nagle either
        if fw.sender.is_open:
            import socket

            sock = fw.sender._assoc.dul.socket.socket  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # the same SOP Instance UID queued again is never sent twice
        enqueue_copy(cfg, "pacs", series[1], tmp_path)
        assert wait_until(lambda: not list_outbox(fw.dir), 10)
        assert len(capture.received) == len(files)
    finally:
        fw.stop()


def test_streamed_c_store_is_fragmented_to_the_peers_maximum_pdu(tmp_path: Path,
                                                                 nema_dir: Path) -> None:
    """The forwarder writes the C-STORE's PDUs itself (``StreamedStoreRequest``): each within
    the PACS's maximum PDU (4 KB here, the DICOM minimum), the dataset byte for byte whatever
    its length against the fragment size, and pynetdicom's slower path is not what ran."""
    capture = CaptureSCP(max_pdu=4096)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\n')
        cfg = make_config(tmp_path, dest)
        files = [*make_series(tmp_path / "in", 2, rows=100, cols=77),  # odd lengths
                 *make_series(tmp_path / "small", 1, rows=8, cols=8),  # under one fragment
                 nema_dir / "RG1_J2KR.dcm"]
        sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
        streamed: dict[int, int] = {}  # per association (a new context opens a new one)
        try:
            for f in files:
                sender.send(f, {})
                stream = sender._stream
                assert stream is not None
                streamed[id(stream)] = stream.streamed
        finally:
            sender.close()
        assert sum(streamed.values()) == len(files), "pynetdicom's own send path ran instead"
        by_uid = {uid: data for _c, uid, _t, data in capture.received}
        for f in files:
            assert by_uid[sop_uid_of(f)] == dataset_bytes(f), f"{f.name} not byte for byte"
        assert capture.pdu_lengths and max(capture.pdu_lengths) <= 4096
        assert sum(n == 4096 for n in capture.pdu_lengths) > 10  # full fragments were used
    finally:
        capture.stop()


class _PassedCheckpoint(threading.Event):
    """pynetdicom's association reactor checkpoint, with the reactor descheduled right after it
    passed the checkpoint while it was still open: it goes on to poll the message queue once
    ``send_c_store`` has paused it and sent (what GIL contention does now and then)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()  # the reactor is past it, the checkpoint still open

    def wait(self, timeout: float | None = None) -> bool:
        if not self.is_set():
            return super().wait(timeout)
        self.entered.set()
        deadline = time.monotonic() + 5
        while self.is_set() and time.monotonic() < deadline:  # until the sender pauses it
            time.sleep(0.001)
        time.sleep(0.05)  # the response arrives meanwhile
        return True


def test_a_response_the_association_reactor_takes_reaches_the_waiting_send(
        capture: CaptureSCP, tmp_path: Path) -> None:
    """The reactor race (``ResponsesToTheWaitingCall``): a reactor past its checkpoint polls
    the queue after the C-STORE response arrived and before the waiting thread woke. Without
    the hand-back pynetdicom drops the response, the send waits out the DIMSE timeout and
    fails (a 20 s stall per instance in the benchmark); with it the send succeeds at once."""
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {capture.port}\nae_title = "CAPTURE"\n')
    cfg = make_config(tmp_path, dest, dimse_s=3)
    files = make_series(tmp_path / "in", 3, rows=64, cols=64)
    sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
    try:
        sender.send(files[0], {})  # opens the association
        assoc = sender._assoc
        assert assoc is not None
        checkpoint = _PassedCheckpoint()
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint
        get_msg = assoc.dimse.get_msg

        def slow_to_wake(block: bool = False) -> Any:
            if block:  # the sending thread waits 0.2 s for the GIL before it reads the queue
                time.sleep(0.2)
            return get_msg(block=block)

        assoc.dimse.get_msg = slow_to_wake
        for f in files[1:]:
            checkpoint.entered.clear()
            assert checkpoint.entered.wait(5)  # the reactor passed the open checkpoint
            t0 = time.monotonic()
            sender.send(f, {})
            assert time.monotonic() - t0 < 2, "the response was lost: DIMSE timeout"
        assert sender._guard is not None
        assert sender._guard.handed_back == 2, "the race was not reproduced"
    finally:
        sender.close()
    assert [uid for _c, uid, _t, _d in capture.received] == [sop_uid_of(f) for f in files]


def test_a_stray_response_never_answers_the_next_request(capture: CaptureSCP,
                                                        tmp_path: Path) -> None:
    """A response to no request in flight (a PACS that answers twice, or late) must not pass
    for the answer to the next C-STORE: it is dropped whether the reactor or the waiting call
    meets it first, and the next instance is reported by its own answer."""
    from pynetdicom.dimse_primitives import C_STORE as CStorePrimitive

    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {capture.port}\nae_title = "CAPTURE"\n')
    cfg = make_config(tmp_path, dest)
    files = make_series(tmp_path / "in", 3, rows=64, cols=64)
    sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
    try:
        sender.send(files[0], {})
        assoc = sender._assoc
        assert assoc is not None and sender._guard is not None
        for f, wait_s in ((files[1], 0.05), (files[2], 0.0)):  # reactor first, then the call
            stray = CStorePrimitive()
            stray.MessageIDBeingRespondedTo = 9999
            stray.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            stray.Status = 0xA700  # out of resources: would fail the send if taken as its answer
            assoc.dimse.msg_queue.put((1, stray))
            time.sleep(wait_s)
            sender.send(f, {})
        assert sender._guard.handed_back == 0
    finally:
        sender.close()
    assert [uid for _c, uid, _t, _d in capture.received] == [sop_uid_of(f) for f in files]


def test_the_response_guard_passes_every_answer_of_a_pending_request() -> None:
    """A C-FIND answers with pending statuses before the final one, all to one Message ID: a
    guarded association (``hand_back_responses``) delivers every one of them to the call."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as FIND

    from gateway.forward import hand_back_responses

    def on_find(event: Any) -> Any:
        for name in ("A^B", "C^D", "E^F"):
            match = Dataset()
            match.PatientName = name
            match.QueryRetrieveLevel = "PATIENT"
            yield 0xFF00, match

    port = free_port()
    scp = AE(ae_title="FINDER")
    scp.add_supported_context(FIND)
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        ae = AE(ae_title="SENTINEL")
        ae.add_requested_context(FIND)
        ae.dimse_timeout = 3
        assoc = ae.associate("127.0.0.1", port, ae_title="FINDER")
        assert assoc.is_established
        hand_back_responses(assoc)
        query = Dataset()
        query.PatientName = "*"
        query.QueryRetrieveLevel = "PATIENT"
        t0 = time.monotonic()
        statuses = [int(status.Status) for status, _ident in assoc.send_c_find(query, FIND)
                    if "Status" in status]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert time.monotonic() - t0 < 2  # no answer waited out the DIMSE timeout


def test_peer_dropping_mid_stream_fails_the_send_and_the_next_one_reconnects(
        tmp_path: Path) -> None:
    """A PACS that drops the connection while the dataset is on the wire: the send fails as a
    connection error (the forwarder holds and retries), and the next send opens a fresh
    association and delivers the same instance whole."""
    capture = CaptureSCP(max_pdu=4096)
    dropped: list[int] = []

    def drop(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF) and not dropped and len(capture.pdu_lengths) > 20:
            dropped.append(1)
            event.assoc.dul.socket.socket.shutdown(2)  # SHUT_RDWR, as a crashed peer

    capture._server.bind(evt.EVT_PDU_RECV, drop)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\n')
        cfg = make_config(tmp_path, dest, forwarding=None)
        f = make_series(tmp_path / "in", 1, rows=1024, cols=1024)[0]  # 2 MB: 500 PDUs
        sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
        try:
            with pytest.raises(SendError) as failed:
                sender.send(f, {})
            assert failed.value.connection
            assert dropped and not capture.received
            sender.send(f, {})
        finally:
            sender.close()
        assert [data for *_x, data in capture.received] == [dataset_bytes(f)]
    finally:
        capture.stop()


def test_peer_that_stops_reading_fails_the_send_within_the_dimse_timeout(
        tmp_path: Path) -> None:
    """A PACS that accepts the association and then reads nothing more (its reading thread
    stuck): the streamed request waits for it at most ``timeouts.dimse_s``, then the send
    fails as a connection error and the association is aborted, instead of the forwarding
    thread hanging in a write for ever."""
    capture = CaptureSCP()
    stuck, release = threading.Event(), threading.Event()

    def stop_reading(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF) and not stuck.is_set():
            stuck.set()
            release.wait(60)  # this is the SCP's only reading thread for the association

    capture._server.bind(evt.EVT_PDU_RECV, stop_reading)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\n')
        cfg = make_config(tmp_path, dest, dimse_s=1.5)
        # 32 MB: more than loopback's socket buffers hold, so the writer must wait
        f = make_series(tmp_path / "in", 1, rows=4096, cols=4096)[0]
        sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
        t0 = time.monotonic()
        try:
            with pytest.raises(SendError, match="read nothing") as failed:
                sender.send(f, {})
            waited = time.monotonic() - t0
            assert failed.value.connection and stuck.is_set()
            assert sender._assoc is None  # aborted, reopened by the next send
        finally:
            release.set()
            sender.close()
        assert waited < 15, waited
    finally:
        release.set()
        capture.stop()


def test_parallel_associations_deliver_each_instance_once(tmp_path: Path) -> None:
    """``associations = 3``: C-STOREs overlap on several associations, every instance arrives
    once and byte for byte, and a second copy of a SOP UID is not sent beside the first."""
    capture = CaptureSCP(store_delay_s=0.05)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\nassociations = 3\n'
                'extra_association_backlog_mb = 0\n')  # all three send whatever the backlog
        cfg = make_config(tmp_path, dest)
        assert cfg.destinations["pacs"].associations == 3
        files = make_series(tmp_path / "in", 12, rows=64, cols=64)
        for f in files:
            enqueue_copy(cfg, "pacs", f, tmp_path)
        enqueue_copy(cfg, "pacs", files[0], tmp_path / "again")  # the same SOP UID, queued twice
        fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path),
                       Metrics())
        assert len(fw.senders) == 3 and not fw.alive()
        fw.start()
        try:
            assert fw.alive()  # what the daemon's health check and watchdog ask
            assert wait_until(lambda: not list_outbox(fw.dir), 60)
        finally:
            fw.stop()
        assert not fw.alive()
        uids = [uid for _c, uid, _t, _d in capture.received]
        assert sorted(uids) == sorted(sop_uid_of(f) for f in files), "lost or sent twice"
        by_uid = {uid: data for _c, uid, _t, data in capture.received}
        assert all(by_uid[sop_uid_of(f)] == dataset_bytes(f) for f in files)
        assert len(capture.associations) >= 2 and capture.most_at_once >= 2, (
            capture.associations, capture.most_at_once)
        assert fw.stats.sent == len(files)
    finally:
        capture.stop()


def test_second_association_opens_only_for_a_backlog(tmp_path: Path) -> None:
    """The default two associations: small instances trickling in go over one; a backlog of at
    least ``extra_association_backlog_mb`` brings the second in, two C-STOREs at once."""
    capture = CaptureSCP(store_delay_s=0.05)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\n'
                'extra_association_backlog_mb = 1\n')
        cfg = make_config(tmp_path, dest)
        assert cfg.destinations["pacs"].associations == 2  # the default
        fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path),
                       Metrics())
        small = make_series(tmp_path / "small", 8, rows=64, cols=64)  # 8 KB each
        for f in small:
            enqueue_copy(cfg, "pacs", f, tmp_path)
        fw.start()
        try:
            assert wait_until(lambda: not list_outbox(fw.dir), 30)
            assert len(capture.associations) == 1 and capture.most_at_once == 1
            large = make_series(tmp_path / "large", 8, rows=512, cols=512)  # 512 KB each
            for f in large:
                enqueue_copy(cfg, "pacs", f, tmp_path)
            fw.notify()
            assert wait_until(lambda: not list_outbox(fw.dir), 60)
        finally:
            fw.stop()
        assert len(capture.associations) == 2 and capture.most_at_once == 2
        assert sorted(uid for _c, uid, _t, _d in capture.received) == sorted(
            sop_uid_of(f) for f in (*small, *large))
    finally:
        capture.stop()


def test_fewer_associations_accepted_than_asked_for_still_delivers(tmp_path: Path) -> None:
    """A PACS that takes one association from us while ``associations = 3``: the extra senders
    rest, the one that connected carries the queue, nothing is held back or dead-lettered."""
    capture = CaptureSCP(store_delay_s=0.02, max_associations=1)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
                f'port = {capture.port}\nae_title = "CAPTURE"\nassociations = 3\n'
                'extra_association_backlog_mb = 0\n')
        cfg = make_config(tmp_path, dest, forwarding="backoff_initial_s = 30\n")
        files = make_series(tmp_path / "in", 10, rows=64, cols=64)
        for f in files:
            enqueue_copy(cfg, "pacs", f, tmp_path)
        fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path),
                       Metrics())
        fw.start()
        try:
            # a destination hold would wait backoff_initial_s = 30 s: it must not happen
            assert wait_until(lambda: not list_outbox(fw.dir), 20), fw.stats
        finally:
            fw.stop()
        assert sorted(uid for _c, uid, _t, _d in capture.received) == sorted(
            sop_uid_of(f) for f in files)
        assert len(capture.associations) == 1 and fw.stats.sent == len(files)
    finally:
        capture.stop()


def test_present_caller_ae(capture: CaptureSCP, tmp_path: Path) -> None:
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {capture.port}\n'
            'ae_title = "CAPTURE"\npresent_caller_ae = true\n')
    cfg = make_config(tmp_path, dest)
    files = make_series(tmp_path / "in", 2, rows=32, cols=32)
    fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path), Metrics())
    enqueue_copy(cfg, "pacs", files[0], tmp_path, calling_ae="MODALITY")
    enqueue_copy(cfg, "pacs", files[1], tmp_path, calling_ae="CT_ROOM_2")
    fw.start()
    try:
        assert wait_until(lambda: len(capture.received) == 2, 30)
        assert [c for c, *_ in capture.received] == ["MODALITY", "CT_ROOM_2"]
    finally:
        fw.stop()


def test_outage_then_all_delivered_once(tmp_path: Path) -> None:
    require_orthanc()
    orthanc = OrthancServer(tmp_path / "orthanc", {"sentinel": ("SENTINEL", 104)})
    orthanc.start()
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = make_config(tmp_path, dest)
    metrics = Metrics()
    fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path), metrics)
    files = make_series(tmp_path / "in", 8, rows=64, cols=64)
    fw.start()
    try:
        for f in files[:4]:
            enqueue_copy(cfg, "pacs", f, tmp_path)
        assert orthanc.wait_for_count(4) == 4
        orthanc.stop()
        for f in files[4:]:
            enqueue_copy(cfg, "pacs", f, tmp_path)
        # while the PACS is down the backlog is visible and failures are audited
        assert wait_until(lambda: fw.stats.failures >= 1 and fw.depth() == 4, 20)
        text = metrics.render().decode()
        assert metric(text, "sentinel_queue_depth", destination="pacs") == 4
        assert metric(text, "sentinel_forward_failures_total", destination="pacs") >= 1
        orthanc.start()
        assert orthanc.wait_for_count(8, timeout=30) == 8
        assert wait_until(lambda: fw.depth() == 0, 10)
        assert int(orthanc.statistics()["CountInstances"]) == 8  # nothing twice
        for f in (files[0], files[-1]):
            data = orthanc.instance_file(sop_uid_of(f))
            assert data is not None and pixel_sha256(data) == pixel_sha256(f)
        events = AuditLog(cfg.audit_path).path.read_text()
        assert '"event":"forward-failed"' in events
    finally:
        fw.stop()
        orthanc.stop()


def test_dead_letter_after_max_age(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens here
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {closed}\n'
            'ae_title = "NOBODY"\n')
    cfg = make_config(tmp_path, dest,
                      forwarding="backoff_initial_s = 0.1\nbackoff_max_s = 0.2\nmax_age_s = 1")
    metrics = Metrics()
    fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path), metrics)
    f = make_series(tmp_path / "in", 1, rows=32, cols=32)[0]
    enqueue_copy(cfg, "pacs", f, tmp_path)
    fw.start()
    try:
        dead = cfg.spool_dir / "dead" / "pacs"
        # the file moves first, the queue and the counters follow (under the forwarder's lock)
        assert wait_until(lambda: len(list_outbox(dead)) == 1 and fw.depth() == 0 and metric(
            metrics.render().decode(), "sentinel_dead_lettered_total", destination="pacs") == 1,
            20)
        text = metrics.render().decode()
        assert metric(text, "sentinel_dead_letter_depth", destination="pacs") == 1
        assert '"event":"dead-letter"' in cfg.audit_path.read_text()
    finally:
        fw.stop()


def test_tls_destination_mutual_authentication(tmp_path: Path) -> None:
    import ssl

    from tests.gateway_harness import make_pki

    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    server_ctx.load_verify_locations(str(pki["ca"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the gateway must present its certificate
    scp = CaptureSCP(ssl_context=server_ctx)
    try:
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {scp.port}\n'
                f'ae_title = "CAPTURE"\n[destinations.pacs.tls]\ncert = "{pki["client_cert"]}"\n'
                f'key = "{pki["client_key"]}"\nca = "{pki["ca"]}"\n')
        cfg = make_config(tmp_path, dest)
        f = make_series(tmp_path / "in", 1, rows=32, cols=32)[0]
        fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path),
                       Metrics())
        enqueue_copy(cfg, "pacs", f, tmp_path)
        fw.start()
        try:
            assert wait_until(lambda: len(scp.received) == 1, 30)
            assert scp.received[0][3] == dataset_bytes(f)
        finally:
            fw.stop()
    finally:
        scp.stop()


def _queue(cfg: Config, dest: str, f: Path, tmp_path: Path, **meta: Any) -> None:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    staged = tmp_path / "staged" / f"{time.monotonic_ns()}.dcm"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, staged)
    enqueue_outbox(cfg.state_dir, dest, staged, {
        "sop_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID), **meta})


def test_a_released_duplicate_uid_is_audited_when_dropped_and_sent_when_asked(
        tmp_path: Path) -> None:
    """Issue 20, defect 4: the forwarder drops a second object under a UID it already delivered
    (idempotency); when that object was released from the quarantine the drop is an audit event
    of its own, not only a log line; a release marked ``resend_duplicate`` is sent anyway."""
    import json

    out = tmp_path / "out"
    cfg = make_config(tmp_path, f'[destinations.pacs]\nkind = "directory"\npath = "{out}"\n')
    original = make_series(tmp_path / "in", 1, rows=32, cols=32)[0]
    ds = pydicom.dcmread(original)
    tampered = tmp_path / "tampered.dcm"
    arr = ds.pixel_array.copy()
    arr[0, 0] ^= 1
    ds.PixelData = arr.tobytes()
    ds.save_as(tampered)
    target = out / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    fw = Forwarder(cfg.destinations["pacs"], lambda: cfg, AuditLog(cfg.audit_path), Metrics())
    fw.start()

    def events(name: str) -> list[dict[str, Any]]:
        lines = cfg.audit_path.read_text().splitlines() if cfg.audit_path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == name]

    try:
        _queue(cfg, "pacs", original, tmp_path)
        assert wait_until(lambda: len(events("forwarded")) == 1, 20)
        first = target.read_bytes()
        _queue(cfg, "pacs", tampered, tmp_path, released_from_quarantine=True)
        assert wait_until(lambda: fw.depth() == 0 and len(events("duplicate-dropped")) == 1, 20)
        (drop,) = events("duplicate-dropped")
        assert drop["sop_uid"] == str(ds.SOPInstanceUID) and drop["destination"] == "pacs"
        assert "released" in drop["detail"]
        assert target.read_bytes() == first  # nothing sent
        _queue(cfg, "pacs", tampered, tmp_path, released_from_quarantine=True,
               resend_duplicate=True)
        assert wait_until(lambda: len(events("forwarded")) == 2, 20)
        assert target.read_bytes() == tampered.read_bytes()
        assert "duplicate" in events("forwarded")[-1]["detail"]
    finally:
        fw.stop()
