"""Data sets: duplicates dropped, patients never shared between splits, seeded and recorded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import datasets


def _write_folder(root: Path, n_patients: int = 40, per_patient: int = 3) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        label = "pneumonia" if p % 3 else "normal"
        for k in range(per_patient):
            rel = f"imgs/p{p:03d}_{k}.png"
            (root / "imgs").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / rel)
            rows.append({"filename": rel, "label": label, "patient_id": f"P{p}"})
    # an exact duplicate of patient 0's first image, filed under another patient
    dup = "imgs/zz_duplicate.png"
    (root / dup).write_bytes((root / "imgs/p000_0.png").read_bytes())
    rows.append({"filename": dup, "label": "normal", "patient_id": "P999"})
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)


def test_duplicates_dropped_and_patients_disjoint(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    split = datasets.make_split(tmp_path, seed=3)
    assert split.dropped_duplicates == ("imgs/zz_duplicate.png",)
    parts = {n: split.part(n) for n in datasets.SPLIT_NAMES}
    assert sum(len(v) for v in parts.values()) == 40 * 3
    patients = {n: {r.patient for r in v} for n, v in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    hashes = [r.sha256 for v in parts.values() for r in v]
    assert len(hashes) == len(set(hashes))
    # fractions roughly respected (whole patients of 3 images)
    assert 70 <= len(parts["train"]) <= 98
    assert all(r.label in (0, 1) for v in parts.values() for r in v)


def test_split_is_seeded_and_round_trips(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    a = datasets.make_split(tmp_path, seed=1)
    b = datasets.make_split(tmp_path, seed=1)
    c = datasets.make_split(tmp_path, seed=2)
    assert a.digest == b.digest
    assert a.digest != c.digest
    a.to_json(tmp_path / "split.json")
    back = datasets.Split.from_json(tmp_path / "split.json")
    assert back.digest == a.digest and back.summary() == a.summary()


def test_duplicate_content_across_patients_stays_in_one_split() -> None:
    recs = [datasets.Record(f"f{i}", i % 2, f"P{i}", f"h{i}") for i in range(30)]
    recs.append(datasets.Record("copy", 0, "PX", "h4"))  # same content as P4's file
    for seed in range(5):
        split = datasets.split_by_patient(recs, seed=seed)
        where = {r.rel: n for n in datasets.SPLIT_NAMES for r in split.part(n)}
        assert where["copy"] == where["f4"]


def test_labels_and_bad_inputs(tmp_path: Path) -> None:
    assert datasets.parse_label("No_Finding") == 0
    assert datasets.parse_label("pneumonia") == 1
    assert datasets.parse_label("") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.scan_folder(tmp_path / "absent")
    (tmp_path / "labels.csv").write_text("name,label\n")
    with pytest.raises(ValueError, match="filename"):
        datasets.scan_folder(tmp_path)
    with pytest.raises(ValueError, match="fractions"):
        datasets.split_by_patient([], seed=0, fractions=(0.5, 0.5, 0.5))


def test_kermany_split_has_no_shared_patient(data_dir: Path) -> None:
    root = data_dir / "kermany224"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    split = datasets.make_split(root, seed=0)
    summary = split.summary()
    assert summary["dropped_duplicates"] >= 30
    seen: dict[str, str] = {}
    for name in datasets.SPLIT_NAMES:
        for r in split.part(name):
            assert seen.setdefault(r.patient, name) == name
    # every duplicate group listed by the data set keeps exactly one member
    kept = {r.rel for n in datasets.SPLIT_NAMES for r in split.part(n)}
    for line in (root / "exact_duplicates.txt").read_text().splitlines():
        group = [g for g in line.strip().split(",") if g]
        if group:
            assert sum(g in kept for g in group) == 1
