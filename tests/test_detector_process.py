"""Screening in a child process: same scores as in-process, typed errors, crash and hang
containment, restart, clean shutdown, and the config knobs that choose it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
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
from gateway.detector_process import (
    CHILD_MALLOC_ENV,
    ProcessDetector,
    ScoringProcessError,
    ScoringStartError,
)
from tests import seccomp_deny
from tests.dcmtk import require_dcmtk, storescu
from tests.gateway_harness import (
    REPO_ROOT,
    GatewayProcess,
    new_ports,
    wait_until,
    write_config,
)


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
    real_send = child._send

    def send_then_die(*args: object) -> None:  # the decoder "segfaults" on this instance
        real_send(*args)  # type: ignore[arg-type]
        if child.pid == first:
            os.kill(first, 9)

    monkeypatch.setattr(child, "_send", send_then_die)
    with pytest.raises(ScoringProcessError) as ei:
        child.score_path(f)
    assert ei.value.reason == "detector-crashed" and "SIGKILL" in str(ei.value)
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


# -- a scoring child where setpriority is denied (issue 20, defect 1) --------------------------
# The unit's SystemCallFilter=~@resources (SystemCallErrorNumber=EPERM) made os.nice fail in the
# child, which died, and `serve` told the operator to restore the bundle files. These run the
# code under a real seccomp filter (tests/seccomp_deny.py) that denies setpriority the same way.

needs_seccomp = pytest.mark.skipif(not seccomp_deny.supported(),
                                   reason="the seccomp test filter knows x86_64 and aarch64 only")
SECCOMP = [sys.executable, str(REPO_ROOT / "tests" / "seccomp_deny.py"), "setpriority"]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OPENBLAS_NUM_THREADS": "1"}

NICE_DENIED = r"""
import json, logging, os, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from gateway.detector_process import ProcessDetector

def nice(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

d = ProcessDetector(Path(sys.argv[1]), nice=10)
first = d.score_path(sys.argv[2]).score
os.kill(d.pid, 9)
d._proc.wait(10)
second = d.score_path(sys.argv[2]).score  # a fresh child: it must not warn again
print(json.dumps({"child": nice(d.pid), "parent": nice(os.getpid()), "same": first == second,
                  "restarts": d.restarts, "nice_error": d.nice_error}))
d.close()
"""


@needs_seccomp
def test_child_scores_where_setpriority_is_denied_and_warns_once(fixture_bundle: Path,
                                                                 tmp_path: Path) -> None:
    f = synthetic(tmp_path / "a.dcm", rows=128, cols=128)
    run = subprocess.run([*SECCOMP, "eperm", "--", sys.executable, "-c", NICE_DENIED,
                          str(fixture_bundle), str(f)],
                         cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    # it could not renice, kept its parent's priority, and scored (twice: restart included)
    assert out["child"] == out["parent"] and out["same"] and out["restarts"] == 1
    assert out["nice_error"].startswith("PermissionError")
    warned = [line for line in run.stderr.splitlines() if "[detector] nice" in line]
    assert len(warned) == 1, run.stderr[-3000:]
    assert warned[0].startswith("WARNING") and "SystemCallFilter" in warned[0]


def _serve_until_ready_or_exit(cfg: Path, log: Path, prefix: list[str]) -> subprocess.Popen[bytes]:
    """``sentinel serve`` behind ``prefix``; returns once it logged ready or has exited."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "gateway.cli", "serve",
                                 "--config", str(cfg)],
                                cwd=REPO_ROOT, env=CHILD_ENV, stdout=out,
                                stderr=subprocess.STDOUT)
    assert wait_until(lambda: proc.poll() is not None or "ready:" in log.read_text(), 120), (
        log.read_text()[-3000:])
    return proc


