"""Screening in a child process: same scores as in-process, typed errors, crash and hang
containment, restart, clean shutdown, and the config knobs that choose it."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pydicom
import pytest
from dicom_factory import make_series, synthetic

from bench.common import descendants
from detector.errors import BundleError
from detector.preprocess import parse_dicom
from detector.scoring import Detector
from gateway.config import ConfigError, load_config
from gateway.detector_process import CHILD_MALLOC_ENV, ProcessDetector, ScoringProcessError
from tests.dcmtk import require_dcmtk, storescu
from tests.gateway_harness import GatewayProcess, new_ports, wait_until, write_config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its state letter says it is gone
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _exited(pid: int) -> bool:
    """Dead in every thread (a zombie the parent has not reaped yet counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in status and "Threads:\t1\n" in status


@pytest.fixture()
def child(fixture_bundle: Path):  # type: ignore[no-untyped-def]
    d = ProcessDetector(fixture_bundle, threads=1, timeout_s=60)
    yield d
    d.close()


def test_scores_equal_in_process_detector(child: ProcessDetector, fixture_bundle: Path,
                                          tmp_path: Path) -> None:
    files = make_series(tmp_path, 3, rows=300, cols=260)
    local = Detector.load(fixture_bundle)
    assert child.bundle_id == local.bundle_id and child.threshold == local.threshold
    for f in files:
        want = local.score_path(f, threshold=0.3)
        got = child.score_dataset(parse_dicom(f), threshold=0.3)
        assert (got.score, got.p_cnn, got.p_rf, got.flagged, got.threshold) == (
            want.score, want.p_cnn, want.p_rf, want.flagged, want.threshold)
    ds = pydicom.dcmread(files[0])  # read whole, as an inflated deflate-syntax dataset is
    ds.filename = None  # a dataset with no file behind it travels whole
    assert child.score_dataset(ds).score == local.score_path(files[0]).score


def test_bad_input_gets_the_detectors_typed_reason(child: ProcessDetector,
                                                   tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    with pytest.raises(ScoringProcessError) as ei:
        child.score_path(junk)
    assert ei.value.reason == "unreadable" and "junk.dcm" in str(ei.value)
    assert child.restarts == 0  # an error answer is not a crash


def test_crash_mid_instance_is_typed_and_the_next_gets_a_fresh_child(
        child: ProcessDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a 3000x3000 instance takes the child well over 10 ms: the kill lands mid-instance
    f = synthetic(tmp_path / "a.dcm", rows=3000, cols=3000)
    first = child.pid
    assert first is not None
    conn = child._conn
    assert conn is not None
    real_send = conn.send

    def send_then_die(obj: object) -> None:  # the decoder "segfaults" on this instance
        real_send(obj)
        os.kill(first, 9)

    monkeypatch.setattr(conn, "send", send_then_die)
    with pytest.raises(ScoringProcessError) as ei:
        child.score_path(f)
    assert ei.value.reason == "detector-crashed"
    assert not _alive(first)
    assert child.score_path(f).score >= 0.0  # a fresh child takes the next instance
    assert child.pid != first and child.restarts == 1


def test_hang_is_killed_after_timeout(child: ProcessDetector, tmp_path: Path) -> None:
    big = synthetic(tmp_path / "big.dcm", rows=3000, cols=3000)
    first = child.pid
    assert first is not None
    child.timeout_s = 0.01  # no 3000x3000 instance is scored in 10 ms: stands in for a hang
    t0 = time.monotonic()
    with pytest.raises(ScoringProcessError) as ei:
        child.score_path(big)
    assert ei.value.reason == "detector-timeout"
    assert time.monotonic() - t0 < 10
    assert not _alive(first)
    child.timeout_s = 60
    assert child.score_path(big).score >= 0.0 and child.restarts == 1


def test_child_killed_between_instances_is_replaced_silently(child: ProcessDetector,
                                                             tmp_path: Path) -> None:
    f = synthetic(tmp_path / "a.dcm", rows=128, cols=128)
    first = child.pid
    assert first is not None
    os.kill(first, 9)
    proc = child._proc
    assert proc is not None
    proc.wait(10)  # fully gone (every thread), as an OOM-killed idle child would be
    assert child.score_path(f).score >= 0.0
    assert child.pid != first and child.restarts == 1


def test_close_ends_the_child(fixture_bundle: Path) -> None:
    d = ProcessDetector(fixture_bundle)
    pid = d.pid
    assert pid is not None and _alive(pid)
    d.close()
    assert not _alive(pid) and d.pid is None


def test_corrupt_bundle_refused_at_start_naming_the_file(fixture_bundle: Path,
                                                         tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(fixture_bundle, bad)
    forest = bad / "forest.npz"
    forest.write_bytes(forest.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"forest\.npz"):
        ProcessDetector(bad)


MINIMAL = """
[listener]
ae_title = "SENTINEL"
port = 11112
[[callers]]
ae_title = "CR1"
addresses = ["127.0.0.1"]
[state]
dir = "state"
[destinations.archive]
kind = "directory"
path = "archive"
[default]
action = "screen"
destinations = ["archive"]
"""


def test_isolation_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL)
    cfg = load_config(p)
    assert cfg.detector.isolation == "process" and cfg.detector.timeout_s == 60.0
    assert cfg.detector.nice == 10
    p.write_text(MINIMAL + '[detector]\nisolation = "thread"\ntimeout_s = 5\nnice = 0\n')
    cfg = load_config(p)
    assert cfg.detector.isolation == "thread" and cfg.detector.timeout_s == 5.0
    assert cfg.detector.nice == 0
    p.write_text(MINIMAL + '[detector]\nisolation = "fork"\n')
    with pytest.raises(ConfigError, match=r"detector.isolation.*fix:.*process"):
        load_config(p)
    p.write_text(MINIMAL + "[detector]\nnice = 20\n")
    with pytest.raises(ConfigError, match=r"detector.nice"):
        load_config(p)


def _nice(pid: int) -> int:
    """The niceness of a process (field 19 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_child_runs_at_the_configured_niceness(fixture_bundle: Path) -> None:
    d = ProcessDetector(fixture_bundle, nice=7)
    try:
        assert d.pid is not None and _nice(d.pid) == min(19, _nice(os.getpid()) + 7)
        # and keeps large decode buffers in its heap (see CHILD_MALLOC_ENV)
        environ = Path(f"/proc/{d.pid}/environ").read_bytes().split(b"\0")
        for key, value in CHILD_MALLOC_ENV.items():
            assert f"{key}={os.environ.get(key, value)}".encode() in environ
    finally:
        d.close()


def _children(pid: int) -> list[int]:
    """Live scoring processes under ``pid`` (running gateway.detector_process)."""
    return [c for c in descendants(pid) if _alive(c) and b"gateway.detector_process" in
            Path(f"/proc/{c}/cmdline").read_bytes()]


def test_daemon_survives_a_scoring_child_killed_and_leaves_none_behind(
        tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    port, mport = new_ports()
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       metrics_port=mport, bundle=fixture_bundle,
                       destinations=f'[destinations.archive]\nkind = "directory"\n'
                                    f'path = "{archive}"\n',
                       default='action = "screen"\ndestinations = ["archive"]\nshadow = true')
    gw = GatewayProcess(cfg, tmp_path / "gw.log", port, mport).start()
    try:
        assert gw.proc is not None
        kids = _children(gw.proc.pid)
        assert len(kids) == 1  # one scoring process per worker (the harness runs one)
        assert _nice(kids[0]) == min(19, _nice(gw.proc.pid) + 10)  # the default: receive first
        # a reload with another niceness starts a scoring process at it (the old one is closed
        # when its worker takes the next instance)
        cfg.write_text(cfg.read_text().replace("[detector]\n", "[detector]\nnice = 3\n", 1))
        gw.signal(signal.SIGHUP)
        want = min(19, _nice(gw.proc.pid) + 3)

        def reniced() -> list[int]:
            return [c for c in _children(gw.proc.pid)  # type: ignore[union-attr]
                    if _nice(c) == want]

        assert wait_until(lambda: len(reniced()) == 1, 30), gw.log()[-2000:]
        kids = reniced()
        os.kill(kids[0], 9)
        assert wait_until(lambda: _exited(kids[0]), 20)  # every thread gone, as after an OOM kill
        files = make_series(tmp_path / "in", 6, rows=128, cols=128)
        assert storescu(port, files).returncode == 0
        assert wait_until(lambda: len(list(archive.rglob("*.dcm"))) == 6, 60), (
            gw.log()[-3000:], sorted(str(p) for p in tmp_path.rglob("*.dcm")))
        fresh = _children(gw.proc.pid)
        assert gw.proc.poll() is None and len(fresh) == 1 and fresh != kids
        # a daemon killed outright takes its scoring process with it
        gw.proc.kill()
        gw.proc.wait(10)
        assert wait_until(lambda: not _alive(fresh[0]), 20)
    finally:
        gw.stop()
