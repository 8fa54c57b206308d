"""Screening writes an instance's ``received`` and ``scored`` audit lines with one fsync.

Why a test: each fsync of the audit log is CPU and latency on every screened instance (issue
18), and the order and completeness of the lines is what the audit promises. The lines must
still be written, in order, before the instance moves on: when it is forwarded, when it is
quarantined, and when scoring fails (the error policy's line included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.audit import AuditLog, verify
from gateway.config import load_config
from gateway.metrics import Metrics
from gateway.quarantine import Quarantine
from gateway.screening import PendingOrder, Screening, WorkItem
from tests.dicom_factory import make_cr
from tests.gateway_harness import write_config


class CountingAudit(AuditLog):
    """The real audit log, counting its write-and-fsync batches."""

    batches = 0

    def _write_batch(self, batch: list[Any]) -> None:
        type(self).batches += 1
        super()._write_batch(batch)


class FailingDetector:
    bundle_id = "broken"
    threshold = 0.5

    def score_dataset(self, ds: Any, threshold: float | None = None,
                      line_gate: float | None = None) -> Any:
        raise RuntimeError("scoring process died")


def _setup(tmp_path: Path, bundle: Path | None, default: str, detector_extra: str = ""
           ) -> tuple[Screening, Any, Quarantine]:
    """The screening pool on a fresh state directory, forwarding to a directory destination;
    ``bundle`` None: the shipped one."""
    state = tmp_path / "state"
    cfg_path = write_config(tmp_path / "c.toml", state=state, port=11112,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/out"\n',
                            default=default, bundle=bundle, relay_unscreened=False,
                            detector_extra=detector_extra)
    cfg = load_config(cfg_path)
    state.mkdir()
    audit = CountingAudit(cfg.audit_path)
    quarantine = Quarantine(cfg.quarantine_dir, audit=audit)
    screening = Screening(lambda: cfg, audit, quarantine, Metrics(), lambda _d: None,
                          PendingOrder())
    screening.layout.create(("o",))
    return screening, cfg, quarantine


UID = "1.2.826.0.1.3680043.10.99.7"


def _write_cr(path: Path) -> Path:
    rng = np.random.default_rng(0)
    pixels = (rng.normal(2000, 200, (256, 256))).clip(0, 4095).astype(np.uint16)
    make_cr(path, pixels, 12, sop_uid=UID)
    return path


def _spool_one(screening: Screening, tmp_path: Path) -> WorkItem:
    uid = UID
    path = _write_cr(screening.layout.incoming / f"{uid}.dcm")
    seq = f"{1:020d}"
    side = {"sop_uid": uid, "sop_class": "1.2.840.10008.5.1.4.1.1.1", "calling_ae": "MODALITY",
            "called_ae": "SENTINEL", "peer": "127.0.0.1", "received_at": time.time(),
            "seq": seq, "assoc_id": "a"}
    path.with_suffix(".json").write_text(json.dumps(side))
    return WorkItem(path=path, sop_uid=uid, seq=seq, assoc_id="a")


def _events(audit_path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in audit_path.read_text().splitlines()]


@pytest.mark.parametrize("threshold, outcome, events", [
    (1.0, "forwarded", ["received", "scored"]),
    (0.0, "quarantined", ["received", "scored", "quarantined"]),
])
def test_received_and_scored_share_one_fsync(tmp_path: Path, fixture_bundle: Path,
                                             threshold: float, outcome: str,
                                             events: list[str]) -> None:
    from detector.scoring import Detector

    screening, cfg, _ = _setup(tmp_path, fixture_bundle,
                               f'action = "screen"\nthreshold = {threshold}')
    item = _spool_one(screening, tmp_path)
    detector = Detector.load(fixture_bundle)
    CountingAudit.batches = 0
    assert screening.process(item, detector) == outcome
    assert _events(cfg.audit_path) == events
    # received + scored in one batch; a quarantine's own line is a second
    assert CountingAudit.batches == len(events) - 1
    assert verify(cfg.audit_path).ok
    if outcome == "forwarded":
        assert list(screening.layout.outbox("o").glob(f"*-{item.sop_uid}.dcm"))


def test_scoring_failure_still_writes_its_lines(tmp_path: Path, fixture_bundle: Path) -> None:
    screening, cfg, _ = _setup(tmp_path, fixture_bundle, 'action = "screen"')
    item = _spool_one(screening, tmp_path)
    CountingAudit.batches = 0
    # the default error policy holds what could not be scored
    assert screening.process(item, FailingDetector()) == "quarantined"
    assert _events(cfg.audit_path) == ["received", "quarantined"]
    assert CountingAudit.batches == 2
    assert verify(cfg.audit_path).ok


def _screen_one(screening: Screening, cfg: Any, detector: Any, tmp_path: Path,
                passes: bool) -> tuple[WorkItem, dict[str, Any]]:
    """Spool the probe CR, screen it (forwarded when it ``passes``, else quarantined) and
    return its work item and its ``scored`` audit line."""
    item = _spool_one(screening, tmp_path)
    assert screening.process(item, detector) == ("forwarded" if passes else "quarantined")
    scored = next(json.loads(x) for x in cfg.audit_path.read_text().splitlines()
                  if json.loads(x)["event"] == "scored")
    return item, scored


@pytest.mark.parametrize("above", [False, True])
def test_site_cnn_gate_flags_what_the_cnn_alone_sees(tmp_path: Path, above: bool) -> None:
    """``[detector] cnn_gate``: at threshold 1.0 the fused score never flags; the CNN gate, set
    just under this image's CNN probability, does, and just over it does not. The verdict, the
    audit and the quarantine record carry the gate and the CNN's peak."""
    from detector.preprocess import read_dicom
    from detector.scoring import Detector

    detector = Detector.load(None)  # the shipped bundle: its CNN is unsure of this noise
    p_cnn = detector.score_dataset(read_dicom(_write_cr(tmp_path / "probe.dcm"))).p_cnn
    gate = p_cnn + 1e-6 if above else p_cnn - 1e-6
    screening, cfg, quarantine = _setup(tmp_path, None, 'action = "screen"\nthreshold = 1.0',
                                        detector_extra=f"cnn_gate = {gate!r}")
    assert cfg.detector.cnn_gate == gate
    item, scored = _screen_one(screening, cfg, detector, tmp_path, above)
    assert scored["cnn_gate"] == gate and scored["cnn_peak"] == pytest.approx(p_cnn)
    assert scored["verdict"] == ("clean" if above else "flagged")
    if not above:
        record = quarantine.get(item.sop_uid)
        assert record is not None and record.reason == "flagged"
        assert record.cnn_gate == gate and record.cnn_peak == pytest.approx(p_cnn)


