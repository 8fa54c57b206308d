"""Adaptive attacks on tiny synthetic data: outputs stay on the source grid within eps, the
victim term works, the statistics penalty keeps the features nearer their clean values, the
HFC Gaussians and the forest surrogate behave. Untrained Keras models and the fixture bundle:
the point is the mechanics, not the figures (those come from runs on real radiographs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from detector import features  # noqa: E402
from train import adaptive, surrogate  # noqa: E402


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    out = []
    for _ in range(n):
        a, b = rng.uniform(1, 4, 2)
        img = 0.45 + 0.25 * np.sin(a * xx + rng.uniform(0, 3)) * np.cos(b * yy)
        out.append(np.round(np.clip(img, 0, 1) * 255) / 255)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def models(fixture_bundle: Path) -> adaptive.AdaptiveModels:
    import keras

    from detector.scoring import Detector
    from train import victim

    keras.utils.set_random_seed(0)
    vic = victim.build_victim()
    det = Detector.load(fixture_bundle)
    cnn = keras.saving.load_model(str(det.manifest.path_of("cnn_keras")), compile=False)
    x = _images(6, seed=1)
    f_clean = features.extract_batch(x)
    return adaptive.AdaptiveModels(victim=vic, cnn=cnn, detector=det,
                                   feature_scale=f_clean.std(axis=0) + 1e-6)


def test_attack_stays_on_grid_within_eps_and_moves_the_victim(models) -> None:
    from train import victim

    x = _images(2)
    logits = victim.predict_logits(models.victim, x)
    y = (logits > 0).astype(np.float64)  # the victim's own prediction: the attack flips it
    spec = adaptive.AdaptiveAttack("victim-only", select="proxy")
    s = adaptive.AttackSettings(eps=0.006, steps=8, check_every=4, kappa=50.0)
    adv = adaptive.run_attack(models, spec, s, x, y)
    k = adv * 255
    assert np.allclose(k, np.round(k), atol=1e-3)
    assert np.abs(adv - x).max() <= 0.006 + 0.5 / 255 + 1e-6
    after = victim.predict_logits(models.victim, adv)
    sign = 2 * y - 1
    assert np.all(sign * after < sign * logits)  # the margin loss was descended


def test_statistics_penalty_keeps_features_nearer_clean(models) -> None:
    from train import victim

    x = _images(2, seed=5)
    y = (victim.predict_logits(models.victim, x) > 0).astype(np.float64)
    s = adaptive.AttackSettings(eps=0.006, steps=10, check_every=5, kappa=50.0)
    plain = adaptive.run_attack(models, adaptive.AdaptiveAttack("plain", select="proxy"), s, x, y)
    stats = adaptive.run_attack(
        models, adaptive.AdaptiveAttack("stats", w_stats=50.0, select="proxy"), s, x, y)
    f0 = features.extract_batch(x)

    def dev(a: np.ndarray) -> float:
        return float(np.mean(((features.extract_batch(a) - f0) / models.feature_scale) ** 2))

    assert dev(stats) < dev(plain)


def test_hfc_gaussians_and_distance() -> None:
    import keras

    from train import victim

    keras.utils.set_random_seed(0)
    vic = victim.build_victim()
    probe, names = adaptive.victim_probe(vic)
    assert len(names) == 5  # four strided blocks + the last conv
    x = _images(8, seed=2)
    y = np.array([0, 1] * 4)
    g = adaptive.fit_gaussians(probe, names, x, y)
    acts = probe(x[..., None], training=False)
    d_own = adaptive.hfc_distance(list(acts), g, tf.constant(y, tf.float32)).numpy()
    assert d_own.shape == (8,) and np.all(np.isfinite(d_own)) and np.all(d_own >= 0)


def test_surrogate_follows_the_forest_and_round_trips(tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    from detector.forest import ForestArrays

    rng = np.random.default_rng(0)
    f_clean = rng.normal(0, 1, (300, 4))
    f_pert = f_clean + np.array([2.0, 0, 0, 0])
    rf = RandomForestClassifier(30, random_state=0).fit(
        np.r_[f_clean, f_pert], np.r_[np.zeros(300), np.ones(300)])
    forest = ForestArrays.from_sklearn(rf)
    sur = surrogate.fit_surrogate(forest, f_clean, f_pert, epochs=40)
    assert sur.fidelity["decision_agreement"] > 0.85
    sur.save(tmp_path / "s.npz")
    back = surrogate.Surrogate.load(tmp_path / "s.npz")
    pts = np.r_[f_clean[:5], f_pert[:5]]
    np.testing.assert_allclose(back.logit_np(pts), sur.logit_np(pts))
    np.testing.assert_allclose(sur.logit_tf(tf.constant(pts)).numpy(), sur.logit_np(pts),
                               rtol=1e-6, atol=1e-9)
    assert np.all(sur.logit_np(f_pert[:20]) > sur.logit_np(f_clean[:20]).max() - 5)


def test_wilson_interval() -> None:
    lo, hi = adaptive.wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo < 0.21
    assert adaptive.wilson(0, 10)[0] == 0.0
    # the interval holds the observed rate for every count, the ends included (0 of 11 and
    # 6 of 6 came out a few ulps outside and broke the grey-box plot's error bars)
    for n in range(1, 300):
        for k in range(n + 1):
            lo, hi = adaptive.wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)


def test_candidate_aware_attack_runs_on_the_grid(models) -> None:
    from train import ablation, victim

    x = _images(1, seed=9)
    y = (victim.predict_logits(models.victim, x) > 0).astype(np.float64)
    models.extra["candidate_scale"] = ablation.candidate_batch(_images(4, seed=3)).std(0) + 1e-3
    spec = adaptive.ATTACKS["adaptive-stats-cand"]
    s = adaptive.AttackSettings(eps=0.003, steps=4, check_every=2)
    adv = adaptive.run_attack(models, spec, s, x, y)
    assert np.allclose(adv * 255, np.round(adv * 255), atol=1e-3)
    assert np.abs(adv - x).max() <= 0.003 + 0.5 / 255 + 1e-6


def test_load_results_merges_finished_attacks(tmp_path: Path) -> None:
    import json

    (tmp_path / "result").mkdir()
    (tmp_path / "suite.json").write_text(json.dumps({"bundle_id": "b", "n": 2, "attacks": {}}))
    for name, rule in (("pgd", "ensemble"), ("adaptive-all", "ensemble"),
                       ("adaptive-all+or", "or")):
        (tmp_path / "result" / f"{name}_0.006.json").write_text(
            json.dumps({"attack": name, "eps": 0.006, "rule": rule}))
    every = adaptive.load_results(tmp_path)
    assert set(every["attacks"]) == {"pgd@0.006", "adaptive-all@0.006", "adaptive-all+or@0.006"}
    only_or = adaptive.load_results(tmp_path, rule="or")
    assert set(only_or["attacks"]) == {"pgd@0.006", "adaptive-all+or@0.006"}
    assert only_or["bundle_id"] == "b"


def test_home_operating_point_counts_only_fooled_images(models) -> None:
    """Detection at the home-source threshold is read among the images the attack fooled, and
    the per-image mask comes with it (the report draws detection against any threshold)."""
    from train import victim

    x = _images(4, seed=3)
    y = (victim.predict_logits(models.victim, x) > 0).astype(np.float64)  # all clean-correct
    adv = x.copy()
    adv[:2] = adaptive.run_attack(models, adaptive.AdaptiveAttack("victim-only", select="proxy"),
                                  adaptive.AttackSettings(eps=0.006, steps=8, kappa=50.0),
                                  x[:2], y[:2])
    fooled = (victim.predict_logits(models.victim, adv) > 0) != (y == 1)
    attacked = np.array([0.9, 0.1, 0.95, 0.2])  # 1st and 3rd above the threshold
    r = adaptive.home_operating_point(models, x, y, adv, np.array([0.1, 0.2, 0.3, 0.6]),
                                      attacked, threshold=0.5)
    assert r["fooled"] == fooled.astype(int).tolist()
    want = np.mean(attacked[fooled] >= 0.5) if fooled.any() else 0.0
    assert r["detection_fooled"] == pytest.approx(want)
    assert r["detection"] == pytest.approx(0.5)
    assert r["clean_fpr_subset"] == pytest.approx(0.25)
    assert r["threshold"] == 0.5


def test_surrogate_term_reads_a_secret_bundles_drawn_columns(models) -> None:
    """A secret site bundle's forest reads drawn columns in a drawn order (train.secret): the
    white-box attacker's surrogate term must read those, not the vector's first columns."""
    from dataclasses import replace

    from sklearn.ensemble import RandomForestClassifier

    from detector.forest import ForestArrays

    x = _images(4, seed=3)
    f = features.extract_batch(x)
    cols = [5, 0, 2]
    rng = np.random.default_rng(0)
    fc = f[:, cols][rng.integers(0, 4, 200)] + rng.normal(0, 0.01, (200, 3))
    fp = fc * 1.5
    rf = RandomForestClassifier(10, random_state=0).fit(np.r_[fc, fp],
                                                        np.r_[np.zeros(200), np.ones(200)])
    sur = surrogate.fit_surrogate(ForestArrays.from_sklearn(rf), fc, fp, epochs=5)
    m = replace(models, surrogate=sur,
                extra={**models.extra, "forest_cols": cols, "n_forest": 3})
    spec = adaptive.AdaptiveAttack("sur", w_surrogate=1.0, select="proxy")
    s = adaptive.AttackSettings(eps=0.006, steps=1)
    step = adaptive._make_step(m, spec, s)
    xt = tf.constant(x)
    _, _, proxy = step(xt, xt, tf.constant(np.zeros(4, np.float32)), tf.constant(f))
    want = np.logaddexp(0.0, sur.logit_np(f[:, cols]))
    np.testing.assert_allclose(proxy.numpy(), want, rtol=1e-3, atol=1e-4)
    first = np.logaddexp(0.0, sur.logit_np(f[:, :3]))
    assert not np.allclose(want, first, rtol=1e-3)  # the prefix would have been another term
