"""End to end: DCMTK storescu (the modality) -> `sentinel serve` (a child process) -> Orthanc.

Scoring uses the fixture bundle (tiny models, meaningless clinically), so verdicts are forced by
configuration: images routed by a rule with ``threshold = 0`` are always flagged (they stand in
for attacked copies until the trained default bundle and ``sentinel attack`` exist), and the
default rule screens in ``shadow`` mode (scored and audited, always forwarded).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from gateway.quarantine import Quarantine
from tests.dcmtk import echoscu, free_port, require_dcmtk, storescu
from tests.dicom_factory import (
    PATIENT_ID,
    PATIENT_NAME,
    from_image,
    jpeg_lossless,
    make_series,
    make_sr,
    pixel_sha256,
    sop_uid_of,
    synthetic,
)
from tests.gateway_harness import GatewayProcess, metric, wait_until, write_config
from tests.orthanc import OrthancServer, require_orthanc

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

FLAG_RULE = """
[[rules]]
name = "force-flag"
action = "screen"
threshold = 0.0
[rules.match]
BodyPartExamined = "HAND"
"""
SHADOW_DEFAULT = 'action = "screen"\nshadow = true'


def audit_lines(state: Path) -> list[dict]:  # type: ignore[type-arg]
    path = state / "audit" / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_storescu_gateway_orthanc(tmp_path: Path, fixture_bundle: Path, data_dir: Path,
                                  nema_dir: Path) -> None:
    require_dcmtk()
    require_orthanc()
    port, mport = free_port(), free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", {"sentinel": ("SENTINEL", port)})
    orthanc.start()
    state = tmp_path / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       rules=FLAG_RULE, default=SHADOW_DEFAULT, bundle=fixture_bundle,
                       metrics_port=mport)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port, mport).start()
    try:
        src = tmp_path / "src"
        pngs = sorted((data_dir / "nih_cxr14_1000" / "img512").glob("*.png"))[:3]
        clean = [from_image(p, src / f"nih{i}.dcm") for i, p in enumerate(pngs)]
        clean += [synthetic(src / "syn12.dcm", 512, 512, bits_stored=12, seed=3)]
        jpeg = jpeg_lossless(synthetic(src / "pre-jpeg.dcm", 256, 256, seed=4),
                             src / "jpegll.dcm")
        j2k = nema_dir / "RG3_J2KR.dcm"
        clean += [nema_dir / "RG1_UNCR.dcm"]
        flagged = [synthetic(src / f"hand{i}.dcm", 256, 256, seed=10 + i, body_part="HAND")
                   for i in range(2)]
        sr = make_sr(src / "report.dcm")
        r = storescu(port, [*clean, *flagged, sr])
        assert r.returncode == 0, r.stderr
        # compressed instances travel in their own syntax (DCMTK proposes it when asked:
        # -xs JPEG lossless, -xv JPEG 2000 lossless) and are forwarded byte for byte
        assert storescu(port, [jpeg], extra=["-xs"]).returncode == 0
        assert storescu(port, [j2k], extra=["-xv"]).returncode == 0
        clean += [jpeg, j2k]
        n_forward = len(clean) + 1
        assert orthanc.wait_for_count(n_forward, timeout=60) == n_forward
        time.sleep(0.5)
        assert int(orthanc.statistics()["CountInstances"]) == n_forward
        for f in [*clean, sr]:
            data = orthanc.instance_file(sop_uid_of(f))
            assert data is not None, f"{f.name} missing in Orthanc"
            if f != sr:
                assert pixel_sha256(data) == pixel_sha256(f), f"{f.name} pixels changed"
        held = {r.sop_uid: r for r in Quarantine(state / "quarantine").list()}
        for f in flagged:
            uid = sop_uid_of(f)
            assert orthanc.find_instance(uid) is None
            assert held[uid].reason == "flagged" and held[uid].rule == "force-flag"
        text = gw.metrics()
        assert metric(text, "sentinel_forwarded_total", destination="pacs") == n_forward
        assert metric(text, "sentinel_quarantined_total", reason="flagged") == 2
        assert metric(text, "sentinel_screened_total") == len(clean) + len(flagged)
        assert metric(text, "sentinel_flagged_total") >= 2
        assert metric(text, "sentinel_acknowledged_total", caller="MODALITY") == n_forward + 2
        assert metric(text, "sentinel_queue_depth", destination="pacs") == 0
        assert gw.http_status("/healthz") == 200 and gw.http_status("/readyz") == 200
        events = audit_lines(state)
        scored = [e for e in events if e["event"] == "scored"]
        assert len(scored) == len(clean) + len(flagged)
        assert all(e["bundle_id"] and "latency_ms" in e and "threshold" in e for e in scored)
    finally:
        rc = gw.stop()
        orthanc.stop()
    assert rc == 0
    from gateway.cli import main

    assert main(["audit", "verify", "--state-dir", str(state)]) == 0
    # no PHI in the audit log or the service log
    for text in (gw.log(), (state / "audit" / "audit.jsonl").read_text()):
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        assert "Testpatient" not in text


def test_orthanc_stopped_during_send(tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", {"sentinel": ("SENTINEL", port)})
    orthanc.start()
    state = tmp_path / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       default='action = "pass"', bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    files = make_series(tmp_path / "in", 20, rows=128, cols=128)
    try:
        assert storescu(port, files[:10]).returncode == 0
        assert orthanc.wait_for_count(10, timeout=30) == 10
        orthanc.stop()  # the PACS goes away while the modality keeps sending
        r = storescu(port, files[10:])
        assert r.returncode == 0, r.stderr  # the gateway acknowledged all of them
        audit = state / "audit" / "audit.jsonl"
        assert wait_until(lambda: '"event":"forward-failed"' in audit.read_text(), 20)
        orthanc.start()
        assert orthanc.wait_for_count(20, timeout=60) == 20
        time.sleep(1.0)
        assert int(orthanc.statistics()["CountInstances"]) == 20  # nothing twice
        assert all(orthanc.find_instance(sop_uid_of(f)) is not None for f in files)
    finally:
        rc = gw.stop()
        orthanc.stop()
    assert rc == 0


def test_reload_on_sighup_and_file_change_keeps_association(tmp_path: Path,
                                                            fixture_bundle: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    out = tmp_path / "out"
    dest = f'[destinations.out]\nkind = "directory"\npath = "{out}"\n'

    def config(default: str) -> Path:
        return write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                            default=default, bundle=fixture_bundle)

    cfg = config('action = "pass"')
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    files = make_series(tmp_path / "in", 4, rows=64, cols=64)
    saved = _config.STORE_SEND_CHUNKED_DATASET
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    q = Quarantine(state / "quarantine")

    def loaded(status: str) -> int:
        return sum(1 for e in audit_lines(state)
                   if e["event"] == "config-loaded" and e.get("status") == status)

    try:
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 1, 20)

        config('action = "screen"\nthreshold = 0.0')  # everything flagged from now on
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: loaded("reload") >= 1, 20)
        assert assoc.send_c_store(pydicom.dcmread(files[1])).Status == 0
        assert wait_until(lambda: len(q.list()) == 1, 20)

        before = loaded("reload")
        config('action = "pass"')  # file change only, no signal
        assert wait_until(lambda: loaded("reload") > before, 20)
        assert assoc.send_c_store(pydicom.dcmread(files[2])).Status == 0
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 2, 20)

        (tmp_path / "c.toml").write_text("[listener\nbroken = ")  # invalid: refused, old kept
        assert wait_until(lambda: any(e["event"] == "config-rejected"
                                      for e in audit_lines(state)), 20)
        assert assoc.send_c_store(pydicom.dcmread(files[3])).Status == 0
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) == 3, 20)
        assert assoc.is_established  # never dropped
        rejected = [e for e in audit_lines(state) if e["event"] == "config-rejected"]
        assert "invalid TOML" in rejected[0]["reason"]
    finally:
        if assoc.is_established:
            assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = saved
        rc = gw.stop()
    assert rc == 0
    assert "config reload refused" in gw.log()


def test_example_config_echo_and_store(tmp_path: Path, fixture_bundle: Path) -> None:
    """The README Quick start's config, moved to a temp state dir and free ports."""
    require_dcmtk()
    default_bundle = REPO / "detector" / "models" / "default"
    bundle = default_bundle if (default_bundle / "manifest.json").is_file() else fixture_bundle
    port, mport = free_port(), free_port()
    text = (REPO / "systemd" / "sentinel.example.toml").read_text()
    text = (text.replace("/var/lib/xray-sentinel", str(tmp_path / "state"))
            .replace("port = 11112", f"port = {port}").replace("port = 9464", f"port = {mport}")
            .replace('bundle = "default"', f'bundle = "{bundle}"')
            .replace("min_free_mb = 512", "min_free_mb = 1"))
    cfg = tmp_path / "sentinel.toml"
    cfg.write_text(text)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port, mport).start()
    try:
        assert echoscu(port, calling="ECHOSCU").returncode == 0
        f = synthetic(tmp_path / "cr.dcm", 256, 256)
        r = storescu(port, [f], calling="STORESCU")
        assert r.returncode == 0, r.stderr
        uid = sop_uid_of(f)
        forwarded = tmp_path / "state" / "forwarded"
        held = tmp_path / "state" / "quarantine"
        assert wait_until(lambda: bool(list(forwarded.rglob(f"{uid}.dcm"))
                                       or list(held.rglob(f"{uid}.dcm"))), 30)
        assert storescu(port, [f], calling="SOMEONE").returncode != 0
    finally:
        rc = gw.stop()
    assert rc == 0


