"""DICOMweb destinations (STOW-RS): byte-for-byte delivery, outage, rejection, auth, config.

The PACS is a real Orthanc with its DICOMweb plugin (Debian's orthanc-dicomweb) on loopback
ports the tests pick, fed by DCMTK's storescu through ``sentinel serve``. Orthanc cannot easily
be made to refuse one instance or to answer with a warning, so those answers (409 with a Failed
SOP Sequence, 202 with a Warning Reason or a failure, 503) come from ``StowStub``: a stdlib
``http.server`` on 127.0.0.1 that the test starts and stops, which answers what the test tells
it and keeps the bodies it receives. The stub stands in for the server's *answer* only; every
path that needs a real STOW-RS server to store and give back images uses Orthanc.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.audit import AuditLog, verify
from gateway.config import ConfigError, load_config
from gateway.forward import Forwarder, SendError
from gateway.metrics import Metrics
from gateway.spool import enqueue_outbox, list_outbox
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import jpeg_lossless, make_series, pixel_sha256, sop_uid_of
from tests.gateway_harness import (
    GatewayProcess,
    audit_events,
    make_pki,
    metric,
    wait_until,
    write_config,
)
from tests.orthanc import OrthancServer, require_dicomweb_plugin

CALLERS = {"sentinel": ("SENTINEL", 104)}  # Orthanc needs none for STOW-RS; kept for parity


# ---------------------------------------------------------------------------------------------
# helpers


def web_dest(url: str, extra: str = "", name: str = "web") -> str:
    return f'[destinations.{name}]\nkind = "dicomweb"\nurl = "{url}"\ntimeout_s = 10\n{extra}'


def after_meta(data: bytes) -> bytes:
    """The dataset bytes after the file meta group of a Part-10 file held in memory."""
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return data[132 + 12 + meta_len:]


def with_new_uid(src: Path, dst: Path) -> Path:
    """A compressed copy keeps its source's SOP UID: give it its own, pixel bytes untouched."""
    ds = pydicom.dcmread(src)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dst, enforce_file_format=True)
    return dst


def compressed_files(src: Path, directory: Path) -> list[Path]:
    """JPEG lossless (dcmcjpeg) and RLE (dcmcrle) copies of ``src``, each with its own UID."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = with_new_uid(jpeg_lossless(src, directory / "jl.tmp"), directory / "jpegll.dcm")
    subprocess.run(["/usr/bin/dcmcrle", str(src), str(directory / "rle.tmp")], check=True,
                   capture_output=True, timeout=60)
    rle = with_new_uid(directory / "rle.tmp", directory / "rle.dcm")
    for f, ts in ((jpeg, "1.2.840.10008.1.2.4.70"), (rle, "1.2.840.10008.1.2.5")):
        assert str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
    return [jpeg, rle]


def queue_copy(cfg: Any, dest: str, f: Path, staging: Path) -> None:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    staged = staging / f"{time.monotonic_ns()}.dcm"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, staged)
    enqueue_outbox(cfg.state_dir, dest, staged, {
        "sop_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID),
        "modality": "CR"})


class StowStub:
    """A stand-in STOW-RS answer on 127.0.0.1 (see the module docstring for why and when).

    ``answer(sop_uid) -> (status, json document or None)`` decides each response; every request
    is kept as (headers, body) so a test can check what was sent."""

    def __init__(self, answer: Any, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.requests: list[tuple[dict[str, str], bytes]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                stub.requests.append((dict(self.headers.items()), body))
                parts = split_multipart(self.headers.get("Content-Type", ""), body)
                sop = str(pydicom.dcmread(BytesIO(parts[0]), stop_before_pixels=True)
                          .SOPInstanceUID) if parts else ""
                status, doc = stub.answer(sop)
                payload = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body, parsed by the stdlib (not by our own code)."""
    msg = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return [part.get_payload(decode=True) for part in msg.iter_parts()]


