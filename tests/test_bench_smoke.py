"""Each gateway benchmark runs end to end in its tiny mode and prints its ratio lines.

Why in CI: the benchmark scripts start real servers (Orthanc, the gateway, storescu) and parse
the gateway's audit log; a change in any of those breaks them silently unless they run. The
tiny modes take seconds and prove the whole path, not the figures (those are in
bench/RESULTS.md, measured on full sets).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dcmtk import require_dcmtk
from tests.orthanc import require_orthanc

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

CASES = {
    "bench.throughput": [
        r"ratio throughput gateway/router 512x512, 1 sender\(s\): \d+\.\d+ \[.*\] n=1",
        r"ratio throughput gateway/direct 512x512, 1 sender\(s\) \(information\): "
        r"\d+\.\d+ \[.*\] n=1"],
    "bench.ingest": [r"ratio ingest gateway/discard 512x512: \d+\.\d+ \[.*\] n=1",
                     r"ratio receive-only gateway/discard 512x512 .*: \d+\.\d+ \[.*\] n=1"],
    "bench.latency": [r"ratio added-latency p50 / direct C-STORE p50 512x512: \d+\.\d+",
                      r"target added p50 <= 50 ms: (met|MISSED) \(median \d+\.\d+ ms\)"],
    "bench.forward_ceiling": [r"ratio pynetdicom/storescu 512x512: \d+\.\d+ \[.*\] n=1"],
    "bench.scaling": [r"ratio scaling k=2 gateway/direct 512x512: \d+\.\d+",
                      r"ratio scaling matrix 512 gateway/direct: \d+\.\d+"],
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_bench_script_tiny(module: str, tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", module, "--tiny", "--bundle", str(fixture_bundle),
         "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for pattern in CASES[module]:
        assert re.search(pattern, r.stdout), f"{module}: no line matching {pattern!r}\n{r.stdout}"
    # every run records where it ran and under which load
    assert re.search(r"^loadavg_start: [\d.]+ [\d.]+ [\d.]+$", r.stdout, re.M)
    assert re.search(r"^orthanc: .*Orthanc", r.stdout, re.M)


def test_throughput_with_an_association_per_study(tmp_path: Path, fixture_bundle: Path) -> None:
    """bench.throughput --per-association 2: the 6 tiny instances go as three associations of
    two on every path (a modality's association per study), and the ratio lines say so."""
    require_dcmtk()
    require_orthanc()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--tiny", "--per-association", "2",
         "--bundle", str(fixture_bundle), "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"ratio throughput gateway/router 512x512, 1 sender\(s\), 2 per "
                     r"association: \d+\.\d+ \[.*\] n=1", r.stdout), r.stdout


def test_send_studies_opens_an_association_per_study(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.common.send_studies: each sender's share goes in consecutive associations of N
    instances, in order (one storescu each); None keeps one association per share."""
    sys.path.insert(0, str(REPO))
    from bench import common

    calls: list[tuple[int, list[list[str]]]] = []
    monkeypatch.setattr(common, "send_parallel", lambda port, shares, called, timeout=900:
                        calls.append((port, [[p.name for p in s] for s in shares])) or 0.0)
    files = [Path(f"i{i}.dcm") for i in range(5)]
    common.send_studies(104, [files], "SENTINEL", per_association=2)
    assert calls == [(104, [["i0.dcm", "i1.dcm"]]), (104, [["i2.dcm", "i3.dcm"]]),
                     (104, [["i4.dcm"]])]
    calls.clear()
    common.send_studies(104, common.split(files, 2), "SENTINEL", per_association=None)
    assert calls == [(104, [["i0.dcm", "i1.dcm"], ["i2.dcm", "i3.dcm", "i4.dcm"]])]
    with pytest.raises(ValueError, match="per_association"):
        common.send_studies(104, [files], "SENTINEL", per_association=0)


def test_detector_latency_script_writes_every_stage(tmp_path: Path, fixture_bundle: Path) -> None:
    """bench/detector_latency.py on the fixture bundle at its smallest allowed run: the runtime
    stages, the naive path on the same models and the ratios all come out (figures: RESULTS)."""
    pytest.importorskip("tensorflow")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    out = tmp_path / "latency.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.detector_latency", "--bundle", str(fixture_bundle),
         "--repeats", "200", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("ours", "naive", "forest200"):
        assert key in res, f"no {key!r} in {sorted(res)}"
    assert re.search(r"paper ensemble 2\.74 ms / ours \d+\.\d+ ms", r.stdout)
    assert re.search(r"naive \d+\.\d+ ms / ours \d+\.\d+ ms = \d+\.\dx", r.stdout)


def test_resize_script_old_and_new_side_by_side() -> None:
    """bench/resize.py at its smallest run: both sizes timed old against new (resize alone and
    the whole score_path), and the scores of the two implementations within 1e-6."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "bench.resize", "--repeats", "20", "--nih", "3", "--big", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for size in ("512x512 uint8", "2500x2048 uint16"):
        lines = re.findall(rf"^  {size} +old +\d+\.\d+ ms +new +\d+\.\d+ ms +ratio old/new +"
                           r"\d+\.\d+ .*$", r.stdout, re.M)
        assert len(lines) == 2, f"{size}: resize and score lines expected\n{r.stdout}"
    diffs = re.findall(r"max \|score old - score new\| (\S+)", r.stdout)
    assert diffs and all(float(d) <= 1e-6 for d in diffs), r.stdout
