"""Modality processing kinds (issue 15) and the zoo evaluation's report, without TensorFlow.

Processing is clean: each kind must give a stored image (same matrix, on the storage grid,
deterministic) that differs from the input the way the kind says. The report must turn cached
cells into the table the issue asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")

from train import processing


def radiograph(rows: int = 200, cols: int = 180, levels: int = 255, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    x = 0.45 + 0.25 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 0.02 * rng.standard_normal(
        (rows, cols))
    return (np.round(np.clip(x, 0, 1) * levels) / levels).astype(np.float32)


@pytest.mark.parametrize("setting", processing.EVAL_SETTINGS, ids=lambda s: f"{s.kind}:{s.label}")
@pytest.mark.parametrize("levels", [255, 4095])
def test_every_setting_stores_a_changed_image_on_the_grid(setting: processing.Setting,
                                                           levels: int) -> None:
    x = radiograph(levels=levels)
    y = setting.apply(x, levels)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.array_equal(np.round(y.astype(np.float64) * levels) / levels,
                          y.astype(np.float64).round(12)) or np.abs(
        np.round(y.astype(np.float64) * levels) - y.astype(np.float64) * levels).max() < 1e-3
    assert np.array_equal(setting.apply(x, levels), y)  # deterministic
    assert np.abs(y - x).mean() > 0.3 / levels, "the processing changed nothing"


def test_clahe_clip_limit_means_the_same_at_8_and_12_bits() -> None:
    """OpenCV's 16-bit CLAHE divides the limit by 65,536 bins: every limit gave the same
    image. A stronger limit must change the image more, at either depth, by similar amounts."""
    for levels in (255, 4095):
        x = radiograph(levels=levels)
        weak = np.abs(processing.clahe(x, clip=1.2, levels=levels) - x).mean()
        strong = np.abs(processing.clahe(x, clip=4.0, levels=levels) - x).mean()
        assert strong > 1.5 * weak, (levels, weak, strong)
    a = np.abs(processing.clahe(radiograph(), 3.0, levels=255) - radiograph()).mean()
    b = np.abs(processing.clahe(radiograph(levels=4095), 3.0, levels=4095)
               - radiograph(levels=4095)).mean()
    assert abs(a - b) < 0.25 * a


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="clahe"):
        processing.Setting("vendor-magic")
    with pytest.raises(ValueError, match="bilateral"):
        processing.denoise(radiograph(), method="wiener")


def test_zoo_report_table_and_plot_from_cells(tmp_path: Path) -> None:
    from train import zoo_eval

    cell = {"family": "maxpool", "pipeline": "224-bilinear", "source": "nih512",
            "attack": "pgd", "eps": 0.003, "n": 100, "fooled": 86, "detected_fooled": 9,
            "detection_fooled": 9 / 86, "detection_fooled_ci": [0.05, 0.19],
            "median_score_fooled": 0.7, "median_p_cnn_fooled": 0.5,
            "median_p_rf_fooled": 0.97, "median_grid_fooled": 0.2}
    results = {"bundle_id": "b", "threshold": 0.892,
               "members": [{"family": "maxpool", "pipeline_tag": "224-bilinear",
                            "test_auc": 0.98, "params": 1, "train_wall_s": 2.0}],
               "clean": [{"source": "nih512", "n": 100, "flagged": 0, "fpr": 0.0,
                          "fpr_ci": [0.0, 0.037], "median_score": 0.3}],
               "cells": [cell, {**cell, "eps": 0.006, "fooled": 0, "detected_fooled": 0,
                                "detection_fooled": None, "detection_fooled_ci": [None, None],
                                **{k: None for k in cell if k.startswith("median")}}],
               "processing": []}
    md = zoo_eval.markdown(results)
    assert "| maxpool | 224-bilinear | 86/100 | 10% (9/86) [5, 19]" in md
    assert "0/100 | - (0 fooled)" in md
    zoo_eval.bar_plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(results)