def test_bundle_that_fails_verification_stops_serve(tmp_path: Path, fixture_bundle: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(fixture_bundle, bad)
    victim = next(p for p in sorted(bad.iterdir()) if p.name != "manifest.json" and p.is_file())
    with victim.open("ab") as fh:
        fh.write(b"tampered")
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{tmp_path}/o"',
                       bundle=bad)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port)
    with pytest.raises(RuntimeError, match="exited 2"):
        gw.start(timeout=60)
    assert victim.name in gw.log() and "model bundle refused" in gw.log()
    from gateway.cli import main

    assert main(["check", "--config", str(cfg)]) == 2
    assert os.path.exists(cfg)


def test_acknowledged_instances_survive_sigkill(tmp_path: Path, fixture_bundle: Path) -> None:
    """SIGKILL with everything still queued (the PACS is down); after restart all arrive once."""
    require_dcmtk()
    require_orthanc()
    port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", {"sentinel": ("SENTINEL", port)})
    state = tmp_path / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       default=SHADOW_DEFAULT, bundle=fixture_bundle)
    files = make_series(tmp_path / "in", 6, rows=64, cols=64)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        assert storescu(port, files).returncode == 0
        outbox = state / "spool" / "outbox" / "pacs"
        assert wait_until(lambda: len(list(outbox.glob("*.dcm"))) == 6, 30)
        gw.kill()  # SIGKILL: no drain
        orthanc.start()
        gw.start()
        assert orthanc.wait_for_count(6, timeout=60) == 6
        time.sleep(1.0)
        assert int(orthanc.statistics()["CountInstances"]) == 6
        assert {orthanc.find_instance(sop_uid_of(f)) is not None for f in files} == {True}
    finally:
        gw.stop()
        orthanc.stop()


