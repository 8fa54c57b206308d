"""The detector's zoo examples (train.zoo_examples, issue 15): attacked copies made at the native
matrix through a member's own resize, processed clean images, chunks cached and resumable,
families that can be left out, and processing settings drawn away from the evaluation's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from train import processing, zoo, zoo_examples


def smooth_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b = rng.uniform(2, 6, 2)
        img = 0.5 + 0.3 * np.sin(a * yy) * np.cos(b * xx) + rng.normal(0, 0.004, (size, size))
        out.append(np.round(np.clip(img, 0, 1) * 255) / 255)
    return np.stack(out).astype(np.float32)


def test_a_chunk_is_an_attack_at_the_native_matrix_read_back_at_224() -> None:
    member = zoo.build_member("maxpool", zoo.Pipeline(32, "bilinear"))
    draw = zoo_examples.ZooDraw(families=("maxpool",), processed_share=0.5, chunk=6)
    plan = zoo_examples.ChunkPlan("maxpool", "pgd", 0.006, 320, np.arange(6))
    out = zoo_examples.make_chunk(plan, smooth_images(6), member, draw, seed=3)
    assert out["clean"].shape == out["attacked"].shape == (6, 224, 224)
    diff = np.abs(out["attacked"].astype(np.float64) - out["clean"])
    # at most 2 stored levels at 320 (eps 0.006 = 1.53 levels), so at most 2 after the average
    assert diff.max() <= 2 / 255 + 1e-6 and diff.max() > 0
    assert set(out["processing"]) - {""} <= set(zoo_examples.PROCESSING_KINDS)
    assert out["fooled"].dtype == bool and len(out["fooled"]) == 6
    again = zoo_examples.make_chunk(plan, smooth_images(6), member, draw, seed=3)
    np.testing.assert_array_equal(again["attacked"], out["attacked"])  # seeded


def test_training_processing_never_draws_an_evaluation_setting() -> None:
    rng = np.random.default_rng(0)
    drawn = [zoo_examples.draw_setting(rng) for _ in range(700)]
    assert {s.kind for s in drawn} == set(zoo_examples.PROCESSING_KINDS)
    evaluated = {(s.kind, tuple(sorted(s.params.items()))) for s in processing.EVAL_SETTINGS}
    assert not [s for s in drawn if (s.kind, tuple(sorted(s.params.items()))) in evaluated]
    assert {s.params["tiles"] for s in drawn if s.kind == "clahe"}.isdisjoint({8, 16})
    img = smooth_images(1, 64)[0]
    for s in drawn[:40]:  # every drawn setting applies and stays on the 8-bit grid
        y = s.apply(img, 255)
        assert y.shape == img.shape and np.allclose(y * 255, np.round(y * 255), atol=1e-4)


def test_examples_are_cached_per_chunk_and_families_can_be_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    data = zoo.KermanyArrays(
        {p: rng.integers(0, 256, (12, 64, 64), dtype=np.uint8) for p in ("train", "val", "test")},
        {p: np.arange(12) % 2 for p in ("train", "val", "test")}, "tiny")
    for fam in ("maxpool", "depthwise"):
        zoo.ensure_member(tmp_path / "members", fam, data, epochs=1, log=lambda _m: None)
    draw = zoo_examples.ZooDraw(families=("maxpool", "depthwise"), attacks=("fgsm",),
                                native_sizes=(224,), chunk=2)
    x = smooth_images(10)
    ex = zoo_examples.stage_zoo_examples(tmp_path / "work", "train", x, 8, draw,
                                         tmp_path / "members", "tiny", seed=0,
                                         log=lambda _m: None)
    assert len(ex) == 8 and set(ex.family) <= {"maxpool", "depthwise"}
    assert len(list((tmp_path / "work/zoo/train").glob("chunk-*.npz"))) == 4

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("a cached chunk was made again")

    monkeypatch.setattr(zoo_examples, "make_chunk", boom)
    again = zoo_examples.stage_zoo_examples(tmp_path / "work", "train", x, 8, draw,
                                            tmp_path / "members", "tiny", seed=0)
    np.testing.assert_array_equal(again.attacked, ex.attacked)
    kept = ex.without(["maxpool"])
    assert "maxpool" not in set(kept.family) and len(kept) == int(np.sum(ex.family != "maxpool"))
    with pytest.raises(ValueError, match="fresh --work"):
        zoo_examples.stage_zoo_examples(tmp_path / "work", "train", x, 6, draw,
                                        tmp_path / "members", "tiny", seed=0)


def test_a_12bit_chunk_is_stored_processed_and_attacked_on_the_12bit_grid() -> None:
    draw = zoo_examples.ZooDraw(families=("maxpool",), processed_share=0.5, levels=4095)
    plan = zoo_examples.ChunkPlan("maxpool", "pgd", 0.006, 320, np.arange(6))
    stored, kinds = zoo_examples.stored_images(plan, smooth_images(6), draw,
                                               np.random.default_rng(0))
    assert stored.shape == (6, 320, 320) and "" in kinds and set(kinds) != {""}
    k = stored.astype(np.float64) * 4095
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # on the 12-bit grid ...
    assert len(np.unique(np.round(k) % 16)) == 16  # ... using it all, not every 16th level
    member = zoo.build_member("maxpool", zoo.Pipeline(32, "bilinear"))
    out = zoo_examples.make_chunk(plan, smooth_images(6), member, draw, seed=3)
    assert set(out["levels"]) == {4095}
    diff = np.abs(out["attacked"].astype(np.float64) - out["clean"])
    # eps 0.006 is 24.6 twelve-bit levels: never more than 25 of them, even after the average
    assert 1 / 4095 < diff.max() <= 25 / 4095 + 1e-6
    eight = zoo_examples.make_chunk(plan, smooth_images(6), member,
                                    zoo_examples.ZooDraw(families=("maxpool",)), seed=3)
    assert set(eight["levels"]) == {255}
    assert "levels" not in zoo_examples.ZooDraw(families=("maxpool",)).settings()
    assert draw.settings()["levels"] == 4095  # a 12-bit cache is not an 8-bit one


def test_example_sets_add_up_and_chunks_made_before_levels_read_as_8bit(tmp_path: Path) -> None:
    n = 3
    chunk = {"clean": np.zeros((n, 224, 224), np.float32),
             "attacked": np.ones((n, 224, 224), np.float32), "family": np.array(["maxpool"] * n),
             "processing": np.array(["", "clahe", ""]), "fooled": np.ones(n, bool)}
    np.savez(tmp_path / "chunk-0000.npz", **chunk)  # as a chunk of session 10 was written
    old = zoo_examples.load_examples(tmp_path, 1)
    assert list(old.levels) == [255] * n and list(old.processed) == [False, True, False]
    np.savez(tmp_path / "chunk-0000.npz", **chunk, levels=np.full(n, 4095))
    both = old + zoo_examples.load_examples(tmp_path, 1)
    assert len(both) == 2 * n and list(both.levels) == [255] * n + [4095] * n
    assert len(both.without(["maxpool"])) == 0


def test_the_12bit_draw_is_its_own_cached_set_beside_the_8bit_one(tmp_path: Path) -> None:
    """`sentinel train --zoo-12bit`: the 8-bit examples stay as they were (their cache and
    features are reused), the 12-bit ones come as a second named set, and features and scores
    are cached per set and concatenated in the sets' order."""
    from types import SimpleNamespace

    from train import pipeline

    x = smooth_images(12, 224, seed=2)
    arr = {p: SimpleNamespace(x=x, y=np.arange(12) % 2) for p in ("train", "val", "test")}
    cfg = pipeline.TrainConfig(data="d", out="o", work=str(tmp_path / "work"),
                               zoo_families=("maxpool",), zoo_train_images=8, zoo_val_images=4,
                               zoo_member_epochs=1, zoo_work=str(tmp_path / "members"))
    work = pipeline.Work(tmp_path / "work")
    split = SimpleNamespace(digest="tiny")
    sets_tr, sets_va, _ = pipeline.stage_zoo(cfg, work, split, arr["train"], arr["val"],
                                             arr["test"])
    assert list(sets_tr) == ["zoo"]
    eight = sets_tr["zoo"]
    cfg12 = dataclasses.replace(cfg, zoo_12bit=True)
    assert cfg12.zoo_tag == "-zoo-12bit" and cfg.zoo_tag == "-zoo"
    sets_tr, sets_va, _ = pipeline.stage_zoo(cfg12, work, split, arr["train"], arr["val"],
                                             arr["test"])
    assert list(sets_tr) == ["zoo", "zoo12"] and len(sets_tr["zoo12"]) == 4
    assert len(sets_va["zoo12"]) == 4 and set(sets_va["zoo12"].levels) == {4095}
    np.testing.assert_array_equal(sets_tr["zoo"].attacked, eight.attacked)  # unchanged
    assert (tmp_path / "work/zoo/train-12bit/settings.json").is_file()
    whole = pipeline.sum_examples(sets_tr)
    assert list(whole.levels) == [255] * 8 + [4095] * 4
    seen: list[str] = []

    def mean_of(kind: str, imgs: np.ndarray) -> np.ndarray:
        seen.append(kind)
        return imgs.mean(axis=(1, 2))

    got = pipeline.zoo_cached(sets_tr, "attacked", mean_of)
    assert seen == ["zoo_attacked", "zoo12_attacked"]
    np.testing.assert_allclose(got, whole.attacked.mean(axis=(1, 2)))
    parts = pipeline.zoo_cached(sets_va, "clean", lambda k, i: {"cnn": i[:, 0, 0], "n": i[:, 1, 1]})
    assert set(parts) == {"cnn", "n"} and len(parts["cnn"]) == 8
    with pytest.raises(ValueError, match="drop --no-zoo"):
        dataclasses.replace(cfg12, zoo=False)
