"""`sentinel train --patient-part K/N`: a detector trained on one of N disjoint parts of the
training patients (issue 19's disjoint-patient site bundles). The parts, the refusals and the
model card line here; the whole path on a tiny folder is the slow test at the end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from train.datasets import Record, patient_parts
from train.pipeline import TrainConfig
from train.report import patient_part_lines


def _records(n_patients: int = 300, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        label = int(p % 4 != 0)  # 3 of 4 patients positive, like Kermany
        for j in range(int(rng.integers(1, 5))):
            recs.append(Record(rel=f"p{p}/{j}.png", label=label, patient=f"P{p}",
                               sha256=f"{p:04d}{j}"))
    return recs


def test_parts_are_disjoint_by_patient_balanced_and_seeded() -> None:
    recs = _records()
    part = patient_parts(recs, 2, seed=0)
    assert set(part.tolist()) == {0, 1}
    by_patient: dict[str, set[int]] = {}
    for r, k in zip(recs, part, strict=True):
        by_patient.setdefault(r.patient, set()).add(int(k))
    assert all(len(v) == 1 for v in by_patient.values())  # no patient in two parts
    patients = Counter(next(iter(v)) for v in by_patient.values())
    assert abs(patients[0] - patients[1]) <= 2  # dealt round-robin within each label
    pos = [np.mean([r.label for r, k in zip(recs, part, strict=True) if k == q]) for q in (0, 1)]
    assert abs(pos[0] - pos[1]) < 0.05, pos
    assert np.array_equal(part, patient_parts(recs, 2, seed=0))
    assert not np.array_equal(part, patient_parts(recs, 2, seed=1))
    three = patient_parts(recs, 3, seed=0)
    assert set(three.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="at least 2"):
        patient_parts(recs, 1, seed=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"patient_part": (0, 2), "zoo": False}, "1 <= K <= N"),
    ({"patient_part": (3, 2), "zoo": False}, "1 <= K <= N"),
    ({"patient_part": (1, 1), "zoo": False}, "N >= 2"),
    ({"patient_part": (1, 2)}, "--no-zoo"),
])
def test_config_refuses_what_a_part_cannot_train_on(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="d", out="o", work="w", **kwargs)


def test_config_tags_a_parts_model_files() -> None:
    whole = TrainConfig(data="d", out="o", work="w", zoo=False)
    part = TrainConfig(data="d", out="o", work="w", zoo=False, patient_part=(2, 3))
    assert whole.part_tag == "" and part.part_tag == "-part2of3"


def test_cli_refuses_a_malformed_part(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", ".", "--out", "o", "--no-zoo", "--patient-part", "half"])
    assert exc.value.code == 2
    assert "give K/N" in capsys.readouterr().err
    assert main(["train", "--data", ".", "--out", "o", "--patient-part", "1/2"]) == 2
    assert "--no-zoo" in capsys.readouterr().err


def test_model_card_names_the_part() -> None:
    assert patient_part_lines({"training_data": {"patient_part": None}}) == []
    lines = patient_part_lines({"training_data": {"patient_part": {
        "part": 1, "of": 2, "images": 2033, "patients": 1104}}})
    assert "part 1 of 2" in lines[-1] and "2,033 images of 1,104 patients" in lines[-1]


@pytest.mark.slow
def test_train_quick_on_two_disjoint_parts(tmp_path: Path) -> None:
    """Both parts train in one work dir, each on its own patients with its own model files;
    their bundles load and score, and together they cover the training split once."""
    from test_train_e2e import _folder

    from detector.bundle import load_manifest
    from detector.scoring import Detector
    from gateway.cli import main

    data = tmp_path / "data"
    _folder(data)
    args = ["train", "--data", str(data), "--work", str(tmp_path / "work"), "--quick",
            "--no-zoo"]
    for k in (1, 2):
        assert main([*args, "--out", str(tmp_path / f"part{k}"), "--patient-part",
                     f"{k}/2"]) == 0
    parts = [load_manifest(tmp_path / f"part{k}").training_data for k in (1, 2)]
    train_images = parts[0]["split"]["train"]["images"]
    assert parts[0]["patient_part"]["images"] + parts[1]["patient_part"]["images"] == (
        train_images)
    assert min(p["patient_part"]["images"] for p in parts) > 0
    models = tmp_path / "work" / "models"
    for k in (1, 2):
        assert (models / f"cnn-part{k}of2.tflite").is_file()
        assert (models / f"paper_cnn-part{k}of2.keras").is_file()
        assert (parts[k - 1]["models"][f"cnn-part{k}of2"]["train_images"]
                < 2 * train_images)
        det = Detector.load(tmp_path / f"part{k}")
        assert 0.0 <= det.score_path(data / "img/000.png").score <= 1.0
