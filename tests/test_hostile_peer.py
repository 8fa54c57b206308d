"""Hostile peers on the DICOM port, before and after association (issue 20, defect 2).

The reproduction: one TCP connection, not on the allow-list, declared a 900 MiB PDU and
streamed zeros; pynetdicom read the body whole, and the daemon's peak RSS went from 62 MB to
884 MB before any association request was parsed. The acceptance test runs the real daemon
(``sentinel serve`` as a child, the example config's ``max_pdu_kb = 0``) against 8 connections
at once, each declaring a 1 GiB PDU and streaming 256 MiB of zeros as fast as the socket takes
them: 4 before association (an A-ASSOCIATE-RQ, from nobody on the allow-list) and 4 from an
allowed caller after a successful association (a P-DATA-TF). Meanwhile DCMTK's storescu sends
an honest instance. The daemon's peak RSS (VmHWM, reset after the idle measurement) must stay
within 200 MB of its idle RSS; every hostile connection must be ended by the server long before
256 MiB are taken, and audited; the honest instance must be acknowledged and forwarded.

The smaller tests pin each bound on an in-process gateway: the 64 KiB cap before association,
the advertised cap after it, the connection limits (closed unread at accept), the deadline for
a complete association request (slow-loris), and the DIMSE message held in memory.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation

from bench.reliability import record_figures
from gateway.config import load_config
from gateway.service import Gateway
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import sop_uid_of, synthetic
from tests.gateway_harness import GatewayProcess, wait_until, write_config

MIB = 1024 * 1024
GIB = 1024 * MIB
STREAM = 256 * MIB
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# -- raw DICOM upper layer, as a hostile peer writes it ----------------------------------------


def association_request(calling: str, port: int, called: str = "SENTINEL",
                        max_length: int = 16384) -> bytes:
    """The bytes of an ordinary A-ASSOCIATE-RQ (CR storage, explicit VR little endian)."""
    cx = build_context(CR, EXPLICIT_LE)
    cx.context_id = 1
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    prim.called_presentation_address = AddressInformation("127.0.0.1", port)
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_length
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from the gateway: (type, body)."""
    head = _read_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", head)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def associate_raw(port: int, calling: str) -> tuple[socket.socket, int]:
    """An established association on a raw socket: (socket, the maximum PDU it accepted)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(association_request(calling, port))
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x02, f"association not accepted (PDU type 0x{pdu_type:02X})"
    # the Maximum Length sub-item (0x51) of the user information item
    at = body.index(b"\x51\x00\x00\x04")
    return sock, struct.unpack(">L", body[at + 4: at + 8])[0]


def server_closes(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the gateway ends the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@dataclass
class Stream:
    """What one hostile connection managed: bytes of its PDU body taken, and how it ended."""

    kind: str
    sent: int = 0
    closed: bool = False
    ended_by: str = ""
    seconds: float = 0.0


def stream_zeros(sock: socket.socket, result: Stream, total: int = STREAM) -> None:
    """Send ``total`` zero bytes as fast as the socket takes them, until the server ends it."""
    zeros = memoryview(bytes(MIB))
    t0 = time.monotonic()
    sock.settimeout(15)
    try:
        while result.sent < total:
            result.sent += sock.send(zeros[: min(MIB, total - result.sent)])
        # everything was taken: the server is reading it; does it ever end the connection?
        result.closed = server_closes(sock, 10)
        result.ended_by = "eof" if result.closed else "never (client gave up)"
    except (BrokenPipeError, ConnectionResetError) as exc:
        result.closed, result.ended_by = True, type(exc).__name__
    except TimeoutError:
        result.ended_by = "stalled (server neither read nor closed)"
    finally:
        result.seconds = time.monotonic() - t0
        sock.close()


def audit_events(state: Path) -> list[dict]:  # type: ignore[type-arg]
    path = state / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- /proc figures ------------------------------------------------------------------------------


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5), so the peak measured is this test's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- the acceptance test -------------------------------------------------------------------------


def test_hostile_peers_cannot_exhaust_memory(tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    out, state = tmp_path / "out", tmp_path / "state"
    cfg = write_config(tmp_path / "c.toml", state=state, port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{out}"\n',
                       callers=("MODALITY", "STORESCU"),
                       limits="max_pdu_kb = 0  # the example config's value")
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    assert gw.proc is not None
    pid = gw.proc.pid
    honest = synthetic(tmp_path / "honest.dcm", 512, 512, seed=20)
    warm = synthetic(tmp_path / "warm.dcm", 512, 512, seed=21)
    try:
        assert storescu(port, [warm], calling="STORESCU").returncode == 0  # warm receive path
        time.sleep(1.0)
        idle_rss = proc_kib(pid, "VmRSS")
        idle_hwm = proc_kib(pid, "VmHWM")
        peak_reset = reset_peak(pid)
        kids = children(pid)
        kids_idle = sum(proc_kib(k, "VmRSS") for k in kids)

        streams: list[Stream] = []
        threads: list[threading.Thread] = []
        started = threading.Barrier(9)

        def before_association(result: Stream) -> None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(header(0x01, GIB))
            started.wait(30)
            stream_zeros(sock, result)

        def after_association(result: Stream) -> None:
            sock, _max = associate_raw(port, "MODALITY")
            sock.sendall(header(0x04, GIB))
            started.wait(30)
            stream_zeros(sock, result)

        for i in range(8):
            kind = "A-ASSOCIATE-RQ, off the allow-list" if i % 2 == 0 else \
                "P-DATA-TF, allowed caller after association"
            result = Stream(kind)
            streams.append(result)
            t = threading.Thread(target=before_association if i % 2 == 0 else after_association,
                                 args=(result,), daemon=True)
            threads.append(t)
            t.start()
        started.wait(30)
        t0 = time.monotonic()
        r = storescu(port, [honest], calling="STORESCU", timeout=120)
        honest_s = time.monotonic() - t0
        for t in threads:
            t.join(90)
        peak = proc_kib(pid, "VmHWM")
        kids_peak = sum(proc_kib(k, "VmHWM") for k in kids if Path(f"/proc/{k}").exists())
        uid = sop_uid_of(honest)
        forwarded = wait_until(lambda: bool(list(out.rglob(f"{uid}.dcm"))), 30)
        events = audit_events(state)
        assert gw.proc.poll() is None, "the daemon died"
    finally:
        gw.stop()

    growth_mb = (peak - idle_rss) / 1024
    refusals = [e for e in events
                if e["event"] == "rejected" and e.get("reason") == "pdu-too-large"]
    record_figures("hostile_peers_memory", {
        "idle_rss_mb": round(idle_rss / 1024, 1), "idle_hwm_mb": round(idle_hwm / 1024, 1),
        "peak_reset": peak_reset, "peak_hwm_mb": round(peak / 1024, 1),
        "peak_growth_mb": round(growth_mb, 1),
        "children_idle_rss_mb": round(kids_idle / 1024, 1),
        "children_peak_hwm_mb": round(kids_peak / 1024, 1),
        "streams": [f"{s.kind}: {s.sent / MIB:.1f} MiB taken, ended by {s.ended_by} after "
                    f"{s.seconds:.2f} s" for s in streams],
        "honest_storescu": f"rc {r.returncode} in {honest_s:.2f} s, forwarded {forwarded}",
        "audited_pdu_too_large": len(refusals)})
    assert r.returncode == 0, r.stderr
    assert forwarded, "the honest instance was acknowledged but not forwarded"
    for s in streams:
        assert s.closed, f"{s.kind}: the server never ended it ({s.ended_by}, {s.sent} bytes)"
        assert s.sent < 64 * MIB, f"{s.kind}: {s.sent / MIB:.0f} MiB taken before the end"
    assert growth_mb < 200, f"peak RSS {growth_mb:.0f} MB above idle"
    assert len(refusals) == 8, [e.get("reason") for e in events if e["event"] == "rejected"]
    assert sum(1 for e in refusals if e.get("calling_ae") == "MODALITY") == 4
    assert all(e.get("peer") == "127.0.0.1" for e in refusals)


# -- each bound on its own, in-process ----------------------------------------------------------

DEST = '[destinations.out]\nkind = "directory"\npath = "{out}"\n'


@pytest.fixture()
def gateway_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Gateway] = []

    def make(**kw: object) -> Gateway:
        port = free_port()
        cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                                destinations=DEST.format(out=tmp_path / "out"),
                                **kw)  # type: ignore[arg-type]
        gw = Gateway(load_config(cfg_path), detector_factory=lambda cfg: [], drain_s=5)
        gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def reasons(gw: Gateway) -> list[str]:
    return [e.get("reason", "") for e in audit_events(gw.config.state_dir)
            if e["event"] == "rejected"]


def echo_ok(port: int, calling: str = "MODALITY") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


def test_association_request_capped_at_64_kib_whatever_max_pdu(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(limits="max_pdu_kb = 16384")
    port = gw.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(header(0x01, 64 * 1024 + 1) + b"\0" * 1024)
        assert server_closes(s, 5)
    assert reasons(gw) == ["pdu-too-large"]
    assert echo_ok(port)


def test_pdata_capped_at_the_advertised_maximum(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(limits="max_pdu_kb = 16")
    port = gw.address[1]
    sock, advertised = associate_raw(port, "MODALITY")
    with sock:
        assert advertised == 16 * 1024
        sock.sendall(header(0x04, advertised + 1) + b"\0" * 1024)
        assert server_closes(sock, 5)
    refused = [e for e in audit_events(gw.config.state_dir) if e["event"] == "rejected"]
    assert [(e["reason"], e.get("calling_ae")) for e in refused] == [
        ("pdu-too-large", "MODALITY")]
    assert wait_until(lambda: gw.receiver.active_associations() == 0, 10)
    # a sender that keeps to the advertised maximum is served: DCMTK fills 16 KiB PDUs
    require_dcmtk()
    f = synthetic(gw.config.state_dir.parent / "a.dcm", 256, 256, seed=3)
    assert storescu(port, [f]).returncode == 0


def test_unlimited_max_pdu_means_the_bounded_default(tmp_path: Path) -> None:
    from gateway.config import DEFAULT_MAX_PDU_KB, ConfigError

    def limits(text: str) -> object:
        path = write_config(tmp_path / "c.toml", state=tmp_path / "s", port=11112,
                            destinations=DEST.format(out=tmp_path / "o"), limits=text)
        return load_config(path).limits

    assert limits("max_pdu_kb = 0").max_pdu_bytes == DEFAULT_MAX_PDU_KB * 1024  # type: ignore[attr-defined]
    assert limits("").max_pdu_bytes == DEFAULT_MAX_PDU_KB * 1024  # type: ignore[attr-defined]
    assert limits("max_pdu_kb = 64").max_pdu_bytes == 64 * 1024  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"limits\.max_pdu_kb.*fix: use at most"):
        limits("max_pdu_kb = 1048576")
    with pytest.raises(ConfigError, match=r"limits\.max_connections.*below max_associations"):
        limits("max_associations = 8\nmax_connections = 4")
    got = limits("max_associations = 8")
    assert (got.max_connections, got.max_connections_per_address) == (16, 12)  # type: ignore[attr-defined]


@contextlib.contextmanager
def connection_limit_reached(gateway_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    """A gateway allowing 3 TCP connections, with 3 idle ones open while the block runs."""
    gw = gateway_factory(limits="max_associations = 2\nmax_connections = 3\n"
                                "max_connections_per_address = 3")
    port = gw.address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        assert wait_until(lambda: gw.receiver.open_connections() == 3, 5)
        yield gw
    finally:
        for s in idle:
            s.close()


def test_connections_over_the_limit_closed_unread_and_audited(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    with connection_limit_reached(gateway_factory) as gw:
        port = gw.address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            t0 = time.monotonic()
            # closed before anything is read: the 1 GiB it announces is never looked at
            extra.sendall(header(0x01, GIB))
            assert server_closes(extra, 5)
            assert time.monotonic() - t0 < 2
        assert reasons(gw) == ["connection-limit"]
    assert wait_until(lambda: gw.receiver.open_connections() == 0, 10)
    assert echo_ok(port)


def test_a_connection_flood_is_audited_once_per_window_and_counted(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """200 connections past the limit from one address: each is closed unread, but the audit
    (an fsync per line) gets one line per window, so the flood cannot pace the accept loop at
    the disk's fsync rate; the next window's line says how many were left out."""
    with connection_limit_reached(gateway_factory) as gw:
        port = gw.address[1]
        t0 = time.monotonic()
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                assert server_closes(extra, 5)
        flood_s = time.monotonic() - t0
        assert reasons(gw) == ["connection-limit"]
        gw.receiver._refusals.window_s = 0.0  # the window is over: the next refusal is written
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert server_closes(extra, 5)
        lines = [e for e in audit_events(gw.config.state_dir)
                 if e.get("reason") == "connection-limit"]
        assert [r.get("suppressed") for r in lines] == [None, 199]
        print(f"200 refused connections in {flood_s:.2f} s, 2 audit lines")


def test_incomplete_association_request_ends_at_acse_timeout(tmp_path: Path) -> None:
    """Slow-loris: a request that never completes, and a connection that never speaks, hold a
    slot for ``timeouts.acse_s`` at most; both are audited."""
    port = free_port()
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=DEST.format(out=tmp_path / "out"))
    cfg_path.write_text(cfg_path.read_text().replace("acse_s = 10", "acse_s = 1"))
    gw = Gateway(load_config(cfg_path), detector_factory=lambda cfg: [], drain_s=5)
    gw.start()
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.monotonic()
        rq = association_request("MODALITY", port)
        slow.sendall(rq[:40])  # a valid start, then one byte every 0.3 s
        stop = threading.Event()

        def drip() -> None:
            for b in rq[40:]:
                if stop.wait(0.3):
                    return
                try:
                    slow.send(bytes([b]))
                except OSError:
                    return

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        assert server_closes(silent, 5)
        assert server_closes(slow, 5)
        spent = time.monotonic() - t0
        stop.set()
        t.join(5)
        slow.close()
        silent.close()
        assert spent < 3, f"held {spent:.1f} s with acse_s = 1"
        assert wait_until(lambda: reasons(gw).count("association-request-timeout") == 2, 5), \
            reasons(gw)
        assert wait_until(lambda: gw.receiver.open_connections() == 0, 5)
        assert echo_ok(port)
    finally:
        gw.stop()


def test_command_fragments_never_ending_are_cut_off(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """PDUs within the advertised size can still pile up in memory as one DIMSE command
    that never ends: the association is aborted past IN_MEMORY_MESSAGE_LIMIT."""
    from gateway.scp import IN_MEMORY_MESSAGE_LIMIT

    gw = gateway_factory(limits="max_pdu_kb = 64")
    port = gw.address[1]
    sock, advertised = associate_raw(port, "MODALITY")
    fragment = advertised - 6  # one PDV: length, context 1, "command, not last"
    pdu = header(0x04, fragment + 6) + struct.pack(">LBB", fragment + 2, 1, 0x01) + \
        b"\0" * fragment
    sent, ended = 0, False
    with sock:
        sock.settimeout(10)
        try:
            while sent < 64 * IN_MEMORY_MESSAGE_LIMIT:
                sock.sendall(pdu)
                sent += len(pdu)
            ended = server_closes(sock, 5)
        except OSError:
            ended = True
    assert ended, f"{sent} bytes of one command taken and the association still open"
    held = [e for e in audit_events(gw.config.state_dir) if e.get("reason") == "message-too-large"]
    assert len(held) == 1 and held[0]["calling_ae"] == "MODALITY"
    assert int(held[0]["detail"].split()[0]) <= IN_MEMORY_MESSAGE_LIMIT + advertised
    assert echo_ok(port)


def test_silent_peer_on_a_tls_port_does_not_stall_the_listener(tmp_path: Path) -> None:
    """pynetdicom runs the TLS handshake in its accept loop with no timeout: one peer that
    connects and says nothing stalled every later connection. The handshake now runs in the
    connection's own thread, under the acse_s deadline, and a failed one is audited."""
    import ssl

    from tests.gateway_harness import make_pki

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=DEST.format(out=tmp_path / "out"))
    cfg_path.write_text(cfg_path.read_text().replace("acse_s = 10", "acse_s = 2").replace(
        f"port = {port}\n",
        f'port = {port}\n[listener.tls]\ncert = "{pki["server_cert"]}"\n'
        f'key = "{pki["server_key"]}"\nca = "{pki["ca"]}"\nrequire_client_cert = true\n', 1))
    gw = Gateway(load_config(cfg_path), detector_factory=lambda cfg: [], drain_s=5)
    gw.start()
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.2)  # the listener has accepted it
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        ctx.check_hostname = False
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        t0 = time.monotonic()
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL", tls_args=(ctx, None))
        spent = time.monotonic() - t0
        assert assoc.is_established, "a TLS caller was not served while another peer was silent"
        assoc.release()
        assert spent < 1.5, f"the TLS association waited {spent:.1f} s behind a silent peer"
        assert server_closes(silent, 5)  # at acse_s
        silent.close()
        assert wait_until(lambda: "tls-handshake-failed" in reasons(gw), 5), reasons(gw)
        assert wait_until(lambda: gw.receiver.open_connections() == 0, 5)
    finally:
        gw.stop()
