"""Alerts: a signed webhook and RFC 5424 syslog when something needs a person.

What raises an alert (each fed by the audit writer, ``AuditLog.add_listener``, or by a check of
the audit file itself):

- ``quarantined`` and ``dead-letter`` audit events, one alert each;
- ``audit-failure``: a background check every ``verify_interval_s`` verifies the whole hash
  chain (``gateway.audit.verify``) and alerts once per break, naming the first bad line. Not
  incremental on purpose: tampering means editing lines that were already checked, and only
  rehashing them finds it; the check reads the file sequentially (seconds per GB) off the
  serving path, and stops at the file's size taken between two appends (``locked_size``);
- ``flag-rate``: a caller's share of flagged images jumps (``FlagRateMonitor``, rule below).

Why the webhook is durable and the syslog line is not: the webhook is the channel a site builds
paging on, so each alert is first written (fsync) to ``<state>/alerts/outbox/<seq>.json``; one
sender thread POSTs them in order, deletes each after a 2xx, retries with the forwarders'
exponential backoff (``[forwarding] backoff_initial_s``/``backoff_max_s``), picks the outbox up
again after a restart, and moves an alert older than ``[forwarding] max_age_s`` to
``<state>/alerts/dead/``. Syslog over UDP or a unix datagram socket is fire-and-forget by
nature; a line that cannot be sent is logged here and the webhook still carries the alert.

Signing: ``X-Sentinel-Signature: sha256=<hex HMAC-SHA256 of timestamp + "." + body>`` with the
``X-Sentinel-Timestamp`` header (Unix seconds), so a receiver can reject a replayed or altered
alert. The secret is read from ``secret_file`` at each send (a rotated secret needs no
restart) and never logged; errors name the file, never its content.

No PHI: an alert carries only fields the audit already may (``ALERT_FIELDS``, from its
whitelist) plus ``gateway`` (the listener's AE title) and ``kind``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog, locked_size, utc_now_iso, verify
from gateway.config import SYSLOG_FACILITIES, AlertsConfig, ForwardingConfig
from gateway.spool import fsync_dir, next_seq, read_json, write_json_durable

LOG = logging.getLogger("sentinel.alerts")

# The audit fields an alert may carry (all on gateway.audit.FIELDS, or written by the log).
ALERT_FIELDS = ("event", "time", "sop_uid", "study_uid", "calling_ae", "destination", "reason",
                "rule", "score", "bundle_id")
# kind -> RFC 5424 severity: warning (4) for a held image, err (3) for a lost delivery or a
# broken audit chain, notice (5) for a statistical change.
SEVERITY = {"quarantined": 4, "dead-letter": 3, "audit-failure": 3, "flag-rate": 5,
            "alert-dead": 3}
AUDIT_KINDS = ("quarantined", "dead-letter")
FLAGGED_VERDICTS = ("flagged", "flagged-shadow")  # shadow mode is where a site watches the rate
SCORED_VERDICTS = ("clean", *FLAGGED_VERDICTS)  # "error" says nothing about the images
FLAG_RATE_FACTOR = 3.0  # the window's rate must be at least this multiple of the long-run rate
APP_NAME = "xray-sentinel"
SD_ID = "sentinel@32473"  # 32473: the example Private Enterprise Number of RFC 5612
MAX_REASON = 300
IDLE_POLL_S = 5.0


def make_alert(kind: str, gateway: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The alert body: ``kind``, ``gateway`` and the whitelisted fields present in ``fields``."""
    alert: dict[str, Any] = {"kind": kind, "gateway": gateway}
    for key in ALERT_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, str) and key == "reason" and len(value) > MAX_REASON:
            value = value[: MAX_REASON - 3] + "..."
        alert[key] = value
    alert.setdefault("event", kind)
    alert.setdefault("time", utc_now_iso())
    return alert


