"""Score DICOM or PNG/JPEG files for adversarial perturbations with a verified model bundle.

Prints one row per file (file, SOP Instance UID, frames, score, P_cnn, P_rf, verdict, ms; and
grid, the stride-grid gate's feature, for a bundle with a gate) or, with --json, one JSON
document. Directories are walked recursively; in a directory, files
that are neither DICOM (Part 10) nor PNG/JPEG by content are skipped, while a file named on
the command line is always scored or reported as an error.

Exit status: 0 every file clean, 1 at least one flagged, 2 at least one file could not be
scored (2 wins over 1: an unscreened file is the more urgent news) or the bundle is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

_SKIP_DIRS = {"__pycache__", ".git"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sentinel score``."""
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="files or directories")
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="model bundle directory (default: the bundle shipped in detector/models/default)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="LiteRT threads for the CNN (default 1)"
    )
    parser.add_argument(
        "--threshold",
        default=None,
        help="decision threshold: a number, or a name from the bundle's thresholds "
        "(e.g. paper_0.5); default: the bundle's operating threshold",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images whose header declares more pixels (rows x columns x frames)",
    )
    parser.add_argument(
        "--line-gate",
        type=float,
        default=None,
        help="also flag an image whose resampling-line score reaches this (the gateway's "
        "[detector] line_gate; `sentinel calibrate` proposes it)",
    )
    parser.add_argument(
        "--cnn-gate",
        type=float,
        default=None,
        help="also flag an image whose detector-CNN probability reaches this (the gateway's "
        "[detector] cnn_gate, for a site's own bundle; `sentinel calibrate --cnn-gate` "
        "proposes it)",
    )
    parser.add_argument(
        "--line-ramp",
        type=float,
        default=None,
        help="with --line-gate: also flag an image whose score, raised by how far its line "
        "lies above this, reaches the threshold (the gateway's [detector] line_ramp; "
        "`sentinel calibrate` proposes it)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def collect_files(paths: list[str]) -> list[tuple[Path, bool]]:
    """(path, named explicitly) for each file to score, directories walked in sorted order."""
    from detector.errors import PreprocessError
    from detector.preprocess import sniff_format

    out: list[tuple[Path, bool]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                for name in sorted(files):
                    f = Path(root) / name
                    if name.startswith("."):
                        continue
                    try:
                        sniff_format(f)
                    except PreprocessError:
                        continue
                    out.append((f, False))
        else:
            out.append((p, True))
    return out


def _resolve_threshold(value: str | None, thresholds: dict[str, float]) -> float | None:
    if value is None:
        return None
    if value in thresholds:
        return thresholds[value]
    try:
        return float(value)
    except ValueError:
        names = ", ".join(sorted(thresholds)) or "none"
        raise ValueError(
            f"--threshold {value!r} is neither a number nor a threshold of this bundle "
            f"(named thresholds: {names})"
        ) from None


def _image_matrix(path: Path) -> list[int]:
    """[rows, columns] of a PNG/JPEG (its header only)."""
    from PIL import Image

    with Image.open(path) as im:
        return [int(im.size[1]), int(im.size[0])]


def score_one(det: Any, path: Path, threshold: float | None,
              line_gate: float | None = None, cnn_gate: float | None = None,
              line_ramp: float | None = None) -> dict[str, Any]:
    from detector.errors import PreprocessError
    from detector.preprocess import read_dicom, sniff_format
    from detector.scoring import apply_cnn_gate, apply_line_ramp

    row: dict[str, Any] = {"file": str(path), "sop_instance_uid": None}
    try:
        if sniff_format(path) == "dicom":
            ds = read_dicom(path, max_pixels=det.max_pixels)
            uid = ds.get("SOPInstanceUID")
            row["sop_instance_uid"] = str(uid) if uid else None
            score = det.score_dataset(ds, threshold, line_gate=line_gate)
            row["matrix"] = [int(ds.Rows), int(ds.Columns)]
        else:
            score = det.score_path(path, threshold, line_gate=line_gate)
            row["matrix"] = _image_matrix(path)
    except PreprocessError as exc:
        row.update(verdict="error", error={"reason": exc.reason, "message": str(exc)})
        return row
    except Exception as exc:  # a crash in one file must not stop the others
        row.update(
            verdict="error",
            error={"reason": "internal", "message": f"{path}: {type(exc).__name__}: {exc}"},
        )
        return row
    score = apply_line_ramp(apply_cnn_gate(score, cnn_gate), line_ramp)
    row.update(score.as_dict())
    row["verdict"] = "flagged" if score.flagged else "clean"
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    gated = any(r.get("grid_peaks") is not None for r in rows)
    lined = any(r.get("line_peak") is not None for r in rows)
    cnn_gated = any(r.get("cnn_gate") is not None for r in rows)
    head = ("file", "SOP Instance UID", "frames", "score", "P_cnn", "P_rf",
            *(("grid",) if gated else ()), *(("lines",) if lined else ()),
            *(("CNN peak",) if cnn_gated else ()), "verdict", "ms")
    body = []
    for r in rows:
        if r["verdict"] == "error":
            body.append((r["file"], r["sop_instance_uid"] or "-", "-", "-", "-", "-",
                         *(("-",) if gated else ()), *(("-",) if lined else ()),
                         *(("-",) if cnn_gated else ()), "ERROR", "-"))
        else:
            body.append(
                (
                    r["file"],
                    r["sop_instance_uid"] or "-",
                    str(r["frames"]),
                    f"{r['score']:.4f}",
                    f"{r['p_cnn']:.4f}",
                    f"{r['p_rf']:.4f}",
                    *((f"{r['grid_peaks']:.3f}",) if gated else ()),
                    *((f"{r['line_peak']:.3f}",) if lined else ()),
                    *((f"{r['cnn_peak']:.4f}",) if cnn_gated else ()),
                    "FLAGGED" if r["verdict"] == "flagged" else "clean",
                    f"{r['timings_ms']['total']:.1f}",
                )
            )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    errors = [r for r in rows if r["verdict"] == "error"]
    for r in errors:
        lines.append(f"error [{r['error']['reason']}]: {r['error']['message']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Score every file; exit 0 clean, 1 any flagged, 2 any error."""
    from detector.errors import BundleError
    from detector.preprocess import DEFAULT_MAX_PIXELS
    from detector.scoring import Detector

    if args.threads < 1:
        print("sentinel score: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        det = Detector.load(
            args.bundle,
            num_threads=args.threads,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        )
    except BundleError as exc:
        print(f"sentinel score: {exc}", file=sys.stderr)
        return 2
    try:
        threshold = _resolve_threshold(args.threshold, det.manifest.thresholds)
    except ValueError as exc:
        print(f"sentinel score: {exc}", file=sys.stderr)
        return 2
    targets = collect_files(args.paths)
    if not targets:
        print(
            "sentinel score: no DICOM or PNG/JPEG files found in " + " ".join(args.paths),
            file=sys.stderr,
        )
        return 2
    if args.cnn_gate is not None and not 0.0 < args.cnn_gate <= 1.0:
        print("sentinel score: --cnn-gate must lie in (0, 1], e.g. the value `sentinel "
              "calibrate --cnn-gate` proposes", file=sys.stderr)
        return 2
    if args.line_ramp is not None and (args.line_gate is None
                                       or not 1.0 <= args.line_ramp < args.line_gate):
        print("sentinel score: --line-ramp works below a --line-gate (it needs the line "
              "score the gate measures): give both, the ramp lower, as `sentinel calibrate` "
              "proposes them", file=sys.stderr)
        return 2
    rows = [score_one(det, path, threshold, args.line_gate, args.cnn_gate, args.line_ramp)
            for path, _ in targets]
    n_err = sum(r["verdict"] == "error" for r in rows)
    n_flag = sum(r["verdict"] == "flagged" for r in rows)
    if args.json:
        doc = {
            "bundle_id": det.bundle_id,
            "rule": det.rule.name,
            "threshold": det.threshold if threshold is None else threshold,
            "files": rows,
            "summary": {
                "files": len(rows),
                "flagged": n_flag,
                "errors": n_err,
                "clean": len(rows) - n_flag - n_err,
            },
        }
        print(json.dumps(doc, indent=2))
    else:
        print(_table(rows))
        print(
            f"{len(rows)} file(s): {len(rows) - n_flag - n_err} clean, {n_flag} flagged, "
            f"{n_err} error(s); bundle {det.bundle_id}, threshold "
            f"{det.threshold if threshold is None else threshold:g}"
        )
    if n_err:
        return 2
    return 1 if n_flag else 0
