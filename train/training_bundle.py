"""Training bundles: the files that training, evaluation and red-teaming read and scoring never
does (the victim, the detector CNN's Keras original, the reference CNNs, split.json).

They used to sit in the runtime bundle, where every gateway start hashed 5.4 MB it never
reads. Now they are a directory of their own with the runtime bundle's discipline: a
``manifest.json`` that names each file with its SHA-256 and size, carries a digest of its own
bytes, refuses unlisted files, loads no pickle, and names the runtime bundle id it belongs to.

Where it is found (``training_dir_for``):

- the shipped runtime bundle (detector/models/default) -> ``train/models/default``, which
  ships with this package, so ``sentinel attack`` / ``sentinel evaluate`` need no argument;
- any other runtime bundle ``OUT`` -> its sibling ``OUT-training`` (what ``sentinel train
  --out OUT`` writes). A sibling, not a subdirectory: the runtime loader refuses unlisted
  entries in its bundle, and copying ``OUT`` alone to a gateway host is then exactly the
  runtime bundle. A copy of the shipped runtime bundle elsewhere still finds the shipped
  training bundle, since the runtime bundle id matches.

A runtime bundle written before this split carries those files itself; ``load_training``
reads them from there (digest-verified by the runtime loader) when no training bundle exists.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detector import bundle as bundle_mod
from detector.errors import BundleError

KIND = "sentinel-training-bundle"
FORMAT_VERSION = 1
SUFFIX = "-training"
DEFAULT_TRAINING = Path(__file__).resolve().parent / "models" / "default"
# manifest entry -> what it is (for messages); every one is training-only
TRAINING_FILES = {
    "victim": "victim classifier",
    "cnn_keras": "Keras original of the detector CNN",
    "paper_cnn": "paper's reference CNN (Keras)",
    "paper_cnn_tflite": "paper's reference CNN (TFLite, for its latency)",
    "baseline_cnn": "adversarial-training baseline CNN",
    "split": "train/val/test split (split.json)",
}
_REQUIRED = ("kind", "format_version", "runtime_bundle_id", "created", "files",
             "manifest_sha256")
_FIX = ("restore the training bundle from its release copy (train/models/default ships with "
        "the package), or re-run `sentinel train`, which writes OUT-training beside OUT")


@dataclass(frozen=True)
class TrainingFiles:
    """Verified training files of one runtime bundle; ``path_of(name)`` gives a file's path."""

    runtime: bundle_mod.Manifest
    paths: dict[str, Path]
    sha256: dict[str, str]
    source: Path  # the training bundle directory (or the runtime bundle, for an old layout)

    def path_of(self, name: str) -> Path:
        if name not in self.paths:
            raise FileNotFoundError(
                f"training bundle {self.source} carries no {TRAINING_FILES.get(name, name)} "
                f"({name!r} in {bundle_mod.MANIFEST}); {_FIX}")
        return self.paths[name]


def training_dir_for(runtime_dir: str | os.PathLike[str] | None) -> Path:
    """Where the training bundle of a runtime bundle lives (see the module docstring)."""
    rdir = Path(runtime_dir) if runtime_dir is not None else bundle_mod.DEFAULT_BUNDLE
    if rdir.resolve() == bundle_mod.DEFAULT_BUNDLE.resolve():
        return DEFAULT_TRAINING
    rdir = rdir.resolve()
    return rdir.parent / (rdir.name + SUFFIX)


