"""Detector latency under the shipped unit's hardening against outside it, side by side.

Issue 20: under the unit LiteRT logged "Error in cpuinfo: failed to parse processor information
from /proc/cpuinfo" (``ProcSubset=pid`` hides it), and XNNPACK, which needs it, was not used.
This boots systemd in a private namespace (``tests/systemd_ns.py``; root, Debian's systemd),
makes a one-shot service out of the shipped unit's ``[Service]`` hardening lines (User=,
Protect*, ProcSubset=, SystemCallFilter=, ...: everything but how it starts and restarts) that
times the default bundle's CNN and whole ``score_unit`` on one 224x224 radiograph, and runs the
same script outside the unit (root, no hardening), alternating, ``--rounds`` times each. Both
use the real-systemd test's venv (Debian's /usr/bin/python3). ``--set KEY=VALUE`` overrides one
unit setting, e.g. ``--set ProcSubset=pid`` for the unit as it was.

    .venv/bin/python bench/unit_cnn_latency.py
    .venv/bin/python bench/unit_cnn_latency.py --set ProcSubset=pid
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.systemd_ns import SystemdNamespace, skip_unless_possible  # noqa: E402
from tests.test_systemd_real import INSTALL, UNIT, service_venv  # noqa: E402

WORK = "/run/unit-bench"
PAYLOAD = r'''
import json, sys, time
import numpy as np
from detector.preprocess import preprocess_path
from detector.scoring import Detector

det = Detector.load(None, num_threads=1)
img = preprocess_path(sys.argv[1])[0]
repeats = int(sys.argv[2])

def median_ms(fn):
    for _ in range(30):
        fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns(); fn(); t.append(time.perf_counter_ns() - t0)
    return float(np.median(t)) / 1e6

print("RESULT " + json.dumps({"cnn_ms": median_ms(lambda: det.cnn.predict(img)),
                              "score_unit_ms": median_ms(lambda: det.score_unit(img))}),
      flush=True)
'''
# [Service] settings about starting, not confinement: replaced by a one-shot start
NOT_HARDENING = re.compile(r"(Type|NotifyAccess|Exec\w*|Watchdog\w*|Timeout\w*|KillMode|"
                           r"Restart\w*|StateDirectory\w*|ConfigurationDirectory\w*)=")


def bench_unit(overrides: dict[str, str], repeats: int) -> str:
    """A one-shot service with the shipped unit's hardening that runs the payload."""
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    lines = [ln for ln in service.splitlines()
             if ln.strip() and not ln.startswith("#") and not NOT_HARDENING.match(ln)]
    for key, value in overrides.items():
        assert any(ln.startswith(f"{key}=") for ln in lines), f"the unit has no {key}="
        lines = [ln for ln in lines if not ln.startswith(f"{key}=")] + [f"{key}={value}"]
    return "\n".join([
        "[Service]", "Type=oneshot",
        f"ExecStart={INSTALL}/bin/python {WORK}/payload.py {WORK}/image.png {repeats}",
        *lines, ""])


def result_of(text: str) -> dict[str, float]:
    found = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    assert found, text[-2000:]
    return json.loads(found[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one unit setting (e.g. ProcSubset=pid)")
    args = ap.parse_args()
    overrides = dict(s.split("=", 1) for s in args.set)
    try:
        skip_unless_possible()
    except BaseException as exc:  # pytest's Skipped
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    data = Path(os.environ.get("SENTINEL_DATA", REPO.parent / "shared" / "data"))
    image = sorted((data / "nih_cxr14_1000" / "img512").rglob("*.png"))[0]
    venv = service_venv()
    outside: list[dict[str, float]] = []
    inside: list[dict[str, float]] = []
    cpuinfo_errors = 0
    with tempfile.TemporaryDirectory() as tmp, \
            SystemdNamespace(Path(tmp) / "boot.log", binds={INSTALL: venv}) as ns:
        work = ns.path(WORK)
        work.mkdir(mode=0o755)
        (work / "payload.py").write_text(PAYLOAD)
        shutil.copy(image, work / "image.png")
        for f in work.iterdir():
            f.chmod(0o644)
        sysusers = ns.path("/etc/sysusers.d")  # the unit's account, as the README makes it
        sysusers.mkdir(exist_ok=True)
        shutil.copy(REPO / "systemd" / "xray-sentinel.sysusers.conf", sysusers / "xs.conf")
        ns.run(["systemd-sysusers", "/etc/sysusers.d/xs.conf"])
        ns.path("/etc/systemd/system/unit-bench.service").write_text(
            bench_unit(overrides, args.repeats))
        ns.systemctl("daemon-reload")
        for _ in range(args.rounds):
            r = subprocess.run([str(venv / "bin" / "python"), str(work / "payload.py"),
                                str(work / "image.png"), str(args.repeats)],
                               capture_output=True, text=True, check=True)
            outside.append(result_of(r.stdout))
            since = time.time() - 1
            started = ns.systemctl("start", "unit-bench", check=False)
            log = ns.journal("unit-bench", since)
            assert started.returncode == 0, f"unit-bench failed:\n{log[-3000:]}"
            cpuinfo_errors += log.count("Error in cpuinfo")
            inside.append(result_of(log))
    for name, runs in (("outside the unit", outside), ("under the unit", inside)):
        for key in ("cnn_ms", "score_unit_ms"):
            values = sorted(r[key] for r in runs)
            print(f"{name:17s} {key:14s} median of round medians {values[len(values) // 2]:.3f} "
                  f"ms  (rounds: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"'Error in cpuinfo' lines under the unit: {cpuinfo_errors}; overrides: "
          f"{overrides or 'none (the shipped unit)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
