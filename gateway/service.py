"""The gateway daemon: wires receiver, screening, forwarding, quarantine, audit and metrics.

Why one object owns the running Config: a reload (SIGHUP or the file changing) builds and
validates a complete new Config, loads new models if the bundle changed, and only then swaps the
single reference every component reads per association or per instance. So a reload never drops
an association, and an invalid file (or a bundle that fails verification) leaves the running
configuration and model untouched, audited as ``config-rejected`` with the reason.

Settings bound to open sockets or threads (listener address/AE title/TLS, state directory,
metrics port, worker count) keep their running values until a restart; a reload that changes
them says so in the log.

A destination changed or removed by a reload is retired off the run loop: a background thread
stops its old forwarder (which finishes the send in flight, up to a minute against a slow PACS)
and then starts the new one. The run loop is also what pings systemd's watchdog, and joining the
old forwarder there starved it (``WatchdogSec=30``). The new forwarder starts only after the old
one has stopped, because two on one outbox could send the instance in flight twice.

SIGTERM drains: stop accepting, let open associations finish (up to ``drain_s``), let workers
finish the instance in hand and forwarders the send in flight; everything else is already on
disk and is picked up at the next start. The whole drain keeps within ``STOP_BUDGET_S``, under
the unit's ``TimeoutStopSec=60``, so systemd never has to SIGKILL a draining gateway. Exit
status 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from detector.errors import BundleError
from gateway.alerts import Alerter, start_alerter
from gateway.audit import AuditLog
from gateway.commitment import CommitmentService, InstanceLocator
from gateway.commitment_scu import PacsCommitment
from gateway.config import Config, ConfigError, DetectorConfig, load_config
from gateway.forward import Forwarder
from gateway.metrics import Metrics, MetricsServer
from gateway.notify import Notifier, watchdog_interval
from gateway.quarantine import Quarantine
from gateway.rules import early_rule
from gateway.scp import StorageReceiver, StoredInstance
from gateway.screening import PendingOrder, Screening, close_detector
from gateway.spool import SpoolLayout, free_bytes

LOG = logging.getLogger("sentinel.service")

RETENTION_EVERY_S = 3600.0
LEFTOVER_AGE_S = 60.0
# The whole drain on SIGTERM, below the unit's TimeoutStopSec=60 with room for the interpreter's
# exit: past it systemd would SIGKILL (nothing acknowledged is lost then, but the drain is cut).
STOP_BUDGET_S = 45.0  # a spool temp file untouched this long belongs to no live writer
DetectorFactory = Callable[[Config], list[Any]]


def load_detectors(cfg: Config) -> list[Any]:
    """One verified detector per worker (LiteRT interpreters are not thread-safe): by default
    each in its own scoring process (gateway.detector_process), or in-process threads with
    ``isolation = "thread"``.

    Raises detector.errors.BundleError (names the file) when the bundle does not verify, and
    gateway.detector_process.ScoringStartError when a scoring process cannot start for another
    reason (it names that reason).
    """
    if cfg.detector.isolation == "process":
        from gateway.detector_process import ProcessDetector

        started: list[Any] = []
        try:
            for _ in range(cfg.detector.workers):
                started.append(ProcessDetector(cfg.detector.bundle, cfg.detector.threads,
                                               cfg.detector.timeout_s, cfg.detector.nice))
        except Exception:
            for detector in started:
                close_detector(detector)
            raise
        return started
    from detector.scoring import Detector  # lazy: keeps `sentinel --help` light

    detectors = [
        Detector.load(cfg.detector.bundle, num_threads=cfg.detector.threads)
        for _ in range(cfg.detector.workers)
    ]
    for detector in detectors:
        detector.warm_up()  # the first real instance per worker must not pay the cold start
    return detectors


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


class Gateway:
    """A running gateway. ``start()``, then ``run_forever()`` or ``stop()``."""

    def __init__(
        self,
        config: Config,
        detector_factory: DetectorFactory = load_detectors,
        notifier: Notifier | None = None,
        drain_s: float = 20.0,
    ) -> None:
        self._config = config
        self._detector_factory = detector_factory
        self.notifier = notifier or Notifier()
        self.drain_s = drain_s
        self.metrics = Metrics()
        self.layout = SpoolLayout(config.state_dir)
        self.audit = AuditLog(config.audit_path)
        self.quarantine = Quarantine(config.quarantine_dir, audit=self.audit)
        self.order = PendingOrder()
        self.forwarders: dict[str, Forwarder] = {}
        self.screening: Screening | None = None
        self.receiver: StorageReceiver | None = None
        self.commitment: CommitmentService | None = None
        self.pacs_commitment: PacsCommitment | None = None
        self.metrics_server: MetricsServer | None = None
        self.alerter: Alerter | None = None  # [alerts]; its settings apply at start only
        self.address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._reload_lock = threading.Lock()
        self._signalled_reload = False  # set by the signal handler only (see _on_signal)
        self._signalled_stop = False
        self._reloader: threading.Thread | None = None  # a reload the run loop started
        # destinations whose old forwarder is stopping on a background thread (see _retire)
        self._retiring: dict[str, threading.Thread] = {}
        self._retire_failed: list[str] = []
        self._observer: Any = None
        self._config_digest = _file_digest(config.path)
        self._last_change = 0.0
        self._ready = False

    @property
    def config(self) -> Config:
        return self._config

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self._config
        for d in (cfg.state_dir, cfg.audit_path.parent, cfg.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.layout.create(tuple(cfg.destinations))
        cleared = self.layout.clear_tmp()
        if cleared:
            LOG.info("removed %d partial receive(s) left by an earlier stop", cleared)
        self._clear_crash_leftovers()
        with contextlib.suppress(Exception):
            self.quarantine.recover()
        detectors = self._detector_factory(cfg)  # BundleError stops the start here
        bundle_id = str(getattr(detectors[0], "bundle_id", "")) if detectors else ""
        self.audit.append("config-loaded", config_path=str(cfg.path), bundle_id=bundle_id,
                          status="start")
        # before anything that may quarantine or dead-letter (recovery included)
        self.alerter = start_alerter(cfg.alerts, cfg.forwarding, cfg.state_dir, self.audit,
                                     cfg.listener.ae_title)
        for name, dest in cfg.destinations.items():
            self._start_forwarder(name, dest)
        self.screening = Screening(
            lambda: self._config, self.audit, self.quarantine, self.metrics,
            self._notify_destination, self.order,
        )
        self.screening.start(detectors, cfg.detector.workers)
        recovered = self.screening.recover()
        if recovered:
            LOG.info("recovered %d acknowledged instance(s) from the spool", recovered)
        self.pacs_commitment = PacsCommitment(lambda: self._config, self.layout, self.audit)
        self.commitment = CommitmentService(
            lambda: self._config,
            InstanceLocator(
                self.layout, cfg.quarantine_dir,
                lambda: {n: fw.ledger for n, fw in self.forwarders.items()},
                self.pacs_commitment,
                lambda: {n for n, d in self._config.destinations.items() if d.commitment},
            ),
            self.audit,
        )
        reopened = self.commitment.start()
        if reopened:
            LOG.info("storage commitment: %d request(s) still open from an earlier run",
                     reopened)
        self.receiver = StorageReceiver(
            lambda: self._config, self._on_stored, self.audit, self.metrics, early_rule,
            on_commit=self.commitment.request,
            on_commit_report=self.pacs_commitment.on_report,
        )
        self.address = self.receiver.start()
        if cfg.metrics.port:
            self.metrics_server = MetricsServer(
                self.metrics, cfg.metrics.host, cfg.metrics.port, self._health, self._readiness,
                self._refresh_gauges,
            )
            self.metrics_server.start()
        self._watch_config_file()
        self._ready = True
        self.notifier.ready(self._status_line())
        LOG.info("ready: %s", self._status_line())

    def _start_forwarder(self, name: str, dest: Any) -> None:
        fw = Forwarder(dest, lambda: self._config, self.audit, self.metrics, self.order.blocks)
        fw.start()
        self.forwarders[name] = fw

    def _notify_destination(self, name: str) -> None:
        fw = self.forwarders.get(name)
        if fw is not None:
            fw.notify()

    def _on_stored(self, item: StoredInstance) -> None:
        assert self.screening is not None
        self.screening.submit(item.path, item.sop_uid, item.seq, item.assoc_id)

    # -- health ------------------------------------------------------------------------------

    def _threads_alive(self) -> bool:
        # a snapshot: a retirement thread may add or remove a forwarder meanwhile
        fw_ok = all(f.alive() for f in list(self.forwarders.values()))
        fw_ok = fw_ok and not self._retire_failed
        sc_ok = self.screening is not None and all(t.is_alive() for t in self.screening._threads)
        return fw_ok and sc_ok

    def _health(self) -> tuple[bool, str]:
        if self._threads_alive():
            return True, "ok"
        return False, "a worker or forwarder thread has stopped"

    def _readiness(self) -> tuple[bool, str]:
        if not self._ready or self._stop.is_set():
            return False, "not ready (starting or draining)"
        free = free_bytes(self.layout.root)
        if free < self._config.state.min_free_bytes:
            return False, f"spool below its watermark ({free} bytes free)"
        return self._health()

    def _refresh_gauges(self) -> None:
        self.metrics.spool_free.set(free_bytes(self.layout.root))
        if self.screening is not None:
            self.metrics.screen_queue.set(self.screening.depth())
        if self.receiver is not None:
            self.metrics.associations.set(self.receiver.active_associations())
        if self.commitment is not None:
            self.metrics.commitments_open.set(self.commitment.open_count())

    def _status_line(self) -> str:
        q = sum(f.depth() for f in list(self.forwarders.values()))
        bundle = self.screening.bundle_id if self.screening else ""
        host, port = self.address or ("?", 0)
        return (f"listening {self._config.listener.ae_title}@{host}:{port}, bundle {bundle}, "
                f"screening {self.screening.depth() if self.screening else 0}, outbox {q}")

    # -- reload ------------------------------------------------------------------------------

    def request_reload(self) -> None:
        self._reload_requested.set()

    def reload(self) -> bool:
        """Load, validate and swap in the config file; keep the running one on any error."""
        with self._reload_lock:
            self.notifier.reloading()
            try:
                return self._reload()
            finally:
                self.notifier.ready(self._status_line())

    def _reloading(self) -> bool:
        return self._reloader is not None and self._reloader.is_alive()

    def _reload_in_background(self) -> None:
        """Apply a reload on its own thread, so the run loop keeps feeding the watchdog while
        new scoring processes start (see the module docstring). One at a time: a request that
        comes meanwhile is applied when this one is done."""

        def apply() -> None:
            try:
                self.reload()
            except Exception:  # a reload must never take the daemon down; the old config runs
                LOG.exception("reload failed; the running configuration is kept")

        self._reloader = threading.Thread(target=apply, name="reload", daemon=True)
        self._reloader.start()

    def _reject(self, path: Path, reason: str) -> bool:
        LOG.error("config reload refused, keeping the running configuration: %s", reason)
        with contextlib.suppress(Exception):
            self.audit.append("config-rejected", config_path=str(path), reason=reason[:900])
        return False

    def _reload(self) -> bool:
        old = self._config
        path = old.path
        self._config_digest = _file_digest(path)
        try:
            new = load_config(path)
        except ConfigError as exc:
            return self._reject(path, str(exc))
        restart_only = {
            "listener": (old.listener, new.listener),
            "state": (old.state, new.state),
            "metrics": (old.metrics, new.metrics),
            "detector.workers": (old.detector.workers, new.detector.workers),
            "detector.isolation": (old.detector.isolation, new.detector.isolation),
        }
        kept = [k for k, (a, b) in restart_only.items() if a != b]
        if kept:
            LOG.warning("reload: %s change(s) need a restart; running values kept",
                        ", ".join(kept))
        new = dataclasses.replace(
            new, listener=old.listener, state=old.state, metrics=old.metrics,
            detector=dataclasses.replace(new.detector, workers=old.detector.workers,
                                         isolation=old.detector.isolation),
        )
        detectors = None
        def scorer_settings(d: DetectorConfig) -> tuple[Any, ...]:
            return d.bundle, d.threads, d.timeout_s, d.nice

        if scorer_settings(new.detector) != scorer_settings(old.detector):
            try:
                detectors = self._detector_factory(new)
            except BundleError as exc:
                return self._reject(path, f"model bundle refused, running model kept: {exc}")
            except Exception as exc:  # the scoring process could not start: not the bundle
                return self._reject(path, f"detector settings not applied, running model "
                                          f"kept: {exc}")
        if detectors is not None and self.screening is not None:
            self.screening.swap_detectors(detectors)
        self._config = new
        for name in [n for n in self.forwarders if n not in new.destinations]:
            LOG.warning("destination %s removed; its outbox stays on disk", name)
            self._retire(name)
        for name, dest in new.destinations.items():
            fw = self.forwarders.get(name)
            if fw is not None and fw.dest != dest:
                self._retire(name)  # its replacement starts once it has stopped
                continue
            if fw is None and name not in self._retiring:
                self._start_forwarder(name, dest)
        bundle_id = self.screening.bundle_id if self.screening else ""
        with contextlib.suppress(Exception):
            self.audit.append("config-loaded", config_path=str(path), bundle_id=bundle_id,
                              status="reload")
        LOG.info("configuration reloaded from %s", path)
        return True

    def _retire(self, name: str) -> None:
        """Stop destination ``name``'s forwarder on a background thread, then start one for the
        destination as the config then stands, if it still has it (caller holds the reload
        lock). Never blocks the run loop: see the module docstring."""
        old = self.forwarders.pop(name)

        def retire() -> None:
            try:
                old.stop()
            except Exception:
                LOG.exception("stopping the old forwarder of %s failed", name)
            with self._reload_lock:
                self._retiring.pop(name, None)
                dest = self._config.destinations.get(name)
                if dest is None or self._stop.is_set() or name in self.forwarders:
                    return
                try:
                    self._start_forwarder(name, dest)
                    LOG.info("destination %s: forwarder restarted with the new settings", name)
                except Exception:  # unhealthy from now on: the watchdog lets systemd restart us
                    LOG.exception("destination %s: the new forwarder did not start", name)
                    self._retire_failed.append(name)

        thread = threading.Thread(target=retire, name=f"retire-{name}", daemon=True)
        self._retiring[name] = thread
        thread.start()

    def _watch_config_file(self) -> None:
        """Reload when the config file changes (editors replace it: watch its directory)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency
            LOG.warning("watchdog not installed: reload on SIGHUP only")
            return
        target = str(self._config.path)
        gateway = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                paths = {str(getattr(event, "src_path", "")), str(getattr(event, "dest_path", ""))}
                if target in paths:
                    gateway._last_change = time.monotonic()

        observer = Observer()
        observer.schedule(Handler(), str(self._config.path.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _check_file_change(self) -> None:
        if self._last_change and time.monotonic() - self._last_change > 0.3:
            self._last_change = 0.0
            if _file_digest(self._config.path) != self._config_digest:
                LOG.info("config file changed; reloading")
                self._reload_requested.set()  # applied by the run loop, off its own thread

    # -- run and stop ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM/SIGINT drain. Install before ``start()`` so that a signal
        arriving while models load is not fatal (it is acted on once the loop runs)."""
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only note the signal; the run loop acts on it (``_take_signals``) within a tick.

        Why not ``Event.set()`` here: Python runs a handler in the main thread between two
        bytecodes, possibly inside that same ``Event.set()`` called by the handler of a signal a
        moment before, which holds the event's lock; the lock is not reentrant, so the second
        handler waited for ever. Two SIGTERMs at once (``timeout`` forwarding one beside an
        operator's ``pkill``) left the daemon deadlocked, not draining and not feeding the
        watchdog. A plain assignment cannot block.
        """
        if signum == signal.SIGHUP:
            self._signalled_reload = True
        else:
            self._signalled_stop = True

    def _take_signals(self) -> None:
        if self._signalled_reload:
            self._signalled_reload = False
            self._reload_requested.set()
        if self._signalled_stop:
            self._stop.set()

    def run_forever(self, install_signals: bool = True) -> int:
        """Block until SIGTERM/SIGINT (or ``stop_event``), handling reloads and the watchdog."""
        if install_signals:
            self.install_signal_handlers()
        wd = watchdog_interval()
        tick = min(0.2, wd) if wd else 0.2
        last_wd = 0.0
        last_status = 0.0
        last_retention = 0.0
        last_tmp_sweep = time.monotonic()
        while not self._stop.is_set():
            self._stop.wait(tick)
            self._take_signals()
            if self._stop.is_set():
                break
            if self._reload_requested.is_set() and not self._reloading():
                self._reload_requested.clear()
                self._reload_in_background()
            self._check_file_change()
            now = time.monotonic()
            if wd and now - last_wd >= wd and self._threads_alive():
                self.notifier.watchdog()
                last_wd = now
            if now - last_status >= 5.0:
                self.notifier.status(self._status_line())
                last_status = now
            if now - last_tmp_sweep >= 60.0:
                t = self._config.timeouts
                stale = self.layout.clear_stale_tmp(2 * max(t.network_s, t.dimse_s) + 60.0)
                if stale:
                    LOG.info("removed %d abandoned partial receive(s)", stale)
                self._clear_crash_leftovers()
                last_tmp_sweep = now
            if now - last_retention >= RETENTION_EVERY_S:
                self.apply_retention()
                last_retention = now
        self.stop()
        return 0

    def _clear_crash_leftovers(self, older_than_s: float = LEFTOVER_AGE_S) -> int:
        """Remove what a kill leaves in the spool besides partial receives.

        Why: a SIGKILL inside a durable write leaves its temp name (``.<name>.<pid>.<n>.tmp``)
        in incoming/, work/ or an outbox, and one between the forwarder's two unlinks leaves an
        outbox sidecar whose instance is gone. Neither is ever forwarded (the queue lists only
        ``<seq>-<uid>.dcm``), but both hold disk on the spool the watermark protects, one more
        per crash. Only files untouched for ``older_than_s`` go, because another process
        (``sentinel quarantine release``) may be writing into an outbox right now; the run
        loop repeats this every minute, so leftovers of a quick restart go too.
        """
        dirs = [self.layout.incoming, self.layout.work]
        for root in (self.layout.outbox_root, self.layout.dead_root):
            with contextlib.suppress(OSError):
                dirs.extend(p for p in root.iterdir() if p.is_dir())
        cutoff = time.time() - older_than_s
        removed = 0
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            names = {e.name for e in entries}
            for e in entries:
                name = e.name
                leftover = (name.startswith(".") and name.endswith(".tmp")) or (
                    d.parent in (self.layout.outbox_root, self.layout.dead_root)
                    and name.endswith(".json") and name[:-5] + ".dcm" not in names)
                if not leftover:
                    continue
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.path)
                        removed += 1
        if removed:
            LOG.info("removed %d temp file(s) or orphan sidecar(s) left by an earlier crash",
                     removed)
        return removed

    def apply_retention(self) -> int:
        """Purge quarantined instances older than the retention (audited as 'purged')."""
        days = self._config.retention.quarantine_days
        if days <= 0:
            return 0
        try:
            purged = self.quarantine.expire(timedelta(days=days))
        except Exception:
            LOG.exception("quarantine retention failed")
            return 0
        if purged:
            LOG.info("retention: purged %d quarantined instance(s) older than %g days",
                     len(purged), days)
        return len(purged)

    def stop_event(self) -> threading.Event:
        return self._stop

    def stop(self) -> None:
        """Drain: stop accepting, finish in-flight work, release everything, in STOP_BUDGET_S."""
        deadline = time.monotonic() + STOP_BUDGET_S

        def left(cap: float) -> float:
            return max(0.0, min(cap, deadline - time.monotonic()))

        self._stop.set()
        self._ready = False
        self.notifier.stopping()
        LOG.info("draining")
        if self.receiver is not None:
            self.receiver.stop_accepting()
            self.receiver.shutdown()
            if not self.receiver.wait_idle(left(self.drain_s)):
                LOG.warning("associations still open after %.0fs; aborting them", self.drain_s)
                ae = self.receiver._ae
                for assoc in list(ae.active_associations) if ae is not None else []:
                    with contextlib.suppress(Exception):
                        assoc.abort()
        if self._reloader is not None:  # a reload starting scoring processes: let it finish,
            self._reloader.join(left(self.drain_s))  # so screening.stop closes what it swapped in
        if self.screening is not None:
            self.screening.stop(left(self.drain_s))
        for thread in list(self._retiring.values()):  # old forwarders finishing a send
            thread.join(left(65.0))  # Forwarder.stop(): up to 30 s for its send in flight
        for fw in list(self.forwarders.values()):
            fw.stop(left(self.drain_s))
        if self.commitment is not None:
            self.commitment.stop(left(10.0))
        if self.pacs_commitment is not None:
            self.pacs_commitment.close()
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
                self._observer.join(2)
        if self.alerter is not None:  # last: the drain may still quarantine or dead-letter
            self.alerter.stop(left(5.0))
        if self.metrics_server is not None:
            self.metrics_server.stop()
        LOG.info("stopped")
