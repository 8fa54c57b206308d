"""The runtime bundle carries what scoring reads; the victim, the reference CNNs and split.json
live in a training bundle beside it (train/models/default for the shipped one), verified the
same way, and split.json records image paths relative to a data root given as-is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixture_bundle import each_file_with_a_flipped_byte

from detector.bundle import DEFAULT_BUNDLE, MANIFEST, load_manifest, write_bundle
from detector.errors import BundleError
from detector.forest import ForestArrays
from train import datasets, training_bundle
from train.training_bundle import DEFAULT_TRAINING, TRAINING_FILES, load_training


def test_shipped_runtime_bundle_lists_no_training_files() -> None:
    """What a gateway start hashes is what scoring reads (plus the card and test metrics)."""
    doc = json.loads((DEFAULT_BUNDLE / MANIFEST).read_text())
    assert set(doc["files"]) == {"cnn", "forest", "model_card", "test_metrics"}
    assert not set(doc["files"]) & set(TRAINING_FILES)
    assert sorted(p.name for p in DEFAULT_BUNDLE.iterdir() if p.is_file()) == sorted(
        [MANIFEST, *(e["path"] for e in doc["files"].values())])
    assert sum(e["bytes"] for e in doc["files"].values()) < 2_200_000
    # and the training bundle that ships with train/ names it and verifies
    files = load_training(None, tuple(TRAINING_FILES))
    assert files.source == DEFAULT_TRAINING
    assert json.loads((DEFAULT_TRAINING / MANIFEST).read_text())["runtime_bundle_id"] == \
        load_manifest(None).bundle_id
    assert not Path(load_manifest(None).training_data["data"]).is_absolute()


def test_split_paths_are_relative_to_a_root_given_as_is(tmp_path: Path) -> None:
    """The shipped split.json: every image is a path under the data root, and the root is the
    one given to `sentinel train`, not the build machine's absolute path."""
    raw = json.loads((DEFAULT_TRAINING / "split.json").read_text())
    assert not Path(raw["root"]).is_absolute()
    for part in datasets.SPLIT_NAMES:
        for r in raw[part]:
            assert not Path(r["rel"]).is_absolute() and ".." not in Path(r["rel"]).parts
    # to_json records the root it is told to; an old split.json (absolute root) still reads,
    # with the same digest, and its images are found under the reader's --data
    split = datasets.Split.from_json(DEFAULT_TRAINING / "split.json")
    old = tmp_path / "old.json"
    split.to_json(old, root="/build/machine/kermany224")
    back = datasets.Split.from_json(old)
    assert back.root == "/build/machine/kermany224" and back.digest == split.digest
    assert back.test[0].rel == split.test[0].rel


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shipped runtime bundle and, as its sibling, of its training bundle."""
    rt = tmp_path / "rt"
    shutil.copytree(DEFAULT_BUNDLE, rt, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    tr = tmp_path / ("rt" + training_bundle.SUFFIX)
    shutil.copytree(DEFAULT_TRAINING, tr, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    return rt, tr


def test_training_bundle_with_a_changed_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    rt, tr = _pair(tmp_path)
    assert load_training(rt).source == tr  # the sibling is found first
    for path in each_file_with_a_flipped_byte(tr):
        with pytest.raises(BundleError) as info:
            load_training(rt)
        assert path.name in str(info.value) and "sentinel train" in str(info.value)
    (tr / "stray.pkl").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"stray\.pkl.*not listed"):
        load_training(rt)


def test_training_bundle_of_another_runtime_bundle_or_none_says_the_fix(
        tmp_path: Path, fixture_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = load_manifest(fixture_bundle)
    other = write_bundle(tmp_path / "other", cnn_tflite=m.path_of("cnn"),
                         forest=ForestArrays.load(m.path_of("forest")),
                         feature_names=m.feature_names, w_cnn=0.5, threshold=0.5,
                         thresholds={}, training_data={}, metrics={}, bundle_id="other-1")
    with pytest.raises(FileNotFoundError) as info:
        load_training(other)
    assert "other-training" in str(info.value) and "sentinel train" in str(info.value)
    # the commands say so in one line, exit 2, instead of a traceback
    from gateway.cli import main

    (tmp_path / "data").mkdir()
    assert main(["evaluate", "--bundle", str(other), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "report")]) == 2
    assert "other-training" in capsys.readouterr().err
    from test_dicom_attack import _write_dicom

    src = _write_dicom(tmp_path / "in.dcm", bits=8, photometric="MONOCHROME2", shape=(224, 224))
    assert main(["attack", str(src), str(tmp_path / "out.dcm"), "--bundle", str(other)]) == 2
    assert "other-training" in capsys.readouterr().err and not (tmp_path / "out.dcm").exists()
    # the shipped training bundle beside it names another runtime bundle: refused
    shutil.copytree(DEFAULT_TRAINING, tmp_path / "other-training")
    with pytest.raises(BundleError, match=r"belongs to runtime bundle .* not other-1"):
        load_training(other)


def test_old_layout_bundle_still_reads_and_migrates(tmp_path: Path, fixture_bundle: Path) -> None:
    """A bundle from before the split (cnn_keras in the runtime manifest) is read as it is;
    `python -m train.training_bundle migrate` moves it out, same bundle id."""
    old = tmp_path / "old"
    shutil.copytree(fixture_bundle, old)
    assert load_training(old, ("cnn_keras",)).source == old
    with pytest.raises(FileNotFoundError, match="victim"):
        load_training(old, ("victim",))
    before = load_manifest(old)
    assert training_bundle.main(["migrate", str(old)]) == 0
    after = load_manifest(old)
    assert after.bundle_id == before.bundle_id and set(after.files) == {"cnn", "forest"}
    files = load_training(old, ("cnn_keras",))
    assert files.source == tmp_path / "old-training"
    assert files.sha256["cnn_keras"] == before.files["cnn_keras"].sha256
