"""Access control and DICOM TLS, inbound and outbound, with a test CA made by the test.

Inbound: DCMTK's ``storescu +tls`` (the modality) into ``sentinel serve`` with a TLS listener that
requires a client certificate from the test CA. Mutual authentication works; no client
certificate, a certificate from another CA, and plaintext on the TLS port are all refused and
store nothing.

Outbound: Orthanc itself as the TLS peer (Orthanc 1.10 has DICOM TLS: ``DicomTlsEnabled``,
``DicomTlsRemoteCertificateRequired``), chosen over DCMTK ``storescp +tls`` because it is the
PACS of every other integration test and its REST API shows what arrived. One gateway has three
destinations to the same TLS Orthanc: mutual TLS (delivered), TLS without a client certificate
(refused by Orthanc, so never delivered, audited as forward-failed) and plaintext (refused).

Access control without TLS: an unknown calling AE title and an address not on the allow-list get
A-ASSOCIATE-RJ with the standard reasons (PS3.8 Table 9-21).

Certificates come from the ``openssl`` command line (the Python ``cryptography`` package is not
a dependency); the test skips when it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.reliability import counting_orthanc, orthanc_store_counts, record_figures
from tests.dcmtk import STORESCU, dcmtk_env, free_port, require_dcmtk
from tests.dicom_factory import synthetic
from tests.gateway_harness import GatewayProcess, wait_until, write_config
from tests.orthanc import require_orthanc

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_cert(d: Path, name: str, ca: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "basicConstraints=CA:FALSE\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make the test CA")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    for name in ("gateway", "modality", "orthanc"):
        make_cert(d, name, "ca")
    make_cert(d, "intruder", "rogue-ca")
    return d


@pytest.fixture(scope="module")
def setup(pki: Path, tmp_path_factory: pytest.TempPathFactory, fixture_bundle: Path
          ) -> Iterator[tuple[GatewayProcess, object, Path]]:
    require_dcmtk()
    require_orthanc()
    tmp = tmp_path_factory.mktemp("tls")
    port = free_port()
    orthanc = counting_orthanc(tmp / "orthanc", {"sentinel": ("SENTINEL", port)}, extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki / "orthanc.pem"),
        "DicomTlsPrivateKey": str(pki / "orthanc.key"),
        "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    }).start()
    op = orthanc.dicom_port
    dest = f"""
[destinations.mutual]
kind = "dicom"
host = "127.0.0.1"
port = {op}
ae_title = "ORTHANC"
[destinations.mutual.tls]
cert = "{pki / 'gateway.pem'}"
key = "{pki / 'gateway.key'}"
ca = "{pki / 'ca.pem'}"

[destinations.nocert]
kind = "dicom"
host = "127.0.0.1"
port = {op}
ae_title = "ORTHANC"
[destinations.nocert.tls]
ca = "{pki / 'ca.pem'}"

