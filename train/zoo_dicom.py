"""Zoo attacks on real DICOM files at their own matrix, scored as the gateway scores them.

Why (issue 15): the leave-one-family-out tables (train.zoo_lofo) are on NIH at 512, where the
detector's area resize to 224 averages about five native pixels. A clinical CR is 2,000-3,000
pixels a side, and an attacker makes the attack there, through the target network's own
resize. ``sentinel evaluate --dicom-check`` attacks real files through the bundle's own victim
only, the one network whose resize averages like the detector's. This attacks every DICOM
file of a folder with every cached zoo member (``python -m train.zoo train``) at the file's
native matrix and bit depth (``train.dicom_attack.attack_dicom_native``, the path of
``sentinel attack --victim``), then scores each copy with each bundle at its own threshold
(``Detector.score_path``: decode, resize, CNN, forest, rule and gate, as the gateway), beside
its resampling-line score (what a site's ``line_gate`` compares) and how much of the
perturbation is left after the detector's resize to 224::

    python -m train.zoo_dicom --zoo-work runs/zoo --folder ../shared/data/dicom_cr_nema \\
        --bundle detector/models/default --bundle detector/models/zoo --out runs/zoo-dicom

Copies are written whole (renamed into place) with their attack result beside them, so a
rerun scores the same copies without attacking again. A handful of files is a check of the
real path, not a rate: the markdown says so. ``--model-card`` puts the table into each
bundle's model card (its own section, replaced on a rerun; ``sentinel evaluate --model-card``
writes the card anew, so run this after it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CARD_HEADING = "## Real DICOM files through the zoo's networks"
DEFAULT_ATTACKS = ("pgd", "mi_fgsm")
DEFAULT_EPS = (0.003, 0.006)


@dataclass(frozen=True)
class CopyResult:
    """One attacked copy: what made it and whether it fooled the member that made it."""

    file: str  # the original's path relative to the folder
    family: str
    pipeline: str
    attack: str
    eps: float
    copy: str  # the attacked copy's path
    margin_before: float  # the member's margin for its own prediction
    margin_after: float

    @property
    def fooled(self) -> bool:
        return self.margin_before * self.margin_after < 0


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM Part 10 files under ``folder`` (by content), sorted."""
    from train.cmd_attack import dicom_files as files

    found = files(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: no DICOM files (a DICOM Part 10 file has 'DICM' at "
                                "offset 128)")
    return found


def cached_member(zoo_work: Path) -> Callable[[str], Any]:
    """The loader of ``attacked_copies``: a family's cached member (its resize included)."""
    from train import zoo

    return lambda family: zoo.load_member(zoo_work, family)[0]


def attacked_copies(folder: Path, load_member: Callable[[str], Any], out: Path,
                    families: Sequence[str], attacks: Sequence[str], eps: Sequence[float],
                    seed: int = 0, log: Callable[[str], None] = print) -> list[CopyResult]:
    """Every file attacked by every member, attack and eps, under ``out/copies``; copies made
    by an earlier run (their result file beside them) are kept, and a member is loaded only
    when one of its copies is missing."""
    from train import attacks as attacks_mod
    from train import zoo
    from train.cmd_attack import file_seed
    from train.dicom_attack import attack_dicom_native
    from train.zoo_eval import _save_json

    files = dicom_files(folder)
    results = []
    for family in families:
        pipeline = zoo.FAMILIES[family].pipeline
        member = None
        for method in attacks:
            for e in eps:
                for src in files:
                    rel = src.relative_to(folder).as_posix()
                    dst = out / "copies" / family / f"{method}-{e}" / rel
                    record = dst.with_name(dst.name + ".json")
                    if not (dst.is_file() and record.is_file()):
                        if member is None:
                            member = load_member(family)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        res = attack_dicom_native(
                            src, dst, member, attacks_mod.NativeAttack(method, e),
                            seed=file_seed(seed, f"{family}/{method}/{e}/{rel}"))
                        _save_json(record, asdict(CopyResult(
                            rel, family, pipeline.tag, method, e, str(dst),
                            res.victim_logit_before, res.victim_logit_after)))
                    results.append(CopyResult(**json.loads(record.read_text())))
        log(f"{family} [{pipeline.tag}]: "
            f"{sum(r.fooled for r in results if r.family == family)} of "
            f"{sum(r.family == family for r in results)} copies fooled it")
    return results


def _unit(path: Path) -> np.ndarray:
    from detector import preprocess

    return preprocess.dataset_to_unit(preprocess.read_dicom(path))[0].astype(np.float64)


def eps_left_at_input(clean: np.ndarray, attacked: np.ndarray, eps: float) -> float:
    """RMS of the perturbation after the detector's own resize to its input, as a share of
    eps: 1 for a perturbation of +-eps that the resize keeps whole, near 0 for one it averages
    away (a few native pixels moved per input pixel)."""
    from detector.preprocess import resize_to_input

    left = resize_to_input(attacked[None]) - resize_to_input(clean[None])
    return float(np.sqrt(np.mean(np.square(left, dtype=np.float64))) / eps)


def score_copies(copies: Sequence[CopyResult], folder: Path, bundles: Sequence[Path]
                 ) -> dict[str, Any]:
    """Each bundle's verdict on each original and each copy, with line scores and the share
    of eps left at the detector's input."""
    from detector.resample_lines import line_peak
    from detector.scoring import Detector

    dets = {str(b): Detector.load(b) for b in bundles}

    def verdicts(path: Path) -> dict[str, Any]:
        out = {}
        for name, det in dets.items():
            s = det.score_path(path)
            out[name] = {"score": s.score, "p_cnn": s.p_cnn, "p_rf": s.p_rf,
                         "flagged": bool(s.flagged)}
        return out

    originals: dict[str, Any] = {}
    for src in dicom_files(folder):
        unit = _unit(src)
        originals[src.relative_to(folder).as_posix()] = {
            "unit": unit, "line": line_peak(unit, 1.0), "bundles": verdicts(src)}
    rows = []
    for c in copies:
        unit = _unit(Path(c.copy))
        rows.append({**asdict(c), "fooled": c.fooled, "line": line_peak(unit, 1.0),
                     "eps_left": eps_left_at_input(originals[c.file]["unit"], unit, c.eps),
                     "bundles": verdicts(Path(c.copy))})
    return {"folder": str(folder), "bundles": {n: d.threshold for n, d in dets.items()},
            "clean": {f: {"line": o["line"], "bundles": o["bundles"]}
                      for f, o in originals.items()},
            "copies": rows}


def _span(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else (
        f"{fmt.format(lo)}-{fmt.format(hi)}")


def markdown(res: dict[str, Any]) -> str:
    """Per family: copies that fooled the member, each bundle's flags among them, the share of
    eps left at the detector's input and the line scores; then the originals."""
    names = list(res["bundles"])
    short = [Path(n).name for n in names]
    rows = res["copies"]
    lines = [
        f"Every DICOM file of `{Path(res['folder']).name}` attacked at its own matrix and bit "
        "depth by each zoo member through the member's own resize (`sentinel attack "
        "--victim`; train.zoo_dicom); each copy scored as the gateway scores it, at each "
        "bundle's own threshold (`sentinel evaluate --dicom-check` attacks the same files "
        "through the bundle's own victim only, whose resize averages like the detector's). A "
        "handful of files is a check of the real path, not a rate.",
        "",
        "| family [resize] | copies | fooled the member | "
        + " | ".join(f"flagged by {s} (of the fooled)" for s in short)
        + " | eps left at the detector's 224 (RMS) | line score of the copies |",
        "| --- | --- | --- | " + " | ".join("---" for _ in short) + " | --- | --- |",
    ]
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == fam]
        fooled = [r for r in rs if r["fooled"]]
        flags = [f"{sum(r['bundles'][n]['flagged'] for r in fooled)} of {len(fooled)}"
                 for n in names]
        left = _span([100 * r["eps_left"] for r in rs], "{:.0f}") + "%"
        lines.append(f"| {fam} [{rs[0]['pipeline']}] | {len(rs)} | {len(fooled)} | "
                     + " | ".join(flags) + f" | {left} | {_span([r['line'] for r in rs])} |")
    fooled = [r for r in rows if r["fooled"]]
    lines += ["", "All families: " + "; ".join(
        f"{s} flags {sum(r['bundles'][n]['flagged'] for r in fooled)} of the {len(fooled)} "
        "fooled copies" for n, s in zip(names, short, strict=True)) + "."]
    lines += ["", "Originals: " + "; ".join(
        f"{f} line {o['line']:.2f}, " + ", ".join(
            f"{s} {o['bundles'][n]['score']:.3f}"
            + (" flagged" if o["bundles"][n]["flagged"] else " passes")
            for n, s in zip(names, short, strict=True))
        for f, o in res["clean"].items()) + "."]
    return "\n".join(lines)


def put_into_model_card(bundle: Path, table: str, summary: dict[str, Any]) -> None:
    """Replace (or append) the card's section on real DICOM files through the zoo."""
    from train.report import add_model_card

    card = (Path(bundle) / "MODEL_CARD.md").read_text()
    head, sep, rest = card.partition("\n" + CARD_HEADING + "\n")
    if sep:  # keep whatever section follows ours
        nxt = rest.find("\n## ")
        rest = rest[nxt:] if nxt >= 0 else ""
    else:
        head, rest = card.rstrip("\n"), ""
    text = head.rstrip("\n") + "\n\n" + CARD_HEADING + "\n\n" + table + "\n" + rest
    add_model_card(Path(bundle), text, {"zoo_dicom": summary})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from train import zoo

    ap = argparse.ArgumentParser(prog="python -m train.zoo_dicom",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, required=True, help="DICOM files to attack")
    ap.add_argument("--zoo-work", type=Path, default=Path("runs/zoo"))
    ap.add_argument("--bundle", type=Path, action="append", default=None,
                    help="a bundle to score with (repeat; default: the shipped default)")
    ap.add_argument("--out", type=Path, default=Path("runs/zoo-dicom"))
    ap.add_argument("--families", nargs="+", default=list(zoo.FAMILIES),
                    choices=list(zoo.FAMILIES))
    ap.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS))
    ap.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-card", action="store_true",
                    help="also put the table into each bundle's MODEL_CARD.md")
    args = ap.parse_args(argv)
    from detector.bundle import DEFAULT_BUNDLE
    from detector.errors import BundleError

    bundles = args.bundle or [DEFAULT_BUNDLE]
    try:
        copies = attacked_copies(args.folder, cached_member(args.zoo_work), args.out,
                                 args.families, args.attacks, args.eps, args.seed)
        res = score_copies(copies, args.folder, bundles)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"python -m train.zoo_dicom: {exc}", file=sys.stderr)
        return 2
    table = markdown(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_dicom.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / "zoo_dicom.md").write_text(table + "\n")
    print(table)
    if args.model_card:
        fooled = [r for r in res["copies"] if r["fooled"]]
        for b in bundles:
            summary = {"folder": Path(args.folder).name, "copies": len(res["copies"]),
                       "fooled": len(fooled),
                       "flagged_of_fooled": sum(r["bundles"][str(b)]["flagged"] for r in fooled)}
            put_into_model_card(Path(b), table, summary)
            print(f"model card: {Path(b) / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
