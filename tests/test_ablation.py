"""Ablation and the adaptive report on synthetic data: candidate steganalysis features react to
+-1 grey-level changes, forests refit on feature subsets, the report states targets met or
missed by how much. No TensorFlow needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train import ablation, adaptive_report


def _smooth(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    img = 0.4 + 0.2 * np.sin(rng.uniform(1, 4) * xx) * np.cos(rng.uniform(1, 4) * yy)
    return (np.round(img * 255) / 255).astype(np.float32)


def _pm1(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.choice([-1, 0, 0, 1], img.shape) / 255, 0, 1).astype(np.float32)


def test_candidate_features_are_shares_and_see_pm1_changes() -> None:
    clean = _smooth(0)
    pert = _pm1(clean, 1)
    fc, fp = ablation.candidate_features(clean), ablation.candidate_features(pert)
    assert fc.shape == (len(ablation.CANDIDATE_NAMES),)
    assert np.isclose(fc[:4].sum(), 1) and np.isclose(fc[4:].sum(), 1)
    i = {n: k for k, n in enumerate(ablation.CANDIDATE_NAMES)}
    assert fp[i["spam_opp"]] > fc[i["spam_opp"]] + 0.05
    assert fp[i["res2_0"]] < fc[i["res2_0"]] - 0.1


def _data(n: int = 60) -> ablation.FeatureData:
    rng = np.random.default_rng(0)
    k = 19

    def feats(shift: float, m: int) -> np.ndarray:
        f = rng.normal(0, 1, (m, k))
        f[:, 5] += shift  # one informative runtime feature
        f[:, 14] += shift  # and one informative candidate
        return f

    return ablation.FeatureData(
        names=tuple(f"f{j}" for j in range(k)),
        x_train=np.r_[feats(0, n), feats(3, n)], y_train=np.r_[np.zeros(n), np.ones(n)],
        val_clean=feats(0, n), test={"clean": feats(0, n), "pgd_0.003": feats(3, n),
                                     "pgd_0.006": feats(3, n)},
        adaptive={"a@0.006": feats(0.5, 20)}, adaptive_clean=feats(0, 20), adaptive_train={})


def test_evaluate_set_uses_only_its_columns() -> None:
    data = _data()
    with_info = ablation.evaluate_set(data, [0, 5], trees=20, max_depth=6, seed=0)
    without = ablation.evaluate_set(data, [0, 1], trees=20, max_depth=6, seed=0)
    assert with_info["per_perturbation"]["pgd_0.006"]["auc"] > 0.95
    assert without["per_perturbation"]["pgd_0.006"]["auc"] < 0.75
    assert set(with_info["importances"]) == {"f0", "f5"}
    assert "a@0.006" in with_info["adaptive"]
    # ROC kept on the FPR grid: monotone, near perfect with the informative feature, near the
    # diagonal without it
    roc = with_info["per_perturbation"]["pgd_0.006"]["tpr_at_fpr"]
    assert len(roc) == len(ablation.ROC_FPR_GRID) and roc == sorted(roc) and roc[-1] == 1.0
    assert roc[ablation.ROC_FPR_GRID.index(0.1)] > 0.8
    assert without["per_perturbation"]["pgd_0.006"]["tpr_at_fpr"][
        ablation.ROC_FPR_GRID.index(0.1)] < 0.5
    assert len(with_info["adaptive"]["a@0.006"]["tpr_at_fpr"]) == len(ablation.ROC_FPR_GRID)
    # adversarial training with examples like the adaptive ones raises their detection
    extra = np.r_[[np.r_[np.zeros(5), 0.5, np.zeros(13)]] * 40] + np.random.default_rng(
        1).normal(0, 0.1, (40, 19))
    hard = ablation.evaluate_set(data, [0, 5], trees=20, max_depth=6, seed=0, extra_x=extra)
    assert hard["adaptive"]["a@0.006"]["detection"] >= with_info["adaptive"]["a@0.006"][
        "detection"]


def _attack_row(name: str, eps: float, fooled: float, det_fooled: float) -> dict:
    n = 100
    rng = np.random.default_rng(0)
    return {"attack": name, "eps": eps, "n": n, "steps": 50, "victim_accuracy_clean": 0.9,
            "victim_accuracy_attacked": 0.1, "fooled_share_of_clean_correct": fooled,
            "n_fooled": int(fooled * 90), "detection_rate": det_fooled,
            "detection_ci": [max(0, det_fooled - 0.1), min(1, det_fooled + 0.1)],
            "detection_rate_fooled": det_fooled,
            "detection_fooled_ci": [max(0, det_fooled - 0.1), min(1, det_fooled + 0.1)],
            "undetected_successes": 3, "auc_ci": [0.9, 0.85, 0.95], "clean_fpr_subset": 0.01,
            "parts": {"cnn": {"detection": 0.1, "auc": 0.6},
                      "forest": {"detection": 0.8, "auc": 0.95}},
            "mean_abs_change_grey_levels": 0.7, "changed_pixel_share": 0.6,
            "scores": {"clean": rng.random(n).tolist(), "attacked": (rng.random(n) + 0.5)
                       .tolist()},
            "part_scores": {"clean": rng.random((n, 2)).tolist(),
                            "attacked": rng.random((n, 2)).tolist()}}


def _with_home(row: dict, threshold: float) -> dict:
    """A result row plus its detection at a home-source threshold (train.adaptive)."""
    s = np.asarray(row["scores"]["attacked"])
    fooled = np.ones(len(s), bool)
    det = float(np.mean(s >= threshold))
    return {**row, "home": {"threshold": threshold, "fooled": fooled.astype(int).tolist(),
                            "detection": det, "detection_fooled": det,
                            "detection_fooled_ci": [max(0, det - 0.1), min(1, det + 0.1)],
                            "clean_fpr_subset": 0.01}}


def test_report_sections_state_targets_and_write_files(tmp_path: Path) -> None:
    adaptive = {"bundle_id": "b1", "w_cnn": 0.5, "threshold": 0.7, "n": 100,
                "surrogate_fidelity": {"decision_agreement": 0.97},
                "attacks": {"pgd@0.006": _attack_row("pgd", 0.006, 0.95, 1.0),
                            "adaptive-all@0.006": _attack_row("adaptive-all", 0.006, 0.92,
                                                              0.31),
                            "adaptive-cnn@0.006": _attack_row("adaptive-cnn", 0.006, 0.5, 0.0),
                            "adaptive-all@0.003": _attack_row("adaptive-all", 0.003, 0.6,
                                                              0.2)}}
    data = _data()
    ab = {"trees": 20, "max_depth": 6, "n_train": 120, "n_test": 60, "n_adaptive": 20,
          "roc_fpr_grid": list(ablation.ROC_FPR_GRID),
          "sets": {"runtime (11)": ablation.evaluate_set(data, [0, 5], trees=10, max_depth=4,
                                                         seed=0),
                   "without f5": ablation.evaluate_set(data, [0], trees=10, max_depth=4,
                                                       seed=0)},
          "single_feature_auc": {"spectral_entropy": {"pgd_0.003": 0.51, "pgd_0.006": 0.52},
                                 "noise_sigma": {"pgd_0.003": 0.99, "pgd_0.006": 1.0}},
          "candidate_reasons": ablation.CANDIDATE_REASONS,
          "candidate_latency_ms": {"median": 0.5, "p25": 0.4, "p75": 0.6, "n": 10}}
    metrics = {"second_source": {"source": "nih", "images": 1000,
                                 "clean_fpr_at_threshold": 0.004,
                                 "pgd_0.006_detection_at_threshold": 0.97}}
    res = adaptive_report.write_sections(tmp_path, adaptive, ab, metrics)
    v = res["json"]["verdict"]
    # strongest at 0.006 = lowest detection among attacks fooling >= 90% (not adaptive-cnn)
    assert v["eps_0.006"]["attack"] == "adaptive-all"
    assert v["target_adaptive_0.006"]["met"] is False
    assert v["target_adaptive_0.006"]["missed_by"] == pytest.approx(0.19)
    assert v["eps_0.003"]["meets_fool_requirement"] is False
    assert v["target_second_source"]["met"] is True
    html = (tmp_path / "adaptive.html").read_text()
    assert "<h2>Adaptive attacks</h2>" in html and "<h2>Ablation</h2>" in html
    assert "short by 19.0 points" in html and "does not hold here" in html
    assert "fig_ablation_roc.png" in html
    for f in ("fig_adaptive_roc_eps0.006.png", "fig_adaptive_roc_eps0.003.png",
              "fig_ablation_single_feature.png", "fig_ablation_roc.png"):
        assert (tmp_path / f).stat().st_size > 1000
    doc = json.loads((tmp_path / "adaptive.json").read_text())
    assert "scores" not in doc["adaptive"]["attacks"]["pgd@0.006"]
    assert "part_scores" not in doc["adaptive"]["attacks"]["pgd@0.006"]
    # a second run against a hardened bundle gets its own section and figure names
    res = adaptive_report.write_sections(tmp_path / "h", adaptive, None, None, hardened=adaptive)
    assert "stronger detector" in res["html"]
    assert res["json"]["verdict_hardened"]["eps_0.006"]["attack"] == "adaptive-all"
    assert (tmp_path / "h" / "fig_adaptive_hardened_roc_eps0.006.png").exists()
    assert "home_threshold_0.006" not in v  # no home operating point in these rows


def test_report_reads_the_home_source_threshold(tmp_path: Path) -> None:
    """Rows measured at a threshold calibrated on the source's own clean images get a column,
    a verdict of their own and the threshold trade-off figure (with the second source's clean
    false-positive rate when its per-image scores are given)."""
    rng = np.random.default_rng(1)
    adaptive = {"bundle_id": "b1", "w_cnn": 0.5, "threshold": 0.9, "n": 100,
                "home_threshold": 0.6,
                "clean_fpr_split": {"images": 873, "split": "test", "at_bundle_threshold": 0.0,
                                    "at_home_threshold": 0.0092},
                "val_clean_scores": {"home": (rng.random(200) * 0.6).tolist(),
                                     "resampled": rng.random(200).tolist()},
                "attacks": {"adaptive-all@0.006": _with_home(
                                _attack_row("adaptive-all", 0.006, 0.95, 0.05), 0.6),
                            "adaptive-cnn@0.006": _with_home(
                                _attack_row("adaptive-cnn", 0.006, 0.95, 0.05), 0.6)}}
    nih = {"source": "/data/nih", "images": 50, "bundles": {"b1": {
        "bundle": "x/default", "clean_fpr": 0.0, "clean_fpr_ci": [0.0, 0.07],
        "pgd_0.006_detection": 1.0, "pgd_0.006_detection_ci": [0.93, 1.0],
        "clean_scores": (rng.random(50) * 0.8).tolist()}}}
    res = adaptive_report.write_sections(tmp_path, adaptive, second_source=nih)
    home = res["json"]["verdict"]["home_threshold_0.006"]
    expect = min(r["home"]["detection_fooled"] for r in adaptive["attacks"].values())
    assert home["detection_among_fooled"] == pytest.approx(expect)
    assert home["threshold"] == 0.6
    assert "home-source threshold" in res["html"]
    assert "all 873 test images: 0.92% at the home-source threshold" in res["html"]
    assert (tmp_path / "fig_adaptive_threshold_tradeoff.png").stat().st_size > 1000
    # per-image lists stay out of the JSON that goes into metrics.json
    doc = res["json"]
    assert "fooled" not in doc["adaptive"]["attacks"]["adaptive-all@0.006"]["home"]
    text = json.dumps(doc)
    assert "clean_scores" not in text and "val_clean_scores" not in text


def test_harden_bundle_loads_with_the_or_rule(tmp_path: Path, fixture_bundle: Path) -> None:
    from detector import features
    from detector.scoring import Detector

    work = tmp_path / "work"
    for d in ("clean", "pert/train", "pert/test", "adv-run/adv"):
        (work / d).mkdir(parents=True)
    clean = np.stack([_smooth(s) for s in range(14)])
    pert = np.stack([_pm1(c, s) for s, c in enumerate(clean)])
    np.save(work / "clean/train.npy", clean[:8])
    np.save(work / "pert/train_kinds.npy", np.zeros(8, np.int64))  # SUITE[0] = pgd_0.003
    np.save(work / "pert/train/pgd_0.003.npy", pert[:8])
    np.save(work / "clean/val.npy", clean[8:11])
    np.save(work / "clean/test.npy", clean[11:])
    np.save(work / "pert/test/pgd_0.003.npy", pert[11:])
    np.save(work / "adv-run/adv/adaptive-all_0.006.npy", pert[8:11])
    for fs, n in ((features.FEATURE_SET, 11), (features.FEATURE_SET_V2, 19)):
        out = ablation.harden_bundle(fixture_bundle, work, work / "adv-run",
                                     tmp_path / f"hard-{n}", feature_set=fs, trees=5)
        det = Detector.load(out)
        assert det.rule.name == "max" and det.threshold == 0.5
        assert det.manifest.training_data["hardened"]["adaptive_examples"] == 3
        assert len(det.manifest.feature_names) == n
        _, p_rf, score = det.score_unit(pert[0])
        assert 0.0 <= score <= 1.0 and 0.0 <= p_rf <= 1.0


def test_evaluate_report_gains_the_adaptive_section(tmp_path: Path) -> None:
    """`sentinel evaluate --adaptive` splices the section, its figures and numbers into the
    evaluation report it has just written."""
    from train.cmd_evaluate import add_adaptive_sections

    out = tmp_path / "report"
    out.mkdir()
    index = out / "index.html"
    index.write_text("<!doctype html><html><body><h1>evaluation</h1></body></html>")
    (out / "metrics.json").write_text(json.dumps({"bundle_id": "b1"}))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "bundle_id": "b1", "w_cnn": 0.5, "threshold": 0.7, "n": 100,
        "attacks": {"adaptive-all@0.006": _attack_row("adaptive-all", 0.006, 0.95, 0.2)}}))
    # a run against a hardened bundle (a train.adaptive output directory) and the bundles'
    # second-source comparison (second_source.json) join the same report
    hard = tmp_path / "hardened"
    (hard / "result").mkdir(parents=True)
    (hard / "suite.json").write_text(json.dumps({"bundle_id": "h1", "w_cnn": 0.5,
                                                 "threshold": 0.7, "n": 100}))
    (hard / "result" / "adaptive-all_0.006.json").write_text(
        json.dumps(_attack_row("adaptive-all", 0.006, 0.95, 0.4)))
    nih = tmp_path / "nih"
    nih.mkdir()
    (nih / "second_source.json").write_text(json.dumps({"source": "nih", "images": 999, "bundles": {
        "b1": {"bundle": "x/default", "clean_fpr": 0.001, "clean_fpr_ci": [0.0, 0.006],
               "pgd_0.006_detection": 1.0, "pgd_0.006_detection_ci": [0.99, 1.0]},
        "h1": {"bundle": "x/hardened", "clean_fpr": 0.03, "clean_fpr_ci": [0.02, 0.04],
               "pgd_0.006_detection": 1.0, "pgd_0.006_detection_ci": [0.99, 1.0]}}}))
    add_adaptive_sections(index, out, {}, results, None, hard, nih)
    page = index.read_text()
    assert page.index("<h1>evaluation</h1>") < page.index("<h2>Adaptive attacks</h2>")
    assert "stronger detector" in page and "<td>h1</td><td>hardened</td>" in page
    assert "src='adaptive/fig_adaptive_hardened_roc_eps0.006.png'" in page
    assert page.rstrip().endswith("</body></html>")
    assert "src='adaptive/fig_adaptive_roc_eps0.006.png'" in page
    assert (out / "adaptive" / "fig_adaptive_roc_eps0.006.png").stat().st_size > 1000
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["bundle_id"] == "b1"
    assert doc["adaptive"]["verdict"]["target_adaptive_0.006"]["met"] is False
