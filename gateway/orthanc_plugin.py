"""Screening inside Orthanc: the plugin form of xray-sentinel (Orthanc >= 1.10, orthanc-python 4.0).

A site that already runs Orthanc as its PACS screens there, with no extra hop: Orthanc loads
Debian's ``libOrthancPython.so``, whose ``PythonScript`` (the two-line loader
``systemd/orthanc_sentinel.py``) calls ``install()``. ``install`` registers one handler,
``Sentinel.filter``, as Orthanc's incoming C-STORE instance filter. In orthanc-python 4.0 that
filter gets the received instance (``orthanc.DicomInstance``) before Orthanc stores it and
returns an int: 0 stores it, 1..0xFFFF refuses it and is the DIMSE status the modality gets.

What the handler does, with the gateway's own code (``gateway.screening.screen``, the same rules,
detector, quarantine layout and hash-chained audit as ``sentinel serve``):
- clean, ``pass`` and shadow-flagged instances: 0, Orthanc stores them as usual;
- flagged, or taken by a ``reject`` rule: moved to the quarantine (audited ``quarantined``) and
  refused with ``[orthanc_plugin] refused_status`` (0x0124 Refused: Not Authorized, what
  ``sentinel serve`` answers a reject rule). Not stored in Orthanc;
- could not be read or scored, under ``[detector] on_error = "quarantine"``: quarantined and
  refused with ``error_status`` (0xC000 Cannot Understand);
- anything going wrong in the handler itself (the quarantine's disk is full, ...): 0xA700 Out
  of Resources, nothing stored, nothing held: the modality may send it again.
``sentinel quarantine release`` puts a held instance into Orthanc through its REST API
(``POST /instances``, destination kind ``orthanc-rest``: ``OrthancRestSender``). A REST upload
does not pass the C-STORE filter, so a release is not screened again; the human decision is in
the audit log (``released``, actor and reason).

Why scoring stays out of Orthanc's process: pixel decoders are C libraries fed by whoever can
open an association. Each instance is scored by the gateway's scoring child process
(``gateway.detector_process``): a decoder crash or hang costs that instance (quarantined as
``detector-crashed``/``detector-timeout``, refused with ``error_status``) and the next instance
gets a fresh child. Orthanc keeps running. The child is started by the interpreter
``[orthanc_plugin] python`` names (inside Orthanc ``sys.executable`` is Orthanc itself).

What differs from ``sentinel serve``: there is no forwarding (Orthanc is the PACS) and no
spool (the modality waits for the verdict; Orthanc 1.10.1 calls the filter under its plugin
lock, one instance at a time across all associations, so one scoring child is used and more
start only if a later Orthanc calls concurrently). Orthanc does not tell the filter the
caller's address nor the called AE title, so rules keyed on ``peer`` are refused at start, and
``called_ae`` is Orthanc's ``DicomAet`` (rules keyed on it need ``DicomCheckCalledAet``). Pin
callers by address with Orthanc's ``DicomModalities`` and ``DicomCheckModalityHost``. The TOML
is read once, at Orthanc's start: restart Orthanc after changing it. Any problem at start
(config, bundle, scoring process) raises, and Orthanc refuses to start: it never receives
unscreened because the screen failed to load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog
from gateway.config import Config, DestinationConfig, load_config
from gateway.dicomweb import MAX_RESPONSE, DicomWebSender, _why
from gateway.forward import SendError
from gateway.quarantine import Quarantine
from gateway.screening import Outcome, close_detector, hold, screen
from gateway.spool import sop_from_outbox_name, valid_uid

LOG = logging.getLogger("sentinel.orthanc")

STORE = 0  # the filter's "store it"; any other value is the refusal's DIMSE status
STATUS_OUT_OF_RESOURCES = 0xA700
ENV_CONFIG = "SENTINEL_CONFIG"  # the TOML's path, where Orthanc's config does not name it
ORTHANC_KEY = "XraySentinel"  # Orthanc's config: "XraySentinel": {"Config": "/etc/.../x.toml"}
REFUSED_REASONS = ("flagged", "rejected-by-rule")  # held by a verdict or a rule, not an error


class _Scorers:
    """Scoring child processes, lent one per instance (a ProcessDetector serves one thread).

    Why lazily beyond the first: Orthanc 1.10.1 calls the filter one instance at a time, so a
    second child would only hold memory; one starts only when a call finds none idle."""

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make = make
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._idle.put(make())  # at start: a refused bundle stops Orthanc's start, not a send
        for _ in range(size - 1):
            self._idle.put(None)

    @contextlib.contextmanager
    def lend(self) -> Iterator[Any]:
        detector = self._idle.get()
        try:
            if detector is None:
                try:
                    detector = self._make()
                except Exception:  # screen() then applies the error policy ("no detector")
                    LOG.exception("could not start another scoring process")
            yield detector
        finally:
            self._idle.put(detector)

    def close(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                close_detector(self._idle.get_nowait())


class Sentinel:
    """The plugin's state (config, audit log, quarantine, scoring processes) and its handler."""

    def __init__(self, cfg: Config, called_ae: str) -> None:
        if cfg.orthanc_plugin is None:
            raise ValueError(f"{cfg.path}: no [orthanc_plugin] table; add one with python = "
                             '"/opt/xray-sentinel/venv/bin/python" (see the README, "Inside '
                             'Orthanc")')
        self.cfg = cfg
        self.plugin = cfg.orthanc_plugin
        self.called_ae = called_ae
        self.audit = AuditLog(cfg.audit_path)
        self.quarantine = Quarantine(cfg.quarantine_dir, audit=self.audit)
        self.quarantine.recover()
        # received bytes wait here while they are screened; beside the quarantine, so holding
        # one is a rename. Left over after a crash: never acknowledged, so removed.
        self.tmp = cfg.state_dir / "orthanc-plugin"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.glob("*.dcm"):
            stale.unlink(missing_ok=True)
        from gateway.detector_process import ProcessDetector

        # nice 0, not [detector] nice: that lowers scoring below receiving because
        # `sentinel serve` acknowledges first and screens off its spool; here the modality's
        # answer waits for the score, so a lower priority would only lengthen that wait
        d = cfg.detector
        self.scorers = _Scorers(lambda: ProcessDetector(
            d.bundle, d.threads, d.timeout_s, 0, python=self.plugin.python), d.workers)

    def close(self) -> None:
        self.scorers.close()

    def _audit(self, event: str, **fields: Any) -> None:
        """As ``sentinel serve``: a failed audit append is logged, the instance goes on."""
        self._write_lines([(event, fields)])

    def _write_lines(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        """Write ``lines`` with one fsync and empty the list (so no line is written twice)."""
        try:
            self.audit.append_many(lines)
        except Exception:
            LOG.exception("audit append failed for %s", ", ".join(e for e, _ in lines))
        lines.clear()

    def filter(self, instance: Any) -> int:
        """Orthanc's incoming C-STORE filter: 0 stores the instance, else the refusal status.

        Never raises: an exception would reach Orthanc as a plugin error, and the modality's
        answer would be Orthanc's choice rather than one that says nothing was kept."""
        path = self.tmp / f"{uuid.uuid4().hex}.dcm"
        lines: list[tuple[str, dict[str, Any]]] = []  # received, scored: one fsync
        try:
            path.write_bytes(instance.GetInstanceData())
            meta = {"calling_ae": instance.GetInstanceRemoteAet(), "called_ae": self.called_ae,
                    "peer": "", "received_at": time.time()}
            sop = _sop_uid(path)
            if not valid_uid(sop):  # it names the quarantine's file; Orthanc needs one too
                self._audit("rejected", calling_ae=meta["calling_ae"], reason="invalid-sop-uid")
                return self.plugin.error_status
            with self.scorers.lend() as detector:
                outcome = screen(self.cfg, path, meta, sop, detector,
                                 lambda event, **fields: lines.append((event, fields)))
            self._write_lines(lines)  # before the answer, as `sentinel serve` before forwarding
            if outcome.action == "forward":
                return STORE
            _fsync(path)  # the quarantine holds it from here on: on disk first
            hold(self.quarantine, path, meta, outcome, self._audit)
            return self._status(outcome)
        except Exception:
            self._write_lines(lines)  # what was decided before the failure, if not yet written
            LOG.exception("screening failed inside Orthanc; the instance is refused "
                          "(0xA700) and neither stored nor held")
            return STATUS_OUT_OF_RESOURCES
        finally:
            path.unlink(missing_ok=True)  # held ones were moved away already

    def _status(self, outcome: Outcome) -> int:
        if outcome.reason in REFUSED_REASONS:
            return self.plugin.refused_status
        return self.plugin.error_status


def _sop_uid(path: Path) -> str:
    """The SOP Instance UID from the file meta Orthanc wrote from the dataset (cheap: the meta
    group only), else from the dataset."""
    import pydicom

    with contextlib.suppress(Exception):
        meta = pydicom.filereader.read_file_meta_info(path)
        uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        if uid:
            return uid
    with contextlib.suppress(Exception):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.get("SOPInstanceUID", "") or "").strip()
    return ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_for_orthanc(cfg: Config, orthanc_config: dict[str, Any]) -> None:
    """Refuse, naming the key and the fix, what the plugin form cannot honour.

    - A rule keyed on ``peer``: Orthanc does not give the filter the caller's address, so the
      rule could never match as written (an ``allow_unscreened_pixels`` pass keyed on it, or a
      stricter threshold, would silently not apply).
    - A rule keyed on ``called_ae`` while Orthanc accepts any called AE title
      (``DicomCheckCalledAet`` false): the filter only knows Orthanc's own ``DicomAet``.
    - A rule or default routing to a destination that is not ``orthanc-rest``: there is no
      forwarder here, so a released instance would wait in an outbox nobody sends from.
    - ``allow_unscreened_pixels`` while Orthanc takes C-STOREs from any AE title or address
      (``DicomAlwaysAllowStore`` true or ``DicomCheckModalityHost`` false, Orthanc's defaults):
      the calling AE title would be a label anyone can write, not a pinned sender.
    """
    check_called = bool(orthanc_config.get("DicomCheckCalledAet", False))
    pinned = (orthanc_config.get("DicomAlwaysAllowStore", True) is False
              and orthanc_config.get("DicomCheckModalityHost", False) is True)
    for rule in (*cfg.rules, cfg.default):
        keys = {m.key for m in rule.matchers}
        if "peer" in keys:
            raise ValueError(
                f"{cfg.path}: rule {rule.name!r} matches on peer, which Orthanc does not tell "
                "the plugin; key it on calling_ae and pin that caller's address in Orthanc "
                '("DicomModalities" with "DicomCheckModalityHost": true)')
        if "called_ae" in keys and not check_called:
            raise ValueError(
                f"{cfg.path}: rule {rule.name!r} matches on called_ae, but Orthanc accepts any "
                'called AE title; set "DicomCheckCalledAet": true in Orthanc\'s config')
        if rule.allow_unscreened_pixels and not pinned:
            raise ValueError(
                f"{cfg.path}: rule {rule.name!r} lets pixels through unscreened by calling AE "
                'title, but Orthanc takes C-STOREs from anyone: set "DicomAlwaysAllowStore": '
                'false and "DicomCheckModalityHost": true, and list the sender in '
                '"DicomModalities" with its address')
        for name in rule.destinations:
            if cfg.destinations[name].kind != "orthanc-rest":
                raise ValueError(
                    f"{cfg.path}: rule {rule.name!r} routes to destination {name!r} of kind "
                    f"{cfg.destinations[name].kind!r}; in the plugin form a released instance "
                    'goes into Orthanc by its REST API: [destinations.NAME] kind = '
                    '"orthanc-rest", url = "http://127.0.0.1:8042"')


