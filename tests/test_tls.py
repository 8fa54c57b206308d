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
from tests.gateway_harness import GatewayProcess, audit_events, wait_until, write_config
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
                   for e in audit_events(audit))

    assert wait_until(lambda: failed_for("nocert") and failed_for("plain"), 30)
    events = audit_events(audit)
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
    events = audit_events(tmp_path / "state" / "audit" / "audit.jsonl")
    assert [e["reason"] for e in events if e["event"] == "rejected"] == [
        "calling-ae-not-allowed", "address-not-allowed"]
    record_figures("access_control", {k: str(v) for k, v in results.items()})


# -- issue 20, defect 6b: outbound TLS verifies the PACS's host name --------------------------


def _server_cert(d: Path, name: str, ca: str, san: str) -> None:
    """A server certificate from ``ca`` whose only names are ``san`` (no CN fallback)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                   "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


def _send_over_tls(tmp_path: Path, pki: Path, server: str, host: str,
                   verify_hostname: bool | None) -> tuple[bool, str, int]:
    """One C-STORE from the gateway's DICOM sender to a TLS Storage SCP presenting
    ``server``'s certificate: (sent, error, instances the SCP received)."""
    import ssl

    from gateway.config import load_config
    from gateway.forward import DicomSender, SendError
    from tests.test_forward import CaptureSCP

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / f"{server}.pem"), str(pki / f"{server}.key"))
    scp = CaptureSCP(ssl_context=ctx)
    try:
        key = ("" if verify_hostname is None
               else f"verify_hostname = {str(verify_hostname).lower()}\n")
        dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "{host}"\nport = {scp.port}\n'
                f'ae_title = "CAPTURE"\n[destinations.pacs.tls]\nca = "{pki / "ca.pem"}"\n{key}')
        cfg = load_config(write_config(tmp_path / f"{server}-{host}-{verify_hostname}.toml",
                                       state=tmp_path / "state", port=free_port(),
                                       destinations=dest))
        f = synthetic(tmp_path / "tls-out.dcm", 32, 32, seed=11)
        sender = DicomSender(cfg.destinations["pacs"], lambda: cfg)
        try:
            sender.send(f, {})
            return True, "", len(scp.received)
        except SendError as exc:
            return False, str(exc), len(scp.received)
        finally:
            sender.close()
    finally:
        scp.stop()


def test_outbound_tls_verifies_the_pacs_host_name(pki: Path, tmp_path: Path) -> None:
    """The CA alone is not the identity: any certificate the hospital CA signed (another
    modality's, another server's) would otherwise pass as the PACS. A server certificate for
    127.0.0.1 / localhost is accepted under either name; one for another name is refused by
    default and accepted only with ``verify_hostname = false`` on the destination."""
    _server_cert(pki, "pacs-here", "ca", "IP:127.0.0.1,DNS:localhost")
    _server_cert(pki, "pacs-elsewhere", "ca", "DNS:pacs.elsewhere.example")
    results = {
        "right-name-ip": _send_over_tls(tmp_path, pki, "pacs-here", "127.0.0.1", None),
        "right-name-dns": _send_over_tls(tmp_path, pki, "pacs-here", "localhost", None),
        "wrong-name": _send_over_tls(tmp_path, pki, "pacs-elsewhere", "127.0.0.1", None),
    }
    assert results["right-name-ip"][0] and results["right-name-ip"][2] == 1
    assert results["right-name-dns"][0] and results["right-name-dns"][2] == 1
    assert results["wrong-name"][:2] != (True, "") and results["wrong-name"][2] == 0, \
        "a certificate for another host name was accepted as the PACS's"
    results["wrong-name-explicit"] = _send_over_tls(tmp_path, pki, "pacs-elsewhere",
                                                    "127.0.0.1", True)
    assert not results["wrong-name-explicit"][0] and results["wrong-name-explicit"][2] == 0
    results["wrong-name-check-off"] = _send_over_tls(tmp_path, pki, "pacs-elsewhere",
                                                     "127.0.0.1", False)
    assert results["wrong-name-check-off"][0] and results["wrong-name-check-off"][2] == 1
    record_figures("tls_outbound_hostname", {k: "sent" if v[0] else "refused"
                                             for k, v in results.items()})


def test_verify_hostname_must_be_a_boolean_and_only_outbound(pki: Path, tmp_path: Path) -> None:
    from gateway.config import ConfigError, load_config

    base = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = 104\n'
            f'ae_title = "PACS"\n[destinations.pacs.tls]\nca = "{pki / "ca.pem"}"\n')
    good = write_config(tmp_path / "good.toml", state=tmp_path / "s", port=free_port(),
                        destinations=base + "verify_hostname = false\n")
    tls = load_config(good).destinations["pacs"].tls
    assert tls is not None and tls.verify_hostname is False
    default = write_config(tmp_path / "default.toml", state=tmp_path / "s", port=free_port(),
                           destinations=base)
    tls = load_config(default).destinations["pacs"].tls
    assert tls is not None and tls.verify_hostname is True
    bad = write_config(tmp_path / "bad.toml", state=tmp_path / "s", port=free_port(),
                       destinations=base + 'verify_hostname = "no"\n')
    with pytest.raises(ConfigError, match="verify_hostname"):
        load_config(bad)
    port = free_port()
    inbound = write_config(tmp_path / "inbound.toml", state=tmp_path / "s", port=port,
                           destinations=base)
    inbound.write_text(inbound.read_text().replace(
        f"port = {port}\n",
        f'port = {port}\n[listener.tls]\ncert = "{pki / "gateway.pem"}"\n'
        f'key = "{pki / "gateway.key"}"\nca = "{pki / "ca.pem"}"\nverify_hostname = false\n', 1))
    with pytest.raises(ConfigError, match="verify_hostname"):  # a listener has no peer name
        load_config(inbound)


