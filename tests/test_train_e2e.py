"""End to end on a tiny synthetic folder: sentinel train --quick writes a bundle the runtime
loads and scores with, sentinel evaluate writes the report, sentinel attack uses its victim.
Slow (TensorFlow training, a few minutes): run with -m slow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def _folder(root: Path, n: int = 48) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    rows = []
    for i in range(n):
        label = i % 2
        base = 120 + 60 * np.sin(yy / (20 + 10 * label)) * np.cos(xx / 25)
        base = base + rng.normal(0, 1, (224, 224))
        img = np.clip(base, 0, 255).astype(np.uint8)
        rel = f"img/{i:03d}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        rows.append({"filename": rel, "label": "pneumonia" if label else "normal",
                     "patient_id": f"P{i // 2}"})
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)


def test_train_evaluate_attack_end_to_end(tmp_path: Path) -> None:
    from gateway.cli import main

    data, bundle, report = tmp_path / "data", tmp_path / "bundle", tmp_path / "report"
    _folder(data)
    assert main(["train", "--data", str(data), "--out", str(bundle), "--work",
                 str(tmp_path / "work"), "--quick"]) == 0
    from detector.scoring import Detector

    det = Detector.load(bundle)
    score = det.score_path(data / "img/000.png")
    assert 0.0 <= score.score <= 1.0
    # the stride-grid gate is calibrated and shipped (its feature reported with each score)
    rule = json.loads((bundle / "manifest.json").read_text())["rule"]
    assert rule["gate"]["feature"] == "stride_grid_peaks" and rule["gate"]["slope"] > 0
    assert score.grid_peaks is not None
    # resumable: a second run with the same work dir skips every stage and rewrites the bundle
    assert main(["train", "--data", str(data), "--out", str(bundle), "--work",
                 str(tmp_path / "work"), "--quick"]) == 0
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(report),
                 "--bootstrap", "20"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["per_perturbation"]) >= {"pgd_0.003", "pgd_0.006"}
    assert (report / "index.html").is_file() and (report / "fig3_roc_overall.png").is_file()