def failed_doc(sop: str, reason: int) -> dict[str, Any]:
    return {"00081198": {"vr": "SQ", "Value": [{
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
        "00081155": {"vr": "UI", "Value": [sop]},
        "00081197": {"vr": "US", "Value": [reason]}}]}}


def stored_doc(sop: str, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1"]},
                            "00081155": {"vr": "UI", "Value": [sop]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return {"00081199": {"vr": "SQ", "Value": [item]}}


@pytest.fixture()
def orthanc_web(tmp_path: Path) -> Iterator[OrthancServer]:
    require_dicomweb_plugin()
    server = OrthancServer(tmp_path / "orthanc", CALLERS, dicomweb=True)
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# 1. storescu -> gateway -> STOW-RS -> Orthanc, byte for byte


@pytest.mark.integration
def test_storescu_gateway_stow_rs_orthanc_byte_identical(tmp_path: Path,
                                                         orthanc_web: OrthancServer) -> None:
    """Uncompressed, JPEG lossless and RLE instances reach Orthanc over STOW-RS with the dataset
    bytes (and so the pixel data) exactly as storescu sent them."""
    require_dcmtk()
    orthanc_web.start()
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "c.toml", state=state, port=port,
                       destinations=web_dest(orthanc_web.dicomweb_url))
    series = make_series(tmp_path / "in", 2, rows=96, cols=80)
    files = [*series, *compressed_files(series[0], tmp_path / "compressed")]
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        # one association per transfer syntax: storescu proposes JPEG lossless with -xs and
        # RLE with -xr (by default only uncompressed syntaxes, which it cannot fill from these)
        for group, extra in ((series, []), (files[2:3], ["-xs"]), (files[3:4], ["-xr"])):
            r = storescu(port, group, extra=extra)
            assert r.returncode == 0, r.stderr[-2000:]
        assert orthanc_web.wait_for_count(len(files), timeout=60) == len(files)
        assert wait_until(lambda: len(audit_events(state / "audit" / "audit.jsonl",
                                             "forwarded")) == len(files), 20)
    finally:
        rc = gw.stop()
    assert rc == 0
    for f in files:
        stored = orthanc_web.instance_file(sop_uid_of(f))
        assert stored is not None, f"{f.name} missing in Orthanc"
        assert pixel_sha256(stored) == pixel_sha256(f), f"{f.name}: pixel data changed"
        assert hashlib.sha256(after_meta(stored)).hexdigest() == hashlib.sha256(
            after_meta(f.read_bytes())).hexdigest(), f"{f.name}: dataset not byte for byte"
        ts = pydicom.dcmread(BytesIO(stored), stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts == pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
    fwd = audit_events(state / "audit" / "audit.jsonl", "forwarded")
    assert {e["sop_uid"] for e in fwd} == {sop_uid_of(f) for f in files}
    assert all(e["destination"] == "web" and e["status"] == "ok" for e in fwd)
    assert verify(state / "audit" / "audit.jsonl").ok
    assert not list(state.glob("spool/dead/web/*.dcm"))


@pytest.mark.integration
def test_three_connections_deliver_each_instance_once(tmp_path: Path,
                                                      orthanc_web: OrthancServer) -> None:
    orthanc_web.start()
    cfg = load_config(write_config(
        tmp_path / "c.toml", state=tmp_path / "state", port=free_port(),
        destinations=web_dest(orthanc_web.dicomweb_url, "connections = 3\n")))
    assert cfg.destinations["web"].associations == 3
    files = make_series(tmp_path / "in", 12, rows=48, cols=48)
    for f in files:
        queue_copy(cfg, "web", f, tmp_path / "staged")
    fw = Forwarder(cfg.destinations["web"], lambda: cfg, AuditLog(cfg.audit_path), Metrics())
    fw.start()
    try:
        assert wait_until(lambda: not list_outbox(fw.dir), 60)
    finally:
        fw.stop()
    assert int(orthanc_web.statistics()["CountInstances"]) == len(files)
    assert fw.stats.sent == len(files)


# ---------------------------------------------------------------------------------------------
# 2. the PACS down: the instances wait, then go once it is up


@pytest.mark.integration
def test_orthanc_down_then_up_delivers_all_audited(tmp_path: Path,
                                                   orthanc_web: OrthancServer) -> None:
    require_dcmtk()
    port, mport = free_port(), free_port()
    state = tmp_path / "state"
    audit = state / "audit" / "audit.jsonl"
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, metrics_port=mport,
                       destinations=web_dest(orthanc_web.dicomweb_url))
    files = make_series(tmp_path / "in", 3, rows=48, cols=48)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port, mport).start()
    try:
        assert storescu(port, files).returncode == 0  # Orthanc not started: spooled, Success
        assert wait_until(lambda: metric(gw.metrics(), "sentinel_queue_depth",
                                         destination="web") == 3, 30)
        assert wait_until(lambda: audit_events(audit, "forward-failed"), 20)
        failed = audit_events(audit, "forward-failed")[0]
        assert failed["destination"] == "web" and "STOW-RS" in failed["error"]
        assert "unavailable" in gw.log()
        orthanc_web.start()  # the same ports as configured
        assert orthanc_web.wait_for_count(3, timeout=60) == 3
        assert wait_until(lambda: len(audit_events(audit, "forwarded")) == 3, 20)
        assert wait_until(lambda: metric(gw.metrics(), "sentinel_queue_depth",
                                         destination="web") == 0, 10)
        assert metric(gw.metrics(), "sentinel_forwarded_total", destination="web") == 3
    finally:
        rc = gw.stop()
    assert rc == 0
    assert sorted(e["sop_uid"] for e in audit_events(audit, "forwarded")) == sorted(
        sop_uid_of(f) for f in files)
    for f in files:
        stored = orthanc_web.instance_file(sop_uid_of(f))
        assert stored is not None and pixel_sha256(stored) == pixel_sha256(f)
    assert not list(state.glob("spool/dead/web/*"))
    assert verify(audit).ok


