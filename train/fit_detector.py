"""Fitting the detector's forest, the stacking weight and the thresholds (numpy + sklearn).

The grid search and threshold calibration are on the validation split only; the test split
and the second source are never seen here. Kept free of TensorFlow so it is cheap to test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.calibration import TARGET_FPR, calibrate_threshold
from detector.scoring import apply_gate, fuse

W_GRID = tuple(round(0.05 * i, 2) for i in range(21))
PAPER_THRESHOLD = 0.5


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count half)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fit_forest(x: np.ndarray, y: np.ndarray, *, n_estimators: int = 200,
               max_depth: int | None = 12, min_samples_leaf: int = 2, seed: int = 0,
               n_jobs: int = 2):  # type: ignore[no-untyped-def]
    """sklearn Random Forest; the bundle stores it as arrays (ForestArrays), never as pickle."""
    from sklearn.ensemble import RandomForestClassifier

    rf = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                min_samples_leaf=min_samples_leaf, random_state=seed,
                                n_jobs=n_jobs)
    rf.fit(x, y)
    return rf


def bootstrap_ci(y: np.ndarray, s: np.ndarray, metric, *, n_resamples: int = 1000,  # type: ignore[no-untyped-def]
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """Point value and percentile (1 - alpha) CI of metric(y, s) over stratified resamples.

    Clean and perturbed are resampled separately so each resample stays balanced as the
    test set is (and AUC is always defined).
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals[i] = metric(y[idx], s[idx])
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(metric(y, s)), float(lo), float(hi)


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall (detection rate), F1, FPR and confusion counts at threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(s) >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / max(1, len(y)),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


@dataclass(frozen=True)
class CleanGroup:
    """One validation source's clean images: the parts' scores and the gate's feature."""

    cnn: np.ndarray
    forest: np.ndarray
    grid: np.ndarray | None


@dataclass(frozen=True)
class OperatingPoint:
    """w_cnn, the either-part thresholds (None: off) and the operating threshold, with the
    validation detection they give."""

    w_cnn: float
    part_fpr: float
    either_cnn: float | None
    either_rf: float | None
    threshold: float
    detection: float
    auc: float


PART_FPRS = (0.0, 0.001, 0.0025, 0.005)


def threshold_beside(scores: np.ndarray, already: np.ndarray, target_fpr: float) -> float:
    """Smallest t such that the images already flagged plus those with score >= t are at most
    floor(target_fpr * n) (1.0 when ``already`` alone spends the budget)."""
    k = int(np.floor(target_fpr * len(scores))) - int(already.sum())
    if k < 0:
        return 1.0
    rest = np.sort(np.asarray(scores, np.float64)[~already])[::-1]
    if k >= len(rest):
        return 0.0
    return min(float(np.nextafter(rest[k], np.inf)), 1.0)


def part_threshold(groups: list[CleanGroup], part: str, part_fpr: float) -> float | None:
    """A part's own threshold: the strictest of its per-source ``part_fpr`` points (None when
    the budget share is 0 or no threshold below 1 keeps it)."""
    if part_fpr <= 0.0:
        return None
    t = max(calibrate_threshold(getattr(g, part), part_fpr) for g in groups if len(g.cnn))
    return t if 0.0 < t < 1.0 else None


def operating_point(groups: list[CleanGroup], w: float, part_fpr: float, fusion: str,
                    gate: tuple[float, float] | None,
                    target_fpr: float = TARGET_FPR) -> tuple[float | None, float | None, float]:
    """(either_cnn, either_rf, threshold) keeping at most ``target_fpr`` of every source's clean
    validation images flagged by the fused score, the gate and the parts together."""
    a = part_threshold(groups, "cnn", part_fpr)
    b = part_threshold(groups, "forest", part_fpr)
    t = 0.0
    for g in groups:
        if not len(g.cnn):
            continue
        s = fuse(g.cnn, g.forest, w, fusion)
        if gate is not None:
            s = apply_gate(s, g.grid, *gate)
        already = np.zeros(len(s), bool)
        if a is not None:
            already |= g.cnn >= a
        if b is not None:
            already |= g.forest >= b
        t = max(t, threshold_beside(s, already, target_fpr))
    return a, b, t


def search_operating_point(groups: list[CleanGroup], p_cnn: np.ndarray, p_rf: np.ndarray,
                           grid: np.ndarray | None, fusion: str,
                           gate: tuple[float, float] | None,
                           w_grid: tuple[float, ...] = W_GRID,
                           part_fprs: tuple[float, ...] = PART_FPRS,
                           ) -> tuple[OperatingPoint, list[OperatingPoint]]:
    """The (w_cnn, either-part share) with the highest detection of the perturbed validation
    images (``p_cnn``, ``p_rf``, ``grid``) at the per-source operating threshold; ties go to
    the smaller share, then the smaller w (the forest is the cheaper part)."""
    from detector.scoring import Either, apply_either

    points = []
    for part_fpr in part_fprs:
        for w in w_grid:
            a, b, t = operating_point(groups, w, part_fpr, fusion, gate)
            s = fuse(p_cnn, p_rf, w, fusion)
            if gate is not None:
                s = apply_gate(s, grid, *gate)
            either = Either(a, b, t) if (a is not None or b is not None) and 0 < t < 1 else None
            s = apply_either(s, p_cnn, p_rf, either)
            clean = np.concatenate([_group_score(g, w, fusion, gate, either) for g in groups])
            y = np.r_[np.zeros(len(clean)), np.ones(len(s))]
            points.append(OperatingPoint(w, part_fpr, either and either.cnn,
                                         either and either.forest, t,
                                         float(np.mean(s >= t)), roc_auc(y, np.r_[clean, s])))
    best = max(points, key=lambda p: (round(p.detection, 6), -p.part_fpr, round(p.auc, 6),
                                      -p.w_cnn))
    return best, points


def _group_score(g: CleanGroup, w: float, fusion: str, gate: tuple[float, float] | None,
                 either: object) -> np.ndarray:
    from detector.scoring import apply_either

    s = fuse(g.cnn, g.forest, w, fusion)
    if gate is not None:
        s = apply_gate(s, g.grid, *gate)
    return apply_either(s, g.cnn, g.forest, either)  # type: ignore[arg-type]
