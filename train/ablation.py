"""Feature ablation and candidate steganalysis features for the forest (issue 7, items 2-3).

Questions it answers, all on the training run's own test split (never used for fitting):
- how much each of the 11 runtime features matters (forest refitted without it);
- which single feature separates clean from PGD best (the paper says spectral entropy);
- whether candidate steganalysis features help, against the non-adaptive suite and against the
  adaptive attacks of ``train.adaptive`` (features of their stored images);
- whether adding adaptive examples crafted on *training* images to the forest's training set
  ("adversarial training" of the forest) raises detection of adaptive examples on test images.

Candidate features (not in the runtime yet; proposals for detector.features): PGD at eps 0.003
to 0.006 on an 8-bit source is, after rounding, +-1 (sometimes +-2) grey-level changes: exactly
the LSB-matching embedding that steganalysis detects with SPAM-style co-occurrences of truncated
pixel differences (Pevny, Bas, Fridrich 2010) and histograms of high-pass residuals. They are
computed in grey levels of an 8-bit grid (x * 255, rounded), ~0.5 ms per image here (busy).

Every threshold is calibrated on validation clean images for a 1% false-positive rate, as the
bundle's is. Forests are refitted with the same depth as the bundle's, ``trees`` trees.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.features import STEGO_REASONS

# The runtime carries these as feature set v2; candidate_features below stays an independent
# int16 implementation that tests/test_features.py checks the runtime against.
CANDIDATE_REASONS: dict[str, str] = STEGO_REASONS
CANDIDATE_NAMES: tuple[str, ...] = tuple(CANDIDATE_REASONS)
GROUPS: dict[str, tuple[str, ...]] = {
    "spam": CANDIDATE_NAMES[:4],
    "res2_hist": CANDIDATE_NAMES[4:],
}
PAPER_FOUR = ("skewness", "kurtosis", "spectral_entropy", "laplacian_var")


def candidate_features(img: np.ndarray) -> np.ndarray:
    """The 8 candidate features of one (H, W) image in [0, 1] (see CANDIDATE_REASONS).

    int16 grey levels and bincounts: ~10x faster than the same in float64.
    """
    g = np.rint(np.asarray(img, np.float32) * 255.0).astype(np.int16)
    out = np.empty(len(CANDIDATE_NAMES))
    # SPAM-like co-occurrence of truncated first differences, horizontal and vertical;
    # bin 3*a+b for a, b in {0: -1, 1: 0, 2: +1}
    counts = np.zeros(9, np.int64)
    for d in (g[:, 1:] - g[:, :-1], (g[1:, :] - g[:-1, :]).T):
        t = np.clip(d, -1, 1)
        t += 1
        counts += np.bincount((t[:, :-1] * 3 + t[:, 1:]).ravel(), minlength=9)
    p = counts / counts.sum()
    out[0] = p[4]
    out[1] = p[1] + p[3] + p[5] + p[7]
    out[2] = p[0] + p[8]
    out[3] = p[2] + p[6]
    # histogram of |second-order residual| in grey levels (0, 1, 2, >= 3), both directions
    h = np.zeros(4, np.int64)
    for r in (g[:, 2:] - 2 * g[:, 1:-1] + g[:, :-2], g[2:, :] - 2 * g[1:-1, :] + g[:-2, :]):
        h += np.bincount(np.minimum(np.abs(r), 3).ravel(), minlength=4)
    out[4:] = h / h.sum()
    return out


def candidate_batch(imgs: np.ndarray) -> np.ndarray:
    return np.stack([candidate_features(i) for i in imgs]) if len(imgs) else np.empty(
        (0, len(CANDIDATE_NAMES)))


def candidate_latency_ms(imgs: np.ndarray, repeats: int = 200) -> dict[str, float]:
    """Median and IQR of candidate_features per image (one thread, after warm-up)."""
    for i in imgs[:10]:
        candidate_features(i)
    t = []
    for k in range(repeats):
        img = imgs[k % len(imgs)]
        s = time.perf_counter()
        candidate_features(img)
        t.append((time.perf_counter() - s) * 1e3)
    a = np.asarray(t)
    return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)),
            "p75": float(np.percentile(a, 75)), "n": len(a)}


# ---------------------------------------------------------------- data from a training run

@dataclass
class FeatureData:
    """Runtime features (+ candidates) of the training run's images, with labels."""

    names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    val_clean: np.ndarray
    test: dict[str, np.ndarray]  # "clean" and each perturbation name -> (n, k)
    adaptive: dict[str, np.ndarray]  # "attack@eps" -> features of adaptive test examples
    adaptive_clean: np.ndarray | None  # the same test subset, clean
    adaptive_train: dict[str, np.ndarray]  # adaptive examples crafted on training images