class _OrthancLog(logging.Handler):
    """The gateway's log lines into Orthanc's log (its own levels), not onto a bare stderr."""

    def __init__(self, orthanc: Any) -> None:
        super().__init__(logging.INFO)
        self._orthanc = orthanc

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            text = f"xray-sentinel: {self.format(record)}"
            if record.levelno >= logging.ERROR:
                self._orthanc.LogError(text)
            elif record.levelno >= logging.WARNING:
                self._orthanc.LogWarning(text)
            else:
                self._orthanc.LogInfo(text)


def config_path(orthanc_config: dict[str, Any]) -> Path:
    """The TOML named by Orthanc's config (``"XraySentinel": {"Config": ...}``), else by the
    environment (``SENTINEL_CONFIG``)."""
    section = orthanc_config.get(ORTHANC_KEY) or {}
    named = section.get("Config") if isinstance(section, dict) else None
    named = named or os.environ.get(ENV_CONFIG)
    if not named:
        raise ValueError(f'xray-sentinel: no config named: add "{ORTHANC_KEY}": {{"Config": '
                         f'"/etc/xray-sentinel/sentinel.toml"}} to Orthanc\'s configuration, or '
                         f"set {ENV_CONFIG} in Orthanc's environment")
    return Path(named)


def install() -> Sentinel:
    """Called by the loader inside Orthanc: load the TOML, start a scoring process, register
    the filter. Raises on any problem, and Orthanc then refuses to start (see module doc)."""
    import orthanc  # only inside Orthanc's embedded interpreter

    logging.getLogger("sentinel").addHandler(_OrthancLog(orthanc))
    logging.getLogger("sentinel").setLevel(logging.INFO)
    orthanc_config = json.loads(orthanc.GetConfiguration())
    cfg = load_config(config_path(orthanc_config))
    check_for_orthanc(cfg, orthanc_config)
    if cfg.detector.isolation != "process":
        LOG.warning("[detector] isolation = %r ignored: inside Orthanc scoring always runs in "
                    "a child process", cfg.detector.isolation)
    sentinel = Sentinel(cfg, called_ae=str(orthanc_config.get("DicomAet", "ORTHANC")))
    orthanc.RegisterIncomingCStoreInstanceFilter(sentinel.filter)

    def on_change(change_type: Any, level: Any, resource: str) -> None:
        if change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            sentinel.close()

    orthanc.RegisterOnChangeCallback(on_change)
    sentinel._audit("config-loaded", config_path=str(cfg.path), detail="orthanc plugin",
                    bundle_id=_bundle_id(sentinel))
    LOG.info("screening C-STOREs with %s (refused: 0x%04X, error: 0x%04X)", cfg.path,
             sentinel.plugin.refused_status, sentinel.plugin.error_status)
    return sentinel


