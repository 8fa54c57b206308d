"""Leave-one-family-out evaluation (train.zoo_lofo, issue 15): each family is scored by the fold
that never saw it, a site threshold comes from the same code as `sentinel calibrate`, and the
issue's targets are checked on the held-out figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixture_bundle import synthetic_images

from train import zoo_lofo
from train.zoo_eval import SiteRule


def _bundle(fixture_bundle: Path, holdout: tuple[str, ...] = ()) -> zoo_lofo.ScoredBundle:
    from detector.scoring import Detector

    return zoo_lofo.ScoredBundle("b", fixture_bundle, Detector.load(fixture_bundle), holdout)


def test_each_family_goes_to_the_fold_that_held_it_out(fixture_bundle: Path) -> None:
    a = _bundle(fixture_bundle, ("avgpool", "blurpool"))
    b = _bundle(fixture_bundle, ("vit",))
    assert zoo_lofo.fold_for("blurpool", [a, b]) is a
    assert zoo_lofo.fold_for("vit", [a, b]) is b
    assert zoo_lofo.fold_for("maxpool", [a, b]) is None


def test_detection_counts_fooled_images_only_at_both_thresholds(fixture_bundle: Path) -> None:
    imgs, labels = synthetic_images(16, seed=3)
    perturbed = imgs[labels == 1]
    b = _bundle(fixture_bundle)
    fooled = np.zeros(len(perturbed), bool)
    fooled[:5] = True
    r = zoo_lofo.detection(b, perturbed, fooled)
    assert r["fooled"] == 5 and 0 <= r["detected"] <= 5 and "site" not in r
    site = zoo_lofo.site_calibrated(b, imgs[labels == 0])
    # `sentinel calibrate --allow-lower` needs 300 images to go below the bundle: not here
    assert site.site is not None and site.site.threshold >= b.detector.threshold
    r = zoo_lofo.detection(site, perturbed, fooled)
    assert r["site"]["threshold"] == site.site.threshold and r["site"]["fooled"] == 5
    assert "cnn_gate" not in r["site"]  # not asked


def test_targets_are_checked_on_held_out_cells_with_enough_fooled_images() -> None:
    def cell(eps: float, rate: float, fooled: int, site_rate: float | None = None) -> dict:
        held = {"rate": rate, "fooled": fooled, "detected": round(rate * fooled)}
        if site_rate is not None:
            held["site"] = {"rate": site_rate, "fooled": fooled}
        return {"source": "nih512", "family": "avgpool", "attack": "pgd", "eps": eps,
                "held_out": held}

    clean = {"kermany224": {"final": {"fpr": 0.005}}, "nih512": {"final": {"fpr": 0.03}}}
    misses = zoo_lofo.targets_check(
        [cell(0.006, 0.95, 40), cell(0.006, 0.5, 19), cell(0.003, 0.6, 30, site_rate=0.9),
         cell(0.006, 0.9, 25, site_rate=0.9)], clean,
        [{"kind": "clahe", "setting": "clip=3.0", "source": "nih512", "fpr": 0.05}])
    text = "\n".join(misses)
    assert "eps 0.003: 60% of 30 fooled < 70%" in text  # held out, under target
    assert "19 fooled" not in text  # too few fooled to count
    assert "site-calibrated avgpool pgd eps 0.006: 90% of 25 fooled < 95%" in text
    assert "site-calibrated avgpool pgd eps 0.003" not in text  # 90% >= 85%
    assert "clean nih512 (final): 3.0% > 2%" in text and "kermany224" not in text
    assert "processing clahe clip=3.0 on nih512: 5.0% > 2%" in text
    assert zoo_lofo.targets_check([cell(0.006, 0.95, 40)], {}, []) == []


def test_markdown_names_the_fold_and_both_thresholds() -> None:
    held = {"rate": 0.5, "fooled": 20, "detected": 10, "ci": [0.3, 0.7],
            "site": {"rate": 0.75, "fooled": 20, "detected": 15, "ci": [0.5, 0.9]}}
    results = {
        "bundle": "B1", "threshold": 0.8, "bundles": ["final", "fold-a"],
        "clean": {"nih512": {"final": {"fpr": 0.01, "flagged": 1, "n": 100, "ci": [0, 0.05]}}},
        "cells": [{"source": "nih512", "family": "vit", "attack": "pgd", "eps": 0.006,
                   "fooled": 20, "n": 100, "held_out": held, "held_out_bundle": "fold-a",
                   "final": {"rate": 1.0, "fooled": 20, "detected": 20, "ci": [0.8, 1.0]}}],
        "processing": [], "misses": [], "site": {"images": 300, "threshold": 0.7},
    }
    md = zoo_lofo.markdown(results)
    assert "| nih512 | vit | pgd | 0.006 | 20/100 | 50% (10/20) [30, 70] (fold-a) | " \
           "75% (15/20) [50, 90] | 100% (20/20) [80, 100] |" in md
    assert "every target holds" in md and "300 clean NIH images" in md


def test_report_section_is_the_markdown_as_escaped_html() -> None:
    md = "# Victim zoo\n\ntext <b>\n\n| a | b |\n| --- | --- |\n| 1 | <script> |\n- missed: x\n"
    out = zoo_lofo.markdown_html(md)
    assert "<h2>Victim zoo</h2>" in out and "<p>text &lt;b&gt;</p>" in out
    assert "<tr><th>a</th><th>b</th></tr><tr><td>1</td><td>&lt;script&gt;</td></tr>" in out
    assert "---" not in out and "&bull; missed: x" in out


def test_a_bundle_trained_without_the_zoo_holds_every_family_out(fixture_bundle: Path) -> None:
    from train.zoo import FAMILIES

    b = zoo_lofo.load_bundle(fixture_bundle)
    assert set(b.holdout) == set(FAMILIES)
    assert zoo_lofo.fold_for("avgpool", [b]) is b


def test_model_card_section_is_replaced_not_repeated() -> None:
    md = "# Victim zoo, leave-one-family-out: bundle B\n\ntext\n\n## Targets\n\n- ok\n"
    card = "# Model card\n\n## Training data\n\nx\n"
    once = zoo_lofo.with_zoo_section(card, md)
    assert once.startswith(card.rstrip("\n")) and "## Victim zoo\n" in once
    assert "### Targets" in once and "Victim zoo, leave-one-family-out: bundle B." in once
    twice = zoo_lofo.with_zoo_section(once + "\n## Licence\n\nCC\n",
                                      md.replace("- ok", "- new"))
    assert twice.count("## Victim zoo") == 1 and "- new" in twice and "- ok" not in twice
    assert twice.rstrip().endswith("CC") and "## Training data" in twice


def test_site_line_gate_comes_from_calibrate_and_counts_in_detection_and_fpr(
        fixture_bundle: Path) -> None:
    """110 clean images without lines: calibrate proposes the line gate; attacked copies whose
    ±1 pattern repeats with a victim's resize are caught by it at the site's operating point."""
    from tests.test_resample_lines import attacked, clean

    b = _bundle(fixture_bundle)
    calib = np.stack([clean(s, 256) / 255.0 for s in range(110)]).astype(np.float32)
    site = zoo_lofo.site_calibrated(b, calib)
    gate = site.site.line_gate
    assert gate is not None and gate >= 2.07
    adv = np.stack([attacked(clean(200 + s, 256), s, victim=128) / 255.0
                    for s in range(6)]).astype(np.float32)
    fooled = np.ones(6, bool)
    r = zoo_lofo.detection(site, adv, fooled)
    assert r["site"]["line_gate"] == gate and r["site"]["detected"] == 6
    lines_only = zoo_lofo.clean_fpr(site.detector, calib, SiteRule(1.01, gate))
    assert lines_only["line_gate"] == gate and lines_only["flagged"] == 0


def test_site_line_ramp_is_what_calibrate_proposes_and_counts_in_the_site_rule(
        fixture_bundle: Path) -> None:
    """300 clean images without lines: the site's ramp is propose_line_ramp's on them, under
    its gate, flags none of them; `--site-no-line-ramp` leaves it out; SiteRule flags a score
    its line lifts to the threshold."""
    from detector.cmd_calibrate import propose_line_ramp
    from tests.test_resample_lines import clean
    from train.zoo_eval import score_stored

    b = _bundle(fixture_bundle)
    calib = np.stack([clean(s, 256) / 255.0 for s in range(300)]).astype(np.float32)
    site = zoo_lofo.site_calibrated(b, calib)
    scored = score_stored(b.detector, calib)
    want = propose_line_ramp(scored["score"], scored["line"], site.site.threshold,
                             site.site.line_gate, 0.01)["ramp"]
    assert want is not None and site.site.line_ramp == want < site.site.line_gate
    assert zoo_lofo.clean_fpr(b.detector, calib, site.site)["flagged"] == int(
        SiteRule(site.site.threshold, site.site.line_gate).flags(scored).sum())
    assert zoo_lofo.site_calibrated(b, calib, line_ramp=False).site.line_ramp is None
    rule = SiteRule(0.8, 3.0, None, 2.0)
    flags = rule.flags({"score": np.array([0.5, 0.5, 0.79]), "line": np.array([2.2, 2.0, 2.0]),
                        "p_cnn": np.zeros(3)})
    assert list(flags) == [True, False, False]  # 25 * ln(1.1) lifts 0.5 past 0.8


def test_a_site_cnn_gate_is_what_calibrate_proposes_and_counts_everywhere(
        fixture_bundle: Path, tmp_path: Path) -> None:
    """`--site-cnn-gate`: the gate comes from propose_cnn_gate on the site's own images (300
    clean ones: above all of them), keeps them within the site's 1%, and flags in detection, in
    the clean FPR and in the processing table through the same SiteRule."""
    from detector.cmd_calibrate import propose_cnn_gate
    from train.zoo_eval import score_stored

    imgs, labels = synthetic_images(600, seed=5)
    calib = imgs[labels == 0][:300]
    b = _bundle(fixture_bundle)
    site = zoo_lofo.site_calibrated(b, calib, cnn_gate=True)
    scored = score_stored(b.detector, calib)
    want = propose_cnn_gate(scored["score"], scored["line"], scored["p_cnn"],
                            site.site.threshold, site.site.line_gate, 0.01)["gate"]
    assert site.site.cnn_gate == want and want is not None
    assert zoo_lofo.clean_fpr(b.detector, calib, site.site)["fpr"] <= 0.01
    assert zoo_lofo.site_calibrated(b, calib).site.cnn_gate is None  # only when asked
    rule = SiteRule(1.01, None, 0.5)
    flags = rule.flags({"score": np.array([0.2, 0.2, 1.0]), "line": np.array([9.0, 0, 0]),
                        "p_cnn": np.array([0.49, 0.5, 0.0])})
    assert list(flags) == [False, True, False]
    r = zoo_lofo.detection(zoo_lofo.ScoredBundle("b", fixture_bundle, b.detector, (), rule),
                           imgs[:4], np.ones(4, bool))
    assert r["site"]["cnn_gate"] == 0.5
    from train import processing

    rows = processing.clean_fpr_table(
        b.detector, {"site": calib[:3], "other": calib[3:5]}, tmp_path,
        settings=(processing.Setting("gamma", {"g": 0.7}),),
        site=("site", SiteRule(1.01, None, 0.0)))
    by_source = {row["source"]: row for row in rows}
    assert by_source["site"]["site_flagged"] == 3  # the CNN gate at 0 flags every image
    assert "site_flagged" not in by_source["other"]


def test_a_site_is_calibrated_at_one_bit_depth_per_run(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        zoo_lofo.main(["--sources", "nih512", "nih512-12bit"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "one of ('nih512', 'nih512-12bit')" in err and "--site 0" in err


def test_site_cells_of_the_12bit_source_count_towards_the_site_targets() -> None:
    cell = {"source": "nih512-12bit", "family": "maxpool", "attack": "pgd", "eps": 0.006,
            "held_out": {"fooled": 50, "rate": 1.0, "site": {"fooled": 50, "rate": 0.5}}}
    misses = zoo_lofo.targets_check([cell], {"nih512-12bit-site": {"b": {"fpr": 0.02}}}, [])
    assert any(m.startswith("site-calibrated maxpool pgd eps 0.006: 50%") for m in misses)
    assert any(m.startswith("clean nih512-12bit-site (b): 2.0% > 1%") for m in misses)
