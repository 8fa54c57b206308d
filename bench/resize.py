"""The exact area resize to 224x224, previous implementation against the current one, side by
side in one run (issue 18: the scorer's CPU per instance).

Three parts, old and new interleaved call by call so that the neighbours' load hits both alike:

1. ``resize_frame`` alone on a 512x512 uint8 and a 2500x2048 uint16 (12-bit) frame: median ms
   per frame over ``--repeats`` and the ratio old/new, plus the max abs difference; then the
   rows-first resize (session 12, kept for large frames) against the current one.
2. The whole score of a DICOM file of each size (``Detector.load(None).score_path``), with
   ``detector.preprocess.resize_frame`` swapped for the previous implementation and back.
3. Scores unchanged: ``--nih`` NIH images (512x512 PNG) and ``--big`` of them upsampled to
   2048x2500 16-bit, through ``score_frames(resize_to_input(...))`` with each implementation;
   the max |score difference| (acceptance: <= 1e-6).

The previous implementation is kept verbatim in tests/resize_reference.py. Run from the repo
root: ``python -m bench.resize``. Data: $SENTINEL_DATA (default ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from dicom_factory import make_cr  # noqa: E402
from PIL import Image  # noqa: E402
from resize_reference import resize_frame_v1  # noqa: E402

from detector import preprocess, scoring  # noqa: E402
from detector.scoring import Detector  # noqa: E402

Impl = Callable[[np.ndarray, int], np.ndarray]
NEW: Impl = preprocess.resize_frame
OLD: Impl = resize_frame_v1


# session 12's resize for every size, which the current code keeps for large frames only
ROWS: Impl = preprocess._resize_rows_first


def use(impl: Impl) -> None:
    """Make the scoring path (and resize_to_input) call ``impl``."""
    preprocess.resize_frame = impl
    scoring.resize_frame = impl


def side_by_side(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each entry, the entries interleaved in every repeat."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def timed_score(det: Detector, path: Path, impl: Impl) -> Callable[[], object]:
    def run() -> object:
        use(impl)
        try:
            return det.score_path(path)
        finally:
            use(NEW)
    return run


def data_dir() -> Path:
    env = os.environ.get("SENTINEL_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per entry (>= 20)")
    ap.add_argument("--nih", type=int, default=50, help="NIH images for the score check")
    ap.add_argument("--big", type=int, default=4, help="of them upsampled to 2048x2500")
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be at least 20")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rng = np.random.default_rng(0)
    frames = {
        "512x512 uint8": rng.integers(0, 256, (512, 512)).astype(np.uint8),
        "2500x2048 uint16": rng.integers(0, 4096, (2500, 2048)).astype(np.uint16),
    }
    print(f"\n1. resize_frame alone, median of {args.repeats}, old and new interleaved")
    for name, x in frames.items():
        old, new = OLD(x, 224), NEW(x, 224)
        diff = float(np.abs(new - old).max())
        t = side_by_side({"old": lambda x=x: OLD(x, 224), "new": lambda x=x: NEW(x, 224)},
                         args.repeats)
        # v1's large temporaries slow the call after it; rows-first and the current code are
        # timed in their own interleaved pair
        r = side_by_side({"rows": lambda x=x: ROWS(x, 224), "new": lambda x=x: NEW(x, 224)},
                         args.repeats)
        print(f"  {name:<18s} old {t['old']:7.3f} ms  new {t['new']:7.3f} ms  "
              f"ratio old/new {t['old'] / t['new']:5.2f}  max|new-old| {diff:.1e} "
              f"(max|old| {np.abs(old).max():.0f})")
        print(f"  {'':<18s} rows-first {r['rows']:7.3f} ms  new {r['new']:7.3f} ms  "
              f"ratio rows/new {r['rows'] / r['new']:5.2f}  max|new-rows| "
              f"{float(np.abs(new - ROWS(x, 224)).max()):.1e}")

    det = Detector.load(None)
    print(f"\n2. whole score_path of a DICOM file (bundle {det.bundle_id}), median of "
          f"{args.repeats}, interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        for name, x in frames.items():
            path = make_cr(Path(tmp) / f"{name.split()[0]}.dcm", x, 8 if x.dtype == np.uint8
                           else 12)
            s_old = timed_score(det, path, OLD)()
            s_new = timed_score(det, path, NEW)()
            t = side_by_side({"old": timed_score(det, path, OLD),
                              "new": timed_score(det, path, NEW)}, args.repeats)
            print(f"  {name:<18s} old {t['old']:7.3f} ms  new {t['new']:7.3f} ms  "
                  f"ratio old/new {t['old'] / t['new']:5.2f}  |score diff| "
                  f"{abs(s_old.score - s_new.score):.1e}")  # type: ignore[attr-defined]

    pngs = sorted((data_dir() / "nih_cxr14_1000" / "img512").glob("**/*.png"))[: args.nih]
    print(f"\n3. scores, {len(pngs)} NIH 512x512 images and {min(args.big, len(pngs))} upsampled "
          "to 2048x2500 16-bit: score_frames(resize_to_input(...)) old vs new")
    worst = {"512": 0.0, "2048x2500": 0.0}
    for i, p in enumerate(pngs):
        img = np.asarray(Image.open(p).convert("L"), dtype=np.uint8)
        cases = {"512": img[None].astype(np.float32) / np.float32(255)}
        if i < args.big:
            big = np.asarray(Image.fromarray(img).resize((2048, 2500), Image.BICUBIC))
            cases["2048x2500"] = (big.astype(np.uint16) * 257)[None].astype(np.float32) / 65535
        for k, unit in cases.items():
            scores = []
            for impl in (OLD, NEW):
                use(impl)
                scores.append(det.score_frames(preprocess.resize_to_input(unit)).score)
            use(NEW)
            worst[k] = max(worst[k], abs(scores[0] - scores[1]))
    for k, v in worst.items():
        print(f"  {k:<10s} max |score old - score new| {v:.1e}  (acceptance <= 1e-6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