# ---------------------------------------------------------------------------------------------
# 3. refusals and warnings (stub answers, see the module docstring)


def test_409_retried_then_dead_lettered_audited_with_failure_reason(tmp_path: Path) -> None:
    """A server that answers 409 with a Failed SOP Sequence (FailureReason 0xC122): the
    instance is retried with backoff (the destination is not held), dead-lettered after
    max_age_s, counted, and the reason is in the audit. Orthanc cannot be made to refuse one
    instance, hence the stub."""
    stub = StowStub(lambda sop: (409, failed_doc(sop, 0xC122)))
    try:
        cfg = load_config(write_config(
            tmp_path / "c.toml", state=tmp_path / "state", port=free_port(),
            destinations=web_dest(stub.url()),
            forwarding="backoff_initial_s = 0.1\nbackoff_max_s = 0.2\nmax_age_s = 1.5"))
        metrics = Metrics()
        fw = Forwarder(cfg.destinations["web"], lambda: cfg, AuditLog(cfg.audit_path), metrics)
        f = make_series(tmp_path / "in", 1, rows=32, cols=32)[0]
        queue_copy(cfg, "web", f, tmp_path / "staged")
        fw.start()
        try:
            dead = cfg.spool_dir / "dead" / "web"
            assert wait_until(lambda: len(list_outbox(dead)) == 1, 20)
            assert fw.depth() == 0
        finally:
            fw.stop()
        text = metrics.render().decode()
        assert metric(text, "sentinel_dead_lettered_total", destination="web") == 1
        assert metric(text, "sentinel_dead_letter_depth", destination="web") == 1
        sop = sop_uid_of(f)
        failed = audit_events(cfg.audit_path, "forward-failed")
        assert max(e["attempts"] for e in failed) > 1 and len(stub.requests) > 1
        assert all(e["sop_uid"] == sop and "0xC122" in e["error"] and "409" in e["error"]
                   for e in failed)
        (dl,) = audit_events(cfg.audit_path, "dead-letter")
        assert dl["sop_uid"] == sop and "0xC122 (transfer syntax not supported)" in dl["error"]
        assert not audit_events(cfg.audit_path, "forwarded")
        # what went on the wire: one part, the outbox file exactly as on disk
        headers, body = stub.requests[0]
        assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
        assert split_multipart(headers["Content-Type"], body) == [f.read_bytes()]
        assert "Authorization" not in headers
    finally:
        stub.stop()


