"""What scoring in a child process (gateway.detector_process) adds per instance.

Scores one file alternately in-process (``Detector.score_path``) and through a
``ProcessDetector`` (request over the socket, the child reads and scores the file, the reply
comes back), ``--repeats`` times each, and prints the medians and spread of each, and of the
round trip minus the child's own read-and-score time (``timings_ms["total"]``, measured inside
the child): the per-instance cost of the process boundary and its wire format. (The child can
be faster than in-process: it runs with CHILD_MALLOC_ENV's malloc settings.) Side by
side in one run, so the shared machine's noise hits both alike; the 10th percentile is printed
too, as the cost when no other work preempted the call. Then the wire format alone, in CPU
microseconds per reply: the JSON encoding and the daemon's field checks against a pickle round
trip of the same Score (what the process boundary used before issue 20).

    .venv/bin/python bench/process_overhead.py                       # 512x512, 200 repeats
    .venv/bin/python bench/process_overhead.py --rows 2048 --cols 2500 --repeats 50
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.common import make_set, workdir  # noqa: E402
from detector.scoring import Detector  # noqa: E402
from gateway import detector_process  # noqa: E402
from gateway.detector_process import ProcessDetector  # noqa: E402


def wire_us(score: Any, bundle_id: str, threshold: float) -> dict[str, float]:
    """CPU microseconds per reply of the wire format alone (best of 7 x 2000, no sockets):
    the child's encoding plus the daemon's parse and field checks, and a pickle round trip of
    the same Score (the format before issue 20) for comparison."""
    dp = detector_process

    def json_reply() -> object:
        data = dp._encode({"kind": "score", "id": 1, "score": score.as_dict()}).encode()
        return dp._score_from(dp._parse(data)["score"], bundle_id, threshold)

    def pickle_reply() -> object:
        return pickle.loads(pickle.dumps(("ok", score)))

    out = {}
    for name, fn in (("json+checks", json_reply), ("pickle", pickle_reply)):
        out[name] = min(timeit.repeat(fn, number=2000, repeat=7)) / 2000 * 1e6
    return out


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
        p10, q1, med, q3 = np.percentile(t, [10, 25, 50, 75])
        print(f"{label:14s} {args.rows}x{args.cols}: median {med:.3f} ms "
              f"(IQR {q1:.3f}-{q3:.3f}, p10 {p10:.3f}, n={args.repeats})")
    if hasattr(detector_process, "_score_from"):
        costs = wire_us(got, child.bundle_id, child.threshold)
        print("wire format per reply (CPU only): " + ", ".join(
            f"{k} {v:.1f} us" for k, v in costs.items()))
    boundary = t_child - t_inside
    print(f"process boundary (round trip minus the child's own read+score): median "
          f"{np.median(boundary):.3f} ms (IQR {np.percentile(boundary, 25):.3f}-"
          f"{np.percentile(boundary, 75):.3f}, p10 {np.percentile(boundary, 10):.3f}; the p10 is "
          "the cost without preemption where other work shares the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
