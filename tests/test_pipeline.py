"""Pipeline pieces that need no TensorFlow: chunked, resumable perturbation storage, the
train-time draw of perturbations, and the resampled-source copies (same encode path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train import attacks, datasets, pipeline


def _arrays(n: int = 10) -> pipeline.SplitArrays:
    rng = np.random.default_rng(0)
    x = (np.round(rng.random((n, 224, 224)) * 255) / 255).astype(np.float32)
    recs = tuple(datasets.Record(f"f{i}.png", 0, f"P{i}", f"h{i}") for i in range(n))
    return pipeline.SplitArrays(name="test", root="/nonexistent", records=recs, x=x,
                                y=np.zeros(n, np.int64), levels=np.full(n, 255),
                                native_224=True)


def test_perturbation_chunks_resume_after_interruption(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "CHUNK", 4)
    arr = _arrays(10)
    work = pipeline.Work(tmp_path)
    p = attacks.BY_NAME["gaussian_0.008"]
    calls: list[int] = []
    real = attacks.perturb224

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while working on the second chunk
        return real(*a, **k)

    monkeypatch.setattr(attacks, "perturb224", counting)
    with pytest.raises(KeyboardInterrupt):
        pipeline.perturb_and_store(p, arr, np.arange(10), None, None, work, "pert/test", 1, "t")
    assert work.has("pert/test/gaussian_0.008.part0000.npy")
    assert not work.has("pert/test/gaussian_0.008.npy")
    calls.clear()
    monkeypatch.setattr(attacks, "perturb224", lambda *a, **k: (calls.append(len(a[1])),
                                                               real(*a, **k))[1])
    out = pipeline.perturb_and_store(p, arr, np.arange(10), None, None, work, "pert/test", 1, "t")
    assert calls == [4, 2]  # the first chunk was not redone
    assert out.shape == (10, 224, 224)
    k = out * 255
    assert np.allclose(k, np.round(k), atol=1e-4)  # stored on the 8-bit grid like clean ones
    assert not list(work.root.glob("pert/test/*.part*"))
    again = pipeline.perturb_and_store(p, arr, np.arange(10), None, None, work, "pert/test", 1,
                                       "t")
    assert np.array_equal(again, out)


def test_train_draw_is_seeded_and_follows_weights() -> None:
    cfg = pipeline.TrainConfig(data="d", out="o", work="w", seed=4)
    a, b = pipeline.train_assignment(cfg, 5000), pipeline.train_assignment(cfg, 5000)
    assert np.array_equal(a, b)
    names = [p.name for p in attacks.SUITE]
    share = np.bincount(a, minlength=len(names)) / 5000
    for k, name in enumerate(names):
        assert abs(share[k] - pipeline.TRAIN_DRAW[name]) < 0.03


def test_resampled_pair_goes_through_the_native_grid() -> None:
    rng = np.random.default_rng(1)
    x = (np.round(rng.random((224, 224)) * 255) / 255).astype(np.float32)
    delta = rng.choice([-2 / 255, 2 / 255], size=(224, 224)).astype(np.float32)
    clean, pert = pipeline.resampled_pair(x, delta, rng)
    assert clean.shape == pert.shape == (224, 224)
    assert clean.min() >= 0 and clean.max() <= 1
    d = pert - clean
    assert np.abs(d).max() <= 2 / 255 + 1 / 255 + 1e-6  # delta plus rounding on the native grid
    assert np.abs(d).mean() > 0.2 / 255  # the perturbation survives the round trip


def test_resampled_copies_of_other_settings_are_not_reused(tmp_path: Path) -> None:
    from dataclasses import replace

    rng = np.random.default_rng(2)
    x = (np.round(rng.random((3, 224, 224)) * 255) / 255).astype(np.float32)
    cfg = pipeline.TrainConfig(data="d", out="o", work=str(tmp_path))
    work = pipeline.Work(tmp_path)
    idx = np.arange(3)
    clean, _ = pipeline.stage_resampled(cfg, work, "val", x, x, idx, 0)
    again, _ = pipeline.stage_resampled(cfg, work, "val", x, x, idx, 0)  # cached
    assert np.array_equal(clean, again)
    noisier = replace(cfg, resample_noise_levels=4.0)
    with pytest.raises(ValueError, match="fresh --work"):
        pipeline.stage_resampled(noisier, work, "val", x, x, idx, 0)


def test_feature_caches_and_forests_are_named_by_feature_set() -> None:
    """v1 keeps the work dirs' old names (their caches stay valid); another set gets its own
    folder and forest file, so switching sets never reads the other's features."""
    from dataclasses import replace

    from train.pipeline import TrainConfig, feature_dir, forest_rel

    assert feature_dir("sentinel-features-v1") == "feat"
    assert feature_dir("sentinel-features-v3") == "feat-v3"
    v1 = TrainConfig(data="d", out="o", work="w", zoo=False)
    v3 = TrainConfig(data="d", out="o", work="w", feature_set="sentinel-features-v3", zoo=False)
    assert forest_rel(v1) == "models/forest-200trees-depth8.npz"
    assert forest_rel(v3) == "models/forest-200trees-depth8-v3.npz"
    assert v1.grid_gate
    # the zoo (the default), its held-out families and other CNN epochs are other models
    zoo = TrainConfig(data="d", out="o", work="w")
    assert forest_rel(zoo) == "models/forest-200trees-depth8-zoo.npz"
    fold = replace(zoo, zoo_holdout=("vit", "patchify"), cnn_epochs=8)
    assert forest_rel(fold) == "models/forest-200trees-depth8-zoo-nopatchify-novit-e8.npz"
    with pytest.raises(ValueError, match="zoo families"):
        replace(zoo, zoo_holdout=("resnet",))
    with pytest.raises(ValueError, match="held out"):
        replace(zoo, zoo_holdout=tuple(zoo.zoo_families))
    with pytest.raises(ValueError, match="feature set"):
        TrainConfig(data="d", out="o", work="w", feature_set="sentinel-features-v9")
