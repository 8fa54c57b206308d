"""Data sets for training and evaluation: scan a folder, drop exact duplicates, split by patient.

Why by patient: the official Kermany train/test split shares 170 patients, and NIH has many
images per patient. A detector or victim evaluated on a patient it was trained on reports a
figure that a hospital would never see. Exact byte duplicates are dropped (first path in sorted
order kept) so that one image cannot sit in two splits under two names.

A folder is any directory of DICOM, PNG or JPEG files. An optional ``labels.csv`` beside them
gives per-file metadata: ``filename`` (relative path), ``label`` (``normal``/``no_finding``/
``negative``/``0`` = 0, anything else = 1) and a patient column (``patient_key``, ``patient_id``
or ``patient``). Without labels.csv every file is its own patient and has no label (the victim
then cannot be trained on that folder, but attacks use the victim's own prediction as label).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
NEGATIVE_LABELS = frozenset({"normal", "no_finding", "negative", "0", "clean", "healthy"})
PATIENT_COLUMNS = ("patient_key", "patient_id", "patient")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image file: where it is, its content hash, its label (or None) and its patient."""

    rel: str
    label: int | None
    patient: str
    sha256: str


@dataclass(frozen=True)
class Split:
    """A seeded patient-grouped split; ``digest`` identifies it in caches and bundles."""

    root: str
    seed: int
    fractions: tuple[float, float, float]
    train: tuple[Record, ...]
    val: tuple[Record, ...]
    test: tuple[Record, ...]
    dropped_duplicates: tuple[str, ...]

    def part(self, name: str) -> tuple[Record, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}: use one of {SPLIT_NAMES}")
        return getattr(self, name)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in SPLIT_NAMES:
            for r in self.part(name):
                h.update(f"{name}:{r.rel}:{r.sha256}\n".encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts per split (images, patients, positives) for the report and the manifest."""
        out: dict = {
            "seed": self.seed,
            "fractions": list(self.fractions),
            "digest": self.digest,
            "dropped_duplicates": len(self.dropped_duplicates),
        }
        for name in SPLIT_NAMES:
            recs = self.part(name)
            labels = [r.label for r in recs if r.label is not None]
            out[name] = {
                "images": len(recs),
                "patients": len({r.patient for r in recs}),
                "positive": int(sum(labels)),
                "negative": int(len(labels) - sum(labels)),
            }
        return out

    def to_json(self, path: Path, root: str | None = None) -> None:
        """Write the split; records are paths relative to the data root, and ``root`` (default
        ``self.root``) is what is recorded for it: pass the root as the user gave it for a
        copy that ships, not this machine's absolute path. Readers re-root onto their --data."""
        data = {
            "root": self.root if root is None else root,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "dropped_duplicates": list(self.dropped_duplicates),
            **{name: [asdict(r) for r in self.part(name)] for name in SPLIT_NAMES},
        }
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path: Path) -> Split:
        """Read a split; ``root`` is as recorded (an old split.json has the build machine's
        absolute path there): image paths are ``rel`` under whatever --data the reader uses."""
        data = json.loads(path.read_text())
        parts = {
            name: tuple(Record(**r) for r in data[name]) for name in SPLIT_NAMES
        }
        return cls(
            root=data["root"],
            seed=int(data["seed"]),
            fractions=tuple(data["fractions"]),  # type: ignore[arg-type]
            dropped_duplicates=tuple(data["dropped_duplicates"]),
            **parts,
        )