def test_cnn_gate_config_is_validated(tmp_path: Path) -> None:
    from gateway.config import ConfigError

    for bad in ("0", "1.5", '"high"'):
        path = write_config(tmp_path / "c.toml", state=tmp_path / "s", port=11112,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/out"\n',
                            detector_extra=f"cnn_gate = {bad}")
        with pytest.raises(ConfigError, match="cnn_gate"):
            load_config(path)


@pytest.mark.parametrize("above", [False, True])
def test_site_line_ramp_flags_a_score_its_line_raises_to_the_threshold(tmp_path: Path,
                                                                        above: bool) -> None:
    """``[detector] line_ramp``: with the threshold one log-odds above this image's score and
    the line gate out of reach, a ramp whose 25 log-odds per e-fold of line lift the score by
    just over one flags it, by just under one does not. The verdict, the audit and the
    quarantine record carry the ramp beside the line score."""
    from detector.preprocess import read_dicom
    from detector.scoring import LINE_RAMP_SLOPE, Detector

    detector = Detector.load(None)
    probe = detector.score_dataset(read_dicom(_write_cr(tmp_path / "probe.dcm")), line_gate=50.0)
    logit = float(np.log(probe.score / (1.0 - probe.score)))
    threshold = float(1.0 / (1.0 + np.exp(-(logit + 1.0))))
    lift = 1.0 / LINE_RAMP_SLOPE  # ln(line / ramp) that adds exactly one log-odds
    ramp = probe.line_peak * float(np.exp(-lift)) * (1.001 if above else 0.999)
    assert 1.0 <= ramp < 50.0  # a valid config value for this image's line
    screening, cfg, quarantine = _setup(
        tmp_path, None, f'action = "screen"\nthreshold = {threshold!r}',
        detector_extra=f"line_gate = 50.0\nline_ramp = {ramp!r}")
    assert cfg.detector.line_ramp == ramp
    item, scored = _screen_one(screening, cfg, detector, tmp_path, above)
    assert scored["line_ramp"] == ramp and scored["line_peak"] == pytest.approx(probe.line_peak)
    assert scored["verdict"] == ("clean" if above else "flagged")
    if not above:
        record = quarantine.get(item.sop_uid)
        assert record is not None and record.reason == "flagged"
        assert record.line_ramp == ramp


@pytest.mark.parametrize("extra, why", [
    ("line_ramp = 2.0", "line_gate above it"),  # no gate to measure the line
    ("line_gate = 2.3\nline_ramp = 2.3", "line_gate above it"),  # not below the gate
    ("line_gate = 2.3\nline_ramp = 0.5", "line_ramp"),  # under any line score's floor
])
def test_line_ramp_config_is_validated(tmp_path: Path, extra: str, why: str) -> None:
    from gateway.config import ConfigError

    path = write_config(tmp_path / "c.toml", state=tmp_path / "s", port=11112,
                        destinations=f'[destinations.o]\nkind = "directory"\n'
                                     f'path = "{tmp_path}/out"\n',
                        detector_extra=extra)
    with pytest.raises(ConfigError, match=why):
        load_config(path)