# -- issue 20, defect 6: a client certificate vouches for one calling AE title -----------------


def _client_cert(d: Path, name: str, cn: str, dns: tuple[str, ...] = ()) -> None:
    """A client certificate from the test CA ``ca`` with subject CN ``cn`` and SAN DNS names."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    san = ",".join(["IP:127.0.0.1", *(f"DNS:{n}" for n in dns)])
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                   "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


def _tls_listener_config(tmp_path: Path, pki: Path, port: int, extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\n'
                                    f'path = "{tmp_path}/o"\n',
                       callers=("MODALITY", "CT01"))
    cfg.write_text(cfg.read_text().replace(
        f"port = {port}\n",
        f'port = {port}\n[listener.tls]\ncert = "{pki / "gateway.pem"}"\n'
        f'key = "{pki / "gateway.key"}"\nca = "{pki / "ca.pem"}"\n{extra}', 1))
    return cfg


def test_client_certificate_must_name_the_calling_ae(pki: Path, tmp_path: Path) -> None:
    """With ``require_cert_matches_ae``, a certificate from the hospital CA admits only the AE
    title it names (subject CN or a SAN DNS name, exact case): the CT's certificate cannot be
    used to send as MODALITY. Off (the default), any trusted certificate may send as any
    allowed AE title, as before."""
    import ssl

    from gateway.config import load_config
    from gateway.service import Gateway

    _client_cert(pki, "cn-modality", "MODALITY")
    _client_cert(pki, "san-modality", "x-ray room 3", dns=("MODALITY",))
    _client_cert(pki, "ct01", "CT01")
    _client_cert(pki, "lower-modality", "modality")

    def associate(port: int, cert: str, calling: str) -> tuple[int, int, int] | str:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        ctx.check_hostname = False
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL", tls_args=(ctx, None))
        if assoc.is_established:
            assoc.release()
            return "accepted"
        rj = assoc.acceptor.primitive
        return (int(rj.result), int(rj.result_source), int(rj.diagnostic)) if rj else "aborted"

    cases = [("cn-modality", "MODALITY"), ("san-modality", "MODALITY"), ("ct01", "CT01"),
             ("ct01", "MODALITY"), ("lower-modality", "MODALITY")]
    results: dict[str, dict[str, object]] = {}
    for setting in ("true", "false"):
        port = free_port()
        cfg = _tls_listener_config(tmp_path / setting, pki, port,
                                   f"require_cert_matches_ae = {setting}\n")
        gw = Gateway(load_config(cfg), detector_factory=lambda c: [], drain_s=5)
        gw.start()
        try:
            results[setting] = {f"{cert} as {calling}": associate(port, cert, calling)
                                for cert, calling in cases}
        finally:
            gw.stop()
        events = audit_events(tmp_path / setting / "state" / "audit" / "audit.jsonl")
        results[setting]["audited"] = [(e.get("calling_ae"), e["reason"], e.get("detail"))
                                       for e in events if e["event"] == "rejected"]
    on = results["true"]
    assert on["cn-modality as MODALITY"] == "accepted"
    assert on["san-modality as MODALITY"] == "accepted"
    assert on["ct01 as CT01"] == "accepted"
    assert on["ct01 as MODALITY"] == (1, 1, 3)  # permanent, service-user, calling AE unknown
    assert on["lower-modality as MODALITY"] == (1, 1, 3)  # names are compared exactly
    assert on["audited"] == [
        ("MODALITY", "certificate-ae-mismatch", "certificate names: CT01"),
        ("MODALITY", "certificate-ae-mismatch", "certificate names: modality")]
    off = results["false"]
    assert all(v == "accepted" for k, v in off.items() if k != "audited")
    record_figures("tls_certificate_ae", {s: {k: str(v) for k, v in r.items()}
                                          for s, r in results.items()})


def test_certificate_ae_match_needs_a_client_certificate(pki: Path, tmp_path: Path) -> None:
    from gateway.config import ConfigError, load_config

    port = free_port()
    cfg = _tls_listener_config(tmp_path, pki, port,
                               "require_client_cert = false\nrequire_cert_matches_ae = true\n")
    with pytest.raises(ConfigError, match=r"listener\.tls\.require_cert_matches_ae: there is no "
                                          r"client certificate.*fix: set require_client_cert"):
        load_config(cfg)
    cfg = _tls_listener_config(tmp_path, pki, port, "")
    tls = load_config(cfg).listener.tls
    assert tls is not None and tls.require_cert_matches_ae is False  # compatible default
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\nport = 104\n'
            f'ae_title = "PACS"\n[destinations.pacs.tls]\nca = "{pki / "ca.pem"}"\n'
            "require_cert_matches_ae = true\n")
    out = write_config(tmp_path / "out.toml", state=tmp_path / "s", port=port, destinations=dest)
    with pytest.raises(ConfigError, match=r"require_cert_matches_ae: unknown key"):
        load_config(out)
