"""Adversarial training of the detector CNN (issue 19, `sentinel train --harden-with`): the
adaptive examples of a train.adaptive --split train folder are paired with their own clean
training images, plain PGD is left out, a folder crafted elsewhere is refused, and a patient
part keeps only the examples made from its own images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train import pipeline


def _folder(root: Path, work: Path, split: str, idx: list[int], n_adv: int | None = None
            ) -> Path:
    (root / "adv").mkdir(parents=True)
    (root / "subset.json").write_text(json.dumps({"work": str(work), "split": split,
                                                   "indices": idx}))
    n = len(idx) if n_adv is None else n_adv
    np.save(root / "adv" / "adaptive-all_0.006.npy", np.full((n, 224, 224), 0.25, np.float32))
    np.save(root / "adv" / "pgd_0.006.npy", np.full((n, 224, 224), 0.75, np.float32))
    return root


def test_harden_examples_pair_adaptive_images_with_their_clean_ones(tmp_path: Path) -> None:
    work = tmp_path / "work"
    x = np.stack([np.full((224, 224), i / 10, np.float32) for i in range(6)])
    tr = pipeline.SplitArrays(name="train", root="", records=(), x=x, y=np.zeros(6),
                              levels=np.full(6, 255), native_224=True)
    d = _folder(tmp_path / "h", work, "train", [4, 1])
    cfg = pipeline.TrainConfig(data="d", out="o", work=str(work), harden=(str(d),))
    adv, clean, tag = pipeline.harden_examples(cfg, tr)
    assert adv.shape == (2, 224, 224) and np.all(adv == 0.25)  # PGD's 0.75 left out
    np.testing.assert_allclose(clean[:, 0, 0], [0.4, 0.1], rtol=1e-6)
    # the tag follows the examples' bytes (a new crafting retrains the hardened CNN)
    np.save(d / "adv" / "adaptive-all_0.006.npy", np.full((2, 224, 224), 0.5, np.float32))
    assert pipeline.harden_examples(cfg, tr)[2] != tag
    with pytest.raises(ValueError, match="not the training split"):
        pipeline.harden_examples(pipeline.TrainConfig(
            data="d", out="o", work=str(work),
            harden=(str(_folder(tmp_path / "t", work, "test", [0, 1])),)), tr)
    with pytest.raises(ValueError, match="images for 2 indices"):
        pipeline.harden_examples(pipeline.TrainConfig(
            data="d", out="o", work=str(work),
            harden=(str(_folder(tmp_path / "m", work, "train", [0, 1], n_adv=3)),)), tr)


def test_a_patient_part_hardens_only_on_its_own_images(tmp_path: Path) -> None:
    work = tmp_path / "work"
    x = np.stack([np.full((224, 224), i / 10, np.float32) for i in range(6)])
    tr = pipeline.SplitArrays(name="train", root="", records=(), x=x, y=np.zeros(6),
                              levels=np.full(6, 255), native_224=True)
    d = _folder(tmp_path / "h", work, "train", [1, 3, 4])
    adv = np.stack([np.full((224, 224), v, np.float32) for v in (0.11, 0.33, 0.44)])
    np.save(d / "adv" / "adaptive-all_0.006.npy", adv)
    cfg = pipeline.TrainConfig(data="d", out="o", work=str(work), harden=(str(d),), zoo=False,
                               patient_part=(2, 2))
    part = np.array([False, True, False, False, True, False])  # rows 1 and 4: this part's
    a, clean, tag = pipeline.harden_examples(cfg, tr, part)
    np.testing.assert_allclose(a[:, 0, 0], [0.11, 0.44], rtol=1e-6)  # row 3's example dropped
    np.testing.assert_allclose(clean[:, 0, 0], [0.1, 0.4], rtol=1e-6)
    assert tag != pipeline.harden_examples(cfg, tr)[2]  # the whole split's examples differ
    with pytest.raises(ValueError, match="this patient part's images"):
        pipeline.harden_examples(cfg, tr, np.zeros(6, bool))


def test_a_hardened_site_bundles_card_names_the_bundle_its_examples_were_crafted_on(
        tmp_path: Path) -> None:
    from train import secret

    work = tmp_path / "work"
    d = _folder(tmp_path / "public-train-s100", work, "train", [1, 3])
    (d / "suite.json").write_text(json.dumps({"bundle_id": "20261206-3295ff2d"}))
    cfg = pipeline.TrainConfig(data="d", out=str(tmp_path / "out"), work=str(work), zoo=False,
                               harden=(str(d),), patient_part=(1, 2),
                               secret=secret.draw(b"k" * 32, "sentinel-features-v1"))
    card = pipeline.model_card_path(cfg, pipeline.Work(work)).read_text()
    assert ("adaptive examples of `public-train-s100` (crafted on bundle 20261206-3295ff2d) "
            "(`sentinel train --harden-with`, each 8 times, only those made from this patient "
            "part's images)") in card
