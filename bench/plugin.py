"""The plugin form's cost: storescu into plain Orthanc against Orthanc with the sentinel plugin.

  .venv/bin/python -m bench.plugin [--n512 100] [--nlarge 0] [--repeats 3] [--senders 1]

Same files, same run, alternating which goes first in each repeat; each send into a fresh
Orthanc (own storage, TCP_NODELAY=1) after a few untimed warm instances. The plugin screens
every instance with the shipped bundle in its scoring child (``shadow = true``, so a flagged
synthetic image is still stored and every send ends with all instances in Orthanc at the full
scoring cost; the audit's ``scored`` lines are counted to prove each was screened). With
``--empty-filter`` a third Orthanc loads the Python plugin with a filter that only copies each
instance out (``GetInstanceData``) and stores it: what the plugin mechanism costs before any
screening. Prints instances/s per repeat, CPU ms per instance of Orthanc (plus its scoring
child), and the ratio plugin/plain with the issue's targets (18: >= 0.7 for 512x512, >= 0.8
for 2048x2500).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    MODALITY_AE,
    ORTHANC_AE,
    SCREEN_ALL,
    Send,
    bundle_dir,
    issue_sets,
    loadavg,
    megabytes,
    print_header,
    ratio_line,
    send_direct,
    send_parallel,
    split,
    summarize,
    tree_cpu_s,
    warm_set,
    workdir,
)
from tests.orthanc import OrthancServer, plugin_toml, sentinel_plugin_orthanc

TARGETS = {"512x512": 0.7, "2048x2500": 0.8}
EMPTY_FILTER = """import orthanc

def keep(instance):
    instance.GetInstanceData()  # the copy the sentinel plugin makes too
    return 0

