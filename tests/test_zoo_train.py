"""Zoo members are trained once and cached by (family, pipeline, seed, split digest) (issue 15).

A tiny run (24 random images at a 32-pixel pipeline, one epoch) so it stays fast: the member is
written with its meta (test AUC, wall time), a second call loads the cache instead of training,
and another split digest or pipeline is another member.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from train import zoo


def tiny_data(digest: str) -> zoo.KermanyArrays:
    rng = np.random.default_rng(0)
    x = {p: rng.integers(0, 256, (24, 64, 64), dtype=np.uint8) for p in ("train", "val", "test")}
    y = {p: np.arange(24) % 2 for p in x}
    return zoo.KermanyArrays(x, y, digest)


def test_member_is_cached_by_family_pipeline_seed_and_split(tmp_path: Path) -> None:
    pipe = zoo.Pipeline(32, "bilinear", True)
    calls: list[str] = []
    meta = zoo.ensure_member(tmp_path, "depthwise", tiny_data("d1"), pipeline=pipe, epochs=1,
                             log=calls.append)
    assert len(calls) == 1  # one epoch trained
    assert meta["pipeline_tag"] == "32-bilinear-aa" and meta["split_digest"] == "d1"
    assert 0.0 <= meta["test_auc"] <= 1.0 and meta["train_wall_s"] > 0
    again = zoo.ensure_member(tmp_path, "depthwise", tiny_data("d1"), pipeline=pipe,
                              log=calls.append)
    assert again == meta and len(calls) == 1  # read from the cache, nothing trained
    model, loaded = zoo.load_member(tmp_path, "depthwise", pipe, digest="d1")
    assert loaded == meta
    x = tiny_data("d1").x["test"]
    assert zoo.predict_logits(model, x).shape == (24,)
    with pytest.raises(FileNotFoundError, match=r"python -m train\.zoo"):
        zoo.load_member(tmp_path, "depthwise", pipe, digest="other")
    assert [m["family"] for m in zoo.list_members(tmp_path)] == ["depthwise"]
