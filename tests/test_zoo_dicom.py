"""Zoo attacks on real DICOM files at their own matrix (train.zoo_dicom, issue 15).

A tiny network behind a zoo resize stands in for a member (no training): every DICOM of a
folder is attacked, each copy records whether it fooled the member, a rerun keeps the copies
without loading the member, each bundle scores each copy as the gateway does, and the table
goes into a model card once however often it is rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from test_zoo_attacks import tiny_victim

from tests import dicom_factory
from train import zoo_dicom

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    dicom_factory.synthetic(folder / "a.dcm", rows=96, cols=80, bits_stored=12, seed=1)
    dicom_factory.synthetic(folder / "nested" / "b.dcm", rows=70, cols=90, bits_stored=10,
                            seed=2)
    (folder / "notes.txt").write_text("not a DICOM")
    return folder


def test_copies_are_made_recorded_and_kept(tmp_path: Path, fixture_bundle: Path) -> None:
    folder, out = _folder(tmp_path), tmp_path / "out"
    loaded: list[str] = []

    def load(family: str):
        loaded.append(family)
        return tiny_victim(32, "bilinear")

    copies = zoo_dicom.attacked_copies(folder, load, out, ["maxpool"], ["fgsm"], [0.006],
                                       log=lambda _: None)
    assert loaded == ["maxpool"]
    assert sorted(c.file for c in copies) == ["a.dcm", "nested/b.dcm"]
    for c in copies:
        assert Path(c.copy).is_file() and Path(c.copy + ".json").is_file()
        assert c.margin_after < c.margin_before  # the attack pushed against its prediction
        assert c.pipeline == "224-bilinear" and c.attack == "fgsm" and c.eps == 0.006
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))  # written whole

    def refuse(family: str):
        raise AssertionError("a kept copy must not load the member again")

    again = zoo_dicom.attacked_copies(folder, refuse, out, ["maxpool"], ["fgsm"], [0.006],
                                      log=lambda _: None)
    assert again == copies

    res = zoo_dicom.score_copies(copies, folder, [fixture_bundle])
    name = str(fixture_bundle)
    assert set(res["clean"]) == {"a.dcm", "nested/b.dcm"}
    for row in res["copies"]:
        v = row["bundles"][name]
        assert 0.0 <= v["score"] <= 1.0 and isinstance(v["flagged"], bool)
        assert 0.0 < row["eps_left"] < 1.5 and np.isfinite(row["line"])
        assert row["fooled"] == (row["margin_before"] * row["margin_after"] < 0)
    table = zoo_dicom.markdown(res)
    n_fooled = sum(r["fooled"] for r in res["copies"])
    assert f"| maxpool [224-bilinear] | 2 | {n_fooled} |" in table
    assert "not a rate" in table


def test_eps_left_is_whole_for_a_blockwise_pattern_and_small_for_a_sparse_one() -> None:
    """What the detector's area resize leaves of a perturbation: a +-eps pattern constant over
    each of its input pixels survives whole; one on a few native pixels per input pixel (a
    resize without antialiasing reads those) is averaged away."""
    rng = np.random.default_rng(0)
    clean = np.full((448, 448), 0.5)
    signs = np.kron(rng.choice([-1.0, 1.0], (224, 224)), np.ones((2, 2)))
    assert zoo_dicom.eps_left_at_input(clean, clean + 0.006 * signs, 0.006) == pytest.approx(1.0)
    sparse = np.zeros((448, 448))
    sparse[::8, ::8] = rng.choice([-1.0, 1.0], (56, 56))
    assert zoo_dicom.eps_left_at_input(clean, clean + 0.006 * sparse, 0.006) < 0.2


def test_model_card_section_is_replaced_not_repeated(tmp_path: Path,
                                                     fixture_bundle: Path) -> None:
    from detector.scoring import Detector

    bundle = tmp_path / "bundle"
    shutil.copytree(fixture_bundle, bundle)
    if not (bundle / "MODEL_CARD.md").exists():
        from train.report import add_model_card

        add_model_card(bundle, "# Model card\n\n## Known limits\n- x\n", {})
    before = (bundle / "MODEL_CARD.md").read_text()
    for table in ("first table", "second table"):
        zoo_dicom.put_into_model_card(bundle, table, {"fooled": 1})
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.count(zoo_dicom.CARD_HEADING) == 1 and "second table" in card
    assert "first table" not in card and card.startswith(before.rstrip("\n")[:40])
    det = Detector.load(bundle)  # the manifest was re-written with the card's new digest
    assert det.manifest.metrics["zoo_dicom"] == {"fooled": 1}