orthanc.RegisterIncomingCStoreInstanceFilter(keep)
"""


def _timed(pacs: OrthancServer, files: Sequence[Path], k: int,
           warm: Sequence[Path]) -> tuple[float, float, int]:
    """Start ``pacs``, send ``warm`` untimed then ``files`` timed (k associations); return
    (wall s, CPU s of Orthanc and its children, instances of ``files`` stored). The storage is
    thrown away after, so Orthanc is killed rather than stopped."""
    pacs.start(timeout=120)
    try:
        assert pacs.proc is not None
        if warm:
            send_parallel(pacs.dicom_port, [warm], ORTHANC_AE)
        c0 = tree_cpu_s(pacs.proc.pid)
        wall = send_parallel(pacs.dicom_port, split(files, k), ORTHANC_AE)
        cpu = tree_cpu_s(pacs.proc.pid) - c0
        got = pacs.wait_for_count(len(files) + len(warm), timeout=60) - len(warm)
    finally:
        if pacs.proc is not None and pacs.proc.poll() is None:
            pacs.proc.kill()
            pacs.proc.wait(30)
        pacs.stop()
    return wall, cpu, got


def _fresh(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def send_via_empty_filter(root: Path, files: Sequence[Path], k: int = 1,
                          warm: Sequence[Path] = ()) -> Send:
    """storescu into a fresh Orthanc whose Python plugin filter stores every instance."""
    script = _fresh(root) / "empty_filter.py"
    script.write_text(EMPTY_FILTER)
    pacs = OrthancServer(root / "orthanc", {"modality": (MODALITY_AE, 104)},
                         python_script=script)
    try:
        wall, cpu, got = _timed(pacs, files, k, warm)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if got != len(files):
        raise RuntimeError(f"Orthanc+empty filter holds {got} of {len(files)} instances")
    return Send(len(files), megabytes(files), wall, wall,
                extra={"orthanc_cpu_ms": 1000.0 * cpu / len(files)})


def send_via_plugin(root: Path, files: Sequence[Path], bundle: Path, k: int = 1,
                    warm: Sequence[Path] = ()) -> Send:
    """storescu (k associations) into a fresh Orthanc that screens with the sentinel plugin."""
    toml = _fresh(root) / "sentinel.toml"
    pacs = sentinel_plugin_orthanc(root / "orthanc", toml, {"modality": (MODALITY_AE, 104)})
    plugin_toml(toml, state=root / "state", bundle=bundle, url=pacs.base_url,
                default=SCREEN_ALL)
    try:
        wall, cpu, got = _timed(pacs, files, k, warm)
        audit = (root / "state" / "audit" / "audit.jsonl").read_text().splitlines()
        scored = sum(json.loads(line)["event"] == "scored" for line in audit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if got != len(files) or scored != len(files) + len(warm):
        raise RuntimeError(f"Orthanc+plugin holds {got} of {len(files)} instances, "
                           f"{scored} scored of {len(files) + len(warm)}")
    return Send(len(files), megabytes(files), wall, wall,
                extra={"orthanc_cpu_ms": 1000.0 * cpu / len(files)})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.plugin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n512", type=int, default=100, help="512x512 instances (default 100)")
    p.add_argument("--nlarge", type=int, default=0, help="2048x2500 instances (default 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--senders", type=int, default=1, help="concurrent storescu associations")
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"),
                   help="where the image sets are kept between runs")
    p.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    p.add_argument("--empty-filter", action="store_true",
                   help="also Orthanc with a Python filter that stores everything")
    p.add_argument("--tiny", action="store_true",
                   help="3 instances, one repeat, with the empty filter: proves the path (CI)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n512, args.nlarge, args.repeats, args.empty_filter = 3, 0, 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print_header("plugin: storescu into plain Orthanc and into Orthanc with the sentinel plugin",
                 ["bench.plugin", *(sys.argv[1:] if argv is None else argv)])
    bundle, which = bundle_dir(args.cache, args.bundle)
    print(f"bundle: {which}; {args.senders} sender(s)")
    with workdir() as work:
        for label, rows, cols, files in issue_sets(args.cache, args.n512, args.nlarge):
            warm = [] if args.tiny else warm_set(args.cache, rows, cols)
            plain: list[Send] = []
            plugin: list[Send] = []
            empty: list[Send] = []
            for r in range(args.repeats):
                order = ["plain", "plugin"] if r % 2 == 0 else ["plugin", "plain"]
                if args.empty_filter:
                    order.insert(1, "empty")
                for which_one in order:
                    if which_one == "plain":
                        plain.append(send_direct(work / "p", files, k=args.senders, warm=warm))
                    elif which_one == "empty":
                        empty.append(send_via_empty_filter(work / "e", files, k=args.senders,
                                                           warm=warm))
                    else:
                        plugin.append(send_via_plugin(work / "s", files, bundle,
                                                      k=args.senders, warm=warm))
                middle = (f", empty filter {empty[-1].rate:.1f}/s "
                          f"({empty[-1].extra['orthanc_cpu_ms']:.1f} ms)" if empty else "")
                print(f"  repeat {r + 1} (order {', '.join(order)}): plain "
                      f"{plain[-1].rate:.1f}/s ({plain[-1].extra['orthanc_cpu_ms']:.1f} ms CPU "
                      f"per instance){middle}, with plugin {plugin[-1].rate:.1f}/s "
                      f"({plugin[-1].extra['orthanc_cpu_ms']:.1f} ms CPU per instance, Orthanc "
                      f"+ scoring child), load {loadavg()}", flush=True)
            print(f"{label} x{len(files)}: plain Orthanc "
                  f"{summarize([s.rate for s in plain]).fmt()} /s, with plugin "
                  f"{summarize([s.rate for s in plugin]).fmt()} /s")
            ratios = [s.rate / p.rate for p, s in zip(plain, plugin, strict=True)]
            print(ratio_line(f"throughput plugin/plain {label}", ratios, TARGETS[label]))
            if empty:
                ratios = [s.rate / p.rate for p, s in zip(plain, empty, strict=True)]
                print(ratio_line(f"throughput empty-filter/plain {label} (information)",
                                 ratios))
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