def _cached(path: Path, make: Any) -> np.ndarray:
    if path.exists():
        return np.load(path)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def _adaptive_sets(adaptive_dir: Path | None, cache: Path, tag: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Runtime + candidate features of every adversarial array of an adaptive run."""
    from detector import features

    runtime: dict[str, np.ndarray] = {}
    cand: dict[str, np.ndarray] = {}
    if adaptive_dir is None or not (adaptive_dir / "adv").is_dir():
        return runtime, cand
    for p in sorted((adaptive_dir / "adv").glob("*.npy")):
        if p.name.endswith(".tmp.npy"):
            continue
        name, eps = p.stem.rsplit("_", 1)
        key = f"{name}@{eps}"
        runtime[key] = _cached(cache / f"{tag}-{p.stem}.runtime.npy",
                               lambda p=p: features.extract_batch(np.load(p)))
        cand[key] = _cached(cache / f"{tag}-{p.stem}.cand.npy",
                            lambda p=p: candidate_batch(np.load(p)))
    return runtime, cand


def load_feature_data(work_dir: Path, cache: Path, adaptive_dir: Path | None = None,
                      adaptive_train_dir: Path | None = None) -> FeatureData:
    """Runtime features from the training run's caches; candidates computed (and cached)."""
    from detector import features
    from train import pipeline
    from train.attacks import SUITE

    work = pipeline.Work(work_dir)
    kinds = work.load_npy("pert/train_kinds.npy")
    names = tuple(features.FEATURE_NAMES) + CANDIDATE_NAMES

    def train_pert_images() -> np.ndarray:
        pert = np.empty(np.load(work.path("clean/train.npy"), mmap_mode="r").shape, np.float32)
        for k, p in enumerate(SUITE):
            idx = np.flatnonzero(kinds == k)
            if len(idx):
                pert[idx] = work.load_npy(f"pert/train/{p.name}.npy")
        return pert

    def runtime(rel: str, make: Any, name: str) -> np.ndarray:
        """The training run's cached runtime features, or computed here (and cached) when
        the run has not reached that stage yet."""
        if work.has(rel):
            return work.load_npy(rel)
        return _cached(cache / f"{name}.runtime.npy", lambda: features.extract_batch(make()))

    parts_x: list[np.ndarray] = []
    parts_y: list[np.ndarray] = []
    specs = [("clean", 0, lambda: work.load_npy("clean/train.npy")),
             ("perturbed", 1, train_pert_images)]
    if work.has("resampled/train_clean.npy"):
        specs += [("resampled_clean", 0, lambda: work.load_npy("resampled/train_clean.npy")),
                  ("resampled_pert", 1, lambda: work.load_npy("resampled/train_pert.npy"))]
    for rel, label, make in specs:
        rt = runtime(f"feat/train/{rel}.npy", make, f"train-{rel}")
        cd = _cached(cache / f"train-{rel}.cand.npy", lambda make=make: candidate_batch(make()))
        parts_x.append(np.c_[rt, cd])
        parts_y.append(np.full(len(rt), label))
    val_parts = []
    for rel, make in [("clean", lambda: work.load_npy("clean/val.npy")),
                      ("resampled_clean", lambda: work.load_npy("resampled/val_clean.npy"))]:
        if not work.has(f"feat/val/{rel}.npy") and not work.has(
                "clean/val.npy" if rel == "clean" else "resampled/val_clean.npy"):
            continue
        rt = runtime(f"feat/val/{rel}.npy", make, f"val-{rel}")
        cd = _cached(cache / f"val-{rel}.cand.npy", lambda make=make: candidate_batch(make()))
        val_parts.append(np.c_[rt, cd])
    test = {}
    for kind in ["clean", *[p.name for p in SUITE]]:
        img_rel = "clean/test.npy" if kind == "clean" else f"pert/test/{kind}.npy"
        if not work.has(img_rel) and not work.has(f"feat/test/{kind}.npy"):
            continue  # a run without that perturbation (or a small hand-made work dir)
        rt = runtime(f"feat/test/{kind}.npy", lambda img_rel=img_rel: work.load_npy(img_rel),
                     f"test-{kind}")
        cd = _cached(cache / f"test-{kind}.cand.npy",
                     lambda img_rel=img_rel: candidate_batch(work.load_npy(img_rel)))
        test[kind] = np.c_[rt, cd]
    adaptive: dict[str, np.ndarray] = {}
    adaptive_clean = None
    if adaptive_dir is not None and (adaptive_dir / "subset.json").exists():
        rt, cd = _adaptive_sets(adaptive_dir, cache, "adaptive-test")
        adaptive = {k: np.c_[rt[k], cd[k]] for k in rt}
        idx = np.asarray(json.loads((adaptive_dir / "subset.json").read_text())["indices"])
        adaptive_clean = test["clean"][idx]
    adaptive_train: dict[str, np.ndarray] = {}
    if adaptive_train_dir is not None:
        rt, cd = _adaptive_sets(adaptive_train_dir, cache, "adaptive-train")
        adaptive_train = {k: np.c_[rt[k], cd[k]] for k in rt}
    return FeatureData(names=names, x_train=np.concatenate(parts_x),
                       y_train=np.concatenate(parts_y), val_clean=np.concatenate(val_parts),
                       test=test, adaptive=adaptive, adaptive_clean=adaptive_clean,
                       adaptive_train=adaptive_train)


# ---------------------------------------------------------------- fitting and scoring

# False-positive rates at which the ablation keeps each ROC curve (the report plots them): log
# spaced where a gateway operates (0.1% to 10%), then linear to 1.
ROC_FPR_GRID: tuple[float, ...] = tuple(
    float(v) for v in np.r_[np.geomspace(1e-3, 0.1, 21), np.linspace(0.15, 1.0, 18)])


def tpr_at_fpr(clean: np.ndarray, attacked: np.ndarray,
               grid: tuple[float, ...] = ROC_FPR_GRID) -> list[float]:
    """The ROC curve as the best true-positive rate at each false-positive rate of ``grid``.

    Why a grid: 20 feature sets x 3-14 attacks of full curves (one point per image) would make
    ablation.json megabytes; the grid keeps what a reader compares (the low-FPR region).
    """
    from train.evaluate import roc_curve

    fpr, tpr = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(attacked))],
                         np.r_[clean, attacked])
    return [round(float(tpr[fpr <= g + 1e-12].max()), 4) for g in grid]


