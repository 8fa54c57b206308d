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
    # the victim zoo (issue 15): members trained and cached, their attacks and processed clean
    # images in the detector's training
    zoo_info = json.loads((bundle / "manifest.json").read_text())["training_data"]["zoo"]
    assert [m["family"] for m in zoo_info["members"]] == ["maxpool", "avgpool"]
    assert zoo_info["train_pairs"] > 0 and zoo_info["holdout"] == []
    assert (tmp_path / "work" / "zoo-members" / "members").is_dir()
    # resumable: a second run with the same work dir skips every stage and rewrites the bundle
    assert main(["train", "--data", str(data), "--out", str(bundle), "--work",
                 str(tmp_path / "work"), "--quick"]) == 0
    # --zoo-12bit: the 8-bit examples reused, 12-bit ones added, each with its clean budget
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "bundle12"), "--work",
                 str(tmp_path / "work"), "--quick", "--zoo-12bit"]) == 0
    zoo12 = json.loads((tmp_path / "bundle12/manifest.json").read_text())["training_data"]["zoo"]
    assert zoo12["example_sets"]["zoo12"]["levels"] == 4095
    assert zoo12["example_sets"]["zoo"] == zoo_info["example_sets"]["zoo"]
    assert zoo12["train_pairs"] == zoo_info["train_pairs"] + zoo12["example_sets"]["zoo12"][
        "train"]
    # its model card says it trained on 12-bit examples (from the manifest's training data)
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle12"), "--data", str(data),
                 "--out", str(tmp_path / "report12"), "--bootstrap", "20", "--model-card"]) == 0
    assert "zoo pairs stored at 12 bits" in (tmp_path / "bundle12/MODEL_CARD.md").read_text()
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(report),
                 "--bootstrap", "20"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["per_perturbation"]) >= {"pgd_0.003", "pgd_0.006"}
    assert (report / "index.html").is_file() and (report / "fig3_roc_overall.png").is_file()
    # the runtime bundle carries what scoring reads; the victim, reference CNNs and split sit
    # in its sibling training bundle, which names it, and the split records the root as given
    from detector.bundle import load_manifest
    from train.training_bundle import TRAINING_FILES, load_training

    assert not set(load_manifest(bundle).files) & set(TRAINING_FILES)
    files = load_training(bundle, tuple(TRAINING_FILES))
    assert files.source == tmp_path / "bundle-training"
    split = json.loads(files.path_of("split").read_text())
    assert split["root"] == str(data) and not Path(split["test"][0]["rel"]).is_absolute()
    assert load_manifest(bundle).training_data["data"] == str(data)
    # sentinel attack --bundle finds the victim there
    from test_dicom_attack import _write_dicom

    src = _write_dicom(tmp_path / "in.dcm", bits=8, photometric="MONOCHROME2", shape=(224, 224))
    assert main(["attack", str(src), str(tmp_path / "adv.dcm"), "--bundle", str(bundle)]) == 0
