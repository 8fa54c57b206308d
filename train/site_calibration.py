"""What `sentinel calibrate` buys on a new source, measured without touching the test half.

``python -m train.site_calibration --bundle B --data DIR --out WORK``. It splits DIR's images by
patient (seeded) into a calibration half and a test half. The threshold for ``--fpr`` comes
from the calibration half's clean scores: ``detector.calibration``, the same function and the
same never-below-the-bundle rule as ``sentinel calibrate``. On the test half it reports the clean
false-positive rate and the PGD eps 0.006 detection rate. The PGD copies are crafted against the
bundle's victim at 224 and mapped onto the native grid exactly as ``sentinel evaluate
--second-source`` does, and cached in WORK. Both figures are also given at the bundle's own
threshold.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def patient_halves(patients: list[str], seed: int) -> np.ndarray:
    """True for images whose patient falls in the calibration half (half the patients)."""
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    cal = {unique[i] for i in order[: len(unique) // 2]}
    return np.array([p in cal for p in patients])


def run(bundle: Path | None, data: Path, out: Path, fpr: float = 0.01, seed: int = 0,
        log: Any = print) -> dict[str, Any]:
    from detector.bundle import DEFAULT_BUNDLE
    from detector.calibration import calibrate_threshold
    from detector.scoring import Detector
    from train import attacks, datasets, pipeline, training_bundle, victim
    from train.adaptive import detector_scores, wilson

    bdir = Path(bundle) if bundle else DEFAULT_BUNDLE
    recs, dropped = datasets.drop_duplicates(datasets.scan_folder(Path(data)))
    split = datasets.Split(root=str(Path(data).resolve()), seed=0, fractions=(1.0, 0.0, 0.0),
                           train=(), val=(), test=tuple(recs), dropped_duplicates=tuple(dropped))
    work = pipeline.Work(Path(out))
    arr = pipeline.stage_arrays(split, "test", work)
    model = victim.load_victim(training_bundle.load_training(bdir, ("victim",))
                               .path_of("victim"))
    pgd = attacks.BY_NAME["pgd_0.006"]
    pert = pipeline.perturb_and_store(pgd, arr, np.arange(len(arr.x)), model,
                                      attacks.make_gradient_attack(model), work, "pert/test",
                                      seed * 1000 + 1, f"{Path(data).name} pgd_0.006")
    det = Detector.load(bdir, num_threads=1)
    clean = detector_scores(det, arr.x)[:, 2]
    attacked = detector_scores(det, pert)[:, 2]
    cal = patient_halves([r.patient for r in recs], seed)
    t = max(calibrate_threshold(clean[cal], fpr), det.threshold)

    def at(threshold: float) -> dict[str, Any]:
        k_c = int((clean[~cal] >= threshold).sum())
        k_a = int((attacked[~cal] >= threshold).sum())
        n = int((~cal).sum())
        return {"threshold": threshold, "clean_fpr": k_c / n, "clean_fpr_ci": wilson(k_c, n),
                "pgd_0.006_detection": k_a / n, "pgd_0.006_detection_ci": wilson(k_a, n)}

    res = {"bundle_id": det.bundle_id, "source": str(data), "seed": seed, "target_fpr": fpr,
           "calibration_images": int(cal.sum()), "test_images": int((~cal).sum()),
           "site_threshold": at(t), "bundle_threshold": at(det.threshold)}
    work.save_json("site_calibration.json", res)
    s, b = res["site_threshold"], res["bundle_threshold"]
    log(f"{det.bundle_id} on {Path(data).name}: calibrated on {res['calibration_images']} "
        f"images, threshold {t:.4f}; on the other {res['test_images']}: clean FPR "
        f"{s['clean_fpr']:.4f}, PGD 0.006 detection {s['pgd_0.006_detection']:.4f} (at the "
        f"bundle's {det.threshold:.4f}: {b['clean_fpr']:.4f}, {b['pgd_0.006_detection']:.4f})")
    return res


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="work directory (caches, result)")
    p.add_argument("--fpr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(run(a.bundle, a.data, a.out, a.fpr, a.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