def evaluate_set(data: FeatureData, cols: list[int], *, trees: int, max_depth: int, seed: int,
                 extra_x: np.ndarray | None = None) -> dict[str, Any]:
    """Fit a forest on columns ``cols`` and measure it on test and on the adaptive sets."""
    from train import fit_detector

    x, y = data.x_train[:, cols], data.y_train
    if extra_x is not None and len(extra_x):
        x = np.concatenate([x, extra_x[:, cols]])
        y = np.r_[y, np.ones(len(extra_x))]
    rf = fit_detector.fit_forest(x, y, n_estimators=trees, max_depth=max_depth, seed=seed)

    def proba(f: np.ndarray) -> np.ndarray:
        return rf.predict_proba(f[:, cols])[:, 1]

    thr = fit_detector.calibrate_threshold(proba(data.val_clean))
    clean = proba(data.test["clean"])
    out: dict[str, Any] = {"threshold": thr, "test_clean_fpr": float(np.mean(clean >= thr)),
                           "per_perturbation": {}, "adaptive": {}}
    mixed_s, mixed_y = [clean], [np.zeros(len(clean))]
    for kind, f in data.test.items():
        if kind == "clean":
            continue
        s = proba(f)
        mixed_s.append(s)
        mixed_y.append(np.ones(len(s)))
        out["per_perturbation"][kind] = {
            "auc": fit_detector.roc_auc(np.r_[np.zeros(len(clean)), np.ones(len(s))],
                                        np.r_[clean, s]),
            "detection": float(np.mean(s >= thr)), "tpr_at_fpr": tpr_at_fpr(clean, s)}
    out["auc_all_kinds"] = fit_detector.roc_auc(np.concatenate(mixed_y), np.concatenate(mixed_s))
    if data.adaptive_clean is not None:
        ac = proba(data.adaptive_clean)
        for key, f in data.adaptive.items():
            s = proba(f)
            out["adaptive"][key] = {
                "auc": fit_detector.roc_auc(np.r_[np.zeros(len(ac)), np.ones(len(s))],
                                            np.r_[ac, s]),
                "detection": float(np.mean(s >= thr)), "tpr_at_fpr": tpr_at_fpr(ac, s)}
    out["importances"] = dict(zip([data.names[c] for c in cols],
                                  rf.feature_importances_.tolist(), strict=True))
    return out


