"""`sentinel train --cnn-pool tile-min`: the detector CNN scores an image by its least
suspicious of 3x3 tiles. The pooling itself, its export to what the runtime runs, the config
and CLI wiring and the model card here, and a whole quick training run (about 40 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.pipeline import TrainConfig, cnn_arch
from train.report import pool_sentence


def _tile_min_model():  # type: ignore[no-untyped-def]
    import keras

    from train import detector_cnn

    keras.utils.set_random_seed(3)
    model = detector_cnn.build_shipped(filters=4, width=8, pool="tile-min")
    tiles = keras.Model(model.input, model.get_layer("tile_logit").output)
    return model, tiles


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0.2, 0.8, 224, dtype=np.float32)[None, :] * np.ones((224, 1), np.float32)
    return np.clip(smooth + rng.normal(0, 0.004, (n, 224, 224)), 0, 1).astype(np.float32)


def test_tile_min_scores_the_least_suspicious_tile() -> None:
    model, tiles = _tile_min_model()
    x = _images()
    logits = np.asarray(tiles(x[..., None])).reshape(len(x), 9)
    p = np.asarray(model(x[..., None])).reshape(-1)
    assert np.allclose(p, 1 / (1 + np.exp(-logits.min(1))), atol=1e-5)
    # noise confined to the top-left tile changes that tile only, so it cannot lift the score
    # above the other eight tiles' lowest
    y = x.copy()
    y[:, :56, :56] += np.random.default_rng(1).choice([-0.006, 0.006], (len(x), 56, 56))
    after = np.asarray(tiles(y[..., None])).reshape(len(x), 9)
    assert np.allclose(after[:, 1:], logits[:, 1:], atol=1e-4)
    assert not np.allclose(after[:, 0], logits[:, 0], atol=1e-4)
    q = np.asarray(model(y[..., None])).reshape(-1)
    assert np.all(q <= 1 / (1 + np.exp(-logits[:, 1:].min(1))) + 1e-6)


def test_tile_min_exports_to_what_the_runtime_runs(tmp_path: Path) -> None:
    from detector.cnn import LiteRTModel
    from train import detector_cnn

    model, _ = _tile_min_model()
    path = detector_cnn.export_tflite(model, tmp_path / "cnn.tflite")
    x = _images(2, seed=5)
    lite = LiteRTModel(path)
    keras_p = np.asarray(model(x[..., None])).reshape(-1)
    assert np.allclose([lite.predict(img) for img in x], keras_p, atol=1e-5)


def test_unknown_pooling_is_refused_where_it_is_named() -> None:
    from train import detector_cnn
    from train.cmd_train import CNN_POOL_CHOICES

    assert CNN_POOL_CHOICES == detector_cnn.CNN_POOLS  # the CLI offers what the builder has
    with pytest.raises(ValueError, match="tile-min"):
        TrainConfig(data="d", out="o", work="w", cnn_pool="tile-max")
    with pytest.raises(ValueError, match="tile-min"):
        detector_cnn.build_shipped(pool="median")


def test_cli_passes_the_pooling(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import build_parser

    args = build_parser().parse_args(["train", "--data", ".", "--out", "o", "--cnn-pool",
                                      "tile-min"])
    assert args.cnn_pool == "tile-min"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", ".", "--out", "o", "--cnn-pool", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_pooling_tags_the_model_file_and_reaches_the_builder() -> None:
    from train import secret

    plain = TrainConfig(data="d", out="o", work="w", zoo=False)
    tiled = TrainConfig(data="d", out="o", work="w", zoo=False, cnn_pool="tile-min")
    assert plain.pool_tag == "" and tiled.pool_tag == "-tilemin"
    assert cnn_arch(plain) is None  # the shipped defaults: model files as before
    assert cnn_arch(tiled) == {"pool": "tile-min"}
    draws = secret.draw(b"k" * 32, "sentinel-features-v1")
    site = TrainConfig(data="d", out="o", work="w", zoo=False, cnn_pool="tile-min",
                       secret=draws)
    assert cnn_arch(site) == {**draws.cnn_arch, "pool": "tile-min"}  # the drawn shape kept
    assert TrainConfig(data="d", out="o", work="w", zoo=False, secret=draws).secret_tag in (
        "cnn" + site.secret_tag + site.pool_tag)


def test_model_card_names_the_pooling() -> None:
    assert pool_sentence({"training_data": {"config": {"cnn_pool": "global"}}}) == ""
    assert pool_sentence({"training_data": {}}) == ""
    assert "3x3 tiles" in pool_sentence({"training_data": {"config": {"cnn_pool": "tile-min"}}})


def test_train_quick_with_tile_min(tmp_path: Path) -> None:
    """A quick bundle with --cnn-pool tile-min: its CNN file is the tagged one, the manifest
    records the pooling, the card says it, and the runtime loads and scores it."""
    from test_train_e2e import _folder

    from detector.bundle import load_manifest
    from detector.scoring import Detector
    from gateway.cli import main

    data = tmp_path / "data"
    _folder(data)
    assert main(["train", "--data", str(data), "--work", str(tmp_path / "work"), "--quick",
                 "--no-zoo", "--cnn-pool", "tile-min", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "work" / "models" / "cnn-tilemin.tflite").is_file()
    assert load_manifest(tmp_path / "b").training_data["config"]["cnn_pool"] == "tile-min"
    assert "3x3 tiles" in (tmp_path / "b" / "MODEL_CARD.md").read_text()
    det = Detector.load(tmp_path / "b")
    assert 0.0 <= det.score_path(data / "img/000.png").score <= 1.0
