"""Model bundles: a directory with ``manifest.json`` and the files it names, each with SHA-256.

A bundle is what the gateway trusts to decide whether an image reaches the PACS, so loading
is strict: every file the manifest names must exist with the recorded size and digest, no
unlisted file may sit beside them, and the manifest carries a digest of its own bytes (the
``manifest_sha256`` field, computed with that field's value set to 64 zeros), so a change of
any single byte of any file is refused with a ``BundleError`` that names the file and says
how to fix it. The digests give integrity against corruption and partial copies, not
authenticity: whoever can rewrite the whole directory can rewrite the digests too (protect the
directory with file permissions; signing would be the next step).

Nothing in a bundle is executable on load: the CNN is a TFLite flatbuffer, the forest an
``.npz`` read with ``allow_pickle=False``. Training-only files (the victim, the detector CNN's
Keras original, the reference CNNs, split.json) live in a separate training bundle
(train.training_bundle) with the same digest discipline, so a start hashes only what scoring
reads; bundles written before that split may still carry them here, and the runtime never
reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from detector.errors import BundleError
from detector.features import FEATURE_SET, FEATURE_SETS
from detector.forest import ForestArrays
from detector.preprocess import INPUT_SIZE, NORMALISATION, RESIZE_METHOD

FORMAT_VERSION = 1
# A bundle whose rule has a stride-grid gate is written as format 2, so that a runtime from
# before the gate refuses it ("format_version 2 is not 1") instead of silently scoring without
# the gate; this runtime reads both.
GATED_FORMAT_VERSION = 2
READABLE_FORMATS = (FORMAT_VERSION, GATED_FORMAT_VERSION)
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "default"
# Bundles shipped in the package, by the name a config or ``--bundle`` may give instead of a
# directory. ``zoo``: trained with the victim zoo's attacks and with modality-processed images
# as clean (README, "Victim zoo"): for sites whose modalities apply strong processing (CLAHE,
# unsharp masking, multi-scale contrast), which the default bundle flags.
BUILTIN_BUNDLES = {"default": DEFAULT_BUNDLE, "zoo": DEFAULT_BUNDLE.parent / "zoo"}
MANIFEST = "manifest.json"
CNN_FILE = "cnn.tflite"
FOREST_FILE = "forest.npz"
_ZERO_DIGEST = "0" * 64
_REQUIRED = (
    "format_version",
    "bundle_id",
    "created",
    "input_size",
    "normalisation",
    "resize",
    "feature_names",
    "w_cnn",
    "threshold",
    "thresholds",
    "files",
    "training_data",
    "metrics",
    "versions",
    "manifest_sha256",
)
_RUNTIME_PACKAGES = ("numpy", "scipy", "pydicom", "ai-edge-litert", "pylibjpeg")
_FIX = (
    "restore the bundle directory from its release copy, or re-export it "
    "(sentinel train ... writes a fresh bundle)"
)


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: path relative to the bundle, SHA-256 hex digest, size in bytes."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A verified bundle manifest; ``path_of(name)`` gives a file's absolute path."""

    bundle_dir: Path
    format_version: int
    bundle_id: str
    created: str
    input_size: int
    normalisation: str
    resize: str
    feature_names: tuple[str, ...]
    w_cnn: float
    threshold: float
    thresholds: dict[str, float]
    files: dict[str, FileEntry]
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def path_of(self, name: str) -> Path:
        """Absolute path of the file the manifest lists under ``name`` (e.g. "cnn")."""
        if name not in self.files:
            raise BundleError(f"{self.bundle_dir / MANIFEST}: no file named {name!r} in bundle")
        return self.bundle_dir / self.files[name].path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _runtime_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in _RUNTIME_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return versions


def _manifest_bytes(doc: dict[str, Any]) -> bytes:
    """Serialise a manifest and fill in ``manifest_sha256`` over its own bytes."""
    doc = dict(doc)
    doc["manifest_sha256"] = _ZERO_DIGEST
    text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"
    raw = text.encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(
        f'"manifest_sha256": "{_ZERO_DIGEST}"'.encode(),
        f'"manifest_sha256": "{digest}"'.encode(),
        1,
    )


