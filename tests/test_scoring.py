"""Detector scoring on the fixture bundle: stacking, thresholds, multi-frame worst frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixture_bundle import synthetic_images

from detector.features import FeatureExtractor
from detector.forest import ForestArrays
from detector.scoring import Detector


@pytest.fixture(scope="module")
def detector(fixture_bundle: Path) -> Detector:
    return Detector.load(fixture_bundle)


def test_stacking_is_weighted_mean_of_parts(detector: Detector) -> None:
    imgs, _ = synthetic_images(4, seed=11)
    for img in imgs:
        p_cnn, p_rf, score = detector.score_unit(img)
        assert 0.0 <= p_cnn <= 1.0 and 0.0 <= p_rf <= 1.0
        assert score == pytest.approx(detector.w_cnn * p_cnn + (1 - detector.w_cnn) * p_rf)
        feats = FeatureExtractor().extract(img)
        assert p_rf == pytest.approx(float(detector.forest.predict_proba(feats)[0]))
        assert p_cnn == pytest.approx(float(detector.cnn.predict(img)))


def test_fixture_models_separate_noise_from_smooth(detector: Detector) -> None:
    """The fixture forest learned +-1 grey level noise: perturbed copies score higher."""
    imgs, labels = synthetic_images(20, seed=3)
    scores = np.array([detector.score_unit(im)[2] for im in imgs])
    assert scores[labels == 1].mean() > scores[labels == 0].mean() + 0.2


def test_threshold_override_and_verdict(detector: Detector) -> None:
    imgs, _ = synthetic_images(2, seed=5)
    s = detector.score_frames([imgs[1]])
    assert s.threshold == detector.threshold
    assert s.flagged == (s.score >= detector.threshold)
    never = detector.score_frames([imgs[1]], threshold=1.01)
    always = detector.score_frames([imgs[1]], threshold=0.0)
    assert not never.flagged and always.flagged
    assert set(s.timings_ms) == {"decode", "features", "cnn", "forest", "total"}
    assert all(v >= 0 for v in s.timings_ms.values())
    assert s.bundle_id == "fixture-0"


def test_multiframe_takes_worst_frame(detector: Detector) -> None:
    imgs, labels = synthetic_images(6, seed=8)
    order = [0, 2, 1, 4]  # the one noisy frame (label 1) sits at index 2
    assert labels[1] == 1
    s = detector.score_frames([imgs[i] for i in order])
    assert s.frames == 4
    assert s.worst_frame == int(np.argmax(s.frame_scores))
    assert s.score == max(s.frame_scores)
    assert s.worst_frame == 2


def test_litert_batch_threads_and_reuse(fixture_bundle: Path, detector: Detector) -> None:
    from detector.cnn import LiteRTModel

    imgs, _ = synthetic_images(3, seed=2)
    batch = detector.cnn.predict(imgs)
    assert batch.shape == (3,)
    singles = [detector.cnn.predict(im) for im in imgs]
    np.testing.assert_allclose(batch, singles, rtol=0, atol=0)  # one interpreter, reused
    two = LiteRTModel(detector.manifest.path_of("cnn"), num_threads=2)
    np.testing.assert_allclose(two.predict(imgs), batch, atol=1e-6)
    with pytest.raises(ValueError):
        detector.cnn.predict(np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError):
        LiteRTModel(detector.manifest.path_of("cnn"), num_threads=0)


def test_score_path_png_and_dicom_agree(detector: Detector, tmp_path: Path) -> None:
    """The same 8-bit pixels as PNG and as DICOM (BitsStored 8) score identically."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    imgs, _ = synthetic_images(2, seed=13)
    px = np.round(imgs[1] * 255).astype(np.uint8)
    Image.fromarray(px).save(tmp_path / "a.png")
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = px.tobytes()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    a = detector.score_path(tmp_path / "a.png")
    b = detector.score_path(tmp_path / "a.dcm")
    assert a.score == b.score and a.p_cnn == b.p_cnn and a.p_rf == b.p_rf
    assert b.timings_ms["decode"] > 0 and b.timings_ms["total"] >= b.timings_ms["decode"]


