"""The detector's zoo examples (train.zoo_examples, issue 15): attacked copies made at the native
matrix through a member's own resize, processed clean images, chunks cached and resumable,
families that can be left out, and processing settings drawn away from the evaluation's."""

from __future__ import annotations

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