def write_bundle(
    out_dir: str | os.PathLike[str],
    *,
    cnn_tflite: Path | bytes,
    forest: ForestArrays,
    feature_names: tuple[str, ...] | list[str],
    w_cnn: float,
    threshold: float,
    thresholds: dict[str, float],
    training_data: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    bundle_id: str | None = None,
    versions: dict[str, str] | None = None,
    rule: dict[str, Any] | None = None,
    feature_set: str | None = None,
) -> Path:
    """Write a bundle directory (created, or emptied of a previous bundle's files).

    ``extra_files`` maps a name (e.g. "cnn_keras", "model_card") to a file copied in under
    its own file name. ``versions`` adds training-side library versions (tensorflow,
    scikit-learn...) to the runtime ones recorded automatically. ``rule`` (optional) picks
    the decision rule, see detector.scoring: ``{"name": "max", "cnn_threshold": a,
    "rf_threshold": b}`` for a per-part OR (then ``threshold`` is normally 0.5).
    ``feature_set`` is inferred from ``feature_names`` (features.FEATURE_SETS). The manifest
    is written last, through a temporary file and a rename, so a crash never leaves a
    bundle that verifies but is incomplete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 <= float(w_cnn) <= 1.0:
        raise ValueError(f"w_cnn must be in [0, 1], got {w_cnn}")
    if feature_set is None:
        matches = [k for k, names in FEATURE_SETS.items() if names == tuple(feature_names)]
        if not matches:
            raise ValueError(
                f"feature_names match none of the runtime's feature sets ({list(FEATURE_SETS)}); "
                "pass features.FEATURE_SETS[...] names, or feature_set= explicitly"
            )
        feature_set = matches[0]
    if len(feature_names) != forest.n_features:
        raise ValueError(
            f"{len(feature_names)} feature names for a forest of {forest.n_features} features"
        )
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()

    cnn_path = out / CNN_FILE
    if isinstance(cnn_tflite, bytes | bytearray):
        cnn_path.write_bytes(bytes(cnn_tflite))
    elif Path(cnn_tflite).resolve() != cnn_path.resolve():
        shutil.copyfile(cnn_tflite, cnn_path)
    forest.save(out / FOREST_FILE)
    names = {"cnn": CNN_FILE, "forest": FOREST_FILE}
    for name, src in (extra_files or {}).items():
        src = Path(src)
        if name in names:
            raise ValueError(f"extra file name {name!r} is reserved")
        dest = out / src.name
        if dest.name in (MANIFEST, CNN_FILE, FOREST_FILE) or dest.name in names.values():
            raise ValueError(f"extra file {src} would overwrite {dest.name}")
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        names[name] = dest.name

    files = {}
    for name, rel in names.items():
        p = out / rel
        files[name] = {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if bundle_id is None:
        # the models and the decision made with them: a new weight, threshold or rule on the
        # same models is another bundle, and audit records must tell them apart
        decision = json.dumps([float(w_cnn), float(threshold), rule], sort_keys=True)
        tag = hashlib.sha256(
            (files["cnn"]["sha256"] + files["forest"]["sha256"] + decision).encode()
        ).hexdigest()[:8]
        bundle_id = f"{created[:10].replace('-', '')}-{tag}"
    all_versions = _runtime_versions()
    all_versions.update(versions or {})
    doc: dict[str, Any] = {
        "format_version": GATED_FORMAT_VERSION if (rule or {}).get("gate") else FORMAT_VERSION,
        "bundle_id": bundle_id,
        "created": created,
        "input_size": INPUT_SIZE,
        "normalisation": NORMALISATION,
        "resize": RESIZE_METHOD,
        "feature_names": list(feature_names),
        "feature_set": feature_set,
        "w_cnn": float(w_cnn),
        "threshold": float(threshold),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "files": files,
        "training_data": training_data,
        "metrics": metrics,
        "versions": all_versions,
    }
    if rule is not None:
        doc["rule"] = dict(rule)
    write_manifest(out, doc)
    return out


def _fail(path: Path, why: str, fix: str = _FIX) -> BundleError:
    return BundleError(f"model bundle file {path}: {why}; {fix}")


def write_manifest(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``out_dir/manifest.json`` with its own digest, through a temporary file
    and a rename (fsynced), so a crash never leaves a manifest that verifies but is partial."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=out_dir)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_manifest_bytes(doc))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    return out_dir / MANIFEST


def read_verified_doc(mpath: Path, required: tuple[str, ...], fix: str = _FIX) -> dict[str, Any]:
    """A manifest's JSON object, its keys ``required`` present and its ``manifest_sha256``
    matching its own bytes; ``BundleError`` naming ``mpath`` and ``fix`` otherwise."""
    raw = mpath.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(mpath, f"is not valid JSON ({exc})", fix) from exc
    if not isinstance(doc, dict):
        raise _fail(mpath, "is not a JSON object", fix)
    missing = [k for k in required if k not in doc]
    if missing:
        raise _fail(mpath, f"lacks the keys {', '.join(missing)}", fix)
    claimed = doc["manifest_sha256"]
    if not isinstance(claimed, str) or not re.fullmatch(r"[0-9a-f]{64}", claimed):
        raise _fail(mpath, "manifest_sha256 is not a SHA-256 hex digest", fix)
    zeroed = raw.replace(
        f'"manifest_sha256": "{claimed}"'.encode(),
        f'"manifest_sha256": "{_ZERO_DIGEST}"'.encode(),
        1,
    )
    if hashlib.sha256(zeroed).hexdigest() != claimed:
        raise _fail(mpath, "its contents do not match its manifest_sha256 (edited or corrupt)",
                    fix)
    return doc


def verify_files(bdir: Path, raw_files: Any, fix: str = _FIX) -> dict[str, FileEntry]:
    """Check every entry of a manifest's ``files`` (inside ``bdir``, recorded size and SHA-256)
    and that ``bdir`` holds no unlisted file; ``BundleError`` names the offending file."""
    mpath = bdir / MANIFEST
    if not isinstance(raw_files, dict):
        raise _fail(mpath, "files is not an object", fix)
    files: dict[str, FileEntry] = {}
    root = bdir.resolve()
    for name, entry in raw_files.items():
        try:
            rel, digest, size = str(entry["path"]), str(entry["sha256"]), int(entry["bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(mpath, f"entry {name!r} needs path, sha256 and bytes ({exc})",
                        fix) from exc
        fpath = (bdir / rel).resolve()
        if fpath.parent != root or rel in (MANIFEST, "") or "/" in rel or "\\" in rel:
            raise _fail(mpath, f"entry {name!r} points outside the bundle directory: {rel!r}",
                        fix)
        if not fpath.is_file():
            raise _fail(bdir / rel, f"is missing (listed as {name!r} in {MANIFEST})", fix)
        actual_size = fpath.stat().st_size
        if actual_size != size:
            raise _fail(bdir / rel, f"has {actual_size} bytes, {MANIFEST} records {size}", fix)
        if sha256_file(fpath) != digest:
            raise _fail(bdir / rel, f"SHA-256 does not match {MANIFEST} (changed or corrupt)",
                        fix)
        files[name] = FileEntry(path=rel, sha256=digest, bytes=size)
    listed = {e.path for e in files.values()} | {MANIFEST}
    for p in sorted(bdir.iterdir()):
        if p.name.startswith(".") or p.name == "__pycache__":
            continue
        if p.name not in listed:
            raise _fail(p, f"is not listed in {MANIFEST}; remove it or re-export the bundle",
                        fix)
    return files


def resolve_bundle(bundle: str | os.PathLike[str] | None) -> Path:
    """The directory of ``bundle``: a path, a shipped bundle's name, or None for the default."""
    if bundle is None:
        return DEFAULT_BUNDLE
    path = Path(bundle)
    if str(bundle) in BUILTIN_BUNDLES and not path.exists():
        return BUILTIN_BUNDLES[str(bundle)]
    return path