def test_max_rule_is_a_per_part_or(fixture_bundle: Path, tmp_path: Path) -> None:
    """Bundles may choose rule "max": flagged at 0.5 iff either part passes its own threshold;
    a p_cnn driven to 0 can no longer hide a confident forest (the stacking blind spot)."""
    from detector.bundle import load_manifest, write_bundle
    from detector.errors import BundleError
    from detector.scoring import Rule, parse_rule

    m = load_manifest(fixture_bundle)
    common = dict(
        cnn_tflite=m.path_of("cnn"),
        forest=ForestArrays.load(m.path_of("forest")),
        feature_names=m.feature_names,
        w_cnn=0.5,
        thresholds={},
        training_data={},
        metrics={},
    )
    out = write_bundle(
        tmp_path / "max",
        threshold=0.5,
        rule={"name": "max", "cnn_threshold": 0.9, "rf_threshold": 0.3},
        **common,
    )
    det = Detector.load(out)
    assert det.rule == Rule("max", 0.9, 0.3)
    imgs, _ = synthetic_images(8, seed=17)
    for img in imgs:
        p_cnn, p_rf, score = det.score_unit(img)
        assert 0.0 <= score <= 1.0
        assert (score >= 0.5) == (p_cnn >= 0.9 or p_rf >= 0.3)
    rule = Rule("max", 0.9, 0.3)
    assert rule.combine(0.0, 0.3, 0.5) == 0.5  # forest alone at its threshold flags
    assert rule.combine(0.0, 0.29, 0.5) < 0.5
    assert rule.combine(0.95, 0.0, 0.5) > 0.5
    assert Rule().combine(0.0, 1.0, 0.5) == 0.5  # stacking: p_cnn = 0 caps the score
    for bad in (
        {"name": "vote"},
        {"name": "max", "cnn_threshold": 1.0, "rf_threshold": 0.5},
        {"name": "max"},
    ):
        with pytest.raises(BundleError):
            parse_rule(bad, tmp_path)


def test_warm_up_runs_every_stage(detector: Detector) -> None:
    seconds = detector.warm_up()
    assert 0.0 < seconds < 30.0


@pytest.mark.parametrize(("feature_set", "n"), [("sentinel-features-v2", 19),
                                               ("sentinel-features-v3", 12)])
def test_feature_set_bundle(fixture_bundle: Path, tmp_path: Path, feature_set: str,
                            n: int) -> None:
    """A bundle whose forest was trained on feature set v2 (v3) gets 19 (12) features at run
    time."""
    from sklearn.ensemble import RandomForestClassifier

    from detector.bundle import load_manifest, write_bundle
    from detector.features import FEATURE_SETS, extract_batch

    imgs, labels = synthetic_images(16, seed=23)
    feats = extract_batch(imgs, feature_set)
    assert feats.shape == (16, n)
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(feats, labels)
    m = load_manifest(fixture_bundle)
    out = write_bundle(
        tmp_path / "bundle",
        cnn_tflite=m.path_of("cnn"),
        forest=ForestArrays.from_sklearn(rf),
        feature_names=FEATURE_SETS[feature_set],
        w_cnn=0.4,
        threshold=0.5,
        thresholds={},
        training_data={},
        metrics={},
    )
    assert load_manifest(out).extra["feature_set"] == feature_set
    det = Detector.load(out)
    _, p_rf, _ = det.score_unit(imgs[0])
    assert p_rf == pytest.approx(float(rf.predict_proba(feats[:1])[0, 1]), abs=1e-9)