def test_unscorable_instances_quarantined_with_reason(tmp_path: Path,
                                                     fixture_bundle: Path) -> None:
    """Default error policy: quarantine with the detector's reason, never a silent forward."""
    from gateway.config import load_config
    from gateway.service import Gateway

    port = free_port()
    out = tmp_path / "out"
    rules = ('[[rules]]\nname = "screen-sr-too"\naction = "screen"\n[rules.match]\n'
             'Modality = "SR"\n')
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{out}"',
                       rules=rules, default='action = "screen"', bundle=fixture_bundle)
    gw = Gateway(load_config(cfg), drain_s=5)
    gw.start()
    try:
        short = pydicom.dcmread(synthetic(tmp_path / "short.dcm", 64, 64))
        short.PixelData = short.PixelData[:1000]  # fewer bytes than Rows x Columns declare
        sr = pydicom.dcmread(make_sr(tmp_path / "sr.dcm"))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(short.SOPClassUID, "1.2.840.10008.1.2.1")
        ae.add_requested_context(sr.SOPClassUID, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        try:
            assert assoc.send_c_store(short).Status == 0
            assert assoc.send_c_store(sr).Status == 0
        finally:
            assoc.release()
        q = Quarantine(tmp_path / "state" / "quarantine")
        assert wait_until(lambda: len(q.list()) == 2, 30)
        reasons = {r.sop_uid: r.reason for r in q.list()}
        assert reasons[str(short.SOPInstanceUID)] == "pixel-length"
        assert reasons[str(sr.SOPInstanceUID)] == "no-pixel-data"
        assert not list(out.rglob("*.dcm"))
    finally:
        gw.stop()


def test_reload_with_a_tampered_bundle_keeps_the_running_model(tmp_path: Path,
                                                               fixture_bundle: Path) -> None:
    from gateway.config import load_config
    from gateway.service import Gateway

    port = free_port()
    cfg_path = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                            destinations=f'[destinations.o]\nkind = "directory"\n'
                                         f'path = "{tmp_path}/o"', bundle=fixture_bundle)
    gw = Gateway(load_config(cfg_path), drain_s=5)
    gw.start()
    try:
        running = gw.screening.bundle_id if gw.screening else ""
        assert running
        bad = tmp_path / "bad-bundle"
        shutil.copytree(fixture_bundle, bad)
        victim = next(p for p in sorted(bad.iterdir()) if p.name != "manifest.json")
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different digest
        victim.write_bytes(bytes(data))
        cfg_path.write_text(cfg_path.read_text().replace(str(fixture_bundle), str(bad)))
        assert gw.reload() is False
        assert gw.config.detector.bundle == fixture_bundle  # running config kept
        assert gw.screening is not None and gw.screening.bundle_id == running
        rejected = [e for e in audit_lines(tmp_path / "state") if e["event"] == "config-rejected"]
        assert rejected and "model bundle refused" in rejected[-1]["reason"]
        assert victim.name in rejected[-1]["reason"]
    finally:
        gw.stop()