@needs_seccomp
@pytest.mark.parametrize("case", ["setpriority-eperm", "setpriority-sigsys", "corrupt-bundle"])
def test_serve_names_the_real_reason_screening_cannot_start(case: str, fixture_bundle: Path,
                                                            tmp_path: Path) -> None:
    bundle = fixture_bundle
    prefix: list[str] = []
    if case == "corrupt-bundle":
        bundle = tmp_path / "bundle"
        shutil.copytree(fixture_bundle, bundle)
        forest = bundle / "forest.npz"
        forest.write_bytes(forest.read_bytes()[:-100])
    else:  # the unit's filter with SystemCallErrorNumber=EPERM, and without it (SIGSYS)
        prefix = [*SECCOMP, "eperm" if case == "setpriority-eperm" else "kill", "--"]
    port, mport = new_ports()
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       metrics_port=mport, bundle=bundle,
                       destinations=f'[destinations.archive]\nkind = "directory"\n'
                                    f'path = "{archive}"\n',
                       default='action = "screen"\ndestinations = ["archive"]\nshadow = true')
    log = tmp_path / "serve.log"
    proc = _serve_until_ready_or_exit(cfg, log, prefix)
    try:
        text = log.read_text()
        if case == "setpriority-eperm":  # starts, screens at normal priority, says so once
            assert proc.poll() is None, text[-3000:]
            require_dcmtk()
            files = make_series(tmp_path / "in", 2, rows=128, cols=128)
            assert storescu(port, files).returncode == 0
            assert wait_until(lambda: len(list(archive.rglob("*.dcm"))) == 2, 60), (
                log.read_text()[-3000:])
            assert log.read_text().count("[detector] nice = 10") == 1
            return
        assert proc.wait(30) == 2, text[-3000:]
        if case == "corrupt-bundle":  # a refused bundle still says so, naming the file
            assert "model bundle refused" in text and "forest.npz" in text, text[-3000:]
            assert "restore the bundle files" in text
        else:  # not a bundle problem: no advice to restore it, and the real cause named
            assert "restore the bundle" not in text and "bundle refused" not in text, text
            assert "the scoring process could not start" in text and "SIGSYS" in text, text
            assert "SystemCallFilter" in text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


# -- the wire from a child cannot run code in the daemon (issue 20, defect 6) -----------------
# A stand-in child speaks the start of the protocol, then answers the first request with what a
# subverted child might send. It is run instead of the real one by pointing sys.executable at
# a wrapper, so ProcessDetector starts it exactly as it starts the real child.

FAKE_CHILD = r"""
import json, os, pickle, socket, struct, sys, time

class Payload:  # unpickling this opens (creates) the marker file: code run by the receiver
    def __reduce__(self):
        return (open, (os.environ["FAKE_MARKER"], "w"))

sock = socket.socket(fileno=int(sys.argv[3]))  # argv: -m gateway.detector_process FD ...
def send(data):
    sock.sendall(struct.pack("!I", len(data)) + data)
def recv():
    n = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))[0]
    return sock.recv(n, socket.MSG_WAITALL) if n else b""

mode = os.environ["FAKE_MODE"]
if mode == "exit-at-start":
    sys.exit(3)
if os.environ.get("FAKE_HANDSHAKE") == "pickle":  # what the daemon before the fix expected
    send(pickle.dumps(("ready", "fake-bundle", 0.5)))
else:
    send(json.dumps({"kind": "ready", "bundle_id": "fake-bundle", "threshold": 0.5,
                     "nice_error": ""}).encode())
request = recv()
rid = json.loads(request)["id"] if request.startswith(b"{") else 1
good = {"score": 0.25, "p_cnn": 0.2, "p_rf": 0.3, "threshold": 0.5, "flagged": False,
        "frames": 1, "worst_frame": 0, "bundle_id": "fake-bundle",
        "timings_ms": {"total": 1.0}, "frame_scores": [0.25], "grid_peaks": None,
            "line_peak": None, "line_gate": None, "cnn_peak": 0.2, "cnn_gate": None,
            "line_ramp": None}
if mode == "pickle":
    send(pickle.dumps(("ok", Payload())))
elif mode == "huge":
    sock.sendall(struct.pack("!I", (16 << 20) + 1))  # a length past the limit, then nothing
elif mode == "good":
    send(json.dumps({"kind": "score", "id": rid, "score": good}).encode())
else:
    send(mode.replace("RID", str(rid)).replace("GOOD", json.dumps(good)).encode())
time.sleep(30)  # stays alive: the daemon must end it
"""