def test_logit_rule_weights_log_odds(fixture_bundle: Path, tmp_path: Path) -> None:
    """Rule "logit": sigmoid(w logit(p_cnn) + (1 - w) logit(p_rf)), the same for floats and
    arrays, loaded from the manifest, and a bundle id that changes with the decision."""
    from detector.bundle import load_manifest, write_bundle
    from detector.scoring import Rule, fuse

    assert fuse(0.5, 0.5, 0.3, "logit") == pytest.approx(0.5)
    # a confident part outweighs a doubtful one in log-odds, not in probability
    assert fuse(0.2, 0.9999, 0.5, "logit") > 0.95 > fuse(0.2, 0.9999, 0.5, "stack")
    assert fuse(0.2, 0.95, 0.5, "logit") < 0.85
    a, b = np.array([0.1, 0.7, 1.0]), np.array([0.9, 0.2, 0.0])
    want = [fuse(float(x), float(y), 0.65, "logit") for x, y in zip(a, b, strict=True)]
    assert np.allclose(fuse(a, b, 0.65, "logit"), want) and np.all(np.isfinite(want))
    assert fuse(0.3, 0.8, 1.0, "logit") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(0.1, 0.2, 0.5, "mean")
    from detector.scoring import FUSIONS
    from train.cmd_train import FUSION_CHOICES
    from train.pipeline import TrainConfig

    assert FUSION_CHOICES == FUSIONS  # `sentinel train --fusion` offers what the runtime has
    with pytest.raises(ValueError, match="fusion 'mean'"):
        TrainConfig(data="d", out="o", work="w", fusion="mean")

    m = load_manifest(fixture_bundle)
    common = dict(cnn_tflite=m.path_of("cnn"), forest=ForestArrays.load(m.path_of("forest")),
                  feature_names=m.feature_names, w_cnn=0.4, thresholds={}, training_data={},
                  metrics={})
    logit = write_bundle(tmp_path / "logit", threshold=0.7, rule={"name": "logit"}, **common)
    stack = write_bundle(tmp_path / "stack", threshold=0.7, **common)
    det = Detector.load(logit)
    assert det.rule == Rule("logit") and det.rule.fusion == "logit"
    assert Detector.load(stack).rule.fusion == "stack"
    assert det.bundle_id != Detector.load(stack).bundle_id  # same models, another decision
    for img in synthetic_images(4, seed=3)[0]:
        p_cnn, p_rf, score = det.score_unit(img)
        assert score == pytest.approx(fuse(p_cnn, p_rf, 0.4, "logit"))
    from train.report import add_model_card

    add_model_card(logit, "# card\n", {})  # rewriting the manifest keeps the rule and the id
    again = Detector.load(logit)
    assert again.rule == Rule("logit") and again.bundle_id == det.bundle_id


def _stride_pattern(img: np.ndarray, amplitude: float = 0.004) -> np.ndarray:
    """img plus a pattern that repeats every 8 pixels: what a strided network's gradient
    imprints on a gradient attack (detector.features, GRID_REASONS)."""
    tile = np.random.default_rng(8).choice([-1.0, 1.0], (8, 8))
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return np.clip(img + amplitude * tile[yy % 8, xx % 8], 0, 1).astype(np.float32)