def _attacked_copies_are_held(tmp_path: Path, sources: list[Path],
                              eps: tuple[float, ...] = (0.006,)) -> None:
    """Send DICOM ``sources`` and their `sentinel attack` PGD copies (each eps) through the
    gateway with the trained default bundle: originals arrive in Orthanc byte-identical,
    attacked copies are quarantined as flagged and never reach Orthanc."""
    import subprocess
    import sys

    require_dcmtk()
    require_orthanc()
    bundle = REPO / "detector" / "models" / "default"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("no trained default bundle in detector/models/default yet")
    attacked = []
    for e in eps:
        for i, f in enumerate(sources):
            out = tmp_path / "src" / f"attacked{i}-{e}.dcm"
            r = subprocess.run([sys.executable, "-m", "gateway.cli", "attack", str(f), str(out),
                                "--method", "pgd", "--eps", str(e), "--bundle", str(bundle)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            attacked.append(out)
    port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", {"sentinel": ("SENTINEL", port)})
    orthanc.start()
    state = tmp_path / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       default='action = "screen"', bundle=bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        assert storescu(port, [*sources, *attacked]).returncode == 0
        q = Quarantine(state / "quarantine")
        assert orthanc.wait_for_count(len(sources), timeout=60) == len(sources)
        assert wait_until(lambda: len(q.list()) == len(attacked), 60)
        for f in sources:
            data = orthanc.instance_file(sop_uid_of(f))
            assert data is not None and pixel_sha256(data) == pixel_sha256(f)
        for f in attacked:
            assert orthanc.find_instance(sop_uid_of(f)) is None
        assert {r.reason for r in q.list()} == {"flagged"}
        # the default bundle's stride-grid gate feature travels with the verdict
        assert all(r.grid_peaks is not None and r.grid_peaks > 0.5 for r in q.list())
    finally:
        gw.stop()
        orthanc.stop()


def test_attacked_copies_quarantined_with_the_default_bundle(tmp_path: Path,
                                                             data_dir: Path) -> None:
    """Kermany test-split images (never trained on; the split is recorded in the bundle) as
    8-bit CR: the originals pass, their `sentinel attack` copies are held."""
    split_file = REPO / "train" / "models" / "default" / "split.json"  # its training bundle
    if not split_file.is_file():
        pytest.skip("no training bundle (with its split.json) in train/models/default")
    test_split = json.loads(split_file.read_text())["test"]
    picks = [e["rel"] for e in test_split if e["label"] == 0][:1] + \
            [e["rel"] for e in test_split if e["label"] == 1][:1]
    sources = [from_image(data_dir / "kermany224" / rel, tmp_path / "src" / f"clean{i}.dcm")
               for i, rel in enumerate(picks)]
    _attacked_copies_are_held(tmp_path, sources)


def test_attacked_nema_cr_copies_quarantined_with_the_default_bundle(tmp_path: Path,
                                                                     nema_dir: Path) -> None:
    """The two real CR DICOMs (15- and 10-bit, MONOCHROME1) pass, and their attacked copies
    at eps 0.003 and 0.006 are held (issue 3's acceptance; RG3 at 0.003 is caught by the
    stride-grid gate, its parts alone score it 0.69 against 0.89)."""
    _attacked_copies_are_held(tmp_path, [nema_dir / "RG1_UNCR.dcm", nema_dir / "RG3_UNCR.dcm"],
                              eps=(0.003, 0.006))


def test_sigterm_drains_open_association_then_exits_0(tmp_path: Path,
                                                      fixture_bundle: Path) -> None:
    """SIGTERM: no new associations, the open one may finish its sends, exit 0; whatever was
    acknowledged and not yet delivered is on disk and delivered after the next start."""
    port = free_port()
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{out}"',
                       bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    files = make_series(tmp_path / "in", 3, rows=64, cols=64)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    try:
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        gw.signal(signal.SIGTERM)
        assert wait_until(lambda: "draining" in gw.log(), 10)
        late = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        assert not late.is_established  # no new associations while draining
        for f in files[1:]:  # the open association is served to its end
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    finally:
        if assoc.is_established:
            assoc.release()
    assert gw.proc is not None and gw.proc.wait(30) == 0
    gw.proc = None
    gw.start()
    try:
        uids = {sop_uid_of(f) for f in files}
        assert wait_until(lambda: {p.stem for p in out.rglob("*.dcm")} == uids, 30)
    finally:
        assert gw.stop() == 0


def test_a_storm_of_signals_neither_deadlocks_nor_loses_the_stop(tmp_path: Path,
                                                                 fixture_bundle: Path) -> None:
    """Thousands of SIGHUPs, then SIGTERMs in a burst (``timeout`` forwarding one beside an
    operator's ``pkill`` sends two at once): the daemon drains and exits 0. A handler that
    called ``Event.set()`` could be re-entered inside that call, and the event's lock is not
    reentrant: the daemon hung for ever, neither draining nor feeding the watchdog."""
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\n'
                                    f'path = "{tmp_path / "out"}"',
                       bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    assert gw.proc is not None
    pid = gw.proc.pid
    try:
        for _ in range(3000):
            os.kill(pid, signal.SIGHUP)
        for _ in range(50):
            os.kill(pid, signal.SIGTERM)
        rc = gw.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not exit within 60 s of SIGTERM after a burst of signals: "
                    + gw.log()[-1500:])
    finally:
        gw.kill()
    assert rc == 0 and "stopped" in gw.log()
