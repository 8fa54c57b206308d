"""Throughput: storescu straight into Orthanc, through Orthanc as a router, and through the gateway.

Why side by side: on a shared 2-core machine absolute rates move with the neighbours' load, so
each repeat sends the same files directly, through an Orthanc that routes every instance to a
fresh Orthanc (its Lua OnStoredInstance hook: SendToModality, then Delete; no screening: the
router a site would otherwise run) and through the gateway (screening every instance,
forwarding to a fresh Orthanc), alternating. The figures that count are the ratios per repeat
(median and min..max over the repeats): gateway/router, the fair anchor, and gateway/direct,
information only (sender, gateway and PACS share the same two cores).

Direct: until storescu exits (Orthanc acknowledges each C-STORE after storing it).
Router and gateway: from the start of storescu until the PACS holds every instance (its
instance count, polled every 0.1 s); the gateway's last 'forwarded' audit line is printed too.

    .venv/bin/python -m bench.throughput                 # 500 x 512x512 and 100 x 2048x2500
    .venv/bin/python -m bench.throughput --tiny          # seconds; what CI runs
    .venv/bin/python -m bench.throughput --n512 200 --nlarge 0 --per-association 2
                                                         # a new association every study
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
    send_direct,
    send_via_gateway,
    send_via_orthanc_router,
    summarize,
    warm_set,
    workdir,
)

TARGETS = {"512x512": 0.90, "2048x2500": 0.80}  # gateway/direct: kept as information
ROUTER_TARGET = 1.0  # issue 18: screened throughput at least the router's


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n512", type=int, default=500, help="instances of 512x512 (0: skip)")
    p.add_argument("--nlarge", type=int, default=100, help="instances of 2048x2500 (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="gateway screening workers")
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"),
                   help="where the generated DICOM sets and the fixture bundle are kept")
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--isolation", nargs="+", choices=("process", "thread"), default=["process"],
                   help="gateway screening isolation; two values measure both, side by side "
                   "in every repeat")
    p.add_argument("--associations", nargs="+", type=int, default=[2],
                   help="the gateway's forwarding associations to Orthanc (destination "
                   "setting `associations`, product default 2); several values measure each, "
                   "side by side")
    p.add_argument("--nice", nargs="+", type=int, default=[10],
                   help="niceness of the gateway's scoring processes ([detector] nice, default "
                   "10); several values measure each, side by side")
    p.add_argument("--backlog-mb", nargs="+", type=float, default=[16.0],
                   help="the destination's extra_association_backlog_mb (product default 16: "
                   "a second association sends only while that much waits; 0: always); "
                   "several values measure each, side by side")
    p.add_argument("--senders", nargs="+", type=int, default=[1],
                   help="concurrent storescu associations (the set split among them); "
                   "several values measure each")
    p.add_argument("--per-association", nargs="+", type=int, default=[0], metavar="N",
                   help="instances per association: 0 (default) sends each sender's share in "
                   "one association; N opens a new one every N instances, as a modality opens "
                   "one per study (2: a chest PA and lateral); several values measure each")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode: 6 x 512x512 only, one repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.n512, args.nlarge, args.repeats = 6, 0, 1
    return args


def variant_name(variant: tuple[str, int, int, float]) -> str:
    iso, k, nice, backlog = variant
    return (f"{iso} isolation, {k} forwarding association{'s' if k > 1 else ''}"
            + (f" (extra ones from a {backlog:g} MB backlog)" if k > 1 else "")
            + (f", scorers at nice {nice}" if iso == "process" else ""))


def report(label: str, direct: list[Send], via: list[Send], target: float | None,
           router: list[Send] | None = None) -> None:
    print(f"\n## {label}: {direct[0].n} instances, {direct[0].megabytes:.1f} MB per set")
    print(f"direct  inst/s {summarize([s.rate for s in direct]).fmt()}"
          f"  MB/s {summarize([s.mb_rate for s in direct]).fmt()}")
    if router:
        print(f"router  inst/s {summarize([s.rate for s in router]).fmt()}"
              f"  MB/s {summarize([s.mb_rate for s in router]).fmt()}"
              f"  (CPU ms per instance: router Orthanc "
              f"{summarize([s.extra['router_cpu_ms'] for s in router]).fmt()}, PACS "
              f"{summarize([s.extra['orthanc_cpu_ms'] for s in router]).fmt()})")
    print(f"gateway inst/s {summarize([s.rate for s in via]).fmt()}"
          f"  MB/s {summarize([s.mb_rate for s in via]).fmt()}"
          f"  (acknowledged: inst/s {summarize([s.ack_rate for s in via]).fmt()})")
    print(f"gateway peak RSS MB {summarize([s.rss_mb for s in via]).fmt(0)}")
    print("CPU ms per instance: Orthanc direct "
          f"{summarize([s.extra['orthanc_cpu_ms'] for s in direct]).fmt()}; via gateway: "
          f"gateway {summarize([s.extra['gateway_cpu_ms'] for s in via]).fmt()}, Orthanc "
          f"{summarize([s.extra['orthanc_cpu_ms'] for s in via]).fmt()}")
    if router:
        ratios = [v.rate / r.rate for r, v in zip(router, via, strict=True)]
        print(ratio_line(f"throughput gateway/router {label}", ratios, ROUTER_TARGET))
    ratios = [v.rate / d.rate for d, v in zip(direct, via, strict=True)]
    print(ratio_line(f"throughput gateway/direct {label} (information)", ratios, target))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print_header("throughput: storescu into Orthanc, an Orthanc router, and the gateway",
                 ["bench.throughput", *(sys.argv[1:] if argv is None else argv)])
    bundle, which = bundle_dir(args.cache, args.bundle)
    print(f"bundle: {which}; gateway workers: {args.workers}")
    with workdir() as work:
        for label, rows, cols, files in issue_sets(args.cache, args.n512, args.nlarge):
            warm = [] if args.tiny else warm_set(args.cache, rows, cols)
            variants = [(iso, k, nice, b) for iso in args.isolation for k in args.associations
                        for nice in args.nice for b in args.backlog_mb]
            for senders, per_assoc in [(k, n) for k in args.senders
                                       for n in args.per_association]:
                per = per_assoc or None
                shape = f"{senders} sender(s)" + (f", {per} per association" if per else "")
                direct: list[Send] = []
                router: list[Send] = []
                via: dict[tuple[str, int, int, float], list[Send]] = {v: [] for v in variants}
                for r in range(args.repeats):
                    direct.append(send_direct(work / "d", files, k=senders, warm=warm,
                                              per_association=per))
                    router.append(send_via_orthanc_router(work / "r", files, k=senders,
                                                          warm=warm, per_association=per))
                    for v in variants:
                        iso, k, nice, backlog = v
                        via[v].append(send_via_gateway(work / "g", files, bundle, k=senders,
                                                       workers=args.workers, warm=warm,
                                                       isolation=iso, associations=k,
                                                       nice=nice, backlog_mb=backlog,
                                                       per_association=per))
                        g = via[v][-1]
                        print(f"  repeat {r + 1}, {shape}: direct "
                              f"{direct[-1].rate:.1f}/s, Orthanc router {router[-1].rate:.1f}/s,"
                              f" gateway ({variant_name(v)}) "
                              f"{g.rate:.1f}/s (all acked at {g.ack_s:.1f} s, all scored at "
                              f"{g.extra['last_scored_s']:.1f} s, all in Orthanc at "
                              f"{g.done_s:.1f} s, last 'forwarded' audit line at "
                              f"{g.extra['audit_done_s']:.1f} s), load {loadavg()}", flush=True)
                for v in variants:
                    tag = f" ({variant_name(v)})" if len(variants) > 1 else ""
                    report(f"{label}, {shape}{tag}", direct, via[v],
                           TARGETS[label], router)
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
