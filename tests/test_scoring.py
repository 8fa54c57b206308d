"""Detector scoring on the fixture bundle: stacking, thresholds, multi-frame worst frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixture_bundle import synthetic_images

from detector.features import FeatureExtractor
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
