"""The detector CNN as the runtime runs it: the fused stem (one convolution with +-255K kernels,
one clipped ReLU), `sentinel train --cnn-members K` (the mean of K networks on one stem) and
`--cnn-stems 2 --cnn-random-members R` (R more, at every pixel or strided, on a frozen stem of
random high-pass kernels). The fused model must be the same function as the networks it is
built from, through the TFLite export the gateway loads; the CLI, config and model card
wiring; and a whole quick training run with 2 + 3 networks (about a minute)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train.pipeline import (
    MAX_CNN_MEMBERS,
    MAX_CNN_NETWORKS,
    TrainConfig,
    ensemble_name,
    member_seed,
)
from train.report import members_sentence


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0.2, 0.8, 224, dtype=np.float32)[None, :] * np.ones((224, 1), np.float32)
    return (np.round(np.clip(smooth + rng.normal(0, 0.01, (n, 224, 224)), 0, 1) * 255)
            / 255).astype(np.float32)


def _members(arch: dict, n: int) -> list:  # type: ignore[type-arg]
    """``n`` networks of ``arch`` from different seeds, on the first one's (perturbed, so not
    the initial SRM) high-pass kernels."""
    from train import detector_cnn

    nets = [detector_cnn.build_seeded("shipped", arch, s) for s in range(1, n + 1)]
    hp = nets[0].get_layer("highpass")
    hp.set_weights([hp.get_weights()[0]
                    + np.random.default_rng(9).normal(0, 0.2, hp.get_weights()[0].shape)])
    for net in nets[1:]:
        net.get_layer("highpass").set_weights(hp.get_weights())
    return nets


@pytest.mark.parametrize("pool", ["global", "tile-min"])
def test_fused_cnn_is_the_mean_of_its_members(pool: str, tmp_path: Path) -> None:
    from detector.cnn import LiteRTModel
    from train import detector_cnn

    arch = {"filters": 6, "width": 8, "trunc": 2.0, "pool": pool}
    nets = _members(arch, 3)
    x = _images(4)
    each = np.stack([detector_cnn.predict(m, x) for m in nets])
    assert np.ptp(each, axis=0).max() > 1e-3  # the members differ, so the mean is a test
    for k in (1, 3):
        fused = detector_cnn.build_fused(nets[:k], arch)
        assert np.allclose(detector_cnn.predict(fused, x), each[:k].mean(0), atol=1e-5)
    lite = LiteRTModel(detector_cnn.export_tflite(fused, tmp_path / "cnn.tflite"))
    assert np.allclose([lite.predict(img) for img in x], each.mean(0), atol=1e-5)


@pytest.mark.parametrize("strided", [False, True])
def test_fused_over_two_stems_is_the_mean_of_its_members(strided: bool, tmp_path: Path) -> None:
    """Members on two kernel sets (the trained SRM stem's and a random one, full-resolution or
    strided): one stem branch each, every head on its own member's stem, the mean of all
    through the TFLite export."""
    from detector.cnn import LiteRTModel
    from train import detector_cnn

    arch = {"filters": 4, "width": 8, "trunc": 2.0}
    srm = _members(arch, 2)
    rnd = [detector_cnn.build_seeded("shipped", {**arch, "strided": strided}, s)
           for s in (21, 22)]
    for net in rnd:
        net.get_layer("highpass").set_weights([detector_cnn.random_highpass_kernels(4, 5)])
    nets = [srm[0], rnd[0], srm[1], rnd[1]]  # interleaved: heads must find their own stem
    x = _images(4, seed=2)
    each = np.stack([detector_cnn.predict(m, x) for m in nets])
    fused = detector_cnn.build_fused(nets, arch)
    assert len([la for la in fused.layers if la.name.startswith("highpass_pm")]) == 2
    assert np.allclose(detector_cnn.predict(fused, x), each.mean(0), atol=1e-5)
    lite = LiteRTModel(detector_cnn.export_tflite(fused, tmp_path / "cnn.tflite"))
    assert np.allclose([lite.predict(img) for img in x], each.mean(0), atol=1e-5)


def test_random_stem_kernels_are_high_pass_and_follow_the_seed() -> None:
    from train import detector_cnn

    k = detector_cnn.random_highpass_kernels(6, 3)
    assert k.shape == (3, 3, 1, 6)
    assert np.allclose(k.sum(axis=(0, 1, 2)), 0, atol=1e-5)  # a flat region gives nothing
    assert np.allclose(np.linalg.norm(k.reshape(9, 6), axis=0), 2.0, atol=1e-5)
    assert np.array_equal(k, detector_cnn.random_highpass_kernels(6, 3))
    assert not np.allclose(k, detector_cnn.random_highpass_kernels(6, 4))


def test_fused_refuses_members_of_another_shape() -> None:
    from train import detector_cnn

    arch = {"filters": 4, "width": 8, "trunc": 3.0}
    nets = _members(arch, 2)
    wider = detector_cnn.build_seeded("shipped", {**arch, "width": 12}, 7)
    wider.get_layer("highpass").set_weights(nets[0].get_layer("highpass").get_weights())
    with pytest.raises(ValueError):
        detector_cnn.build_fused([nets[0], wider], arch)


def test_members_config_cli_names_and_card() -> None:
    from gateway.cli import build_parser

    def config(**kw: int) -> TrainConfig:
        return TrainConfig(data="d", out="o", work="w", **kw)

    for bad in (0, MAX_CNN_MEMBERS + 1):
        with pytest.raises(ValueError, match="CNN members"):
            config(cnn_members=bad)
        with pytest.raises(ValueError, match="random members"):
            config(cnn_stems=2, cnn_random_members=bad)
    with pytest.raises(ValueError, match="stems"):
        config(cnn_stems=3)
    with pytest.raises(ValueError, match="--cnn-stems 2"):
        config(cnn_random_members=2)
    with pytest.raises(ValueError, match="random stem"):
        config(cnn_stems=2, cnn_random_stem="wide")
    with pytest.raises(ValueError, match=f"at most {MAX_CNN_NETWORKS}"):
        config(cnn_members=4, cnn_stems=2, cnn_random_members=MAX_CNN_NETWORKS - 3)
    args = build_parser().parse_args(["train", "--data", ".", "--out", "o", "--cnn-members", "3",
                                      "--cnn-stems", "2", "--cnn-random-members", "2"])
    assert (args.cnn_members, args.cnn_stems, args.cnn_random_members) == (3, 2, 2)
    assert config(cnn_members=3, cnn_stems=2).members_tag == "-x3+3"
    assert config(cnn_members=3, cnn_stems=2, cnn_random_stem="strided").members_tag == (
        "-x3+3-strided")
    assert config(cnn_members=2, cnn_stems=2, cnn_random_members=3).random_members == 3
    assert config(cnn_members=2).random_members == 0
    # a site bundle (--secret-file) gets 2 + 2 networks on two stems unless told
    from train.cmd_train import SITE_CNN, _cnn_ensemble

    def ensemble(*extra: str) -> tuple[int, int, int | None, str]:
        got = _cnn_ensemble(build_parser().parse_args(["train", "--data", ".", "--out", "o",
                                                       *extra]))
        return (got["cnn_members"], got["cnn_stems"], got["cnn_random_members"],
                got["cnn_random_stem"])

    assert SITE_CNN == {"cnn_members": 2, "cnn_stems": 2}
    assert ensemble() == (1, 1, None, "full")
    assert ensemble("--secret-file", "k") == (2, 2, None, "full")
    assert ensemble("--secret-file", "k", "--cnn-stems", "1") == (2, 1, None, "full")
    assert ensemble("--secret-file", "k", "--cnn-members", "1", "--cnn-stems", "1") == (
        1, 1, None, "full")
    assert ensemble("--cnn-stems", "2", "--cnn-random-members", "1", "--cnn-random-stem",
                    "strided") == (1, 2, 1, "strided")
    assert ensemble_name("cnn-part1of2", 1) == "cnn-part1of2"
    assert ensemble_name("cnn-part1of2", 3) == "cnn-part1of2-x3"
    assert ensemble_name("cnn-part1of2", 2, 3) == "cnn-part1of2-x2+3"
    assert ensemble_name("cnn-part1of2", 2, 3, strided=True) == "cnn-part1of2-x2+3-strided"
    # the first member keeps the run's seed: a one-member CNN is the CNN trained before
    assert member_seed(11, 0) == 11
    assert len({member_seed(11, i) for i in range(5)}) == 5
    assert members_sentence({"training_data": {"config": {"cnn_members": 1}}}) == ""
    assert members_sentence({"training_data": {}}) == ""
    assert "mean of 3 networks" in members_sentence(
        {"training_data": {"config": {"cnn_members": 3}}})
    two_stems = {"cnn_members": 3, "cnn_stems": 2}
    now = members_sentence({"training_data": {"config": two_stems,
                                              "models": {"cnn-x3+3-strided": {}}}})
    before = members_sentence({"training_data": {"config": two_stems,
                                                 "models": {"cnn-x3-2stems": {}}}})
    assert "mean of 6 networks" in now and "every second pixel" in now
    assert "`--cnn-members 3 --cnn-stems 2 --cnn-random-stem strided`" in now
    assert "mean of 6 networks" in before and "every second pixel" not in before
    assert "--cnn-random-stem" not in before
    site = members_sentence({"training_data": {"config": {**two_stems, "cnn_members": 2,
                                                          "cnn_random_members": 3}}})
    assert "mean of 5 networks" in site and "--cnn-random-members 3" in site


def test_train_quick_two_plus_three_strided(tmp_path: Path) -> None:
    """A quick bundle with --cnn-members 2 --cnn-stems 2 --cnn-random-members 3
    --cnn-random-stem strided: two networks on the trained stem (the second on the first
    one's, frozen) and three strided ones on the random stem drawn from the run's seed, frozen
    as drawn, each from the seed of its index; the bundle's CNN is the mean of all five as the
    runtime loads it; the training bundle's Keras CNN (what `train.adaptive` attacks) is the
    same model; the card says it."""
    import keras
    from test_train_e2e import _folder

    from detector.bundle import load_manifest
    from detector.cnn import LiteRTModel
    from detector.scoring import Detector
    from gateway.cli import main
    from train import detector_cnn, training_bundle

    data, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "b"
    _folder(data)
    assert main(["train", "--data", str(data), "--work", str(work), "--quick", "--no-zoo",
                 "--cnn-members", "2", "--cnn-stems", "2", "--cnn-random-members", "3",
                 "--cnn-random-stem", "strided", "--out", str(out)]) == 0
    models = work / "models"
    names = ["cnn", "cnn-m2", *(f"cnn-rstem{i}-strided" for i in (1, 2, 3))]
    nets = [keras.saving.load_model(str(models / f"{n}.keras"), safe_mode=True) for n in names]
    stems = [n.get_layer("highpass") for n in nets]
    assert [hp.strides for hp in stems] == [(1, 1)] * 2 + [(2, 2)] * 3
    kernels = [hp.get_weights()[0] for hp in stems]
    assert np.array_equal(kernels[1], kernels[0])
    drawn = detector_cnn.random_highpass_kernels(4, 0)  # the quick run's seed is 0
    assert all(np.array_equal(k, drawn) for k in kernels[2:])
    assert not np.allclose(kernels[0], drawn)
    made = json.loads((models / "cnn-x2+3-strided.json").read_text())
    assert made["members"] == names
    assert made["seeds"] == [member_seed(0, i) for i in (0, 1, 0, 1, 2)]
    x = _images(3, seed=4)
    mean = np.mean([detector_cnn.predict(n, x) for n in nets], axis=0)
    man = load_manifest(out)
    lite = LiteRTModel(man.path_of("cnn"))
    assert np.allclose([lite.predict(img) for img in x], mean, atol=1e-5)
    tfiles = training_bundle.load_training(out, ("cnn_keras",))
    attacked = keras.saving.load_model(str(tfiles.path_of("cnn_keras")), safe_mode=True)
    assert np.allclose(detector_cnn.predict(attacked, x), mean, atol=1e-5)
    config = man.training_data["config"]
    assert (config["cnn_members"], config["cnn_stems"], config["cnn_random_members"],
            config["cnn_random_stem"]) == (2, 2, 3, "strided")
    card = (out / "MODEL_CARD.md").read_text()
    assert "mean of 5 networks" in card and "every second pixel" in card
    det = Detector.load(out)
    assert 0.0 <= det.score_path(data / "img/000.png").score <= 1.0