def single_feature_auc(data: FeatureData) -> dict[str, dict[str, float]]:
    """Direction-free AUC of each raw feature, clean vs each PGD eps (no fitting at all)."""
    from train import fit_detector

    out = {}
    for j, name in enumerate(data.names):
        row = {}
        for kind in ("pgd_0.003", "pgd_0.006"):
            c, p = data.test["clean"][:, j], data.test[kind][:, j]
            a = fit_detector.roc_auc(np.r_[np.zeros(len(c)), np.ones(len(p))], np.r_[c, p])
            row[kind] = float(max(a, 1 - a))
        out[name] = row
    return out


@dataclass(frozen=True)
class AblationConfig:
    work: str
    out: str
    adaptive_dir: str | None = None
    adaptive_train_dir: str | None = None
    trees: int = 100
    max_depth: int = 12
    seed: int = 0


def run_ablation(cfg: AblationConfig, log: Any = print) -> dict[str, Any]:
    """Every feature set of the ablation; writes ``ablation.json`` into ``cfg.out``."""
    from detector import features

    out_dir = Path(cfg.out)
    cache = out_dir / "cache"
    log("features (runtime from the training cache, candidates computed)")
    data = load_feature_data(Path(cfg.work), cache,
                             Path(cfg.adaptive_dir) if cfg.adaptive_dir else None,
                             Path(cfg.adaptive_train_dir) if cfg.adaptive_train_dir else None)
    base = list(range(len(features.FEATURE_NAMES)))
    idx = {n: i for i, n in enumerate(data.names)}
    sets: dict[str, list[int]] = {"runtime (11)": base,
                                  "paper four": [idx[n] for n in PAPER_FOUR]}
    for n in features.FEATURE_NAMES:
        sets[f"without {n}"] = [i for i in base if data.names[i] != n]
    for g, members in GROUPS.items():
        sets[f"runtime + {g}"] = base + [idx[n] for n in members]
    sets["runtime + all candidates"] = base + [idx[n] for n in CANDIDATE_NAMES]
    kw = {"trees": cfg.trees, "max_depth": cfg.max_depth, "seed": cfg.seed}
    results: dict[str, Any] = {"trees": cfg.trees, "max_depth": cfg.max_depth,
                               "roc_fpr_grid": list(ROC_FPR_GRID),
                               "n_train": len(data.y_train), "n_test": len(data.test["clean"]),
                               "n_adaptive": (len(data.adaptive_clean)
                                              if data.adaptive_clean is not None else 0),
                               "sets": {}, "candidate_reasons": CANDIDATE_REASONS}
    for name, cols in sets.items():
        t0 = time.time()
        results["sets"][name] = evaluate_set(data, cols, **kw)
        r = results["sets"][name]
        log(f"{name}: pgd0.003 AUC {r['per_perturbation']['pgd_0.003']['auc']:.4f} det "
            f"{r['per_perturbation']['pgd_0.003']['detection']:.3f}; pgd0.006 det "
            f"{r['per_perturbation']['pgd_0.006']['detection']:.3f}; clean FPR "
            f"{r['test_clean_fpr']:.3f} ({time.time() - t0:.0f} s)")
    if data.adaptive_train:
        extra = np.concatenate(list(data.adaptive_train.values()))
        for name in ("runtime (11)", "runtime + all candidates"):
            key = f"{name} + adaptive training"
            results["sets"][key] = evaluate_set(data, sets[name], extra_x=extra, **kw)
            results["sets"][key]["adaptive_train_examples"] = len(extra)
            log(f"{key}: done ({len(extra)} adaptive training examples)")
    results["single_feature_auc"] = single_feature_auc(data)
    imgs = np.load(Path(cfg.work) / "clean" / "test.npy", mmap_mode="r")[:50]
    results["candidate_latency_ms"] = candidate_latency_ms(np.asarray(imgs))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


