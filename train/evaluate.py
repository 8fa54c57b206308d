"""Detection metrics on a scored test set: per perturbation, per part, with bootstrap CIs.

A ``ScoreBook`` holds, for the clean images and for each perturbation of the suite, the
scores of every part (shipped CNN, forest, paper CNN, adversarial-training baseline) on the
same images in the same order. Each perturbation is evaluated as a balanced set: the clean
images against their own perturbed copies. "Overall" mixes the suite: each image contributes
its clean copy and one perturbed copy drawn uniformly from the suite (seeded).
No TensorFlow here: the figures and metrics are recomputable from cached scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.scoring import Either, apply_either, apply_gate, fuse
from train.attacks import SUITE
from train.fit_detector import (
    PAPER_THRESHOLD,
    W_GRID,
    binary_metrics,
    bootstrap_ci,
    roc_auc,
)

PARTS = ("cnn", "forest", "ensemble", "paper_cnn", "baseline_cnn")
PART_LABELS = {
    "cnn": "CNN (shipped)", "forest": "Forest", "ensemble": "Ensemble",
    "paper_cnn": "Paper CNN (reference)", "baseline_cnn": "Adv.-training baseline",
}


@dataclass(frozen=True)
class ScoreBook:
    """kind ('clean' or a perturbation name) -> part -> scores (n,)."""

    scores: dict[str, dict[str, np.ndarray]]
    fusion: str = "stack"  # how "ensemble" weights the parts (detector.scoring.fuse)
    # (threshold, slope) of the bundle's stride-grid gate (detector.scoring.apply_gate), whose
    # feature values are each kind's "grid" entry; None: no gate
    gate: tuple[float, float] | None = None
    either: Either | None = None  # the bundle's either-part override (detector.scoring)

    def combine(self, parts: dict[str, np.ndarray], w_cnn: float) -> np.ndarray:
        """The runtime's decision score from the parts' scores (and the gate's feature)."""
        s = fuse(parts["cnn"], parts["forest"], w_cnn, self.fusion)
        if self.gate is not None:
            s = apply_gate(s, parts["grid"], *self.gate)
        return apply_either(s, parts["cnn"], parts["forest"], self.either)

    def part(self, kind: str, part: str, w_cnn: float | None = None) -> np.ndarray:
        s = self.scores[kind]
        if part == "ensemble":
            if w_cnn is None:
                raise ValueError("the ensemble needs w_cnn")
            return self.combine(s, w_cnn)
        return s[part]

    def ensemble(self, kind: str, w_cnn: float) -> np.ndarray:
        return self.part(kind, "ensemble", w_cnn)

    def kinds(self) -> list[str]:
        return [p.name for p in SUITE if p.name in self.scores]

    def pair(self, kind: str, part: str, w_cnn: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Balanced labels and scores: clean (0) then the same images perturbed by kind (1)."""
        c, p = self.part("clean", part, w_cnn), self.part(kind, part, w_cnn)
        return np.r_[np.zeros(len(c)), np.ones(len(p))], np.r_[c, p]

    def mixed_pick(self, seed: int) -> np.ndarray:
        n = len(self.scores["clean"]["forest"])
        return np.random.default_rng([seed, 17]).integers(0, len(self.kinds()), size=n)

    def mixed(self, seed: int, w_cnn: float | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Balanced mix: every clean image + one drawn perturbed copy; scores of every part."""
        pick = self.mixed_pick(seed)
        kinds = self.kinds()
        common = set.intersection(*(set(self.scores[k]) for k in ["clean", *kinds]))
        parts = [p for p in PARTS if p in common or (p == "ensemble" and w_cnn is not None)]
        n = len(pick)
        rows = np.arange(n)
        out = {}
        for part in [*parts, *(["grid"] if "grid" in common else [])]:
            stacked = np.stack([self.part(k, part, w_cnn) for k in kinds])
            out[part] = np.r_[self.part("clean", part, w_cnn), stacked[pick, rows]]
        return np.r_[np.zeros(n), np.ones(n)], out


def _part_block(y: np.ndarray, s: np.ndarray, threshold: float, n_boot: int, seed: int) -> dict:
    auc = bootstrap_ci(y, s, roc_auc, n_resamples=n_boot, seed=seed)
    at_t = binary_metrics(y, s, threshold)
    acc_ci = bootstrap_ci(y, s, lambda a, b: float(np.mean((b >= threshold) == a)),
                          n_resamples=n_boot, seed=seed)
    return {
        "auc_ci": list(auc),
        "accuracy_ci_at_threshold": list(acc_ci),
        "threshold": threshold,
        "at_threshold": at_t,
        "at_0.5": binary_metrics(y, s, PAPER_THRESHOLD),
    }


def compute_metrics(book: ScoreBook, *, w_cnn: float, threshold: float,
                    part_thresholds: dict[str, float], seed: int = 0,
                    n_boot: int = 1000) -> dict:
    """Everything the report shows, as plain JSON-able numbers.

    Each part is read at its own validation-calibrated threshold (1% FPR on validation clean
    images) and at the paper's 0.5; the ensemble's calibrated threshold is the operating one.
    """
    thresholds = dict(part_thresholds, ensemble=threshold)
    per: dict[str, dict] = {}
    for kind in book.kinds():
        per[kind] = {}
        for part in PARTS:
            y, s = book.pair(kind, part, w_cnn)
            per[kind][part] = _part_block(y, s, thresholds[part], n_boot, seed)
    y, mix = book.mixed(seed, w_cnn)
    overall = {part: _part_block(y, mix[part], thresholds[part], n_boot, seed) for part in PARTS}
    ens_clean = book.ensemble("clean", w_cnn)
    grid = []
    for w in W_GRID:
        s = book.combine(mix, w)
        m = binary_metrics(y, s, PAPER_THRESHOLD)
        m_t = binary_metrics(y, s, threshold)
        grid.append({"w_cnn": w, "auc": roc_auc(y, s), **{k: m[k] for k in
                     ("accuracy", "precision", "recall", "f1")},
                     "recall_at_operating_threshold": m_t["recall"],
                     "fpr_at_operating_threshold": m_t["fpr"]})
    return {
        "w_cnn": w_cnn,
        "fusion": book.fusion,
        "threshold": threshold,
        "part_thresholds": thresholds,
        "n_clean": len(ens_clean),
        "clean_fpr_at_threshold": float(np.mean(ens_clean >= threshold)),
        "clean_fpr_at_0.5": float(np.mean(ens_clean >= PAPER_THRESHOLD)),
        "per_perturbation": per,
        "overall": overall,
        "w_grid_test": grid,
        "n_bootstrap": n_boot,
    }


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0,0) to (1,1)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(s), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = np.cumsum(~y_sorted)[distinct]
    tpr = np.r_[0.0, tps / max(1, y.sum())]
    fpr = np.r_[0.0, fps / max(1, (~y).sum())]
    return fpr, tpr
