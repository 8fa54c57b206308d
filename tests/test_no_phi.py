"""No PHI in logs: patient data sent through the daemon never reaches the audit or service log.

Instances carry patient name, ID, birth date, accession number, referring physician and
institution (distinctive markers) and take every path the daemon has: forwarded clean, flagged
into the quarantine, unreadable (a bad VR inside the Patient Name element, so a parser error
message would quote it), a corrupted length that makes SOP Class UID swallow the patient's
name and ID, preprocessing errors (pixel data too short), a structured report
(non-image pass), refused by a rule, and a destination that fails (forward-failed, dead letter).
The daemon runs at ``--log-level DEBUG`` (the most it ever says), with Python warnings on, and
its whole stdout/stderr is captured. Neither the audit log, the service log, nor ``/metrics``
may contain any of the markers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from bench.reliability import record_figures
from gateway.audit import verify
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, make_sr, synthetic
from tests.gateway_harness import REPO_ROOT, GatewayProcess, metric, wait_until, write_config

MARKERS = {
    "patient name": PATIENT_NAME,
    "patient name (family)": "Testpatient",
    "patient name (given)": "Phi^Marker",
    "patient id": PATIENT_ID,
    "birth date": "19411207",
    "accession": "ACCPHI7731",
    "referring physician": "Docphi^Referrer",
    "institution": "Phimarker Hospital",
}

RULES = """
[[rules]]
name = "force-flag"
action = "screen"
threshold = 0.0
[rules.match]
BodyPartExamined = "HAND"

[[rules]]
name = "no-feet"
action = "reject"
destinations = []
[rules.match]
BodyPartExamined = "FOOT"
"""


def _phi(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate = MARKERS["birth date"]
    ds.AccessionNumber = MARKERS["accession"]
    ds.ReferringPhysicianName = MARKERS["referring physician"]
    ds.InstitutionName = MARKERS["institution"]
    ds.save_as(path, enforce_file_format=True)
    return path


def _bad_vr_in_name(path: Path) -> Path:
    """Patient Name's VR 'PN' turned into 'QN': pydicom's error names the element."""
    data = bytearray(path.read_bytes())
    at = data.index(b"\x10\x00\x10\x00PN")
    data[at + 4: at + 6] = b"QN"
    path.write_bytes(bytes(data))
    return path


def _swallowing_length(path: Path) -> Path:
    """SOP Class UID's length enlarged so its value runs over Patient Name and ID (a parser
    takes them for the UID: this once put both into the audit log)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"\x08\x00\x16\x00UI")
    end = data.index(MARKERS["patient id"].encode()) + len(MARKERS["patient id"])
    length = end - (at + 8)
    length += length % 2
    data[at + 6: at + 8] = length.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def _short_pixels(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:-100]
    ds.save_as(path, enforce_file_format=True)
    return path


def send_raw(port: int, path: Path) -> int | None:
    """C-STORE the file's dataset bytes as they are (pynetdicom chunked send, no parsing)."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID),
                                 str(meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


class DebugGateway(GatewayProcess):
    """``sentinel serve --log-level DEBUG`` with Python warnings always shown."""

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> DebugGateway:
        log = self.log_path.open("ab")
        full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="always",
                        OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config),
             "--log-level", "DEBUG"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=full_env)
        if not wait_until(lambda: "ready:" in self.log() or self.proc.poll() is not None,
                          timeout):
            raise RuntimeError("gateway not ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {self.log()[-2000:]}")
        return self


def test_patient_data_never_in_audit_or_service_log(tmp_path: Path,
                                                    fixture_bundle: Path) -> None:
    require_dcmtk()
    port, mport, nobody = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    dest = (f'[destinations.out]\nkind = "directory"\npath = "{tmp_path}/out"\n\n'
            f'[destinations.gone]\nkind = "dicom"\nhost = "127.0.0.1"\nport = {nobody}\n'
            'ae_title = "GONE"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       rules=RULES, default='action = "screen"\nthreshold = 1.0',
                       bundle=fixture_bundle, metrics_port=mport,
                       forwarding="backoff_initial_s = 0.2\nbackoff_max_s = 0.5\nmax_age_s = 2")
    d = tmp_path / "in"
    clean = _phi(synthetic(d / "clean.dcm", 64, 64, seed=1))
    flagged = _phi(synthetic(d / "hand.dcm", 64, 64, seed=2, body_part="HAND"))
    rejected = _phi(synthetic(d / "foot.dcm", 64, 64, seed=3, body_part="FOOT"))
    short = _short_pixels(_phi(synthetic(d / "short.dcm", 64, 64, seed=4)))
    sr = make_sr(d / "report.dcm")
    bad = _bad_vr_in_name(_phi(synthetic(d / "badvr.dcm", 64, 64, seed=5)))
    swallow = _swallowing_length(_phi(synthetic(d / "swallow.dcm", 64, 64, seed=6)))
    gw = DebugGateway(cfg, tmp_path / "service.log", port, mport).start()
    try:
        r = storescu(port, [clean, flagged, rejected, short, sr])
        assert r.returncode == 0, r.stderr[-1500:]
        assert send_raw(port, bad) == 0  # DCMTK will not send a bad VR; a broken modality might
        assert send_raw(port, swallow) == 0
        audit = state / "audit" / "audit.jsonl"
        swallow_uid = str(pydicom.filereader.read_file_meta_info(swallow)
                          .MediaStorageSOPInstanceUID)

        def settled() -> bool:
            text = audit.read_text()
            return (text.count('"event":"quarantined"') >= 4 and swallow_uid in text
                    and text.count('"event":"dead-letter"') >= 2)

        assert wait_until(settled, 60), audit.read_text()[-3000:]
        time.sleep(0.5)
        metrics_text = gw.metrics()
        assert metric(metrics_text, "sentinel_forwarded_total", destination="out") >= 2
    finally:
        assert gw.stop() == 0
    assert verify(state / "audit" / "audit.jsonl").ok
    audit_text = (state / "audit" / "audit.jsonl").read_text()
    service_text = gw.log()
    assert "DEBUG" in service_text or "INFO" in service_text
    found = {
        (where, what)
        for where, text in (("audit log", audit_text), ("service log", service_text),
                            ("/metrics", metrics_text))
        for what, marker in MARKERS.items() if marker in text
    }
    assert not found, f"PHI leaked: {sorted(found)}"
    events = audit_text.count("\n")
    record_figures("no_phi", {"audit_lines_checked": events,
                              "service_log_lines_checked": service_text.count("\n"),
                              "markers": len(MARKERS), "paths_exercised": 8, "leaks": 0})


@pytest.mark.parametrize("marker", [PATIENT_NAME, PATIENT_ID])
def test_markers_are_in_what_was_sent(marker: str, tmp_path: Path) -> None:
    """Guards the test above against checking for markers the instances never carried."""
    raw = _phi(synthetic(tmp_path / "x.dcm", 16, 16)).read_bytes()
    assert marker.encode() in raw