[destinations.plain]
kind = "dicom"
host = "127.0.0.1"
port = {op}
ae_title = "ORTHANC"
"""
    state = tmp / "state"
    cfg = write_config(tmp / "c.toml", state=state, port=port, destinations=dest,
                       bundle=fixture_bundle,
                       forwarding="backoff_initial_s = 0.2\nbackoff_max_s = 1\nmax_age_s = 600")
    text = cfg.read_text().replace(
        f"port = {port}\n",
        f'port = {port}\n[listener.tls]\ncert = "{pki / "gateway.pem"}"\n'
        f'key = "{pki / "gateway.key"}"\nca = "{pki / "ca.pem"}"\nrequire_client_cert = true\n',
        1)
    cfg.write_text(text)
    gw = GatewayProcess(cfg, tmp / "gateway.log", port).start()
    yield gw, orthanc, state
    gw.stop()
    orthanc.stop()


def storescu_tls(port: int, f: Path, pki: Path, key: str | None, cert: str | None
                 ) -> subprocess.CompletedProcess[str]:
    tls = ["+tla"] if key is None else ["+tls", str(pki / key), str(pki / cert or ""), "-pw"]
    cmd = [STORESCU, *tls, "+cf", str(pki / "ca.pem"), "-aet", "MODALITY", "-aec", "SENTINEL",
           "-to", "10", "-ta", "10", "-td", "20", "127.0.0.1", str(port), str(f)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dcmtk_env())


def _uid(f: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)


def test_inbound_mutual_tls_and_outbound_to_orthanc(setup: tuple, pki: Path,  # type: ignore[type-arg]
                                                    tmp_path: Path) -> None:
    gw, orthanc, state = setup
    f = synthetic(tmp_path / "ok.dcm", 64, 64)
    r = storescu_tls(gw.port, f, pki, "modality.key", "modality.pem")
    assert r.returncode == 0, r.stderr
    uid = _uid(f)
    # delivered over mutual TLS; the two misconfigured destinations never get it through
    assert wait_until(lambda: orthanc.find_instance(uid) is not None, 30)
    audit = state / "audit" / "audit.jsonl"

    def failed_for(dest: str) -> bool:
        return any(e["event"] == "forward-failed" and e.get("destination") == dest
                   for e in map(json.loads, audit.read_text().splitlines()))

    assert wait_until(lambda: failed_for("nocert") and failed_for("plain"), 30)
    events = [json.loads(x) for x in audit.read_text().splitlines()]
    forwarded = {e["destination"] for e in events if e["event"] == "forwarded"}
    assert forwarded == {"mutual"}
    assert orthanc_store_counts(orthanc)[uid] == 1
    record_figures("tls_mutual", {"inbound_storescu_tls": "accepted",
                                  "outbound_orthanc_mutual_tls": "delivered",
                                  "outbound_tls_without_client_cert": "refused, audited",
                                  "outbound_plaintext_to_tls_peer": "refused, audited"})


@pytest.mark.parametrize("case", ["anonymous-tls", "rogue-ca-cert", "plaintext"])
def test_inbound_refused_without_a_trusted_client_certificate(
        case: str, setup: tuple, pki: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    gw, orthanc, state = setup
    f = synthetic(tmp_path / f"{case}.dcm", 32, 32, seed=3)
    if case == "anonymous-tls":
        r = storescu_tls(gw.port, f, pki, None, None)
    elif case == "rogue-ca-cert":
        r = storescu_tls(gw.port, f, pki, "intruder.key", "intruder.pem")
    else:
        r = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "SENTINEL", "-to", "5",
                            "-ta", "5", "-td", "10", "127.0.0.1", str(gw.port), str(f)],
                           capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert r.returncode != 0, f"{case} was accepted"
    uid = _uid(f)
    spool = state / "spool"
    assert not [p for p in spool.rglob(f"*{uid}*")]
    assert orthanc.find_instance(uid) is None
    assert gw.proc is not None and gw.proc.poll() is None
    record_figures(f"tls_inbound_{case}", {"result": "refused"})


def test_unknown_ae_and_address_refused_with_reasons(tmp_path: Path,
                                                     fixture_bundle: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\n'
                                    f'path = "{tmp_path}/o"\n',
                       callers=("MODALITY",), bundle=fixture_bundle)
    text = cfg.read_text() + '\n'
    text = text.replace("[timeouts]", '[[callers]]\nae_title = "REMOTE"\n'
                        'addresses = ["10.20.0.0/16"]\n\n[timeouts]')
    cfg.write_text(text)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    results: dict[str, tuple[int, int, int] | str] = {}
    try:
        for name, calling in (("unknown-ae", "INTRUDER"), ("address-not-allowed", "REMOTE"),
                              ("allowed", "MODALITY")):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
            if assoc.is_established:
                results[name] = "accepted"
                assoc.release()
            else:
                rj = assoc.acceptor.primitive
                results[name] = (int(rj.result), int(rj.result_source), int(rj.diagnostic))
    finally:
        assert gw.stop() == 0
    assert results["unknown-ae"] == (1, 1, 3)  # permanent, service-user, calling AE unknown
    assert results["address-not-allowed"] == (1, 1, 1)  # permanent, service-user, no reason
    assert results["allowed"] == "accepted"
    events = [json.loads(x) for x in (tmp_path / "state" / "audit" / "audit.jsonl")
              .read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "rejected"] == [
        "calling-ae-not-allowed", "address-not-allowed"]
    record_figures("access_control", {k: str(v) for k, v in results.items()})
