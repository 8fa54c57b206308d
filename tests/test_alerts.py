"""Alerts (gateway.alerts): a signed, durable webhook and RFC 5424 syslog, fed by the audit.

Real receivers on 127.0.0.1, started and stopped by each test: a stdlib HTTP server that checks
the HMAC, and a UDP socket that parses the syslog line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.alerts import ALERT_FIELDS, Alerter, FlagRateMonitor, sd_escape, syslog_line
from gateway.audit import AuditLog, verify
from gateway.config import AlertsConfig, ConfigError, ForwardingConfig, load_config
from tests.dcmtk import free_port
from tests.gateway_harness import make_pki, wait_until

SECRET = b"s3cr3t-never-shown-4f1c9a"
FAST = ForwardingConfig(backoff_initial_s=0.05, backoff_max_s=0.2, max_age_s=600)
LINE_RE = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) xray-sentinel (?P<procid>\d+) "
    r"(?P<msgid>\S+) \[sentinel@32473 (?P<sd>(?:[^\]\\]|\\.)*)\] (?P<msg>.*)$", re.S)
PARAM_RE = re.compile(r'(\w+)="((?:[^"\\\]]|\\["\\\]])*)"')


def parse_syslog(data: bytes) -> tuple[re.Match[str], dict[str, str]]:
    """Parse an RFC 5424 line as a collector would; SD values unescaped."""
    m = LINE_RE.match(data.decode())
    assert m, data
    params = {k: re.sub(r'\\(["\\\]])', r"\1", v) for k, v in PARAM_RE.findall(m["sd"])}
    # every byte of the SD element is accounted for by well-formed params
    assert " ".join(f'{k}="{sd_escape(v)}"' for k, v in params.items()) == m["sd"]
    return m, params


class Webhook:
    """A stdlib HTTP receiver: records each POST and whether its signature was valid."""

    def __init__(self, port: int = 0, status: int = 200,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.status = status
        self.scheme = "https" if tls else "http"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-Sentinel-Timestamp"]
                want = "sha256=" + hmac.new(SECRET, ts.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                outer.received.append({
                    "body": json.loads(body), "raw": body, "headers": dict(self.headers),
                    "signed": hmac.compare_digest(want, self.headers["X-Sentinel-Signature"]),
                    "fresh": abs(time.time() - int(ts)) < 300,
                })
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:  # (certificate, key): serve https
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SyslogReceiver:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def recv(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def nothing(self, wait: float = 0.3) -> bool:
        self.sock.settimeout(wait)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def syslog_rx() -> Iterator[SyslogReceiver]:
    rx = SyslogReceiver()
    yield rx
    rx.sock.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "alerts.secret"
    p.write_bytes(SECRET + b"\n")
    return p


def alerts_cfg(secret_file: Path, url: str = "", syslog_port: int = 0,
               **kw: Any) -> AlertsConfig:
    return AlertsConfig(url=url, secret_file=secret_file if url else None,
                        syslog_host="127.0.0.1" if syslog_port else "", syslog_port=syslog_port,
                        **{"verify_interval_s": 0.0, **kw})


def make(tmp_path: Path, cfg: AlertsConfig, forwarding: ForwardingConfig = FAST
         ) -> tuple[AuditLog, Alerter]:
    audit = AuditLog(tmp_path / "state" / "audit" / "audit.jsonl")
    alerter = Alerter(cfg, forwarding, tmp_path / "state", audit, "SENTINEL")
    alerter.start()
    return audit, alerter


def test_quarantine_and_dead_letter_reach_webhook_signed_and_syslog_as_rfc5424(
        tmp_path: Path, webhook: Webhook, syslog_rx: SyslogReceiver, secret_file: Path) -> None:
    audit, alerter = make(tmp_path, alerts_cfg(secret_file, webhook.url, syslog_rx.port))
    try:
        audit.append("received", sop_uid="1.2.3.4", calling_ae="CR1")  # no alert
        audit.append("quarantined", sop_uid="1.2.3.4", study_uid="1.2.3", calling_ae="CR1",
                     rule="default", reason="flagged", detail="not for alerts")
        audit.append("dead-letter", sop_uid="1.2.3.5", destination="pacs",
                     reason='refused "0xA700" [out of resources] C:\\store', attempts=9)
        assert wait_until(lambda: len(webhook.received) == 2, 10)
        q, dl = (r["body"] for r in webhook.received)
        assert all(r["signed"] and r["fresh"] for r in webhook.received)
        assert webhook.received[0]["headers"]["Content-Type"] == "application/json"
        assert q["kind"] == "quarantined" and q["gateway"] == "SENTINEL"
        assert (q["sop_uid"], q["calling_ae"], q["reason"]) == ("1.2.3.4", "CR1", "flagged")
        assert dl["kind"] == "dead-letter" and dl["destination"] == "pacs"
        for body in (q, dl):  # only the whitelist: detail, attempts, prev, hash stay out
            assert set(body) <= {*ALERT_FIELDS, "gateway", "kind"}
        lines = [syslog_rx.recv(), syslog_rx.recv()]
        m, params = parse_syslog(lines[0])
        assert m["pri"] == "132" and m["msgid"] == "quarantined"  # local0 (16) * 8 + warning
        assert params["sop_uid"] == "1.2.3.4" and params["gateway"] == "SENTINEL"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", m["ts"])
        m, params = parse_syslog(lines[1])
        assert m["pri"] == "131" and m["msgid"] == "dead-letter"  # err
        assert params["reason"] == 'refused "0xA700" [out of resources] C:\\store'
        assert r'reason="refused \"0xA700\" [out of resources\] C:\\store"' in m["sd"]
        # the webhook records a request before it answers, and the alerter removes the outbox
        # file after the answer: wait for that, rather than race it
        outbox = tmp_path / "state" / "alerts" / "outbox"
        assert wait_until(lambda: not list(outbox.iterdir()), 10), list(outbox.iterdir())
    finally:
        alerter.stop()


def test_syslog_to_a_unix_datagram_socket_with_facility(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    try:
        cfg = AlertsConfig(syslog_path=path, syslog_facility="auth", verify_interval_s=0)
        audit, alerter = make(tmp_path, cfg)
        audit.append("quarantined", sop_uid="1.2.9", reason="flagged")
        rx.settimeout(5)
        m, params = parse_syslog(rx.recv(65536))
        assert m["pri"] == str(4 * 8 + 4) and params["kind"] == "quarantined"
        alerter.stop()
    finally:
        rx.close()
    line = syslog_line({"kind": "flag-rate", "time": "2026-01-01T00:00:00.000Z", "reason": "x"},
                       "local7", hostname="host with space", procid=42)
    assert line.startswith(b"<189>1 2026-01-01T00:00:00.000Z host_with_space xray-sentinel 42 "
                           b"flag-rate [sentinel@32473 ")


def test_undelivered_alert_stays_in_outbox_across_restart_then_is_delivered_once(
        tmp_path: Path, secret_file: Path) -> None:
    port = free_port()
    cfg = alerts_cfg(secret_file, f"http://127.0.0.1:{port}/hook")
    outbox = tmp_path / "state" / "alerts" / "outbox"
    audit, alerter = make(tmp_path, cfg)
    audit.append("quarantined", sop_uid="1.2.3.7", reason="flagged")
    time.sleep(0.5)  # several tries against a closed port
    alerter.stop()
    assert len(list(outbox.glob("*.json"))) == 1
    hook = Webhook(port)
    try:
        hook.status = 503  # up but failing: kept, retried
        audit, alerter = make(tmp_path, cfg)  # the restart picks the outbox up
        assert wait_until(lambda: len(hook.received) >= 2, 10)
        assert len(list(outbox.glob("*.json"))) == 1
        hook.status = 204
        assert wait_until(lambda: not list(outbox.glob("*.json")), 10)
        time.sleep(0.3)
        alerter.stop()
        assert [r["body"]["sop_uid"] for r in hook.received if r["signed"]][-1] == "1.2.3.7"
        delivered = len(hook.received)
        audit, alerter = make(tmp_path, cfg)  # nothing left to send twice
        time.sleep(0.3)
        alerter.stop()
        assert len(hook.received) == delivered
    finally:
        hook.close()


def test_alert_given_up_after_max_age_moves_to_dead(tmp_path: Path, secret_file: Path) -> None:
    cfg = alerts_cfg(secret_file, f"http://127.0.0.1:{free_port()}/hook")
    audit, alerter = make(tmp_path, cfg, ForwardingConfig(0.05, 0.1, max_age_s=0.5))
    try:
        audit.append("dead-letter", sop_uid="1.2.3.8", destination="pacs", reason="refused")
        dead = tmp_path / "state" / "alerts" / "dead"
        assert wait_until(lambda: len(list(dead.glob("*.json"))) == 1, 10)
        assert not list((tmp_path / "state" / "alerts" / "outbox").glob("*.json"))
        body = json.loads(next(dead.glob("*.json")).read_text())
        assert body["alert"]["sop_uid"] == "1.2.3.8"
        # the lost alert is itself on the record, in the same chain, and is not re-alerted
        def given_up() -> list[dict]:
            lines = audit.path.read_text().splitlines()
            return [r for r in map(json.loads, lines) if r["event"] == "alert-dead"]
        assert wait_until(lambda: len(given_up()) == 1, 10)
        assert "(dead-letter) undelivered after" in given_up()[0]["reason"]
        assert verify(audit.path).ok
        time.sleep(0.5)
        assert len(list(dead.glob("*.json"))) == 1
    finally:
        alerter.stop()


def test_https_webhook_verifies_the_certificate_against_ca(tmp_path: Path,
                                                          secret_file: Path) -> None:
    """https with ``ca``: a receiver whose certificate comes from that CA gets the signed alert;
    one whose certificate comes from another CA gets nothing (the alert waits in the outbox)."""
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    good = Webhook(tls=(pki["server_cert"], pki["server_key"]))
    bad = Webhook(tls=(other["server_cert"], other["server_key"]))
    try:
        audit, alerter = make(tmp_path / "good", alerts_cfg(secret_file, good.url, ca=pki["ca"]))
        try:
            audit.append("quarantined", sop_uid="1.2.3.9", reason="flagged")
            assert wait_until(lambda: len(good.received) == 1, 10)
            assert good.received[0]["signed"] and good.received[0]["body"]["sop_uid"] == "1.2.3.9"
        finally:
            alerter.stop()
        audit, alerter = make(tmp_path / "bad", alerts_cfg(secret_file, bad.url, ca=pki["ca"]))
        try:
            audit.append("quarantined", sop_uid="1.2.3.10", reason="flagged")
            outbox = tmp_path / "bad" / "state" / "alerts" / "outbox"
            time.sleep(1.0)  # several attempts with the fast backoff
            assert not bad.received and len(list(outbox.glob("*.json"))) == 1
        finally:
            alerter.stop()
    finally:
        good.close()
        bad.close()


def test_flag_rate_steady_is_quiet_a_jump_alerts_once_per_window() -> None:
    mon = FlagRateMonitor(window=50, jump=0.2)
    fired = [mon.observe("CR1", i % 20 == 0) for i in range(1000)]  # steady 5%
    assert not any(fired)
    # another caller's jump is its own business
    assert not any(mon.observe("DX2", False) for _ in range(100))
    jump = [mon.observe("CR1", i % 5 < 2) for i in range(50)]  # 40%
    alerts = [a for a in jump if a]
    assert len(alerts) == 1 and alerts[0]["calling_ae"] == "CR1"
    assert alerts[0]["rule"] == "flag-rate" and "long-run 5.0%" in alerts[0]["reason"]
    # still high: not again within the window after the alert
    at = next(i for i, a in enumerate(jump) if a)
    again = [mon.observe("CR1", True) for _ in range(at + 1)]  # the rest of the 50 after it
    assert not any(again)
    assert mon.observe("CR1", True) is not None  # still high a window later: once more
    # a steady high rate from the start is a baseline, not a jump (each image alerts anyway)
    mon2 = FlagRateMonitor(window=50, jump=0.2)
    assert not any(mon2.observe("US1", i % 10 < 3) for i in range(500))
    # 3x rule: a 15% baseline does not alert at 30%
    mon3 = FlagRateMonitor(window=20, jump=0.2)
    assert not any(mon3.observe("A", i % 20 < 3) for i in range(200))
    assert not any(mon3.observe("A", i % 10 < 3) for i in range(40))


def test_flag_rate_from_scored_audit_events(tmp_path: Path, syslog_rx: SyslogReceiver,
                                            secret_file: Path) -> None:
    audit, alerter = make(tmp_path, alerts_cfg(secret_file, syslog_port=syslog_rx.port,
                                               flag_rate_window=10))
    try:
        for i in range(30):
            audit.append("scored", calling_ae="CR1", verdict="error" if i % 7 == 0 else "clean")
        assert syslog_rx.nothing()
        for _ in range(10):
            audit.append("scored", calling_ae="CR1", verdict="flagged-shadow", score=0.9)
        m, params = parse_syslog(syslog_rx.recv())
        assert m["msgid"] == "flag-rate" and m["pri"] == str(16 * 8 + 5)
        assert params["calling_ae"] == "CR1" and params["rule"] == "flag-rate"
        assert syslog_rx.nothing()  # one alert for the window
    finally:
        alerter.stop()


def test_audit_tamper_alerts_once_naming_the_line(tmp_path: Path, webhook: Webhook,
                                                  secret_file: Path) -> None:
    cfg = alerts_cfg(secret_file, webhook.url, verify_interval_s=0.1)
    audit, alerter = make(tmp_path, cfg)
    try:
        for i in range(5):
            audit.append("received", sop_uid=f"1.2.3.{i}", calling_ae="CR1")
        time.sleep(0.4)
        assert webhook.received == []  # intact chain: quiet
        data = bytearray(audit.path.read_bytes())
        third = data.index(b"1.2.3.2")
        data[third + 6] ^= 1  # 1.2.3.2 -> 1.2.3.3 on line 3
        audit.path.write_bytes(bytes(data))
        assert wait_until(lambda: len(webhook.received) >= 1, 10)
        time.sleep(0.5)  # several more checks: the same break is not alerted again
        assert len(webhook.received) == 1
        body = webhook.received[0]["body"]
        assert body["kind"] == "audit-failure" and webhook.received[0]["signed"]
        assert "line 3" in body["reason"] and "edited" in body["reason"]
    finally:
        alerter.stop()


def test_secret_never_in_logs_bodies_outbox_or_errors(
        tmp_path: Path, webhook: Webhook, secret_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = SECRET.decode()
    audit, alerter = make(tmp_path, alerts_cfg(secret_file, webhook.url))
    try:
        audit.append("quarantined", sop_uid="1.2.3.9", reason="flagged")
        assert wait_until(lambda: len(webhook.received) == 1, 10)
        secret_file.unlink()  # the next send fails on the missing file: logged, kept
        webhook.status = 500
        audit.append("quarantined", sop_uid="1.2.3.10", reason="flagged")
        assert wait_until(lambda: "secret file" in caplog.text, 10)
    finally:
        alerter.stop()
    outbox = tmp_path / "state" / "alerts"
    files = "".join(p.read_text() for p in outbox.rglob("*.json"))
    assert files and secret not in files
    assert all(SECRET not in r["raw"] and secret not in json.dumps(r["headers"])
               for r in webhook.received)
    assert secret not in caplog.text and str(secret_file) in caplog.text
    cfg = load_config(_write_alerts(tmp_path, f'url = "{webhook.url}"\n'
                                    f'secret_file = "{_secret(tmp_path)}"\n'))
    assert secret not in repr(cfg) and cfg.alerts is not None
    with pytest.raises(ConfigError) as err:
        load_config(_write_alerts(tmp_path, f'url = "{webhook.url}"\nsecret = "{secret}"\n'))
    assert err.value.key == "alerts.secret" and secret not in str(err.value)


# -- config -------------------------------------------------------------------------------------

BASE = """
[listener]
port = 11112
[state]
dir = "state"
{alerts}
[destinations.archive]
kind = "directory"
path = "out"
"""


def _secret(tmp_path: Path) -> Path:
    p = tmp_path / "cfg.secret"
    p.write_text(SECRET.decode() + "\n")
    return p


def _write_alerts(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(BASE.format(alerts="[alerts]\n" + body))
    return p


def test_alerts_config_loads_with_defaults(tmp_path: Path) -> None:
    s = _secret(tmp_path)
    cfg = load_config(_write_alerts(
        tmp_path, f'url = "https://alerts.example.org/h"\nsecret_file = "{s}"\n'
        'syslog = "udp://127.0.0.1:514"\n'))
    a = cfg.alerts
    assert a is not None and a.url == "https://alerts.example.org/h" and a.secret_file == s
    assert (a.syslog_host, a.syslog_port, a.syslog_path) == ("127.0.0.1", 514, None)
    assert (a.syslog_facility, a.verify_interval_s, a.flag_rate_window, a.flag_rate_jump) == (
        "local0", 300.0, 50, 0.2)
    cfg = load_config(_write_alerts(tmp_path, 'syslog = "/dev/log"\nsyslog_facility = "local3"'))
    assert cfg.alerts is not None and cfg.alerts.syslog_path == Path("/dev/log")
    assert cfg.alerts.url == "" and cfg.alerts.syslog_facility == "local3"
    p = tmp_path / "none.toml"
    p.write_text(BASE.format(alerts=""))
    assert load_config(p).alerts is None


@pytest.mark.parametrize(("body", "key", "words"), [
    ('syslog = "/dev/log"\nsurprise = 1', "alerts.surprise", "unknown key"),
    ("verify_interval_s = 10", "alerts.url", "neither"),
    ('url = "ftp://x.example.org/"\nsecret_file = "{s}"', "alerts.url", "not http or https"),
    ('url = "http://alerts.example.org/h"\nsecret_file = "{s}"', "alerts.url", "plain http"),
    ('url = "https://u:p@alerts.example.org/h"\nsecret_file = "{s}"', "alerts.url",
     "credentials"),
    ('url = "https://alerts.example.org/h"', "alerts.secret_file", "missing"),
    ('url = "https://alerts.example.org/h"\nsecret_file = "nope.secret"', "alerts.secret_file",
     "does not exist"),
    ('url = "https://alerts.example.org/h"\nsecret_file = "{empty}"', "alerts.secret_file",
     "empty"),
    ('url = "https://a.example.org/h"\nsecret_file = "{s}"\nca = "no.pem"', "alerts.ca",
     "does not exist"),
    ('syslog = "tcp://10.0.0.1:514"', "alerts.syslog", "neither"),
    ('syslog = "udp://10.0.0.1"', "alerts.syslog", "needs a host and a port"),
    ('syslog = "/dev/log"\nsyslog_facility = "local9"', "alerts.syslog_facility", "unknown"),
    ('syslog = "/dev/log"\nflag_rate_jump = 2', "alerts.flag_rate_jump", "out of range"),
    ('syslog = "/dev/log"\nsecret_file = "{s}"', "alerts.secret_file", "only used with"),
    ('syslog = "/dev/log"\napi_key = "x"', "alerts.api_key", "secrets are not written"),
])
def test_alerts_config_errors_name_key_and_fix(tmp_path: Path, body: str, key: str,
                                               words: str) -> None:
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as err:
        load_config(_write_alerts(tmp_path, body.format(s=_secret(tmp_path), empty=empty)))
    assert err.value.key == key and words in err.value.problem and err.value.fix


def test_plain_http_allowed_to_loopback_or_on_purpose(tmp_path: Path) -> None:
    s = _secret(tmp_path)
    for body in (f'url = "http://127.0.0.1:8080/h"\nsecret_file = "{s}"',
                 f'url = "http://alerts.lan/h"\nsecret_file = "{s}"\nallow_plain_http = true'):
        assert load_config(_write_alerts(tmp_path, body)).alerts is not None


@pytest.mark.integration
def test_serve_quarantine_sends_signed_webhook_and_syslog(
        tmp_path: Path, fixture_bundle: Path, webhook: Webhook, syslog_rx: SyslogReceiver,
        secret_file: Path) -> None:
    """`sentinel serve` with a rule that flags every screened image: a stored image is
    quarantined, the webhook gets the signed alert and the UDP receiver the syslog line."""
    from tests.dcmtk import require_dcmtk, storescu
    from tests.dicom_factory import sop_uid_of, synthetic
    from tests.gateway_harness import GatewayProcess, write_config

    require_dcmtk()
    src = synthetic(tmp_path / "src" / "cr.dcm", 128, 128, seed=7)
    port = free_port()
    archive = tmp_path / "archive"
    alerts = (f'[alerts]\nurl = "{webhook.url}"\nsecret_file = "{secret_file}"\n'
              f'syslog = "udp://127.0.0.1:{syslog_rx.port}"\n')
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.archive]\nkind = "directory"\n'
                                    f'path = "{archive}"\n',
                       default='action = "screen"\nthreshold = 0.0', bundle=fixture_bundle,
                       relay_unscreened=False, extra=alerts)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        r = storescu(port, [src])
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: webhook.received, 120), gw.log()[-3000:]
        m, params = parse_syslog(syslog_rx.recv(30))
    finally:
        assert gw.stop() == 0
    hit = webhook.received[0]
    assert hit["signed"] and hit["body"]["kind"] == "quarantined"
    assert hit["body"]["sop_uid"] == sop_uid_of(src) and hit["body"]["reason"] == "flagged"
    assert hit["body"]["gateway"] == "SENTINEL" and hit["body"]["calling_ae"] == "MODALITY"
    assert m["msgid"] == "quarantined" and params["sop_uid"] == sop_uid_of(src)
    assert not list(archive.rglob("*.dcm"))
    assert SECRET.decode() not in gw.log()


def test_example_alerts_block_uncommented_loads(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "systemd" / "sentinel.example.toml").read_text()
    start = text.index("# [alerts]")
    end = text.index("\n\n", start)
    block = "\n".join(line[2:] for line in text[start:end].splitlines())
    secret, ca = _secret(tmp_path), tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    block = block.replace("/etc/xray-sentinel/alerts.secret", str(secret)).replace(
        "/etc/xray-sentinel/alerts-ca.pem", str(ca))
    text = text[:start] + block + text[end:]
    text = text.replace('"/var/lib/xray-sentinel"', f'"{tmp_path / "state"}"')
    p = tmp_path / "example.toml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.alerts is not None and cfg.alerts.url.startswith("https://")
    assert cfg.alerts.syslog_path == Path("/dev/log") and cfg.alerts.ca == ca
