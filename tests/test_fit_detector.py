"""Stacking grid search, threshold calibration, bootstrap CIs and metrics on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from train import fit_detector as fd


def test_roc_auc_matches_sklearn_with_ties() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    assert fd.roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    assert fd.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert np.isnan(fd.roc_auc(np.ones(3), np.arange(3.0)))


def test_calibrated_threshold_keeps_fpr_at_target() -> None:
    rng = np.random.default_rng(1)
    clean = rng.random(1000)
    t = fd.calibrate_threshold(clean, 0.01)
    assert np.mean(clean >= t) <= 0.01
    # and it is the smallest such threshold: one step lower exceeds the target
    below = np.sort(clean)[::-1][int(0.01 * 1000)]
    assert np.mean(clean >= below) > 0.01
    assert fd.calibrate_threshold(np.array([0.2, 0.2, 0.2]), 0.01) > 0.2
    with pytest.raises(ValueError, match="at least one"):
        fd.calibrate_threshold(np.array([]))


def _one_source(clean_cnn: np.ndarray, clean_rf: np.ndarray) -> list:
    return [fd.CleanGroup(clean_cnn, clean_rf, None)]


def test_search_prefers_the_informative_part() -> None:
    """Without the either-part override the search is the weight grid alone: detection at the
    1% point of the clean images, and the informative part gets the weight."""
    rng = np.random.default_rng(2)
    informative = np.clip(0.3 + 0.4 * np.r_[np.zeros(400), np.ones(400)]
                          + rng.normal(0, 0.05, 800), 0, 1)
    noise = rng.random(800)
    best, points = fd.search_operating_point(_one_source(informative[:400], noise[:400]),
                                             informative[400:], noise[400:], None, "stack",
                                             None, part_fprs=(0.0,))
    assert [p.w_cnn for p in points] == list(fd.W_GRID)
    assert all(p.either_cnn is None and p.either_rf is None for p in points)
    assert best.w_cnn >= 0.8 and best.detection > 0.95
    swapped, _ = fd.search_operating_point(_one_source(noise[:400], informative[:400]),
                                           noise[400:], informative[400:], None, "stack",
                                           None, part_fprs=(0.0,))
    assert swapped.w_cnn <= 0.2


def test_bootstrap_ci_brackets_the_point_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(200), np.ones(200)]
    s = rng.normal(0, 1, 400) + 1.0 * y
    v, lo, hi = fd.bootstrap_ci(y, s, fd.roc_auc, n_resamples=200, seed=5)
    assert lo <= v <= hi and 0.0 < hi - lo < 0.2
    assert fd.bootstrap_ci(y, s, fd.roc_auc, n_resamples=200, seed=5) == (v, lo, hi)
    # a bigger sample gives a narrower interval
    y4, s4 = np.tile(y, 4), rng.normal(0, 1, 1600) + 1.0 * np.tile(y, 4)
    _, lo4, hi4 = fd.bootstrap_ci(y4, s4, fd.roc_auc, n_resamples=200, seed=5)
    assert hi4 - lo4 < hi - lo


def test_binary_metrics_counts() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.6, 0.2, 0.9, 0.4, 0.7])
    m = fd.binary_metrics(y, s, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["recall"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)



def test_search_in_log_odds_scores_the_fused_log_odds() -> None:
    """fusion="logit": each point's threshold and detection are those of the log-odds fusion
    (detector.scoring.fuse), not of the probability mean."""
    from detector.calibration import calibrate_threshold
    from detector.scoring import fuse

    rng = np.random.default_rng(4)
    cnn = np.clip(np.r_[rng.normal(0.2, 0.1, 600), rng.normal(0.7, 0.2, 600)], 0.001, 0.999)
    forest = np.clip(np.r_[rng.normal(0.4, 0.2, 600), rng.normal(0.8, 0.2, 600)], 0.001, 0.999)
    groups = _one_source(cnn[:600], forest[:600])
    best, points = fd.search_operating_point(groups, cnn[600:], forest[600:], None, "logit",
                                             None, part_fprs=(0.0,))
    for p in points[::5]:
        s = fuse(cnn, forest, p.w_cnn, "logit")
        t = calibrate_threshold(s[:600])
        assert p.threshold == pytest.approx(t)
        assert p.detection == pytest.approx(np.mean(s[600:] >= t))
    _, stack = fd.search_operating_point(groups, cnn[600:], forest[600:], None, "stack", None,
                                         part_fprs=(0.0,))
    by_w = {p.w_cnn: p.threshold for p in stack}
    assert any(abs(by_w[p.w_cnn] - p.threshold) > 1e-3 for p in points[1:-1])
    assert 0.0 < best.w_cnn < 1.0  # both parts carry information here


def test_gate_and_threshold_share_the_false_positive_budget() -> None:
    """With the stride-grid gate, the operating threshold keeps score and gate together at the
    1% target on the clean images, and is stricter than without the gate."""
    from detector.scoring import apply_gate

    rng = np.random.default_rng(4)
    cnn, forest, grid = rng.uniform(0, 1, 2000), rng.uniform(0, 1, 2000), \
        rng.normal(0.1, 0.15, 2000)
    grid[:3] = [0.9, 1.0, 1.1]  # three clean images with a natural periodic peak
    gate = (fd.calibrate_threshold(grid, 0.001), 10.0)
    groups = [fd.CleanGroup(cnn, forest, grid)]
    _, _, t = fd.operating_point(groups, 0.5, 0.0, "stack", gate)
    flagged = apply_gate(fd.fuse(cnn, forest, 0.5, "stack"), grid, *gate) >= t
    assert np.mean(flagged) <= 0.01
    _, _, plain = fd.operating_point([fd.CleanGroup(cnn, forest, None)], 0.5, 0.0, "stack",
                                     None)
    assert t >= plain  # the gate's images take part of the budget


def test_operating_point_keeps_the_budget_on_every_source_with_the_parts_included() -> None:
    """The threshold and the either-part thresholds together flag at most 1% of each source's
    clean validation images, even where one source is far noisier than the other."""
    from train.fit_detector import CleanGroup, operating_point, search_operating_point

    rng = np.random.default_rng(0)
    quiet = CleanGroup(rng.beta(1, 9, 1000), rng.beta(1, 9, 1000), None)
    noisy = CleanGroup(rng.beta(3, 4, 600), rng.beta(4, 3, 600), None)
    for part_fpr in (0.0, 0.0025, 0.005):
        a, b, t = operating_point([quiet, noisy], 0.5, part_fpr, "logit", None)
        assert (a is None) == (b is None) == (part_fpr == 0.0)
        for g in (quiet, noisy):
            fused = fd.fuse(g.cnn, g.forest, 0.5, "logit")
            flagged = fused >= t
            if a is not None:
                flagged |= (g.cnn >= a) | (g.forest >= b)
            assert flagged.sum() <= int(0.01 * len(g.cnn))
    # attacks that only the forest sees: the override finds them, the fused score does not
    p_cnn, p_rf = rng.beta(2, 5, 400), rng.uniform(0.985, 1.0, 400)
    best, points = search_operating_point([quiet, noisy], p_cnn, p_rf, None, "logit", None,
                                          w_grid=(0.5,))
    plain = next(p for p in points if p.part_fpr == 0.0)
    assert best.part_fpr > 0 and best.either_rf is not None
    assert best.detection > plain.detection + 0.2
