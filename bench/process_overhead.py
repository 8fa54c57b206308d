"""What scoring in a child process (gateway.detector_process) adds per instance.

Scores one file alternately in-process (``Detector.score_path``) and through a
``ProcessDetector`` (request over the socket, the child reads and scores the file, the reply
comes back), ``--repeats`` times each, and prints the medians and spread of each, and of the
round trip minus the child's own read-and-score time (``timings_ms["total"]``, measured inside
the child): the per-instance cost of the process boundary and its wire format. (The child can
be faster than in-process: it runs with CHILD_MALLOC_ENV's malloc settings.) Side by
side in one run, so the shared machine's noise hits both alike.

    .venv/bin/python bench/process_overhead.py                       # 512x512, 200 repeats
    .venv/bin/python bench/process_overhead.py --rows 2048 --cols 2500 --repeats 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.common import make_set, workdir  # noqa: E402
from detector.scoring import Detector  # noqa: E402
from gateway.detector_process import ProcessDetector  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    with workdir() as root:
        path = make_set(root / "set", 1, args.rows, args.cols)[0]
        local = Detector.load(args.bundle, num_threads=1)
        local.warm_up()
        child = ProcessDetector(args.bundle, threads=1, nice=0)
        try:
            for _ in range(20):  # warm both
                local.score_path(path)
                child.score_path(path)
            t_local, t_child = np.empty(args.repeats), np.empty(args.repeats)
            t_inside = np.empty(args.repeats)
            for i in range(args.repeats):
                t0 = time.perf_counter_ns()
                want = local.score_path(path)
                t1 = time.perf_counter_ns()
                got = child.score_path(path)
                t2 = time.perf_counter_ns()
                t_local[i], t_child[i] = (t1 - t0) / 1e6, (t2 - t1) / 1e6
                t_inside[i] = got.timings_ms["total"]  # the child's own read + score
                assert got.score == want.score
        finally:
            child.close()
    for label, t in (("in-process", t_local), ("child process", t_child)):
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        print(f"{label:14s} {args.rows}x{args.cols}: median {med:.3f} ms "
              f"(IQR {q1:.3f}-{q3:.3f}, n={args.repeats})")
    boundary = t_child - t_inside
    print(f"process boundary (round trip minus the child's own read+score): median "
          f"{np.median(boundary):.3f} ms (IQR {np.percentile(boundary, 25):.3f}-"
          f"{np.percentile(boundary, 75):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