@pytest.fixture()
def fake_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Make ProcessDetector start the stand-in child; returns a setter for its mode."""
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))
    monkeypatch.setenv("FAKE_MARKER", str(tmp_path / "marker"))

    def mode(value: str) -> Path:
        monkeypatch.setenv("FAKE_MODE", value)
        return tmp_path / "marker"

    return mode


def test_a_pickle_from_the_child_is_not_run(fake_child, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = fake_child("pickle")
    d = ProcessDetector(None, timeout_s=10)
    first = d.pid
    try:
        with pytest.raises(ScoringProcessError) as ei:
            d.score_path(tmp_path / "any.dcm")
        assert not marker.exists()  # before the fix: the daemon unpickled it and ran open()
        assert ei.value.reason == "detector-protocol-error"
        assert first is not None and wait_until(lambda: not _alive(first), 10)
        fake_child("good")  # the next instance gets a fresh child
        assert d.score_path(tmp_path / "any.dcm").score == 0.25 and d.restarts == 1
    finally:
        d.close()


GOOD_WITH = 'GOOD'.join(['{"kind": "score", "id": RID, "score": ', '}'])


@pytest.mark.parametrize("reply", [
    "huge",                                                   # over MAX_REPLY_BYTES
    "not json at all",
    '{"kind": "score", "id": RID, "score": {"score": NaN}}',    # NaN is no verdict
    '["score", RID]',                                         # not an object
    GOOD_WITH.replace('"id": RID', '"id": 999'),               # a reply to another request
    GOOD_WITH.replace('}', ', "extra": 1}', 1),                # unknown key in the envelope
    GOOD_WITH.replace("GOOD", '{"score": "0.1"}'),             # a string for a number
    '{"kind": "error", "id": RID, "reason": "ok\\nforged audit line", "message": "x"}',
])
def test_a_reply_that_is_not_a_valid_score_is_a_protocol_error(fake_child, reply: str,
                                                               tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fake_child(reply)
    d = ProcessDetector(None, timeout_s=10)
    try:
        t0 = time.monotonic()
        with pytest.raises(ScoringProcessError) as ei:
            d.score_path(tmp_path / "any.dcm")
        assert ei.value.reason == "detector-protocol-error", str(ei.value)
        assert time.monotonic() - t0 < 5 and d.pid is None  # killed at once, not timed out
    finally:
        d.close()


@pytest.mark.parametrize("field,value", [
    ("score", 1e400), ("p_cnn", None), ("flagged", 1), ("frames", 0), ("worst_frame", 1),
    ("frame_scores", [0.9]), ("bundle_id", "another-bundle"), ("threshold", 0.7),
    ("timings_ms", {"total": "1"}), ("grid_peaks", "x"), ("flagged", True),
    ("p_rf", 10 ** 400), ("p_rf", "1e999"),  # too large for a float; infinity as JSON text
    ("line_gate", 2.0), ("line_peak", 3.0),  # a line gate nobody asked for; a peak without one
    # the CNN gate is the parent's to apply; a peak below the worst frame's CNN, or above 1
    ("cnn_gate", 0.5), ("cnn_peak", 0.1), ("cnn_peak", 1.5), ("cnn_peak", None),
    ("line_ramp", 2.0),  # and so is the line ramp
])
def test_each_score_field_is_checked(fake_child, field: str, value: object,
                                     tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = {"score": 0.25, "p_cnn": 0.2, "p_rf": 0.3, "threshold": 0.5, "flagged": False,
            "frames": 1, "worst_frame": 0, "bundle_id": "fake-bundle",
            "timings_ms": {"total": 1.0}, "frame_scores": [0.25], "grid_peaks": None,
            "line_peak": None, "line_gate": None, "cnn_peak": 0.2, "cnn_gate": None,
            "line_ramp": None}
    good[field] = value
    text = json.dumps({"kind": "score", "id": 0, "score": good}).replace('"id": 0', '"id": RID')
    fake_child(text.replace('"1e999"', "1e999"))
    d = ProcessDetector(None, timeout_s=10)
    try:
        with pytest.raises(ScoringProcessError) as ei:
            d.score_path(tmp_path / "any.dcm")
        assert ei.value.reason == "detector-protocol-error", str(ei.value)
    finally:
        d.close()


def test_a_child_that_dies_at_start_is_not_called_a_bundle_problem(fake_child) -> None:  # type: ignore[no-untyped-def]
    fake_child("exit-at-start")
    with pytest.raises(ScoringStartError) as ei:
        ProcessDetector(None, timeout_s=10)
    assert not isinstance(ei.value, BundleError)
    assert "could not start" in str(ei.value) and "exited with code 3" in str(ei.value)