def harden_bundle(bundle_dir: Path, work_dir: Path, adaptive_train_dir: Path | None,
                  out_dir: Path, *, feature_set: str | None = None, cache: Path | None = None,
                  trees: int | None = None, seed: int = 0) -> Path:
    """A bundle whose forest is refitted, optionally on the v2 feature set (runtime 11 + the 8
    candidates, detector.features.FEATURE_SET_V2) and with adaptive examples crafted on
    training images (every array under ``<adaptive_train_dir>/adv`` whose name starts with
    "adaptive-", label perturbed).

    Same CNN (so the runtime loads it and the adaptive attacks can be rerun against it).
    Decision rule "max" (OR of the parts, each calibrated on validation clean images for 0.5%
    FPR), so neither part can be silenced by the other.
    """
    from detector import bundle as bundle_mod
    from detector import features
    from detector.forest import ForestArrays
    from detector.scoring import Detector
    from train import fit_detector, pipeline, training_bundle

    feature_set = feature_set or features.FEATURE_SET
    names = features.FEATURE_SETS[feature_set]
    manifest = bundle_mod.load_manifest(bundle_dir)
    work = pipeline.Work(work_dir)
    cache = cache or Path(out_dir).parent / (Path(out_dir).name + "-cache")
    data = load_feature_data(Path(work_dir), cache, None, adaptive_train_dir)
    if tuple(data.names[: len(names)]) != tuple(names):
        raise RuntimeError(f"feature names differ: {data.names[:len(names)]} vs {names}")
    cols = list(range(len(names)))
    x, y = data.x_train[:, cols], data.y_train
    adv = [f for k, f in data.adaptive_train.items() if k.startswith("adaptive-")]
    n_adv = sum(len(f) for f in adv)
    if adv:
        x = np.concatenate([x, *[f[:, cols] for f in adv]])
        y = np.r_[y, np.ones(n_adv)]
    cfg = manifest.training_data.get("config", {})
    rf = fit_detector.fit_forest(x, y, n_estimators=trees or int(cfg.get("trees", 200)),
                                 max_depth=int(cfg.get("max_depth", 12)), seed=seed)
    forest = ForestArrays.from_sklearn(rf)
    val = [work.load_npy("clean/val.npy")]
    if work.has("resampled/val_clean.npy"):
        val.append(work.load_npy("resampled/val_clean.npy"))
    val_x = np.concatenate(val)
    det = Detector.load(bundle_dir, num_threads=1)
    p_cnn = np.array([det.score_unit(img)[0] for img in val_x])
    p_rf = forest.predict_proba(data.val_clean[:, cols])
    a = fit_detector.calibrate_threshold(p_cnn, 0.005)
    b = fit_detector.calibrate_threshold(p_rf, 0.005)
    td = dict(manifest.training_data)
    td["part_thresholds"] = {**td.get("part_thresholds", {}),
                             "cnn": fit_detector.calibrate_threshold(p_cnn),
                             "forest": fit_detector.calibrate_threshold(p_rf)}
    td["hardened"] = {"from_bundle": manifest.bundle_id, "adaptive_examples": n_adv,
                      "adaptive_dir": str(adaptive_train_dir), "feature_set": feature_set,
                      "rule": "max", "part_fpr": 0.005, "n_val_clean": len(val_x)}
    # the hardened bundle is a new runtime bundle (new forest and rule, new id); it gets a
    # training bundle of its own beside it, with the parent's victim, Keras CNN and split
    tfiles = training_bundle.load_training(bundle_dir)
    extra = {k: tfiles.path_of(k) for k in ("victim", "cnn_keras", "split") if k in tfiles.paths}
    out = Path(bundle_mod.write_bundle(
        out_dir, cnn_tflite=manifest.path_of("cnn"), forest=forest,
        feature_names=names, w_cnn=manifest.w_cnn, threshold=0.5,
        thresholds={"max_rule": 0.5}, training_data=td, metrics={},
        rule={"name": "max", "cnn_threshold": a, "rf_threshold": b}))
    training_bundle.write_training_bundle(training_bundle.training_dir_for(out),
                                          bundle_mod.load_manifest(out).bundle_id, extra)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m train.ablation --work W --out O [--adaptive-dir A] [--adaptive-train-dir T]``"""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--adaptive-dir", default=None)
    p.add_argument("--adaptive-train-dir", default=None)
    p.add_argument("--trees", type=int, default=100)
    p.add_argument("--max-depth", type=int, default=12)
    p.add_argument("--harden-bundle", default=None,
                   help="instead: write a bundle (to --out) from this one with the forest "
                   "refitted (on --feature-set, plus --adaptive-train-dir examples), OR rule")
    p.add_argument("--feature-set", default=None,
                   help="detector.features feature set of the hardened forest (default v1)")
    a = p.parse_args(argv)
    from train.pipeline import log

    if a.harden_bundle:
        out = harden_bundle(Path(a.harden_bundle), Path(a.work),
                            Path(a.adaptive_train_dir) if a.adaptive_train_dir else None,
                            Path(a.out), feature_set=a.feature_set)
        log(f"hardened bundle written to {out}")
        return 0

    run_ablation(AblationConfig(work=a.work, out=a.out, adaptive_dir=a.adaptive_dir,
                                adaptive_train_dir=a.adaptive_train_dir, trees=a.trees,
                                max_depth=a.max_depth), log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