def _bundle_id(sentinel: Sentinel) -> str:
    with sentinel.scorers.lend() as detector:
        return str(getattr(detector, "bundle_id", "") or "")


class OrthancRestSender(DicomWebSender):
    """Puts one instance into an Orthanc by ``POST {url}/instances`` (the release path).

    The session, credentials from files, TLS and scrubbing are DICOMweb's (same keys, same
    refusals at load); only the request and the reading of Orthanc's answer differ. A REST
    upload does not pass Orthanc's C-STORE filter: a released instance is stored as it is.
    ``AlreadyStored`` is a failure: Orthanc kept the copy it had (``OverwriteInstances``
    false), so the held one was not put in and must stay held."""

    def __init__(self, dest: DestinationConfig,
                 config_provider: Callable[[], Config] | None = None) -> None:
        assert dest.kind == "orthanc-rest" and dest.url
        self.dest = dest
        self.instances_url = f"{dest.url}/instances"
        self._session = None
        self._secrets = ()

    def send(self, path: Path, meta: dict[str, Any]) -> str | None:
        import requests

        sop = str(meta.get("sop_uid") or sop_from_outbox_name(path.name))
        session = self._session or self._open()
        timeout = (self.dest.timeout_s, self.dest.timeout_s)
        try:
            with path.open("rb") as body, session.post(
                    self.instances_url, data=body, timeout=timeout, allow_redirects=False,
                    headers={"Content-Type": "application/dicom"}) as response:
                content = response.content[:MAX_RESPONSE]  # Orthanc answers a few lines
                status = response.status_code
        except requests.exceptions.RequestException as exc:
            self.close()
            raise self._fail(f"POST {self.instances_url} failed: {_why(exc)}",
                             connection=True) from None
        doc: dict[str, Any] = {}
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            parsed = json.loads(content)
            doc = parsed if isinstance(parsed, dict) else {}
        stored = str(doc.get("Status", ""))
        if status == 200 and stored == "Success":
            return None
        if status == 200 and stored == "AlreadyStored":
            raise self._fail(f"{self.dest.name} already holds an instance with SOP Instance UID "
                             f"{sop} and kept it (Orthanc's OverwriteInstances is false)",
                             connection=False)
        if status in (401, 403):
            self.close()
            raise self._fail(f"{self.dest.name} refused the credentials (HTTP {status}): check "
                             "username and password_file", connection=True)
        raise self._fail(f"{self.dest.name} did not store {sop} (HTTP {status}, Status "
                         f"{stored or 'none'})", connection=status >= 500 or status in (404,))


def release_to_orthanc(dest: DestinationConfig, path: Path, meta: dict[str, Any]) -> None:
    """Upload one released instance now (``sentinel quarantine release``); SendError if it was
    not stored."""
    sender = OrthancRestSender(dest)
    try:
        sender.send(path, meta)
    finally:
        sender.close()


__all__ = ["OrthancRestSender", "SendError", "Sentinel", "check_for_orthanc", "install",
           "release_to_orthanc"]
