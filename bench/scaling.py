"""Scaling: concurrent associations (1, 2, 4, 8) and the image matrix (512..3000 square).

Why both against the direct send: on two shared cores more associations can only help as far
as work overlaps (network wait, fsync wait, Orthanc's own storage), so each point is the
gateway (screening on, forwarding to Orthanc) beside storescu straight into Orthanc with the
same number of concurrent storescu processes, and the ratio is what scales or not. The
gateway's peak RSS (VmHWM) at each point answers the memory target (8 associations of
2048x2500 under 1 GB).

Concurrency: the set is split into k contiguous shares, one storescu (one association) each,
all started at once. Matrix: one association; cost per instance and per megapixel.

    .venv/bin/python -m bench.scaling
    .venv/bin/python -m bench.scaling --tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import (
    Send,
    bundle_dir,
    loadavg,
    make_set,
    print_header,
    ratio_line,
    send_direct,
    send_via_gateway,
    summarize,
    warm_set,
    workdir,
)

RSS_LIMIT_MB = 1024.0


def concurrency(work: Path, args: argparse.Namespace, bundle: Path, label: str, n: int,
                rows: int, cols: int) -> None:
    files = make_set(args.cache / f"set-{rows}x{cols}-{n}", n, rows, cols)
    warm = [] if args.tiny else warm_set(args.cache, rows, cols)
    print(f"\n## concurrency, {label}: {n} instances per send", flush=True)
    for k in args.assocs:
        direct: list[Send] = []
        via: list[Send] = []
        for _ in range(args.repeats):
            direct.append(send_direct(work / "d", files, k, warm=warm))
            via.append(send_via_gateway(work / "g", files, bundle, k, workers=args.workers,
                                        warm=warm))
        rss = summarize([s.rss_mb for s in via])
        print(f"k={k}: direct inst/s {summarize([s.rate for s in direct]).fmt()}; gateway inst/s "
              f"{summarize([s.rate for s in via]).fmt()} (ack "
              f"{summarize([s.ack_rate for s in via]).fmt()}); gateway peak RSS MB {rss.fmt(0)}"
              f"{'' if rss.hi < RSS_LIMIT_MB else '  OVER 1 GB'}; load {loadavg()}")
        print(ratio_line(f"scaling k={k} gateway/direct {label}",
                         [v.rate / d.rate for d, v in zip(direct, via, strict=True)]), flush=True)


def matrix(work: Path, args: argparse.Namespace, bundle: Path) -> None:
    print("\n## matrix (one association)", flush=True)
    for side in args.sides:
        n = max(args.min_n, round(args.matrix_mpix / (side * side / 1e6)))
        files = make_set(args.cache / f"set-{side}x{side}-{n}", n, side, side)
        warm = [] if args.tiny else warm_set(args.cache, side, side)
        direct: list[Send] = []
        via: list[Send] = []
        for _ in range(args.repeats):
            direct.append(send_direct(work / "d", files, warm=warm))
            via.append(send_via_gateway(work / "g", files, bundle, workers=args.workers,
                                        warm=warm))
        mpix = side * side / 1e6
        d_ms = [1000.0 / s.rate for s in direct]
        g_ms = [1000.0 / s.rate for s in via]
        print(f"{side}x{side} ({n} instances): ms/instance direct {summarize(d_ms).fmt()}, "
              f"gateway {summarize(g_ms).fmt()}; gateway ms/Mpixel "
              f"{summarize([x / mpix for x in g_ms]).fmt()}; extra ms/instance "
              f"{summarize([g - d for g, d in zip(g_ms, d_ms, strict=True)]).fmt()}; "
              f"peak RSS MB {summarize([s.rss_mb for s in via]).fmt(0)}; load {loadavg()}")
        print(ratio_line(f"scaling matrix {side} gateway/direct",
                         [v.rate / d.rate for d, v in zip(direct, via, strict=True)]), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assocs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--n512", type=int, default=200, help="512x512 set for the concurrency sweep")
    p.add_argument("--nlarge", type=int, default=48, help="2048x2500 set (memory target)")
    p.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 3000])
    p.add_argument("--matrix-mpix", type=float, default=100.0,
                   help="pixels per matrix send, in megapixels (sets n per side)")
    p.add_argument("--min-n", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode: k=2 on 4 x 512x512, matrix 512 only, one repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.assocs, args.n512, args.nlarge, args.repeats = [2], 4, 0, 1
        args.sides, args.matrix_mpix, args.min_n = [512], 1.0, 2
    print_header("scaling: concurrent associations and image matrix", ["bench.scaling", *argv])
    bundle, which = bundle_dir(args.cache, args.bundle)
    print(f"bundle: {which}; gateway workers: {args.workers}")
    with workdir() as work:
        if args.n512 > 0:
            concurrency(work, args, bundle, "512x512", args.n512, 512, 512)
        if args.nlarge > 0:
            concurrency(work, args, bundle, "2048x2500", args.nlarge, 2500, 2048)
        if not args.skip_matrix:
            matrix(work, args, bundle)
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
