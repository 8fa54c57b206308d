"""Make real DICOM CR files for tests: from a PNG/JPEG at its own bit depth, or synthetic.

Why here and not with pydicom's test files: the gateway's tests need many distinct instances
(own SOP/Study UIDs), known pixel bytes (to compare SHA-256 after forwarding), and patient name
and ID set (so PHI tests can prove neither leaks into logs). Nothing is written into the
repository: callers pass a tmp_path.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PATIENT_NAME = "Testpatient^Phi^Marker"
PATIENT_ID = "PHI-ID-0042"


def _base(sop_class: str, sop_uid: str, study_uid: str, series_uid: str, modality: str,
          patient_name: str, patient_id: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.ReferringPhysicianName = ""
    return ds


def make_cr(
    path: Path,
    pixels: np.ndarray,
    bits_stored: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    body_part: str = "CHEST",
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
) -> Path:
    """Write a CR instance holding ``pixels`` (uint8 or uint16, 2-D) uncompressed."""
    if pixels.ndim != 2:
        raise ValueError("pixels must be 2-D (rows, cols)")
    allocated = 8 if pixels.dtype == np.uint8 else 16
    ds = _base(ComputedRadiographyImageStorage, sop_uid or generate_uid(),
               study_uid or generate_uid(), series_uid or generate_uid(), modality,
               patient_name, patient_id)
    ds.InstanceNumber = instance_number
    ds.BodyPartExamined = body_part
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(f"<u{allocated // 8}")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def from_image(src: Path, path: Path, **kw: object) -> Path:
    """A CR from a PNG/JPEG radiograph at its own bit depth (8-bit stays 8-bit)."""
    im = Image.open(src)
    if im.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(im, dtype=np.uint16)
        bits = 16
    else:
        arr = np.asarray(im.convert("L"), dtype=np.uint8)
        bits = 8
    return make_cr(path, arr, bits, **kw)  # type: ignore[arg-type]


def synthetic(path: Path, rows: int = 512, cols: int = 512, bits_stored: int = 12,
              seed: int = 0, **kw: object) -> Path:
    """A smooth radiograph-like field plus mild noise, quantised to ``bits_stored``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    field = 0.5 + 0.3 * np.sin(x / cols * np.pi * 2.0) * np.cos(y / rows * np.pi)
    field += 0.05 * rng.standard_normal((rows, cols))
    top = (1 << bits_stored) - 1
    arr = np.clip(field, 0, 1) * top
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return make_cr(path, arr.astype(dtype), bits_stored, **kw)  # type: ignore[arg-type]


def make_series(directory: Path, n: int, *, seed: int = 0, rows: int = 256, cols: int = 256,
                **kw: object) -> list[Path]:
    """``n`` synthetic CR instances of one study and series, numbered 1..n."""
    study, series = generate_uid(), generate_uid()
    return [
        synthetic(directory / f"img{i:04d}.dcm", rows=rows, cols=cols, seed=seed + i,
                  study_uid=study, series_uid=series, instance_number=i + 1, **kw)
        for i in range(n)
    ]


def make_sr(path: Path, **kw: str) -> Path:
    """A Basic Text SR: a non-image instance (no Pixel Data)."""
    ds = _base(BasicTextSRStorage, generate_uid(), kw.get("study_uid") or generate_uid(),
               generate_uid(), "SR", PATIENT_NAME, PATIENT_ID)
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless(src: Path, dst: Path) -> Path:
    """Compress with DCMTK's dcmcjpeg (JPEG lossless, first-order prediction)."""
    subprocess.run(["/usr/bin/dcmcjpeg", "+e1", str(src), str(dst)], check=True,
                   capture_output=True, timeout=60)
    return dst


def pixel_sha256(path_or_bytes: Path | bytes) -> str:
    """SHA-256 of the Pixel Data element's value as stored (encapsulated or not)."""
    if isinstance(path_or_bytes, bytes):
        from io import BytesIO

        ds = pydicom.dcmread(BytesIO(path_or_bytes))
    else:
        ds = pydicom.dcmread(path_or_bytes)
    return hashlib.sha256(ds.PixelData).hexdigest()


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group: what travels in a C-STORE."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read()


def relabel(src: Path, dst: Path, *, modality: str | None = None, sop_class: str | None = None,
            new_uid: bool = True) -> Path:
    """A copy of ``src`` with its header edited as a tamperer would: another Modality (``OT``,
    lower-case ``cr``) or another SOP class in both the dataset and the file meta (an SR class
    with the Pixel Data kept). Pixel data and transfer syntax are kept byte for byte."""
    ds = pydicom.dcmread(src)
    if modality is not None:
        ds.Modality = modality
    if sop_class is not None:
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    if new_uid:
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def sentinel_attack(src: Path, dst: Path, bundle: Path, method: str = "pgd",
                    eps: float = 0.006) -> Path:
    """An attacked copy of ``src`` made by `sentinel attack` (the command a site red-teams with)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "attack", str(src), str(dst),
                        "--method", method, "--eps", str(eps), "--bundle", str(bundle)],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst
