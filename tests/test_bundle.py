"""Bundle manifests: every byte of every file is verified, errors name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixture_bundle import each_file_with_a_flipped_byte

from detector.bundle import (
    MANIFEST,
    check_runtime_compat,
    load_manifest,
    write_bundle,
)
from detector.errors import BundleError
from detector.features import FEATURE_NAMES
from detector.scoring import Detector


@pytest.fixture()
def bundle(fixture_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session fixture bundle, free to corrupt."""
    dest = tmp_path / "bundle"
    shutil.copytree(fixture_bundle, dest)
    return dest


def test_manifest_contents(fixture_bundle: Path) -> None:
    m = load_manifest(fixture_bundle)
    doc = json.loads((fixture_bundle / MANIFEST).read_text())
    for key in (
        "format_version",
        "bundle_id",
        "created",
        "input_size",
        "normalisation",
        "resize",
        "feature_names",
        "w_cnn",
        "threshold",
        "thresholds",
        "files",
        "training_data",
        "metrics",
        "versions",
        "manifest_sha256",
    ):
        assert key in doc, key
    assert m.input_size == 224 and m.feature_names == FEATURE_NAMES
    assert set(m.files) >= {"cnn", "forest"}
    assert m.thresholds["paper_0.5"] == 0.5
    assert {"numpy", "pydicom", "ai-edge-litert", "python"} <= set(m.versions)
    for entry in m.files.values():
        assert (
            len(entry.sha256) == 64 and entry.bytes == (fixture_bundle / entry.path).stat().st_size
        )
    check_runtime_compat(m, FEATURE_NAMES)


def test_one_changed_byte_in_any_file_is_refused_naming_it(bundle: Path) -> None:
    files = sorted(p for p in bundle.iterdir() if p.is_file())
    assert {p.name for p in files} >= {MANIFEST, "cnn.tflite", "forest.npz"}
    for path in files:
        original = path.read_bytes()
        for pos in sorted({0, len(original) // 3, len(original) // 2, len(original) - 2}):
            changed = bytearray(original)
            changed[pos] = (changed[pos] + 1) % 256
            path.write_bytes(bytes(changed))
            with pytest.raises(BundleError) as info:
                load_manifest(bundle)
            assert path.name in str(info.value), (path.name, pos, str(info.value))
            assert "re-export" in str(info.value) or "restore" in str(info.value)
        path.write_bytes(original)
    load_manifest(bundle)  # intact again


def test_whitespace_only_edit_of_manifest_refused(bundle: Path) -> None:
    mpath = bundle / MANIFEST
    mpath.write_text(mpath.read_text().replace('"w_cnn": ', '"w_cnn":  ', 1))
    with pytest.raises(BundleError, match=MANIFEST):
        load_manifest(bundle)


def test_missing_and_unlisted_files(bundle: Path) -> None:
    (bundle / "forest.npz").rename(bundle / "forest.bak")
    with pytest.raises(BundleError, match=r"forest\.npz"):
        load_manifest(bundle)
    (bundle / "forest.bak").rename(bundle / "forest.npz")
    load_manifest(bundle)
    (bundle / "extra.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(BundleError, match=r"extra\.pkl"):
        load_manifest(bundle)


def test_missing_bundle_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="sentinel train"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="--bundle"):
        load_manifest(tmp_path / "empty")


def test_path_traversal_in_manifest_refused(bundle: Path, tmp_path: Path) -> None:
    """A manifest pointing outside its directory is refused even with correct digests."""
    from detector.forest import ForestArrays

    outside = tmp_path / "outside.npz"
    shutil.copy(bundle / "forest.npz", outside)
    forest = ForestArrays.load(bundle / "forest.npz")
    rebuilt = tmp_path / "rebuilt"
    write_bundle(
        rebuilt,
        cnn_tflite=bundle / "cnn.tflite",
        forest=forest,
        feature_names=FEATURE_NAMES,
        w_cnn=0.5,
        threshold=0.5,
        thresholds={},
        training_data={},
        metrics={},
    )
    text = (
        (rebuilt / MANIFEST).read_text().replace('"path": "forest.npz"', '"path": "../outside.npz"')
    )
    # re-seal the manifest so only the traversal check can catch it
    from detector.bundle import _manifest_bytes

    doc = json.loads(text)
    doc.pop("manifest_sha256")
    (rebuilt / MANIFEST).write_bytes(_manifest_bytes(doc))
    (rebuilt / "forest.npz").unlink()
    with pytest.raises(BundleError, match="outside"):
        load_manifest(rebuilt)


def test_incompatible_runtime_refused(bundle: Path, tmp_path: Path) -> None:
    from detector.forest import ForestArrays

    forest = ForestArrays.load(bundle / "forest.npz")
    other = tmp_path / "other"
    names = tuple(f"f{i}" for i in range(forest.n_features))
    write_bundle(
        other,
        cnn_tflite=bundle / "cnn.tflite",
        forest=forest,
        feature_set="sentinel-features-v1",
        feature_names=names,
        w_cnn=0.5,
        threshold=0.5,
        thresholds={},
        training_data={},
        metrics={},
    )
    with pytest.raises(BundleError, match="feature_names"):
        Detector.load(other)


def test_write_bundle_validates_inputs(bundle: Path, tmp_path: Path) -> None:
    from detector.forest import ForestArrays

    forest = ForestArrays.load(bundle / "forest.npz")
    with pytest.raises(ValueError):
        write_bundle(
            tmp_path / "x",
            cnn_tflite=b"x",
            forest=forest,
            feature_names=("a",),
            w_cnn=0.5,
            threshold=0.5,
            thresholds={},
            training_data={},
            metrics={},
        )
    with pytest.raises(ValueError):
        write_bundle(
            tmp_path / "y",
            cnn_tflite=b"x",
            forest=forest,
            feature_names=FEATURE_NAMES,
            w_cnn=1.5,
            threshold=0.5,
            thresholds={},
            training_data={},
            metrics={},
        )


def test_corrupt_tflite_with_valid_digest_is_bundle_error(bundle: Path, tmp_path: Path) -> None:
    from detector.forest import ForestArrays

    forest = ForestArrays.load(bundle / "forest.npz")
    out = write_bundle(
        tmp_path / "z",
        cnn_tflite=b"definitely not a flatbuffer",
        forest=forest,
        feature_names=FEATURE_NAMES,
        w_cnn=0.5,
        threshold=0.5,
        thresholds={},
        training_data={},
        metrics={},
    )
    with pytest.raises(BundleError, match=r"cnn\.tflite"):
        Detector.load(out)
    assert np.isfinite(load_manifest(out).threshold)


def test_other_feature_set_refused(bundle: Path) -> None:
    """Same feature names but another definition version: the forest would be fed wrong inputs."""
    from detector.bundle import _manifest_bytes

    doc = json.loads((bundle / MANIFEST).read_text())
    assert doc["feature_set"] == "sentinel-features-v1"
    doc["feature_set"] = "sentinel-features-v0"
    doc.pop("manifest_sha256")
    (bundle / MANIFEST).write_bytes(_manifest_bytes(doc))
    load_manifest(bundle)  # verifies: it is a consistent bundle...
    with pytest.raises(BundleError, match="feature_set"):
        Detector.load(bundle)  # ...but not for this runtime


def test_shipped_default_bundle_verifies_and_detects_changes(tmp_path: Path) -> None:
    """The same byte-change check on the default bundle, once the training issue ships it."""
    from detector.bundle import DEFAULT_BUNDLE

    if not (DEFAULT_BUNDLE / MANIFEST).is_file():
        pytest.skip(f"no default bundle in {DEFAULT_BUNDLE} yet (shipped by `sentinel train`)")
    Detector.load(None)
    copy = tmp_path / "default"
    shutil.copytree(DEFAULT_BUNDLE, copy, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for path in each_file_with_a_flipped_byte(copy):
        with pytest.raises(BundleError) as info:
            load_manifest(copy)
        assert path.name in str(info.value)
    load_manifest(copy)


def test_gated_bundles_are_format_2_and_unknown_formats_refused(bundle: Path,
                                                                tmp_path: Path) -> None:
    """A bundle with a stride-grid gate is written as format 2, so a runtime from before the gate
    (which reads format 1 only) refuses it instead of scoring without the gate; this runtime
    reads 1 and 2 and refuses anything else, naming what it reads."""
    import hashlib

    from detector.bundle import GATED_FORMAT_VERSION, READABLE_FORMATS
    from detector.forest import ForestArrays

    common = dict(cnn_tflite=bundle / "cnn.tflite", forest=ForestArrays.load(bundle / "forest.npz"),
                  feature_names=FEATURE_NAMES, w_cnn=0.5, threshold=0.5, thresholds={},
                  training_data={}, metrics={})
    gated = write_bundle(tmp_path / "gated", rule={"name": "logit", "gate": {
        "feature": "stride_grid_peaks", "threshold": 0.5, "slope": 10.0}}, **common)
    plain = write_bundle(tmp_path / "plain", rule={"name": "logit"}, **common)
    assert load_manifest(gated).format_version == GATED_FORMAT_VERSION == 2
    assert load_manifest(plain).format_version == 1 and READABLE_FORMATS == (1, 2)
    Detector.load(gated)
    # a format this runtime does not read, with a valid digest: refused, naming 1 and 2
    raw = (plain / MANIFEST).read_text()
    claimed = json.loads(raw)["manifest_sha256"]
    zeroed = raw.replace('"format_version": 1', '"format_version": 3', 1).replace(claimed, "0" * 64)
    digest = hashlib.sha256(zeroed.encode()).hexdigest()
    (plain / MANIFEST).write_text(zeroed.replace("0" * 64, digest, 1))
    with pytest.raises(BundleError, match="format_version 3 is not one of 1, 2"):
        load_manifest(plain)