def load_manifest(bundle_dir: str | os.PathLike[str] | None = None) -> Manifest:
    """Read and verify a bundle (None = the default bundle; a name of ``BUILTIN_BUNDLES`` that
    is not also a directory here = that shipped bundle); ``BundleError`` names the file."""
    bdir = resolve_bundle(bundle_dir)
    mpath = bdir / MANIFEST
    if not bdir.is_dir():
        raise BundleError(
            f"model bundle {bdir} does not exist; pass --bundle DIR or train one with "
            "`sentinel train`"
        )
    if not mpath.is_file():
        raise BundleError(
            f"model bundle {bdir} has no {MANIFEST}; pass --bundle DIR or train one with "
            "`sentinel train`"
        )
    doc = read_verified_doc(mpath, _REQUIRED)
    if doc["format_version"] not in READABLE_FORMATS:
        raise _fail(
            mpath,
            f"format_version {doc['format_version']} is not one of "
            f"{', '.join(map(str, READABLE_FORMATS))}, the versions this runtime reads",
        )

    raw_files = doc["files"]
    if not isinstance(raw_files, dict):
        raise _fail(mpath, "files is not an object")
    for name in ("cnn", "forest"):
        if name not in raw_files:
            raise _fail(mpath, f"lists no {name!r} file")
    files = verify_files(bdir, raw_files)

    try:
        manifest = Manifest(
            bundle_dir=bdir,
            format_version=int(doc["format_version"]),
            bundle_id=str(doc["bundle_id"]),
            created=str(doc["created"]),
            input_size=int(doc["input_size"]),
            normalisation=str(doc["normalisation"]),
            resize=str(doc["resize"]),
            feature_names=tuple(str(n) for n in doc["feature_names"]),
            w_cnn=float(doc["w_cnn"]),
            threshold=float(doc["threshold"]),
            thresholds={str(k): float(v) for k, v in dict(doc["thresholds"]).items()},
            files=files,
            training_data=dict(doc["training_data"]),
            metrics=dict(doc["metrics"]),
            versions={str(k): str(v) for k, v in dict(doc["versions"]).items()},
            extra={k: v for k, v in doc.items() if k not in _REQUIRED},
        )
    except (TypeError, ValueError) as exc:
        raise _fail(mpath, f"has a malformed value ({exc})") from exc
    if not 0.0 <= manifest.w_cnn <= 1.0:
        raise _fail(mpath, f"w_cnn {manifest.w_cnn} is outside [0, 1]")
    return manifest