def write_training_bundle(out_dir: str | os.PathLike[str], runtime_bundle_id: str,
                          files: dict[str, Path]) -> Path:
    """Write a training bundle (created, or emptied of a previous one's files) for the runtime
    bundle ``runtime_bundle_id``; ``files`` maps a name of TRAINING_FILES to a source file,
    copied in under its own file name. The manifest is written last (temp file, rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / bundle_mod.MANIFEST).unlink(missing_ok=True)
    unknown = set(files) - set(TRAINING_FILES)
    if unknown:
        raise ValueError(f"not training files: {sorted(unknown)} (known: {list(TRAINING_FILES)})")
    keep = {Path(src).name for src in files.values()}
    for p in out.iterdir():  # a previous training bundle's files would be refused as unlisted
        if p.is_file() and not p.name.startswith(".") and p.name not in keep:
            p.unlink()
    entries = {}
    for name, src in files.items():
        src = Path(src)
        dest = out / src.name
        if dest.name == bundle_mod.MANIFEST:
            raise ValueError(f"training file {src} would overwrite {bundle_mod.MANIFEST}")
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        entries[name] = {"path": dest.name, "sha256": bundle_mod.sha256_file(dest),
                         "bytes": dest.stat().st_size}
    doc: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "runtime_bundle_id": runtime_bundle_id,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": entries,
    }
    bundle_mod.write_manifest(out, doc)
    return out


def load_training_dir(tdir: Path) -> tuple[str, dict[str, bundle_mod.FileEntry]]:
    """(runtime bundle id, verified file entries) of the training bundle in ``tdir``."""
    mpath = tdir / bundle_mod.MANIFEST
    if not mpath.is_file():
        raise BundleError(f"training bundle {tdir} has no {bundle_mod.MANIFEST}; {_FIX}")
    doc = bundle_mod.read_verified_doc(mpath, _REQUIRED, _FIX)
    if doc["kind"] != KIND or doc["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"model bundle file {mpath}: kind {doc['kind']!r} format {doc['format_version']} is "
            f"not {KIND!r} format {FORMAT_VERSION}, what this version reads; {_FIX}")
    return str(doc["runtime_bundle_id"]), bundle_mod.verify_files(tdir, doc["files"], _FIX)


def load_training(runtime_dir: str | os.PathLike[str] | None = None,
                  needs: tuple[str, ...] = ()) -> TrainingFiles:
    """The verified runtime bundle (None = the shipped one) and its training files.

    Looks in ``training_dir_for(runtime_dir)``, then in the shipped training bundle if it names
    this runtime bundle's id (a copy of the shipped bundle); a runtime bundle of the old layout
    that carries the files itself needs neither. Refuses a training bundle that names another
    runtime bundle, or whose files do not match their digests (``BundleError`` naming the
    file); a missing one, or one that lacks an entry of ``needs``, is a FileNotFoundError that
    says where it was looked for and how to get it.
    """
    runtime = bundle_mod.load_manifest(runtime_dir)
    legacy = [n for n in TRAINING_FILES if n in runtime.files]
    expected = training_dir_for(runtime_dir)
    candidates = [expected] + ([DEFAULT_TRAINING] if expected != DEFAULT_TRAINING else [])
    for tdir in candidates:
        if not (tdir / bundle_mod.MANIFEST).is_file():
            continue
        owner, entries = load_training_dir(tdir)
        if owner != runtime.bundle_id:
            if tdir == expected:
                raise BundleError(
                    f"training bundle {tdir} belongs to runtime bundle {owner}, not "
                    f"{runtime.bundle_id} ({runtime.bundle_dir}); copy the training bundle "
                    f"that `sentinel train` wrote with this bundle to {expected}")
            continue
        found = TrainingFiles(runtime, {n: tdir / e.path for n, e in entries.items()},
                              {n: e.sha256 for n, e in entries.items()}, tdir)
        break
    else:
        if not legacy:
            raise FileNotFoundError(
                f"no training bundle for model bundle {runtime.bundle_dir} (id "
                f"{runtime.bundle_id}): looked in {expected}; the victim, reference CNNs and "
                f"split.json ship apart from the runtime bundle: copy the {expected.name} "
                "directory that `sentinel train` wrote beside it, or pass a --bundle that "
                "`sentinel train` wrote")
        found = TrainingFiles(runtime, {n: runtime.path_of(n) for n in legacy},
                              {n: runtime.files[n].sha256 for n in legacy}, runtime.bundle_dir)
    for name in needs:
        found.path_of(name)  # raises, naming what is missing
    return found


def migrate(runtime_dir: str | os.PathLike[str]) -> Path:
    """Move the training files out of an old-layout runtime bundle into its training bundle.

    The runtime bundle is verified first; its manifest is rewritten without those entries
    (same bundle id, created date and every other field, so audit records still name it), and
    the build machine's absolute data path in ``training_data.data`` and in split.json's root
    is replaced by the root as it was given to ``sentinel train`` (``training_data.config.data``).
    Returns the training bundle directory.
    """
    import json

    from train import datasets

    rdir = Path(runtime_dir)
    runtime = bundle_mod.load_manifest(rdir)
    moved = {n: runtime.path_of(n) for n in TRAINING_FILES if n in runtime.files}
    if not moved:
        raise ValueError(f"{rdir}: its manifest lists no training files; nothing to move")
    given = runtime.training_data.get("config", {}).get("data")
    tdir = training_dir_for(rdir)
    staging = Path(tempfile_dir(tdir))
    files = dict(moved)
    if "split" in moved:
        split = datasets.Split.from_json(moved["split"])
        root = given if given and Path(split.root).is_absolute() else split.root
        files["split"] = staging / moved["split"].name
        split.to_json(files["split"], root=root)
    write_training_bundle(tdir, runtime.bundle_id, files)
    shutil.rmtree(staging, ignore_errors=True)
    mpath = rdir / bundle_mod.MANIFEST
    doc = json.loads(mpath.read_text())
    doc["files"] = {n: e for n, e in doc["files"].items() if n not in moved}
    td = doc.get("training_data", {})
    if given and Path(str(td.get("data", ""))).is_absolute():
        td["data"] = given
    bundle_mod.write_manifest(rdir, doc)
    for path in moved.values():
        path.unlink()
    bundle_mod.load_manifest(rdir)
    load_training(rdir)
    return tdir


def tempfile_dir(near: Path) -> str:
    """A fresh temporary directory beside ``near`` (same file system)."""
    import tempfile

    near.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=".training-", dir=near.parent)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.training_bundle migrate DIR``: split an old-layout bundle."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.training_bundle",
                                 description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mig = sub.add_parser("migrate", help="move the training files of an old-layout runtime "
                         "bundle into its training bundle (OUT-training, or train/models/default "
                         "for the shipped one)")
    mig.add_argument("bundle", type=Path)
    args = ap.parse_args(argv)
    print(f"training bundle written to {migrate(args.bundle)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
