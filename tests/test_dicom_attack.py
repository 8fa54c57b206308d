"""`sentinel attack` on DICOM: same bit depth, photometric and syntax, new UID, perturbation
mapped from 224 onto the native grid; clear failure for syntaxes we cannot re-encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from detector import preprocess
from train import dicom_attack


def _write_dicom(path: Path, *, bits: int = 12, signed: bool = False,
                 photometric: str = "MONOCHROME1", shape: tuple[int, int] = (300, 260),
                 seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = (np.sin(yy / 40.0) + np.cos(xx / 30.0) + 2) / 4
    arr = (lo + smooth * (hi - lo) * 0.8 + rng.normal(0, 3, shape)).round()
    arr = np.clip(arr, lo, hi).astype(np.int16 if signed else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unit_to_stored_inverts_the_runtime_normalisation() -> None:
    rng = np.random.default_rng(0)
    for bits, signed, invert in [(12, False, True), (15, False, False), (10, True, False),
                                 (8, True, True)]:
        lo = -(1 << (bits - 1)) if signed else 0
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        v = rng.integers(lo, hi + 1, 500)
        u = preprocess.stored_to_unit(v, bits_stored=bits, signed=signed, invert=invert)
        back = dicom_attack.unit_to_stored(u, bits_stored=bits, signed=signed, invert=invert)
        assert np.array_equal(back, v)


def test_gaussian_copy_keeps_depth_photometric_and_gets_new_uid(tmp_path: Path) -> None:
    src = _write_dicom(tmp_path / "in.dcm")
    res = dicom_attack.attack_dicom(src, tmp_path / "out.dcm", method="gaussian", param=0.008)
    a, b = pydicom.dcmread(src), pydicom.dcmread(res.out_path)
    for kw in ("BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation",
               "Rows", "Columns", "StudyInstanceUID"):
        assert a.get(kw) == b.get(kw), kw
    assert b.SOPInstanceUID != a.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    d = b.pixel_array.astype(int) - a.pixel_array.astype(int)
    assert b.pixel_array.max() <= 4095 and res.changed_pixel_share > 0.5
    # sigma 0.008 at 224 (6 sigma), mapped exactly: at 300x260 (ratio 1.2-1.3) the
    # minimum-norm native delta reaches about 4x the 224 value on single pixels
    assert np.abs(d).max() <= 0.008 * 6 * 4 * 4095


def test_keep_uid_and_rle_reencoded(tmp_path: Path) -> None:
    src = _write_dicom(tmp_path / "in.dcm", bits=10, photometric="MONOCHROME2")
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm")
    res = dicom_attack.attack_dicom(tmp_path / "rle.dcm", tmp_path / "out.dcm",
                                    method="contrast", param=1.1, keep_uid=True)
    out = pydicom.dcmread(res.out_path)
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert out.pixel_array.max() <= 1023 and res.max_stored_change > 0


def test_lossy_syntax_fails_naming_the_fix(tmp_path: Path) -> None:
    src = _write_dicom(tmp_path / "in.dcm")
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xd9" * 8])
    ds.save_as(tmp_path / "lossy.dcm")
    with pytest.raises(dicom_attack.AttackWriteError, match="dcmdjpeg"):
        dicom_attack.attack_dicom(tmp_path / "lossy.dcm", tmp_path / "o.dcm",
                                  method="gaussian", param=0.008)


def test_pgd_copy_within_eps_on_native_grid(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from detector import preprocess
    from train.victim import build_victim

    src = _write_dicom(tmp_path / "in.dcm", bits=12, photometric="MONOCHROME1")
    model = build_victim()
    res = dicom_attack.attack_dicom(src, tmp_path / "pgd.dcm", method="pgd", param=0.006,
                                    model=model, upsample="bilinear")
    # eps 0.006 of 4095 levels = 24.6; bilinear upsampling cannot exceed the 224 delta
    assert 0 < res.max_stored_change <= int(np.ceil(0.006 * 4095 + 0.5))
    assert res.changed_pixel_share > 0.5
    # the default exact mapping: what the victim reads back moves by eps (plus rounding; a few
    # bins beside native pixels clipped at 0 or 1 overshoot), whatever the native pixels do
    res = dicom_attack.attack_dicom(src, tmp_path / "exact.dcm", method="pgd", param=0.006,
                                    model=model)
    x0, x1 = (preprocess.resize_to_input(preprocess.dataset_to_unit(pydicom.dcmread(p)))[0]
              for p in (src, res.out_path))
    seen = np.abs(x1 - x0)[(x0 > 0.01) & (x0 < 0.99)]
    assert np.percentile(seen, 99) <= 0.006 + 1.0 / 4095 and seen.max() < 1.5 * 0.006
    assert np.median(seen) > 0.005


def test_nema_j2k_copy_stays_j2k_lossless(nema_dir: Path, tmp_path: Path) -> None:
    src = nema_dir / "RG3_J2KR.dcm"
    res = dicom_attack.attack_dicom(src, tmp_path / "rg3.dcm", method="gaussian", param=0.008)
    a, b = pydicom.dcmread(src), pydicom.dcmread(res.out_path)
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert b.BitsStored == a.BitsStored == 10
    assert b.PhotometricInterpretation == "MONOCHROME1"
    assert 0 < res.max_stored_change <= 0.008 * 6 * 1023


def test_cli_lists_every_adaptive_attack_and_needs_data(tmp_path: Path) -> None:
    from train import adaptive, cmd_attack

    assert tuple(adaptive.ATTACKS) == cmd_attack.ADAPTIVE
    import subprocess
    import sys

    src = _write_dicom(tmp_path / "in.dcm")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "attack", str(src),
                        str(tmp_path / "o.dcm"), "--method", "adaptive-cnn"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--data" in r.stderr
    assert not (tmp_path / "o.dcm").exists()


def test_adaptive_copy_read_back_within_eps_and_moves_the_victim(tmp_path: Path,
                                                                  data_dir: Path) -> None:
    """`sentinel attack --method adaptive-cnn`: white-box through the shipped bundle's victim
    and detector CNN, statistics fitted on a few Kermany images; what the victim reads back
    moves by at most eps and pushes its logit towards the other class."""
    pytest.importorskip("tensorflow")
    src = _write_dicom(tmp_path / "in.dcm", bits=12, photometric="MONOCHROME2",
                       shape=(448, 448))
    adversary, vic = dicom_attack.adaptive_adversary(
        "adaptive-cnn", 0.006, bundle_dir=None, data_dir=data_dir / "kermany224", n_fit=12,
        steps=12, log=lambda m: None)
    res = dicom_attack.attack_dicom(src, tmp_path / "adv.dcm", method="adaptive-cnn",
                                    param=0.006, model=vic, adversary=adversary)
    x0, x1 = (preprocess.resize_to_input(preprocess.dataset_to_unit(pydicom.dcmread(p)))[0]
              for p in (src, res.out_path))
    assert np.abs(x1 - x0).max() <= 0.006 + 1.0 / 4095
    before, after = res.victim_logit_before, res.victim_logit_after
    assert abs(after - before) > 0.1 and np.sign(before) * (after - before) < 0


def test_cli_attack_with_no_bundle_uses_the_shipped_training_bundle(tmp_path: Path) -> None:
    """After the Quick start, `sentinel attack IN OUT` needs no --bundle: the victim is in the
    training bundle that ships with train/ (train/models/default), not in the runtime bundle."""
    pytest.importorskip("tensorflow")
    from detector.bundle import load_manifest
    from gateway.cli import main
    from train.training_bundle import load_training

    assert "victim" not in load_manifest(None).files
    assert load_training(None, ("victim",)).path_of("victim").parent.parts[-3:] == (
        "train", "models", "default")
    src = _write_dicom(tmp_path / "in.dcm", bits=8, photometric="MONOCHROME2", shape=(224, 224))
    out = tmp_path / "out.dcm"
    assert main(["attack", str(src), str(out), "--method", "fgsm", "--eps", "0.006"]) == 0
    a, b = (pydicom.dcmread(p) for p in (src, out))
    diff = np.abs(b.pixel_array.astype(np.int64) - a.pixel_array.astype(np.int64))
    assert 0 < diff.max() <= round(0.006 * 255) + 1
    assert b.SOPInstanceUID != a.SOPInstanceUID


def test_adaptive_copy_takes_the_detector_weight(data_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`sentinel attack --det-weight 2`: the strongest attack the README measures (combined,
    100 steps, weight 2) reaches the attack loop as train.adaptive's --det-weight does."""
    pytest.importorskip("tensorflow")
    from train import adaptive

    seen: list[tuple[float, int]] = []
    monkeypatch.setattr(adaptive, "run_attack",
                        lambda models, spec, s, x, y: seen.append((s.det_weight, s.steps)) or x)
    for weight in (None, 2.0):
        adversary, _ = dicom_attack.adaptive_adversary(
            "adaptive-all", 0.006, bundle_dir=None, data_dir=data_dir / "kermany224", n_fit=12,
            steps=100, det_weight=weight, log=lambda m: None)
        adversary(np.zeros((1, 224, 224), np.float32), np.zeros(1, np.float32), 255)
    assert seen == [(adaptive.AttackSettings(eps=0.006).det_weight, 100), (2.0, 100)]