def test_gate_raises_log_odds_above_its_threshold_only() -> None:
    from detector.errors import BundleError
    from detector.scoring import Rule, apply_gate, parse_rule

    assert apply_gate(0.3, 0.2, 0.5, 10.0) == 0.3  # below the gate: the score as it was
    assert apply_gate(0.3, 0.5, 0.5, 10.0) == 0.3
    # above: + slope * (v - g) in log-odds
    assert apply_gate(0.3, 0.6, 0.5, 10.0) == pytest.approx(
        1 / (1 + np.exp(-(np.log(0.3 / 0.7) + 1.0))))
    v = np.array([0.0, 0.55, 0.7, 1.5])
    out = apply_gate(np.full(4, 0.2), v, 0.5, 10.0)
    assert out[0] == 0.2 and np.all(np.diff(out) > 0) and out[-1] > 0.99
    rule = parse_rule({"name": "logit", "gate": {"feature": "stride_grid_peaks",
                                                 "threshold": 0.53, "slope": 10}}, Path("."))
    assert rule == Rule("logit", gate_threshold=0.53, gate_slope=10.0)
    assert rule.combine(0.2, 0.3, 0.5, grid=0.1) == Rule("logit").combine(0.2, 0.3, 0.5)
    assert rule.combine(0.2, 0.3, 0.5, grid=1.2) > 0.99
    with pytest.raises(ValueError, match="pass the grid feature"):
        rule.combine(0.2, 0.3, 0.5)
    for bad in ({"feature": "noise_sigma", "threshold": 0.5, "slope": 10},
                {"feature": "stride_grid_peaks", "threshold": 0.5},
                {"feature": "stride_grid_peaks", "threshold": 0.5, "slope": 0},
                "0.5"):
        with pytest.raises(BundleError, match="gate"):
            parse_rule({"name": "logit", "gate": bad}, Path("."))


def test_gated_bundle_flags_a_stride_pattern_the_parts_miss(fixture_bundle: Path,
                                                            tmp_path: Path) -> None:
    """A v1 forest with a gate: the runtime computes v3 (v1 + the grid feature), the forest
    reads the first 11, scores below the gate are exactly the ungated ones, and a stride
    pattern the fixture's parts do not flag is flagged by the gate (Score.grid_peaks says so).
    A gate on a v2 forest is refused."""
    from detector.bundle import load_manifest, write_bundle
    from detector.errors import BundleError
    from detector.features import FEATURE_SET_V3, extract

    m = load_manifest(fixture_bundle)
    common = dict(cnn_tflite=m.path_of("cnn"), forest=ForestArrays.load(m.path_of("forest")),
                  w_cnn=m.w_cnn, thresholds={}, training_data={}, metrics={})
    gate = {"feature": "stride_grid_peaks", "threshold": 0.6, "slope": 10.0}
    plain = Detector.load(write_bundle(tmp_path / "plain", threshold=0.99,
                                       feature_names=m.feature_names, **common))
    gated = Detector.load(write_bundle(tmp_path / "gated", threshold=0.99,
                                       feature_names=m.feature_names,
                                       rule={"name": "stack", "gate": gate}, **common))
    imgs, _ = synthetic_images(4, seed=29)
    for img in imgs:
        assert extract(img, FEATURE_SET_V3)[-1] < 0.6
        assert gated.score_unit(img) == plain.score_unit(img)
    attacked = _stride_pattern(imgs[0])
    s_plain, s_gated = plain.score_frames([attacked]), gated.score_frames([attacked])
    assert not s_plain.flagged and s_plain.grid_peaks is None
    assert s_gated.flagged and s_gated.grid_peaks == pytest.approx(
        extract(attacked, FEATURE_SET_V3)[-1]) and s_gated.grid_peaks > 1.0
    assert (s_gated.p_cnn, s_gated.p_rf) == (s_plain.p_cnn, s_plain.p_rf)
    assert s_gated.as_dict()["grid_peaks"] == s_gated.grid_peaks

    from sklearn.ensemble import RandomForestClassifier

    from detector.features import FEATURE_SET_V2, FEATURE_SETS, extract_batch

    x, y = synthetic_images(8, seed=31)
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(
        extract_batch(x, FEATURE_SET_V2), y)
    common["forest"] = ForestArrays.from_sklearn(rf)
    v2 = write_bundle(tmp_path / "v2", threshold=0.5, feature_names=FEATURE_SETS[FEATURE_SET_V2],
                      rule={"name": "stack", "gate": gate}, **common)
    with pytest.raises(BundleError, match="gate needs feature set"):
        Detector.load(v2)


