"""Regenerate the reliability figures of issue 5 by running the fault, fuzz, load and TLS tests.

Why through pytest: the proofs live in the test suite (tests/test_fault_*.py, test_fuzz.py,
test_load.py, test_tls.py, ...); this script runs the same scenarios with their counts and
collects the figures each test records, so the README's numbers and CI's assertions come from
one implementation. CI runs the short versions (``-m "not slow"``); ``--full`` runs the issue's
counts (20 kill/restart cycles over 2,000 instances, a 1,000-instance outage, 100,000 fuzz
executions, 8 associations x 500 instances), which take tens of minutes on a 2-core machine.

    .venv/bin/python bench/reliability.py            # CI counts, a few minutes
    .venv/bin/python bench/reliability.py --full     # the issue's counts
    .venv/bin/python bench/reliability.py --full --only fuzz --fuzz-examples 200000

Figures land in ``--out`` (default ``runs/reliability/reliability.json``, git-ignored) and
are printed as a table.

The small helpers at the top (``record_figures``, ``counting_orthanc``, ``orthanc_store_counts``)
are imported by those tests; they must stay light (no model, no TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES_ENV = "SENTINEL_FIGURES"  # directory where tests drop <name>.json figure files

# test file and the scenario names it records, in report order
SUITES: dict[str, str] = {
    "crash": "tests/test_fault_crash.py",
    "outage": "tests/test_fault_outage.py",
    "disk": "tests/test_fault_disk.py",
    "fuzz": "tests/test_fuzz.py",
    "hostile": "tests/test_hostile_input.py",
    "load": "tests/test_load.py",
    "tls": "tests/test_tls.py",
    "tamper": "tests/test_tamper.py",
    "phi": "tests/test_no_phi.py",
}

# environment overrides the slow (full-count) tests read; --flags below set them
COUNT_ENV = {
    "cycles": "SENTINEL_CRASH_CYCLES",
    "instances": "SENTINEL_CRASH_INSTANCES",
    "outage_instances": "SENTINEL_OUTAGE_INSTANCES",
    "fuzz_examples": "SENTINEL_FUZZ_EXAMPLES",
    "load_per_association": "SENTINEL_LOAD_PER_ASSOCIATION",
}


def env_count(name: str, default: int) -> int:
    """A count for a slow test, overridable from bench/reliability.py's flags."""
    value = os.environ.get(COUNT_ENV.get(name, name), "")
    return int(value) if value.strip().isdigit() else default


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Write one scenario's measured figures where bench/reliability.py collects them.

    Without ``SENTINEL_FIGURES`` set (a plain pytest run) this does nothing.
    """
    out = os.environ.get(FIGURES_ENV)
    if not out:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(figures, indent=1, sort_keys=True, default=str))


LUA_COUNTER = """
-- Called by Orthanc for every instance received over DICOM, duplicates included: the count
-- of deliveries that Orthanc's own index (one entry per SOP Instance UID) cannot show.
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{path}", "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  return true
end
"""


def counting_orthanc(workdir: Path, modalities: dict[str, tuple[str, int]],
                     extra: dict[str, Any] | None = None) -> Any:
    """An OrthancServer (tests/orthanc.py) that logs every C-STORE it receives to a file.

    Why: Orthanc keeps one instance per SOP Instance UID, so a second delivery of the same
    instance never shows in its REST API; the Lua hook counts deliveries themselves.
    ``extra`` is merged into Orthanc's JSON configuration (e.g. its TLS settings).
    """
    from tests.orthanc import OrthancServer

    server = OrthancServer(workdir, modalities)
    lua = workdir / "count-stores.lua"
    lua.write_text(LUA_COUNTER.format(path=workdir / "stores.txt"))
    config = json.loads(server.config_path.read_text())
    config["LuaScripts"] = [str(lua)]
    config.update(extra or {})
    server.config_path.write_text(json.dumps(config, indent=1))
    return server


def orthanc_store_counts(server: Any) -> Counter[str]:
    """SOP Instance UID -> number of C-STOREs Orthanc received for it (counting_orthanc)."""
    path = Path(server.workdir) / "stores.txt"
    if not path.exists():
        return Counter()
    return Counter(line.strip() for line in path.read_text().splitlines() if line.strip())


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a running process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


# ---------------------------------------------------------------------------------------------


def _run_suites(names: list[str], full: bool, figures_dir: Path, env_extra: dict[str, str],
                pytest_args: list[str]) -> dict[str, str]:
    """One pytest session over the chosen files (the fixture bundle is built once); returns
    each test's outcome from pytest's JUnit XML."""
    env = dict(os.environ)
    env[FIGURES_ENV] = str(figures_dir)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.update(env_extra)
    junit = figures_dir / "junit.xml"
    marker = "slow" if full else "not slow"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
           f"--junitxml={junit}", *[SUITES[n] for n in names], *pytest_args]
    print("==", " ".join(cmd[2:]), flush=True)
    t0 = time.monotonic()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    print(f"== exit {code} in {time.monotonic() - t0:.0f}s", flush=True)
    outcomes: dict[str, str] = {}
    if junit.exists():
        import xml.etree.ElementTree as ET

        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[name] = kinds[0] if kinds else "passed"
    outcomes["_exit"] = str(code)
    outcomes["_seconds"] = f"{time.monotonic() - t0:.0f}"
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="run the issue's full counts (the tests marked slow)")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES),
                        help="run these scenarios only")
    parser.add_argument("--out", type=Path,
                        default=REPO / "runs" / "reliability" / "reliability.json")
    for key in COUNT_ENV:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"override the full run's {key.replace('_', ' ')}")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)
    env_extra = {COUNT_ENV[k]: str(getattr(args, k)) for k in COUNT_ENV
                 if getattr(args, k) is not None}
    figures_dir = args.out.parent / ("figures-full" if args.full else "figures-ci")
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.json"):
        old.unlink()
    outcomes = _run_suites(args.only, args.full, figures_dir, env_extra, args.pytest_args)
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(figures_dir.glob("*.json"))}
    report = {"full": args.full, "tests": outcomes, "figures": figures,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True))
    print()
    for name, figs in figures.items():
        print(f"{name}:")
        for k, v in sorted(figs.items()):
            print(f"  {k:32s} {v}")
    bad = {k: v for k, v in outcomes.items() if not k.startswith("_") and v != "passed"}
    for k, v in sorted(bad.items()):
        print(f"  {v:8s} {k}")
    print(f"\nwritten {args.out}")
    return int(outcomes["_exit"])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