def _sender(tmp_path: Path, url: str, extra: str = "") -> Any:
    from gateway.dicomweb import DicomWebSender

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path / "c.toml", state=tmp_path / "state",
                                   port=free_port(), destinations=web_dest(url, extra)))
    return DicomWebSender(cfg.destinations["web"])


@pytest.mark.parametrize(("status", "doc", "expect"), [
    (200, "stored", None),
    (202, "warning", "WarningReason 0xB000 (coercion of data elements)"),
    (202, "failed", SendError("", connection=False)),
    (409, "failed", SendError("", connection=False)),
    (400, None, SendError("", connection=False)),
    (415, None, SendError("", connection=False)),
    (503, None, SendError("", connection=True)),
    (404, None, SendError("", connection=True)),
    (401, None, SendError("", connection=True)),
    (302, None, SendError("", connection=True)),
    (200, "other", SendError("", connection=False)),
])
def test_response_outcomes(tmp_path: Path, status: int, doc: str | None, expect: Any) -> None:
    """Each STOW-RS answer is the instance's failure, the destination's, a warning or success."""
    def answer(sop: str) -> tuple[int, Any]:
        docs = {"stored": stored_doc(sop), "warning": stored_doc(sop, 0xB000),
                "failed": failed_doc(sop, 0x0110), "other": stored_doc("1.2.3.4"), None: None}
        return status, docs[doc]

    stub = StowStub(answer)
    try:
        sender = _sender(tmp_path, stub.url())
        f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]
        if isinstance(expect, SendError):
            with pytest.raises(SendError) as info:
                sender.send(f, {"sop_uid": sop_uid_of(f)})
            assert info.value.connection is expect.connection and not info.value.at_open
            assert f"HTTP {status}" in str(info.value)
            if doc == "failed":
                assert "FailureReason 0x0110 (processing failure)" in str(info.value)
        else:
            result = sender.send(f, {"sop_uid": sop_uid_of(f)})
            assert result is None if expect is None else expect in result
        sender.close()
    finally:
        stub.stop()


def test_warning_is_audited_on_the_forwarded_line(tmp_path: Path) -> None:
    stub = StowStub(lambda sop: (202, stored_doc(sop, 0xB006)))
    try:
        cfg = load_config(write_config(tmp_path / "c.toml", state=tmp_path / "state",
                                       port=free_port(), destinations=web_dest(stub.url())))
        fw = Forwarder(cfg.destinations["web"], lambda: cfg, AuditLog(cfg.audit_path), Metrics())
        f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]
        queue_copy(cfg, "web", f, tmp_path / "staged")
        fw.start()
        try:
            assert wait_until(lambda: audit_events(cfg.audit_path, "forwarded"), 20)
        finally:
            fw.stop()
        (fwd,) = audit_events(cfg.audit_path, "forwarded")
        assert fwd["status"] == "warning" and "0xB006 (elements discarded)" in fwd["detail"]
    finally:
        stub.stop()


def test_unreachable_holds_the_destination(tmp_path: Path) -> None:
    sender = _sender(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web")
    f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]
    with pytest.raises(SendError) as info:
        sender.send(f, {"sop_uid": sop_uid_of(f)})
    assert info.value.connection and not sender.is_open