def encode_body(alert: dict[str, Any]) -> bytes:
    return json.dumps(alert, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Sentinel-Signature`` value: ``sha256=`` + HMAC-SHA256(secret, ts + "." + body)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# -- syslog (RFC 5424) ---------------------------------------------------------------------------

_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def _token(text: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, or "-"."""
    return _PRINTUSASCII.sub("_", text)[:limit] or "-"


def sd_escape(value: str) -> str:
    """An SD-PARAM value with ``"``, ``\\`` and ``]`` escaped (RFC 5424 section 6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _describe(alert: dict[str, Any]) -> str:
    kind = alert["kind"]
    if kind == "quarantined":
        return (f"instance {alert.get('sop_uid', '?')} from {alert.get('calling_ae', '?')} "
                f"quarantined: {alert.get('reason', '?')}")
    if kind == "dead-letter":
        return (f"instance {alert.get('sop_uid', '?')} dead-lettered for "
                f"{alert.get('destination', '?')}: {alert.get('reason', '?')}")
    return f"{kind}: {alert.get('reason', '')}"


def syslog_line(alert: dict[str, Any], facility: str, hostname: str | None = None,
                procid: int | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME xray-sentinel PROCID MSGID [sentinel@32473 ...] MSG``."""
    pri = SYSLOG_FACILITIES[facility] * 8 + SEVERITY.get(alert["kind"], 5)
    params = " ".join(
        f'{key}="{sd_escape(str(value))}"' for key, value in alert.items()
        if key not in ("time",) and value is not None
    )
    header = " ".join((
        f"<{pri}>1",
        _token(str(alert.get("time") or utc_now_iso()), 128),
        _token(hostname if hostname is not None else socket.gethostname(), 255),
        APP_NAME,
        _token(str(procid if procid is not None else os.getpid()), 128),
        _token(alert["kind"], 32),
    ))
    return f"{header} [{SD_ID} {params}] {_describe(alert)}".encode()


class SyslogSender:
    """Sends one datagram per alert to ``udp://host:port`` or a unix datagram socket."""

    def __init__(self, cfg: AlertsConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()

    def send(self, alert: dict[str, Any]) -> bool:
        data = syslog_line(alert, self.cfg.syslog_facility)
        try:
            with self._lock:
                if self.cfg.syslog_path is not None:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                        sock.settimeout(1.0)
                        sock.sendto(data, str(self.cfg.syslog_path))
                else:
                    family, kind, proto, _, addr = socket.getaddrinfo(
                        self.cfg.syslog_host, self.cfg.syslog_port, type=socket.SOCK_DGRAM)[0]
                    with socket.socket(family, kind, proto) as sock:
                        sock.settimeout(1.0)
                        sock.sendto(data, addr)
            return True
        except OSError as exc:
            LOG.warning("syslog alert %s not sent: %s", alert["kind"], exc)
            return False


# -- webhook -------------------------------------------------------------------------------------


class WebhookOutbox:
    """The durable queue: one fsync'd JSON file per alert, sent in name (= arrival) order."""

    def __init__(self, state_dir: Path, cfg: AlertsConfig, forwarding: ForwardingConfig,
                 on_dead: Callable[[str, str, str], None] | None = None) -> None:
        self.cfg = cfg
        # called with (file name, alert kind, why) when an alert is given up
        self._on_dead = on_dead
        self.forwarding = forwarding
        self.outbox = state_dir / "alerts" / "outbox"
        self.dead = state_dir / "alerts" / "dead"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: Any = None

    def create(self) -> None:
        for d in (self.outbox, self.dead):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)

    def put(self, alert: dict[str, Any]) -> Path:
        """Write the alert durably, then wake the sender. Raises OSError if it cannot."""
        path = self.outbox / f"{next_seq()}.json"
        write_json_durable(path, {"queued_at": time.time(), "alert": alert})
        self._wake.set()
        return path

    def pending(self) -> list[Path]:
        return sorted(p for p in self.outbox.glob("*.json") if not p.name.startswith("."))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alerts-webhook", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()

    def _run(self) -> None:
        backoff = self.forwarding.backoff_initial_s
        while not self._stop.is_set():
            self._wake.clear()
            files = self.pending()
            if not files:
                self._wake.wait(IDLE_POLL_S)
                continue
            if self.send_one(files[0]):
                backoff = self.forwarding.backoff_initial_s
                continue
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.forwarding.backoff_max_s)

    def send_one(self, path: Path) -> bool:
        """Deliver or give up on the oldest alert; False: keep it and back off."""
        try:
            envelope = read_json(path)
            alert = envelope["alert"]
            queued_at = float(envelope["queued_at"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            LOG.error("alert file %s is unreadable (%s); moved to %s", path.name, exc, self.dead)
            self._move_dead(path, "?", f"unreadable ({type(exc).__name__})")
            return True
        if time.time() - queued_at > self.forwarding.max_age_s:
            LOG.error("webhook alert %s (%s) undelivered after %.0f s; moved to %s",
                      path.name, alert.get("kind"), self.forwarding.max_age_s, self.dead)
            self._move_dead(path, str(alert.get("kind", "?")),
                            f"undelivered after {self.forwarding.max_age_s:.0f} s")
            return True
        try:
            status = self._post(alert)
        except Exception as exc:  # a requests error, a secret file gone: keep, retry later
            LOG.warning("webhook alert %s not delivered: %s", path.name, _safe_error(exc))
            return False
        if 200 <= status < 300:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fsync_dir(self.outbox)
            return True
        LOG.warning("webhook alert %s refused with HTTP %d; will retry", path.name, status)
        return False

    def _post(self, alert: dict[str, Any]) -> int:
        import requests  # only a site with a webhook pays for the import

        if self._session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy or netrc credentials from the environment
            session.verify = str(self.cfg.ca) if self.cfg.ca is not None else True
            self._session = session
        body = encode_body(alert)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": APP_NAME,
            "X-Sentinel-Timestamp": timestamp,
            "X-Sentinel-Signature": sign(self._secret(), timestamp, body),
        }
        response = self._session.post(self.cfg.url, data=body, headers=headers,
                                      timeout=self.cfg.timeout_s, allow_redirects=False)
        response.close()
        return int(response.status_code)

    def _secret(self) -> bytes:
        assert self.cfg.secret_file is not None
        try:
            secret = self.cfg.secret_file.read_bytes().strip()
        except OSError as exc:
            raise OSError(f"secret file {self.cfg.secret_file} unreadable ({exc.strerror})") \
                from None
        if not secret:
            raise OSError(f"secret file {self.cfg.secret_file} is empty")
        return secret

    def _move_dead(self, path: Path, kind: str, why: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, self.dead / path.name)
            fsync_dir(self.dead)
            fsync_dir(self.outbox)
        if self._on_dead is not None:
            try:
                self._on_dead(path.name, kind, why)
            except Exception:
                LOG.exception("recording the given-up alert %s failed", path.name)


def _safe_error(exc: BaseException) -> str:
    """An exception's type and message, cut short (requests errors carry the URL, no secret)."""
    return f"{type(exc).__name__}: {str(exc)[:300]}"


# -- flag rate -----------------------------------------------------------------------------------


@dataclass
class _CallerRate:
    window: collections.deque[bool]
    before_total: int = 0  # instances that have left the window: the long-run baseline
    before_flagged: int = 0
    quiet: int = 0  # scored instances still to see before this caller may alert again


class FlagRateMonitor:
    """Per calling AE: the flagged share of its last ``window`` scored instances against its
    long-run share (every instance before that window).

    The rule: alert when the window is full, the caller has at least one window of history
    before it, and the window's rate is above ``jump`` AND at least ``FLAG_RATE_FACTOR`` times
    the long-run rate. Then stay quiet for the next ``window`` instances of that caller, so one
    jump makes one alert (a rate that stays high alerts again once per window, and is slowly
    absorbed into the baseline until the factor no longer holds).

    Why a full window of history first: each flagged image already raises its own quarantine
    alert; this rule is for a *change*, and with no baseline there is none to measure. The
    counts live in memory, so after a restart the first window rebuilds the baseline.
    """

    def __init__(self, window: int, jump: float, factor: float = FLAG_RATE_FACTOR) -> None:
        self.size = window
        self.jump = jump
        self.factor = factor
        self._callers: dict[str, _CallerRate] = {}
        self._lock = threading.Lock()

    def observe(self, calling_ae: str, flagged: bool) -> dict[str, Any] | None:
        """Count one scored instance; return the alert fields when the rule fires."""
        with self._lock:
            state = self._callers.get(calling_ae)
            if state is None:
                state = _CallerRate(collections.deque(maxlen=self.size))
                self._callers[calling_ae] = state
            if len(state.window) == self.size:
                state.before_total += 1
                state.before_flagged += int(state.window[0])
            state.window.append(flagged)
            if state.quiet > 0:
                state.quiet -= 1
                return None
            if len(state.window) < self.size or state.before_total < self.size:
                return None
            rate = sum(state.window) / self.size
            baseline = state.before_flagged / state.before_total
            if rate <= self.jump or rate < self.factor * baseline:
                return None
            state.quiet = self.size
            return {
                "calling_ae": calling_ae,
                "rule": "flag-rate",
                "score": round(rate, 4),
                "reason": (f"{sum(state.window)} of the last {self.size} scored instances "
                           f"flagged ({rate:.0%}), long-run {baseline:.1%} over "
                           f"{state.before_total}; alerting above {self.jump:.0%} and "
                           f"{self.factor:g}x the long-run rate"),
            }


# -- the alerter ---------------------------------------------------------------------------------


class Alerter:
    """Listens to the audit log, checks its chain, and sends alerts to the webhook and syslog."""

    def __init__(self, cfg: AlertsConfig, forwarding: ForwardingConfig, state_dir: Path,
                 audit: AuditLog, gateway_ae: str) -> None:
        self.cfg = cfg
        self.audit = audit
        self.gateway_ae = gateway_ae
        self.webhook = (WebhookOutbox(state_dir, cfg, forwarding, self._alert_dead)
                        if cfg.url else None)
        self.syslog = SyslogSender(cfg) if cfg.syslog_enabled else None
        self.flag_rate = FlagRateMonitor(cfg.flag_rate_window, cfg.flag_rate_jump)
        self._stop = threading.Event()
        self._verifier: threading.Thread | None = None
        self._alerted_break: tuple[int | None, str] | None = None

    def start(self) -> None:
        if self.webhook is not None:
            self.webhook.create()
            waiting = len(self.webhook.pending())
            if waiting:
                LOG.info("alerts: %d webhook alert(s) waiting from an earlier run", waiting)
            self.webhook.start()
        self.audit.add_listener(self.on_record)
        if self.cfg.verify_interval_s > 0:
            self._verifier = threading.Thread(target=self._verify_loop, name="alerts-verify",
                                              daemon=True)
            self._verifier.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.audit.remove_listener(self.on_record)
        self._stop.set()
        if self._verifier is not None:
            self._verifier.join(timeout)
        if self.webhook is not None:
            self.webhook.stop(timeout)

    # -- sources --

    def on_record(self, record: dict[str, Any]) -> None:
        """The audit listener: runs in the appending thread, after the durable write."""
        event = record.get("event")
        if event in AUDIT_KINDS:
            self.emit(str(event), record)
        elif event == "scored" and record.get("verdict") in SCORED_VERDICTS:
            fired = self.flag_rate.observe(str(record.get("calling_ae") or "-"),
                                           record.get("verdict") in FLAGGED_VERDICTS)
            if fired is not None:
                self.emit("flag-rate", fired)

    def check_audit(self) -> bool:
        """Verify the chain now; alert when a break is new (not the one alerted last)."""
        path = self.audit.path
        try:
            result = verify(path, limit=locked_size(path))
        except FileNotFoundError:
            return True
        except OSError as exc:
            LOG.warning("audit check: cannot read %s: %s", path, exc)
            return True
        if result.ok:
            self._alerted_break = None
            return True
        key = (result.first_bad_line, result.reason)
        if key != self._alerted_break:
            self._alerted_break = key
            LOG.error("audit chain broken: %s", result.reason)
            self.emit("audit-failure", {"reason": f"{path.name}: {result.reason}"})
        return False

    def _verify_loop(self) -> None:
        while not self._stop.wait(self.cfg.verify_interval_s):
            try:
                self.check_audit()
            except Exception:
                LOG.exception("audit check failed")

    def _alert_dead(self, name: str, kind: str, why: str) -> None:
        """A webhook alert given up: on the audit record (``alert-dead``, not itself alerted by
        webhook) and, where configured, on syslog, the one channel left."""
        self.audit.append("alert-dead", reason=f"webhook alert {name} ({kind}) {why}",
                          outcome="moved to alerts/dead")
        if self.syslog is not None:
            self.syslog.send(make_alert("alert-dead", self.gateway_ae,
                                        {"reason": f"webhook alert ({kind}) {why}"}))

    # -- sinks --

    def emit(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Queue the alert for the webhook (durably, first) and send the syslog line."""
        alert = make_alert(kind, self.gateway_ae, fields)
        if self.webhook is not None:
            try:
                self.webhook.put(alert)
            except OSError as exc:
                LOG.error("webhook alert %s could not be queued: %s", kind, exc)
        if self.syslog is not None:
            self.syslog.send(alert)
        return alert


def start_alerter(cfg: AlertsConfig | None, forwarding: ForwardingConfig, state_dir: Path,
                  audit: AuditLog, gateway_ae: str) -> Alerter | None:
    """The running alerter for ``[alerts]``, or None when the table is absent."""
    if cfg is None:
        return None
    alerter = Alerter(cfg, forwarding, state_dir, audit, gateway_ae)
    alerter.start()
    return alerter
