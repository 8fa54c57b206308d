"""Prometheus metrics and health endpoints on a loopback HTTP port.

Why its own registry and server: no global state (tests run several gateways in one process),
and ``/healthz`` (the process is alive and its threads run) and ``/readyz`` (listening, models
loaded, spool below its watermark) live beside ``/metrics`` on one port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LOG = logging.getLogger("sentinel.metrics")

# Modality defined terms of DICOM PS3.3 C.7.3.1.1.1 (current and retired). Why a closed set:
# Modality comes from the sender's dataset, and every distinct label value is a new time
# series (about 6 KiB across the counters and the latency histogram) that lives as long as
# the process: a fuzzed or hostile stream of made-up values grew the gateway's memory
# without bound. Anything else is counted as "OTHER".
MODALITY_TERMS = frozenset((
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC",
    "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT",
    "IVUS", "KER", "KO", "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT",
    "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF",
    "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT",
    "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA",
    "XAPROTOCOL", "XC", "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS",
    "LP", "MA", "MS", "OPR", "ST", "VF",
))


def modality_label(value: str) -> str:
    """The metric label for a Modality value: itself when a DICOM defined term (or empty)."""
    return value if not value or value in MODALITY_TERMS else "OTHER"


LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
E2E_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """All counters and gauges of one gateway, with small methods the components call."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._acknowledged = Counter(
            "sentinel_acknowledged", "Instances acknowledged with Success (on disk)", ["caller"],
            registry=r)
        self._received = Counter(
            "sentinel_received", "Instances taken up for routing", ["modality", "caller"],
            registry=r)
        self._screened = Counter(
            "sentinel_screened", "Instances scored by the detector", ["modality", "caller"],
            registry=r)
        self._flagged = Counter(
            "sentinel_flagged", "Instances the detector flagged", ["modality", "caller"],
            registry=r)
        self._screen_errors = Counter(
            "sentinel_screen_errors", "Instances the detector could not score",
            ["modality", "reason"], registry=r)
        self._forwarded = Counter(
            "sentinel_forwarded", "Instances delivered", ["destination", "modality", "caller"],
            registry=r)
        self._quarantined = Counter(
            "sentinel_quarantined", "Instances quarantined", ["modality", "caller", "reason"],
            registry=r)
        self._rejected = Counter(
            "sentinel_rejected", "Associations or instances refused",
            ["caller", "modality", "reason"], registry=r)
        self._forward_failures = Counter(
            "sentinel_forward_failures", "Failed delivery attempts", ["destination"], registry=r)
        self._dead = Counter(
            "sentinel_dead_lettered", "Instances dead-lettered", ["destination"], registry=r)
        self._queue_depth = Gauge(
            "sentinel_queue_depth", "Instances waiting per destination", ["destination"],
            registry=r)
        self._queue_age = Gauge(
            "sentinel_queue_oldest_age_seconds", "Age of the oldest waiting instance",
            ["destination"], registry=r)
        self._dead_depth = Gauge(
            "sentinel_dead_letter_depth", "Instances in the dead-letter folder", ["destination"],
            registry=r)
        self._latency = Histogram(
            "sentinel_detector_latency_seconds", "Detector time per instance", ["modality"],
            buckets=LATENCY_BUCKETS, registry=r)
        self._e2e = Histogram(
            "sentinel_added_latency_seconds", "From Success to the modality until delivered",
            ["destination"], buckets=E2E_BUCKETS, registry=r)
        self._flag_rate = Gauge(
            "sentinel_flag_rate", "Flagged / screened since start", ["modality"], registry=r)
        self.spool_free = Gauge(
            "sentinel_spool_free_bytes", "Free bytes on the spool filesystem", registry=r)
        self.screen_queue = Gauge(
            "sentinel_screening_queue_depth", "Instances waiting for screening", registry=r)
        self.associations = Gauge(
            "sentinel_active_associations", "Inbound associations open now", registry=r)
        self.commitments_open = Gauge(
            "sentinel_commitment_requests_open",
            "Storage Commitment requests taken on and not yet reported", registry=r)
        self._lock = threading.Lock()
        self._rate: dict[str, list[int]] = {}

    def acknowledged(self, caller: str) -> None:
        self._acknowledged.labels(caller).inc()

    def received(self, modality: str, caller: str) -> None:
        self._received.labels(modality_label(modality), caller).inc()

    def scored(self, modality: str, caller: str, flagged: bool, seconds: float) -> None:
        modality = modality_label(modality)
        self._screened.labels(modality, caller).inc()
        if flagged:
            self._flagged.labels(modality, caller).inc()
        self._latency.labels(modality).observe(seconds)
        with self._lock:
            n = self._rate.setdefault(modality, [0, 0])
            n[0] += 1
            n[1] += int(flagged)
            self._flag_rate.labels(modality).set(n[1] / n[0])

    def screen_error(self, modality: str, reason: str) -> None:
        self._screen_errors.labels(modality_label(modality), reason).inc()

    def forwarded(self, destination: str, modality: str, caller: str,
                  total_ms: float | None) -> None:
        self._forwarded.labels(destination, modality_label(modality), caller).inc()
        if total_ms is not None:
            self._e2e.labels(destination).observe(total_ms / 1000.0)

    def quarantined(self, modality: str, caller: str, reason: str) -> None:
        self._quarantined.labels(modality_label(modality), caller, reason).inc()

    def rejected(self, caller: str, modality: str, reason: str) -> None:
        self._rejected.labels(caller, modality_label(modality), reason).inc()

    def forward_failed(self, destination: str) -> None:
        self._forward_failures.labels(destination).inc()

    def dead_lettered(self, destination: str) -> None:
        self._dead.labels(destination).inc()

    def queue(self, destination: str, depth: int, oldest_age: float, dead: int) -> None:
        self._queue_depth.labels(destination).set(depth)
        self._queue_age.labels(destination).set(oldest_age)
        self._dead_depth.labels(destination).set(dead)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a loopback port, in a daemon thread.

    ``health()`` and ``ready()`` return (ok, message); ``refresh()`` runs before each scrape
    (to sample gauges such as spool free space).
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        health: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        refresh: Callable[[], None] = lambda: None,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        outer._refresh()
                    except Exception:
                        LOG.exception("metrics refresh failed")
                    self._reply(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, msg = (outer._health if path == "/healthz" else outer._ready)()
                    self._reply(200 if ok else 503, (msg + "\n").encode(), "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes are not worth a journal line each."""

        self.metrics = metrics
        self._health = health
        self._ready = ready
        self._refresh = refresh
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