# ---------------------------------------------------------------------------------------------
# 4. authentication


@pytest.mark.integration
def test_basic_auth_against_orthanc_wrong_password_is_clear_and_never_leaks(
        tmp_path: Path) -> None:
    """Orthanc with authentication on: a wrong password_file is a clear error in the log and
    the audit (and none of the passwords appears in log, audit or metrics); once the operator
    corrects the file the held instance goes, without a restart or reload."""
    require_dcmtk()
    require_dicomweb_plugin()
    right, wrong = "Right-Pa55word-7f3a", "Wrong-Pa55word-c91e"
    orthanc = OrthancServer(tmp_path / "orthanc", CALLERS, dicomweb=True,
                            users={"sentinel": right})
    secret = tmp_path / "web.password"
    secret.write_text(wrong + "\n")
    secret.chmod(0o600)
    port, mport = free_port(), free_port()
    state = tmp_path / "state"
    audit = state / "audit" / "audit.jsonl"
    auth = f'username = "sentinel"\npassword_file = "{secret}"\n'
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, metrics_port=mport,
                       destinations=web_dest(orthanc.dicomweb_url, auth))
    f = make_series(tmp_path / "in", 1, rows=32, cols=32)[0]
    orthanc.start()
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port, mport).start()
    try:
        assert storescu(port, [f]).returncode == 0
        assert wait_until(lambda: audit_events(audit, "forward-failed"), 20)
        err = audit_events(audit, "forward-failed")[0]["error"]
        assert "refused the credentials" in err and "401" in err and "'sentinel'" in err
        assert "refused the credentials" in gw.log()
        metrics_text = gw.metrics()
        for where, text in (("log", gw.log()), ("audit", audit.read_text()),
                            ("metrics", metrics_text)):
            assert wrong not in text and right not in text, f"a password in the {where}"
        assert int(orthanc.statistics()["CountInstances"]) == 0
        secret.write_text(right + "\n")
        assert orthanc.wait_for_count(1, timeout=30) == 1
        assert wait_until(lambda: audit_events(audit, "forwarded"), 20)
    finally:
        rc = gw.stop()
        orthanc.stop()
    assert rc == 0
    for where, text in (("log", gw.log()), ("audit", audit.read_text())):
        assert wrong not in text and right not in text, f"a password in the {where}"


def test_bearer_token_is_sent_and_scrubbed(tmp_path: Path) -> None:
    token = "tok-6b1d0c55e2"
    (tmp_path / "web.token").write_text(token + "\n")
    stub = StowStub(lambda sop: (503, None))
    try:
        sender = _sender(tmp_path, stub.url(), f'token_file = "{tmp_path / "web.token"}"\n')
        f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]
        with pytest.raises(SendError) as info:
            sender.send(f, {"sop_uid": sop_uid_of(f)})
        assert stub.requests[0][0]["Authorization"] == f"Bearer {token}"
        assert token not in str(info.value)
        assert token not in repr(sender.dest)  # the config holds the file, not the token
        assert sender._scrub(f"x {token} y") == "x *** y"
    finally:
        stub.stop()


# ---------------------------------------------------------------------------------------------
# https: the certificate and the host name are verified


def _cert_for(pki_dir: Path, name: str) -> tuple[Path, Path]:
    """A server certificate from the test CA in ``pki_dir`` for ``name`` only (SAN)."""
    key, csr, crt, ext = (pki_dir / f"{name}.key", pki_dir / f"{name}.csr",
                          pki_dir / f"{name}.crt", pki_dir / f"{name}.ext")
    run = [shutil.which("openssl") or "openssl"]
    subprocess.run([*run, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(csr), "-subj", f"/CN={name}"], check=True, capture_output=True)
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    subprocess.run([*run, "x509", "-req", "-in", str(csr), "-CA", str(pki_dir / "ca.crt"),
                    "-CAkey", str(pki_dir / "ca.key"), "-CAcreateserial", "-out", str(crt),
                    "-days", "2", "-extfile", str(ext)], check=True, capture_output=True)
    return crt, key


