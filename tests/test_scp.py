"""The Storage SCP: spool-only handler, admission policy, limits, watermark, size cap.

These tests route everything with ``action = "pass"`` to a directory destination, so no model
is involved: the gateway gets an empty detector list (screening is tested end to end in
test_service_e2e.py with a real bundle).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.config import load_config
from gateway.service import Gateway
from tests.dcmtk import echoscu, free_port, require_dcmtk, storescu
from tests.dicom_factory import dataset_bytes, make_series, sop_uid_of, synthetic
from tests.gateway_harness import wait_until, write_config

DEST = '[destinations.out]\nkind = "directory"\npath = "{out}"\n'


def no_detectors(cfg):  # type: ignore[no-untyped-def]
    """These configs never screen: no model is loaded."""
    return []


@pytest.fixture()
def gateway_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Gateway] = []

    def make(**kw: object) -> Gateway:
        port = free_port()
        out = tmp_path / "out"
        cfg_path = write_config(
            tmp_path / "c.toml", state=tmp_path / "state", port=port,
            destinations=DEST.format(out=out), **kw,  # type: ignore[arg-type]
        )
        gw = Gateway(load_config(cfg_path), detector_factory=no_detectors, drain_s=5)
        gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def audit_events(gw: Gateway) -> list[dict]:  # type: ignore[type-arg]
    path = gw.config.audit_path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_store_spools_and_forwards_byte_for_byte(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_dcmtk()
    gw = gateway_factory()
    files = make_series(tmp_path / "in", 3, rows=128, cols=128)
    r = storescu(gw.address[1], files)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 3, 20)
    for f in files:
        sop = sop_uid_of(f)
        got = next(out.rglob(f"{sop}.dcm"))
        assert dataset_bytes(got) == dataset_bytes(f)  # exactly the bytes sent
    # nothing left behind in the spool
    layout = gw.layout
    assert not list(layout.incoming.iterdir()) and not list(layout.work.iterdir())
    assert not list(layout.tmp.iterdir())
    # the forwarder audits a delivery on its completer thread, just after the file lands
    def audited(event: str) -> int:
        return [e["event"] for e in audit_events(gw)].count(event)

    assert wait_until(lambda: audited("forwarded") == 3, 10), audited("forwarded")
    assert audited("received") == 3


def test_unknown_caller_address_and_called_ae_refused(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_dcmtk()
    gw = gateway_factory(callers=("MODALITY",))
    port = gw.address[1]
    f = synthetic(tmp_path / "a.dcm", 64, 64)
    r = storescu(port, [f], calling="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    r = storescu(port, [f], called="SOMEONE")
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stderr
    reasons = [e.get("reason") for e in audit_events(gw) if e["event"] == "rejected"]
    assert reasons == ["calling-ae-not-allowed", "called-ae-not-recognised"]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_address_not_on_allow_list(tmp_path: Path) -> None:
    port = free_port()
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=DEST.format(out=tmp_path / "out"), callers=())
    text = cfg_path.read_text().replace(
        "[timeouts]", '[[callers]]\nae_title = "MODALITY"\naddresses = ["10.9.0.0/16"]\n\n'
        "[timeouts]")
    cfg_path.write_text(text)
    gw = Gateway(load_config(cfg_path), detector_factory=no_detectors, drain_s=5)
    gw.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert assoc.is_rejected
        assert [e["reason"] for e in audit_events(gw) if e["event"] == "rejected"] == [
            "address-not-allowed"]
    finally:
        gw.stop()


def test_per_caller_association_limit_and_nodelay(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(limits="max_associations = 5\nmax_associations_per_caller = 2")
    port = gw.address[1]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    a1 = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    a2 = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    a3 = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    try:
        assert a1.is_established and a2.is_established
        assert a3.is_rejected
        rj = a3.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        # another caller still gets in
        other = AE(ae_title="STORESCU")
        other.add_requested_context(Verification)
        b = other.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert b.is_established and b.send_c_echo().Status == 0
        # TCP_NODELAY on the accepted sockets (no 40 ms delayed-ACK stall)
        server_side = [a for a in gw.receiver._ae.active_associations if a.is_acceptor]
        assert server_side
        for a in server_side:
            sock = a.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        b.release()
    finally:
        a1.release()
        a2.release()
    # the slots free up when associations close
    assert wait_until(lambda: gw.receiver.active_associations() == 0, 10)
    a4 = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    assert a4.is_established
    a4.release()


def test_out_of_resources_past_watermark_echo_still_works(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_dcmtk()
    gw = gateway_factory(min_free_mb=10**7 - 1)  # far more than any disk here: always past
    port = gw.address[1]
    f = synthetic(tmp_path / "a.dcm", 64, 64)
    assert storescu(port, [f]).returncode != 0  # DCMTK reports the failed store
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    status = assoc.send_c_store(pydicom.dcmread(f))
    assoc.release()
    assert status.Status == 0xA700  # Out of Resources
    assert echoscu(port).returncode == 0
    assert not list(gw.layout.incoming.iterdir()) and not list(gw.layout.tmp.iterdir())
    assert "spool-full" in [e.get("reason") for e in audit_events(gw)]


def test_instance_over_size_limit_aborted_and_not_kept(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_dcmtk()
    gw = gateway_factory(limits="max_instance_mb = 0.05")  # 50 KiB
    port = gw.address[1]
    big = synthetic(tmp_path / "big.dcm", 256, 256)  # 128 KiB of pixels
    small = synthetic(tmp_path / "small.dcm", 32, 32)
    r = storescu(port, [big])
    assert r.returncode != 0
    time.sleep(0.5)
    assert not list(gw.layout.incoming.iterdir())
    assert "instance-too-large" in [e.get("reason") for e in audit_events(gw)]
    assert storescu(port, [small]).returncode == 0
    out = tmp_path / "out"
    assert wait_until(lambda: bool(list(out.rglob(f"{sop_uid_of(small)}.dcm"))), 20)
    time.sleep(0.5)
    assert [p.stem for p in out.rglob("*.dcm")] == [sop_uid_of(small)]  # never the big one


def test_unscreened_instances_recovered_at_start(tmp_path: Path) -> None:
    """Instances acknowledged but not yet routed (incoming/ or claimed in work/) when the
    process died are routed at the next start; partial receives in tmp/ are dropped."""
    port = free_port()
    out = tmp_path / "out"
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=DEST.format(out=out))
    cfg = load_config(cfg_path)
    from gateway.spool import SpoolLayout, write_json_durable

    layout = SpoolLayout(cfg.state_dir)
    layout.create(("out",))
    files = make_series(tmp_path / "in", 2, rows=32, cols=32)
    uids = [sop_uid_of(f) for f in files]
    (layout.incoming / f"{uids[0]}.dcm").write_bytes(files[0].read_bytes())
    write_json_durable(layout.incoming / f"{uids[0]}.json",
                       {"sop_uid": uids[0], "calling_ae": "MODALITY", "seq": "0" * 19 + "1"})
    (layout.work / f"{uids[1]}~00000000000000000002.dcm").write_bytes(files[1].read_bytes())
    (layout.tmp / "rx-partial.dcm").write_bytes(b"\0" * 100)
    gw = Gateway(cfg, detector_factory=no_detectors, drain_s=5)
    gw.start()
    try:
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 2, 20)
        assert {p.stem for p in out.rglob("*.dcm")} == set(uids)
        assert not list(layout.tmp.iterdir())
    finally:
        gw.stop()


def test_reject_rule_refused_before_acknowledgement(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rules = ('[[rules]]\nname = "no-old-box"\naction = "reject"\n[rules.match]\n'
             'calling_ae = "OLDBOX"\n')
    gw = gateway_factory(rules=rules, callers=("MODALITY", "OLDBOX"))
    port = gw.address[1]
    f = synthetic(tmp_path / "a.dcm", 32, 32)
    ae = AE(ae_title="OLDBOX")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    try:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0124  # Refused: Not Authorized
    finally:
        assoc.release()
    assert not list(gw.layout.incoming.iterdir())
    rejected = [e for e in audit_events(gw) if e["event"] == "rejected"]
    assert rejected[-1]["rule"] == "no-old-box"


def test_tls_listener_mutual_authentication(tmp_path: Path) -> None:
    import ssl

    from tests.gateway_harness import make_pki

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=DEST.format(out=tmp_path / "out"))
    text = cfg_path.read_text().replace(
        f"port = {port}\n",
        f'port = {port}\n[listener.tls]\ncert = "{pki["server_cert"]}"\n'
        f'key = "{pki["server_key"]}"\nca = "{pki["ca"]}"\nrequire_client_cert = true\n', 1)
    cfg_path.write_text(text)
    gw = Gateway(load_config(cfg_path), detector_factory=no_detectors, drain_s=5)
    gw.start()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        ctx.check_hostname = False
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL", tls_args=(ctx, None))
        assert assoc.is_established
        f = synthetic(tmp_path / "a.dcm", 32, 32)
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        assoc.release()
        assert wait_until(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 1, 20)
        # plaintext, and TLS without a client certificate, are both refused
        plain = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert not plain.is_established
        anon = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        anon.check_hostname = False
        no_cert = ae.associate("127.0.0.1", port, ae_title="SENTINEL", tls_args=(anon, None))
        assert not no_cert.is_established
    finally:
        gw.stop()


def test_oversized_pdu_refused_before_it_is_read(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """A peer declaring a 2 GiB PDU is disconnected without the gateway buffering it."""
    import struct

    gw = gateway_factory(limits="max_instance_mb = 1")
    port = gw.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x01\x00" + struct.pack(">L", 2**31) + b"\x00" * 4096)
        deadline = time.monotonic() + 10
        closed = False
        while time.monotonic() < deadline:
            try:
                if s.recv(4096) == b"":
                    closed = True
                    break
            except (ConnectionResetError, TimeoutError):
                closed = True
                break
    assert closed
    assert "pdu-too-large" in [e.get("reason") for e in audit_events(gw)]
    ae = AE(ae_title="MODALITY")  # and the gateway still serves everyone else
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_negotiation_accepts_any_storage_class_in_the_callers_first_syntax(
    gateway_factory,  # type: ignore[no-untyped-def]
) -> None:
    """Every storage SOP Class, listed or not (a private one too), is accepted in the transfer
    syntax the caller proposes first; Verification is accepted; a query class is not (the
    same outcome as when every storage class was listed, checked side by side). The
    listener keeps no per-class context list for this: pynetdicom deep-copies that list into
    every association, which cost ~55 ms of CPU per association with all ~130 storage classes
    listed (bench/RESULTS.md), so the list must stay the few non-storage classes."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        PatientRootQueryRetrieveInformationModelFind,
    )

    gw = gateway_factory()
    private_storage = "1.3.6.1.4.1.5962.99.1.1.2.1"
    proposals = [
        (ComputedRadiographyImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
        (DigitalXRayImageStorageForPresentation, [RLELossless, ExplicitVRLittleEndian]),
        (private_storage, [ExplicitVRLittleEndian]),
        (PatientRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian]),
        (Verification, [ExplicitVRLittleEndian]),
    ]
    ae = AE(ae_title="MODALITY")
    for sop_class, syntaxes in proposals:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", gw.address[1], ae_title="SENTINEL")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax): str(cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
        assert accepted == {
            ComputedRadiographyImageStorage: JPEG2000Lossless,
            DigitalXRayImageStorageForPresentation: RLELossless,
            private_storage: ExplicitVRLittleEndian,
            Verification: ExplicitVRLittleEndian,
        }
        assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [
            PatientRootQueryRetrieveInformationModelFind]
    finally:
        assoc.release()
    assert gw.receiver is not None and gw.receiver._ae is not None
    assert len(gw.receiver._ae.supported_contexts) <= 2  # Verification, storage commitment
