"""Ingest: how fast the gateway acknowledges instances (spooled with fsync) against a
pynetdicom SCP that discards them, side by side in one run.

Why this baseline: both are pynetdicom on the same sockets settings, so the ratio is the price
of the gateway's own receive path (stream to spool/tmp, xattr, fsync, rename, directory fsync,
hand-off) while screening and forwarding run beside it on the same two cores, as in service.
The gateway here is the full daemon (screening on, forwarding to a fresh Orthanc); the rate is
instances over the time until storescu exits (every C-STORE answered).

Each repeat also sends the set to a gateway that only receives (rule ``pass``, its destination
down, so nothing is screened or forwarded): the ceiling of the ingest ratio, which tells the
receive path's own cost apart from the competition with screening and forwarding.

    .venv/bin/python -m bench.ingest
    .venv/bin/python -m bench.ingest --tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import (
    Send,
    bundle_dir,
    issue_sets,
    loadavg,
    print_header,
    ratio_line,
    send_discard,
    send_receive_only,
    send_via_gateway,
    summarize,
    warm_set,
    workdir,
)

TARGET = 0.80


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n512", type=int, default=500)
    p.add_argument("--nlarge", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="smoke mode: 6 x 512x512, one repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.n512, args.nlarge, args.repeats = 6, 0, 1
    print_header("ingest: gateway acknowledgements vs a discard-only pynetdicom SCP",
                 ["bench.ingest", *argv])
    bundle, which = bundle_dir(args.cache, args.bundle)
    print(f"bundle: {which}; gateway workers: {args.workers}")
    with workdir() as work:
        for label, rows, cols, files in issue_sets(args.cache, args.n512, args.nlarge):
            warm = [] if args.tiny else warm_set(args.cache, rows, cols)
            base: list[Send] = []
            via: list[Send] = []
            alone: list[Send] = []
            for r in range(args.repeats):
                base.append(send_discard(files))
                via.append(send_via_gateway(work / "g", files, bundle, workers=args.workers,
                                            warm=warm))
                alone.append(send_receive_only(work / "r", files, bundle, warm=warm))
                print(f"  repeat {r + 1}: discard {base[-1].ack_rate:.1f}/s, gateway ack "
                      f"{via[-1].ack_rate:.1f}/s, receive-only ack {alone[-1].ack_rate:.1f}/s, "
                      f"load {loadavg()}", flush=True)
            print(f"\n## {label}: {len(files)} instances")
            print(f"discard-only SCP inst/s {summarize([s.ack_rate for s in base]).fmt()}"
                  f"  peak RSS MB {summarize([s.rss_mb for s in base]).fmt(0)}")
            print(f"gateway ack      inst/s {summarize([s.ack_rate for s in via]).fmt()}"
                  f"  peak RSS MB {summarize([s.rss_mb for s in via]).fmt(0)}")
            print("CPU ms per instance: discard SCP "
                  f"{summarize([s.extra['discard_cpu_ms'] for s in base]).fmt()}, gateway "
                  f"(receive+screen+forward) "
                  f"{summarize([s.extra['gateway_cpu_ms'] for s in via]).fmt()}")
            ratios = [v.ack_rate / b.ack_rate for b, v in zip(base, via, strict=True)]
            print(ratio_line(f"ingest gateway/discard {label}", ratios, TARGET), flush=True)
            print(f"receive-only ack inst/s {summarize([s.ack_rate for s in alone]).fmt()}"
                  f"  CPU ms per instance "
                  f"{summarize([s.extra['gateway_cpu_ms'] for s in alone]).fmt()}")
            print(ratio_line(f"receive-only gateway/discard {label} (not a target: the ceiling "
                             "of the row above)",
                             [a.ack_rate / b.ack_rate for b, a in zip(base, alone, strict=True)]),
                  flush=True)
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