def test_https_verifies_the_chain_and_the_host_name(tmp_path: Path) -> None:
    """https with ``ca``: a server certificate from that CA for the host dialled is accepted
    (the file arrives as on disk); one from another CA, or from the right CA for another host
    name, is refused as a TLS failure that holds the destination, before anything is sent.

    The server is the TLS-wrapped stub, not Orthanc: Debian's Orthanc 1.10.1 resets every
    HTTPS connection here (``SslEnabled``), so it cannot be the https peer of a test."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]

    def tls_stub(cert: Path, key: Path) -> StowStub:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        return StowStub(lambda sop: (200, stored_doc(sop)), ssl_context=ctx)

    stub = tls_stub(pki["server_cert"], pki["server_key"])  # SAN 127.0.0.1, localhost
    try:
        bad = _sender(tmp_path / "bad", stub.url(scheme="https"), f'ca = "{other["ca"]}"\n')
        with pytest.raises(SendError) as info:
            bad.send(f, {"sop_uid": sop_uid_of(f)})
        assert info.value.connection and "TLS" in str(info.value) and not stub.requests
        good = _sender(tmp_path / "good", stub.url(scheme="https"), f'ca = "{pki["ca"]}"\n')
        assert good.send(f, {"sop_uid": sop_uid_of(f)}) is None
        good.close()
        headers, body = stub.requests[0]
        assert split_multipart(headers["Content-Type"], body) == [f.read_bytes()]
    finally:
        stub.stop()

    stub = tls_stub(*_cert_for(tmp_path / "pki", "not-the-pacs.example"))
    try:
        sender = _sender(tmp_path / "host", stub.url(scheme="https"), f'ca = "{pki["ca"]}"\n')
        with pytest.raises(SendError) as info:
            sender.send(f, {"sop_uid": sop_uid_of(f)})
        assert info.value.connection and "TLS" in str(info.value)
        assert "hostname" in str(info.value).lower() or "match" in str(info.value)
        assert not stub.requests
    finally:
        stub.stop()


# ---------------------------------------------------------------------------------------------
# 5. configuration


BASE = """
[listener]
port = 11112
[state]
dir = "state"
"""


def load_dest(tmp_path: Path, body: str) -> Any:
    p = tmp_path / "c.toml"
    p.write_text(BASE + '[destinations.web]\nkind = "dicomweb"\n' + body)
    return load_config(p).destinations["web"]


def refused(tmp_path: Path, body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_dest(tmp_path, body)
    return info.value


def test_config_loads_with_defaults_and_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x\n")
    d = load_dest(tmp_path, 'url = "http://127.0.0.1:8042/dicom-web/"\nusername = "gw"\n'
                  'password_file = "pw"\n')
    assert (d.kind, d.url, d.username, d.password_file) == (
        "dicomweb", "http://127.0.0.1:8042/dicom-web", "gw", tmp_path / "pw")
    assert d.associations == 1 and d.timeout_s == 60 and d.token_file is None and d.ca is None
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    d = load_dest(tmp_path, 'url = "https://pacs.example.org/dicom-web"\nca = "ca.pem"\n'
                  "timeout_s = 5\nconnections = 4\n")
    assert d.ca == tmp_path / "ca.pem" and d.timeout_s == 5 and d.associations == 4
    d = load_dest(tmp_path, 'url = "http://10.0.0.20:8042/dicom-web"\nallow_plain_http = true\n')
    assert d.allow_plain_http


@pytest.mark.parametrize(("body", "key", "words"), [
    ('url = "ftp://pacs/dicom-web"\n', "url", "not http or https"),
    ('url = "pacs.example.org/dicom-web"\n', "url", "not http or https"),
    ('url = "https:///dicom-web"\n', "url", "no host"),
    ('url = "https://pacs:99999/dicom-web"\n', "url", "not a valid URL"),
    ('url = "https://gw:secret@pacs/dicom-web"\n', "url", "credentials in the URL"),
    ('url = "http://10.0.0.20/dicom-web"\n', "url", "plain http"),
    ('url = "http://pacs.example.org/dicom-web"\n', "url", "allow_plain_http = true"),
    ('url = "https://pacs/dicom-web"\ntoken_file = "missing.token"\n', "token_file",
     "does not exist"),
    ('url = "https://pacs/dicom-web"\npassword = "hunter2"\n', "password", "password_file"),
    ('url = "https://pacs/dicom-web"\ntoken = "abc"\n', "token", "token_file"),
    ('url = "https://pacs/dicom-web"\nassociations = 2\n', "associations", "unknown key"),
    ('url = "https://pacs/dicom-web"\nusername = "gw"\n', "password_file", "missing"),
    ('url = "http://127.0.0.1/dicom-web"\nca = "ca.pem"\n', "ca", "only used with an https"),
    ('url = "https://pacs/dicom-web"\nca = "nope.pem"\n', "ca", "does not exist"),
    ('url = "https://pacs/dicom-web"\nconnections = 9\n', "connections", "out of range"),
    ("", "url", "missing"),
])
def test_config_refusals_name_key_and_fix(tmp_path: Path, body: str, key: str,
                                          words: str) -> None:
    err = refused(tmp_path, body)
    assert err.key == f"destinations.web.{key}", err
    assert words in str(err) and err.fix
    assert "hunter2" not in str(err) and "secret@" not in str(err)


def test_config_refuses_empty_secret_file_and_both_auth_kinds(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "t").write_text("t\n")
    err = refused(tmp_path, 'url = "https://pacs/dicom-web"\ntoken_file = "empty"\n')
    assert err.key.endswith("token_file") and "empty" in err.problem
    err = refused(tmp_path, 'url = "https://pacs/dicom-web"\ntoken_file = "t"\n'
                  'username = "gw"\npassword_file = "t"\n')
    assert "both" in err.problem


def test_example_config_dicomweb_block_loads_and_tools_show_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example's commented DICOMweb destination, uncommented (its files made real), loads;
    `sentinel check` and `sentinel rules test` name it as DICOMweb with its URL, no secret."""
    from gateway.cli import main

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "systemd" / "sentinel.example.toml").read_text()
    start = text.index("# [destinations.web]")
    block = text[start:text.index("\n\n", start)]
    plain = "\n".join(line[2:].split("  #")[0].rstrip() if line.startswith("# ") else ""
                      for line in block.splitlines())
    password = "Example-Pa55-3d9e"
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "web-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "web.password").write_text(password + "\n")
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(text.replace(block, plain.replace("/etc/xray-sentinel/",
                                                          f"{tmp_path}/")))
    d = load_config(cfg_path).destinations["web"]
    assert (d.kind, d.url, d.username) == ("dicomweb", "https://pacs.example.org/dicom-web",
                                           "sentinel")
    assert d.password_file == tmp_path / "web.password" and d.token_file is None
    assert main(["check", "--no-bundle", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "web (dicomweb https://pacs.example.org/dicom-web, basic auth as 'sentinel'" in out
    assert password not in out

    rules_cfg = write_config(tmp_path / "r.toml", state=tmp_path / "state", port=free_port(),
                             destinations=web_dest("http://127.0.0.1:8042/dicom-web"))
    f = make_series(tmp_path / "in", 1, rows=16, cols=16)[0]
    assert main(["rules", "test", "--config", str(rules_cfg), str(f)]) == 0
    assert "to web (DICOMweb http://127.0.0.1:8042/dicom-web)" in capsys.readouterr().out