def parse_label(value: str | None) -> int | None:
    """Map a labels.csv value to 0 (negative) / 1 (positive); empty -> None."""
    if value is None or not value.strip():
        return None
    return 0 if value.strip().lower() in NEGATIVE_LABELS else 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_labels(root: Path) -> dict[str, dict[str, str]]:
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        return {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "filename" not in reader.fieldnames:
            raise ValueError(
                f"{csv_path}: needs a 'filename' column (relative path of each image); "
                f"found columns {reader.fieldnames}"
            )
        return {row["filename"]: row for row in reader}


def scan_folder(root: Path) -> list[Record]:
    """Every image under ``root`` (sorted), with label and patient from labels.csv if present."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: pass --data DIR")
    rows = _read_labels(root)
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ValueError(f"{root}: no DICOM/PNG/JPEG files found (suffixes {IMAGE_SUFFIXES})")
    records = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        row = rows.get(rel, {})
        patient = next((row[c] for c in PATIENT_COLUMNS if row.get(c)), None) or f"file:{rel}"
        records.append(
            Record(rel=rel, label=parse_label(row.get("label")), patient=patient,
                   sha256=file_sha256(p))
        )
    return records


def drop_duplicates(records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """Keep the first record of each content hash (records come sorted by path)."""
    seen: set[str] = set()
    kept, dropped = [], []
    for r in records:
        if r.sha256 in seen:
            dropped.append(r.rel)
        else:
            seen.add(r.sha256)
            kept.append(r)
    return kept, dropped


def _merge_patients_sharing_content(records: Sequence[Record]) -> dict[str, str]:
    """Union-find over patients: two patients whose files were duplicates become one group.

    Duplicates are dropped before splitting, so this only matters when a caller splits
    records that still hold duplicates; it keeps the no-leak guarantee unconditional.
    """
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_hash: dict[str, str] = {}
    for r in records:
        find(r.patient)
        if r.sha256 in by_hash:
            parent[find(r.patient)] = find(by_hash[r.sha256])
        else:
            by_hash[r.sha256] = r.patient
    return {p: find(p) for p in parent}


def _label_strata(groups: dict[str, list[Record]]) -> dict[int, list[str]]:
    """Group keys by their records' majority label (-1: unlabelled), each stratum in key order:
    what both the split and the patient parts shuffle and deal within."""
    strata: dict[int, list[str]] = defaultdict(list)
    for g, recs in sorted(groups.items()):
        labels = [r.label for r in recs if r.label is not None]
        strata[round(float(np.mean(labels))) if labels else -1].append(g)
    return strata


def split_by_patient(
    records: Sequence[Record],
    *,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    root: str = "",
    dropped: Sequence[str] = (),
) -> Split:
    """Assign whole patients to train/val/test, stratified by the patient's majority label.

    Patients are shuffled with ``seed`` within each stratum and dealt so each split gets its
    fraction of images; no patient (or duplicate-content group) appears in two splits.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"split fractions {fractions} must be positive and sum to 1")
    group_of = _merge_patients_sharing_content(records)
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[group_of[r.patient]].append(r)
    strata = _label_strata(groups)
    rng = np.random.default_rng(seed)
    assigned: dict[str, list[Record]] = {n: [] for n in SPLIT_NAMES}
    for key in sorted(strata):
        names = strata[key]
        order = rng.permutation(len(names))
        total = sum(len(groups[names[i]]) for i in order)
        targets = np.cumsum(fractions) * total
        count = 0
        for i in order:
            recs = groups[names[i]]
            # deal by the running image count so big patients do not skew the fractions
            k = int(np.searchsorted(targets, count + len(recs) / 2.0, side="right"))
            assigned[SPLIT_NAMES[min(k, 2)]].extend(recs)
            count += len(recs)
    parts = {n: tuple(sorted(assigned[n], key=lambda r: r.rel)) for n in SPLIT_NAMES}
    return Split(root=root, seed=seed, fractions=tuple(fractions),
                 dropped_duplicates=tuple(dropped), **parts)


def patient_parts(records: Sequence[Record], n: int, seed: int) -> np.ndarray:
    """Which of ``n`` disjoint parts (0 .. n-1) each record falls in.

    Whole patients are shuffled with ``seed`` within each majority-label stratum and dealt
    round-robin, so no patient is in two parts and every part has a like label mix. Why: a
    bundle trained on one part stands in for a site whose images the public bundle never saw
    (issue 19's disjoint-patient evaluation, ``sentinel train --patient-part``).
    """
    if n < 2:
        raise ValueError(f"{n} patient parts: use at least 2")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_patient[r.patient].append(i)
    strata = _label_strata({p: [records[i] for i in rows] for p, rows in by_patient.items()})
    rng = np.random.default_rng([seed, 37])
    part = np.empty(len(records), np.int64)
    for key in sorted(strata):
        patients = strata[key]
        for j, k in enumerate(rng.permutation(len(patients))):
            part[by_patient[patients[k]]] = j % n
    return part


def make_split(root: Path, *, seed: int,
               fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Split:
    """Scan, drop duplicates and split a folder in one call (the pipeline's first stage)."""
    kept, dropped = drop_duplicates(scan_folder(root))
    return split_by_patient(kept, seed=seed, fractions=fractions, root=str(Path(root).resolve()),
                            dropped=dropped)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image on its native matrix, in [0,1], with the grid it is stored on."""

    native: np.ndarray  # (rows, cols) float32 in [0, 1]
    levels: int  # number of grey steps: values are k / levels


def load_native(path: Path) -> LoadedImage:
    """Decode once to the native grid with the runtime's own decoder (detector.preprocess).

    ``levels`` is 2**BitsStored - 1 for DICOM and 255 / 65535 for 8 / 16-bit images: the grid a
    perturbation is rounded to, so clean and perturbed share the encode path.
    """
    preprocess = _preprocess()
    frames = preprocess.load_unit(Path(path))
    return LoadedImage(native=np.asarray(frames[0], dtype=np.float32), levels=_levels_of(path))


def _preprocess():  # type: ignore[no-untyped-def]
    """The runtime's preprocessing module (one decode path for training and serving)."""
    from detector import preprocess

    return preprocess


def _levels_of(path: Path) -> int:
    with Path(path).open("rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or Path(path).suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(2 ** int(ds.BitsStored) - 1)
    from PIL import Image

    with Image.open(path) as im:
        return 65535 if im.mode in ("I;16", "I;16B", "I;16L", "I") else 255


def load_split_arrays(root: Path, records: Sequence[Record],
                      progress: str | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Clean 224x224 inputs for ``records`` (n, 224, 224) float32, labels (-1 = none), levels."""
    from tqdm import tqdm

    preprocess = _preprocess()

    out = np.empty((len(records), preprocess.INPUT_SIZE, preprocess.INPUT_SIZE), np.float32)
    levels = []
    for i, r in enumerate(tqdm(records, desc=progress, disable=progress is None, leave=False)):
        img = load_native(Path(root) / r.rel)
        out[i] = preprocess.resize_to_input(img.native[None])[0]
        levels.append(img.levels)
    labels = np.array([-1 if r.label is None else r.label for r in records], np.int64)
    return out, labels, levels