def _folder(tmp_path: Path) -> Path:
    """Three DICOMs (one nested, one RLE), a text file and a truncated 'DICOM'."""
    src = tmp_path / "in"
    (src / "series2").mkdir(parents=True)
    _write_dicom(src / "a.dcm", bits=12, seed=1)
    _write_dicom(src / "series2" / "b", bits=8, photometric="MONOCHROME2", seed=2)
    c = _write_dicom(src / "c.dcm", bits=10, seed=3)
    ds = pydicom.dcmread(c)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(c, enforce_file_format=True)
    (src / "notes.txt").write_text("not an image")
    good = (src / "a.dcm").read_bytes()
    (src / "broken.dcm").write_bytes(good[: len(good) // 3])  # DICM preamble, pixels cut off
    return src


def _stored(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array.astype(np.int64)


def test_folder_attacks_every_dicom_and_names_the_one_it_could_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sentinel attack IN_DIR OUT_DIR`: every DICOM under IN_DIR gets a copy at its relative
    path in its own syntax; a broken file is named and the others still go through (exit 1);
    a second run keeps what is there and redoes nothing."""
    from gateway.cli import main

    src, out = _folder(tmp_path), tmp_path / "out"
    assert main(["attack", str(src), str(out), "--method", "gaussian", "--eps", "0.01"]) == 1
    cap = capsys.readouterr()
    assert "not attacked: broken.dcm" in cap.err
    assert "wrote 3 attacked copies" in cap.out and "1 failed" in cap.out
    rels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert rels == ["a.dcm", "c.dcm", "series2/b"]
    for rel in rels:
        a, b = pydicom.dcmread(src / rel), pydicom.dcmread(out / rel)
        assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
        assert b.SOPInstanceUID != a.SOPInstanceUID
        assert np.any(_stored(src / rel) != _stored(out / rel))
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in rels}
    (src / "broken.dcm").unlink()
    assert main(["attack", str(src), str(out), "--method", "gaussian", "--eps", "0.01"]) == 0
    assert "wrote 0 attacked copies" in capsys.readouterr().out
    assert {rel: (out / rel).stat().st_mtime_ns for rel in rels} == mtimes


def test_folder_run_cut_short_by_a_full_disk_resumes_to_the_same_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk while writing one copy leaves no half-written file (it would be taken as
    done on the rerun); rerunning writes just that copy, the same one an uninterrupted run
    writes (each copy's seed comes from its relative path, not from the order of the run)."""
    import errno

    from gateway.cli import main

    src = _folder(tmp_path)
    (src / "broken.dcm").unlink()
    args = ["--method", "gaussian", "--eps", "0.01"]
    whole = tmp_path / "whole"
    assert main(["attack", str(src), str(whole), *args]) == 0
    real_save = Dataset.save_as

    def save_as(self: Dataset, filename: object, *a: object, **kw: object) -> None:
        if "c.dcm" in str(filename):
            Path(str(filename)).write_bytes(b"\0" * 1000)  # a part of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, filename, *a, **kw)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Dataset, "save_as", save_as)
    assert main(["attack", str(src), str(cut), *args]) == 1
    assert "c.dcm: [Errno 28] No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in cut.rglob("*") if p.is_file()) == ["a.dcm", "b"]
    monkeypatch.setattr(Dataset, "save_as", real_save)
    assert main(["attack", str(src), str(cut), *args]) == 0
    assert "wrote 1 attacked copies" in capsys.readouterr().out
    for rel in ("a.dcm", "c.dcm", "series2/b"):
        assert np.array_equal(_stored(cut / rel), _stored(whole / rel))


@pytest.mark.parametrize("where", ["inside", "file", "folder for a file"])
def test_attack_refuses_an_output_it_cannot_use(tmp_path: Path, where: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    src = _folder(tmp_path)
    out = {"inside": src / "attacked", "file": tmp_path / "out.dcm",
           "folder for a file": tmp_path / "outdir"}[where]
    if where == "file":
        out.write_bytes(b"x")
    if where == "folder for a file":
        out.mkdir()
        src = src / "a.dcm"
    assert main(["attack", str(src), str(out), "--method", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert {"inside": "inside the input folder", "file": "must be one too",
            "folder for a file": "give the attacked copy a file name"}[where] in err
    assert not (tmp_path / "in" / "attacked").exists() and not list(tmp_path.glob("**/.*.part"))


def test_folder_attack_loads_the_victim_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """FGSM through the shipped training bundle's victim over a folder: one load for all the
    files (the adaptive attacks fit their statistics at the same place, once)."""
    pytest.importorskip("tensorflow")
    from gateway.cli import main

    loads: list[object] = []
    real = dicom_attack.load_victim_from_bundle
    monkeypatch.setattr(dicom_attack, "load_victim_from_bundle",
                        lambda b: loads.append(b) or real(b))
    src = _folder(tmp_path)
    (src / "broken.dcm").unlink()
    assert main(["attack", str(src), str(tmp_path / "out"), "--method", "fgsm",
                 "--eps", "0.006"]) == 0
    assert len(loads) == 1
    assert "wrote 3 attacked copies" in capsys.readouterr().out
