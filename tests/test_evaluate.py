"""Evaluation on a synthetic score book: balanced per-perturbation sets, CIs, w-grid curves."""

from __future__ import annotations

import numpy as np
import pytest

from train import evaluate
from train.attacks import SUITE


def _book(n: int = 120, seed: int = 0) -> evaluate.ScoreBook:
    rng = np.random.default_rng(seed)
    scores = {"clean": {p: rng.uniform(0.0, 0.4, n) for p in
                        ("cnn", "forest", "paper_cnn", "baseline_cnn")}}
    for k, pert in enumerate(SUITE):
        shift = 0.1 * (k + 1) / len(SUITE)
        scores[pert.name] = {
            "cnn": rng.uniform(0.3 + shift, 1.0, n), "forest": rng.uniform(0.5, 1.0, n),
            "paper_cnn": rng.uniform(0.0, 0.6, n), "baseline_cnn": rng.uniform(0.1, 0.5, n)}
    return evaluate.ScoreBook(scores)


def test_metrics_cover_every_part_and_perturbation() -> None:
    book = _book()
    m = evaluate.compute_metrics(book, w_cnn=0.4, threshold=0.42,
                                 part_thresholds={"cnn": 0.4, "forest": 0.45, "paper_cnn": 0.5,
                                                  "baseline_cnn": 0.5},
                                 n_boot=50)
    assert set(m["per_perturbation"]) == {p.name for p in SUITE}
    for block in m["per_perturbation"].values():
        assert set(block) == set(evaluate.PARTS)
        for part in block.values():
            v, lo, hi = part["auc_ci"]
            assert lo <= v <= hi
            assert part["at_threshold"]["tp"] + part["at_threshold"]["fn"] == 120
    # forest scores never overlap: perfect AUC; clean FPR at threshold is measured on clean only
    assert m["per_perturbation"]["pgd_0.003"]["forest"]["auc_ci"][0] == 1.0
    ens_clean = 0.4 * book.part("clean", "cnn") + 0.6 * book.part("clean", "forest")
    assert m["clean_fpr_at_threshold"] == pytest.approx(np.mean(ens_clean >= 0.42))
    assert [g["w_cnn"] for g in m["w_grid_test"]][::20] == [0.0, 1.0]


def test_mixed_set_is_balanced_and_seeded() -> None:
    book = _book()
    y, mix = book.mixed(seed=1, w_cnn=0.5)
    assert y.sum() == len(y) / 2 == 120
    _, mix2 = book.mixed(seed=1, w_cnn=0.5)
    assert np.array_equal(mix["ensemble"], mix2["ensemble"])
    assert np.allclose(mix["ensemble"], 0.5 * mix["cnn"] + 0.5 * mix["forest"])


def test_roc_curve_is_monotone_from_origin_to_one() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    fpr, tpr = evaluate.roc_curve(y, rng.random(200) + y)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_gated_book_scores_as_the_runtime_rule() -> None:
    """With a gate, the ensemble is the runtime's gated score (the same apply_gate), in the
    per-kind, mixed and w-grid figures alike; the mix carries the grid feature along."""
    from dataclasses import replace

    from detector.scoring import Rule

    book = _book()
    rng = np.random.default_rng(3)
    for kind, block in book.scores.items():
        block["grid"] = rng.uniform(0.0, 0.4, 120) if kind == "clean" else rng.uniform(0, 2, 120)
    gated = replace(book, gate=(0.5, 10.0))
    rule = Rule("stack", gate_threshold=0.5, gate_slope=10.0)
    s = gated.scores["pgd_0.003"]
    want = [rule.combine(c, f, 0.4, g) for c, f, g in zip(s["cnn"], s["forest"], s["grid"],
                                                           strict=True)]
    np.testing.assert_allclose(gated.ensemble("pgd_0.003", 0.4), want, rtol=1e-12)
    # clean grid values all lie below the gate: the clean scores are untouched
    np.testing.assert_array_equal(gated.ensemble("clean", 0.4), book.ensemble("clean", 0.4))
    _, mix = gated.mixed(seed=1, w_cnn=0.4)
    np.testing.assert_allclose(mix["ensemble"], gated.combine(mix, 0.4))
    assert np.all(gated.ensemble("pgd_0.003", 0.4) >= book.ensemble("pgd_0.003", 0.4))
    m = evaluate.compute_metrics(gated, w_cnn=0.4, threshold=0.6, part_thresholds={
        "cnn": 0.4, "forest": 0.45, "paper_cnn": 0.5, "baseline_cnn": 0.5}, n_boot=20)
    g04 = next(g for g in m["w_grid_test"] if g["w_cnn"] == 0.4)
    y0, mix0 = gated.mixed(seed=0, w_cnn=0.4)  # compute_metrics' own mix (seed 0)
    assert g04["recall_at_operating_threshold"] == pytest.approx(
        np.mean(mix0["ensemble"][y0 == 1] >= 0.6))


def test_model_card_and_readme_table_state_the_gate_and_the_dicom_check() -> None:
    """The card and the README table say what the gate does and how the real DICOM files
    came out, from the metrics (nothing typed in by hand)."""
    from train.report import gate_sentence, model_card, readme_table

    m = evaluate.compute_metrics(_book(), w_cnn=0.4, threshold=0.42, part_thresholds={
        "cnn": 0.4, "forest": 0.45, "paper_cnn": 0.5, "baseline_cnn": 0.5}, n_boot=20)
    split = {n: {"images": 10, "patients": 5, "positive": 6, "negative": 4}
             for n in ("train", "val", "test")}
    m.update(bundle_id="b-1", split={**split, "seed": 0, "digest": "d", "dropped_duplicates": 0})
    assert gate_sentence(m) == ""
    m["rule"] = {"name": "logit", "gate": {"feature": "stride_grid_peaks", "threshold": 0.5317,
                                           "slope": 10.0}}
    v = {"p_cnn": 0.7, "p_rf": 0.5, "grid_peaks": 1.4}
    m["dicom_check"] = {"folder": "/d/dicom_cr_nema", "eps": [0.003, 0.006], "files": [
        {"file": "RG3_UNCR.dcm", "clean": {**v, "score": 0.02, "flagged": False},
         "pgd_0.003": {**v, "score": 1.0, "flagged": True},
         "pgd_0.006": {**v, "score": 0.6, "flagged": False}}], "all_as_expected": False}
    table = readme_table(m)
    assert "| real CR DICOMs (RG3_UNCR.dcm)" in table and "| n/a | 1 of 1 / 1 of 2 |" in table
    assert "attacked through the bundled victim" in table  # not every network's attack
    card = model_card(m, table, "sentinel train ...")
    assert "train.zoo_dicom" in card  # the limit names where the other networks' figures are
    assert "exceeds 0.5317" in card and "rise by 10 per decade" in card
    assert ("RG3_UNCR.dcm clean 0.020 passes, pgd_0.003 1.000 flagged, pgd_0.006 0.600 "
            "passes") in card
    assert "stride-grid gate knows one kind of attacker" in card
    # the bit-depth limit says what the bundle trained on (sentinel train --zoo-12bit)
    assert "was not in the training data" in card and "12 bits" not in card
    m["training_data"] = {"zoo": {"example_sets": {"zoo": {"train": 2048, "val": 640,
                                                           "levels": 255},
                                                   "zoo12": {"train": 1024, "val": 640,
                                                             "levels": 4095}}}}
    assert "1,024 zoo pairs stored at 12 bits" in model_card(m, table, "sentinel train ...")