def test_either_part_override_flags_what_one_part_alone_sees(fixture_bundle: Path,
                                                               tmp_path: Path) -> None:
    """Rule "either" (issue 15): the fused score is kept, and a part passing its own threshold
    flags on its own, so a confident forest is not averaged away by an unsure CNN."""
    from detector.bundle import load_manifest, write_bundle
    from detector.errors import BundleError
    from detector.scoring import Either, Rule, apply_either, parse_rule

    rule = Rule("logit", either=Either(None, 0.97, 0.89))
    assert rule.either == Either(None, 0.97, 0.89)
    assert Rule("logit").combine(0.5, 0.97, 0.65) < 0.89  # the miss measured in issue 15
    assert rule.combine(0.5, 0.97, 0.65) == pytest.approx(0.89)  # now flagged at 0.89
    assert rule.combine(0.5, 0.96, 0.65) < 0.89
    assert rule.combine(0.99, 0.99, 0.65) == pytest.approx(Rule("logit").combine(0.99, 0.99, 0.65))
    # arrays and floats agree, and the map is monotone in each part
    p = np.linspace(0, 1, 101)
    s = apply_either(np.zeros_like(p), np.zeros_like(p), p, rule.either)
    assert np.all(np.diff(s) >= 0) and s[-1] == 1.0
    assert float(apply_either(0.0, 0.0, 0.5, rule.either)) == pytest.approx(s[50])

    m = load_manifest(fixture_bundle)
    out = write_bundle(tmp_path / "either", cnn_tflite=m.path_of("cnn"),
                       forest=ForestArrays.load(m.path_of("forest")),
                       feature_names=m.feature_names, w_cnn=0.5, threshold=0.6, thresholds={},
                       training_data={}, metrics={},
                       rule={"name": "logit", "either": {"cnn": None, "forest": 0.3, "at": 0.6}})
    det = Detector.load(out)
    imgs, _ = synthetic_images(8, seed=17)
    for img in imgs:
        p_cnn, p_rf, score = det.score_unit(img)
        assert (score >= 0.6) == (Rule("logit").combine(p_cnn, p_rf, 0.5) >= 0.6 or p_rf >= 0.3)
    for bad in ({"cnn": 1.2, "at": 0.5}, {"cnn": 0.5}, {"forest": 0.5, "at": 0.5, "x": 1},
                "either"):
        with pytest.raises(BundleError, match="either"):
            parse_rule({"name": "logit", "either": bad}, tmp_path)


def test_line_ramp_lifts_the_score_by_its_line_and_needs_the_line() -> None:
    """apply_line_ramp flags where logit(score) + 25 ln(line / ramp) reaches the threshold's
    log-odds, never for a line at or under the ramp, and refuses a score without a line."""
    from dataclasses import replace

    from detector.scoring import LINE_RAMP_SLOPE, Score, apply_line_ramp, ramp_flags

    base = Score(score=0.5, p_cnn=0.5, p_rf=0.5, threshold=0.8, flagged=False, frames=1,
                 worst_frame=0, bundle_id="b", timings_ms={}, line_peak=2.0, line_gate=3.0)
    need = np.log(0.8 / 0.2) / LINE_RAMP_SLOPE  # ln(line / ramp) that reaches the threshold
    just = apply_line_ramp(base, 2.0 * np.exp(-need) * 0.999)
    short = apply_line_ramp(base, 2.0 * np.exp(-need) * 1.001)
    assert just.flagged and not short.flagged and just.line_ramp is not None
    assert not apply_line_ramp(replace(base, score=0.79), 2.0).flagged  # line at the ramp
    assert apply_line_ramp(base, None) is base
    with pytest.raises(ValueError, match="line gate"):
        apply_line_ramp(replace(base, line_peak=None), 1.8)
    scores, lines = np.array([0.5, 0.5, 0.79, 0.1]), np.array([2.0, 1.9, 2.0, 9.0])
    vec = ramp_flags(scores, lines, 0.8, 1.95)
    assert list(vec) == [ramp_flags(s, v, 0.8, 1.95) for s, v in zip(scores, lines,
                                                                      strict=True)]
