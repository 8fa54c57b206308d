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


def test_exported_member_is_a_site_victim_with_the_same_answers(tmp_path: Path) -> None:
    """`python -m train.zoo export` writes the network without its resize; in a fresh process
    `sentinel attack --victim`'s loader puts the member's own resize in front of it and gives
    the member's logits (the ViT: its position embedding must load from the file too)."""
    import os
    import subprocess
    import sys

    pipe = zoo.Pipeline(32, "bicubic", True)
    zoo.ensure_member(tmp_path, "vit", tiny_data("d1"), pipeline=pipe, epochs=1,
                      log=lambda _: None)
    model, _ = zoo.load_member(tmp_path, "vit", pipe, digest="d1")
    out = tmp_path / "site" / "vit.keras"
    assert zoo.export_member(tmp_path, "vit", out, pipeline=pipe, digest="d1") == pipe
    assert zoo.attack_flags(pipe) == "--input-size 32 --resize bicubic --antialias"
    x = tiny_data("d1").x["test"][:3].astype(np.float32) / 255.0
    np.save(tmp_path / "x.npy", x)
    want = zoo.predict_logits(model, x)
    code = ("import sys, numpy as np; from train import dicom_attack, zoo; "
            "v = dicom_attack.load_site_victim(sys.argv[1], zoo.Pipeline.parse(sys.argv[3])); "
            "x = np.load(sys.argv[2]); print(*np.asarray(v(x[..., None])).reshape(-1))")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), pipe.tag],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.array(r.stdout.split(), float)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not list(out.parent.glob("*.part*"))  # written whole, renamed into place


def test_export_refuses_what_it_cannot_write_and_names_the_fix(tmp_path: Path, capsys) -> None:
    rc = zoo.main(["--work", str(tmp_path), "export", "maxpool", str(tmp_path / "m.keras")])
    assert rc == 2 and "python -m train.zoo" in capsys.readouterr().err  # not trained here
    with pytest.raises(ValueError, match=r"\.keras"):
        zoo.export_member(tmp_path, "maxpool", tmp_path / "m.h5")


def test_a_member_as_is_reads_the_stored_matrix_with_its_own_weights(tmp_path: Path) -> None:
    """load_member_as_is: the member's weights at another input size with no resize in front
    (its logits are the bare network's on the image itself), cached apart by its tag; the ViT,
    whose body is fixed to its input, is refused with the families that can."""
    pipe = zoo.Pipeline(32, "bilinear")
    zoo.ensure_member(tmp_path, "maxpool", tiny_data("d1"), pipeline=pipe, epochs=1,
                      log=lambda _: None)
    model, meta = zoo.load_member_as_is(tmp_path, "maxpool", 64, digest="d1", trained=pipe)
    assert meta["pipeline_tag"] == "as-is-64" and meta["as_is"] and meta["family"] == "maxpool"
    bare = zoo.build_member("maxpool", zoo.Pipeline(64, "bilinear"), with_resize=False)
    bare.set_weights(model.get_weights())
    x = tiny_data("d1").x["test"][:4].astype(np.float32) / 255.0
    np.testing.assert_allclose(zoo.predict_logits(model, x),
                               np.asarray(bare(x[..., None])).reshape(-1), atol=1e-5)
    with pytest.raises(ValueError, match="strided"):
        zoo.load_member_as_is(tmp_path, "vit", 64, digest="d1")