def manifest_feature_set(manifest: Manifest) -> str:
    """The feature set a bundle's forest was trained on (v1 for bundles that predate the key)."""
    return str(manifest.extra.get("feature_set", FEATURE_SET))


def forest_columns(names: tuple[str, ...] | list[str], feature_set: str) -> tuple[int, ...] | None:
    """Where each of a forest's input ``names`` sits in ``feature_set``'s vector, when they are
    distinct features of that set in another order or a subset (a secret site bundle draws
    them, train.secret); None when they are not, and for the whole set in order (the forest
    then reads the vector's leading columns as they are, the only other valid case). A runtime
    from before this reads such a manifest's names as a mismatch and refuses the bundle rather
    than feeding its forest the wrong columns."""
    full = FEATURE_SETS.get(feature_set, ())
    names = tuple(names)
    if (not names or names == full or len(set(names)) != len(names)
            or not set(names) <= set(full)):
        return None
    return tuple(full.index(n) for n in names)


def check_runtime_compat(manifest: Manifest, feature_names: tuple[str, ...] | None = None) -> None:
    """Refuse a bundle trained for another input size, normalisation, resize or feature set.

    ``feature_names`` defaults to the names of the bundle's own feature set as this runtime
    computes them; a feature set this runtime does not know is refused.
    """
    mpath = manifest.bundle_dir / MANIFEST
    feature_set = manifest_feature_set(manifest)
    if feature_set not in FEATURE_SETS:
        raise BundleError(
            f"model bundle file {mpath}: feature_set {feature_set!r} is not one this runtime "
            f"computes ({', '.join(FEATURE_SETS)}); re-export the bundle with this version "
            "of xray-sentinel"
        )
    expected = FEATURE_SETS[feature_set] if feature_names is None else tuple(feature_names)
    if feature_names is None and forest_columns(manifest.feature_names, feature_set) is not None:
        expected = manifest.feature_names  # a secret site bundle's drawn subset and order
    wants = {
        "input_size": (manifest.input_size, INPUT_SIZE),
        "normalisation": (manifest.normalisation, NORMALISATION),
        "resize": (manifest.resize, RESIZE_METHOD),
        "feature_names": (manifest.feature_names, expected),
    }
    for key, (have, want) in wants.items():
        if have != want:
            raise BundleError(
                f"model bundle file {mpath}: {key} is {have!r} but this runtime computes "
                f"{want!r}; re-export the bundle with this version of xray-sentinel"
            )
