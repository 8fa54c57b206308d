"""The honest baseline of issue 15: the shipped detector against attacks on the victim zoo.

For each zoo family (its own pipeline), each source and attack setting, the attacker perturbs
the stored image at its native matrix through the member's own resize (train.attacks
.native_attack), rounds to the storage grid (8-bit here), and the **runtime** Detector of the
bundle scores the stored result exactly as the gateway would (resize_to_input, then
score_frames). Reported per cell: how many images the attack fooled (the member's prediction
flipped away from its clean prediction), how many of those the bundle flags at its own
threshold, with Wilson 95% intervals, and the parts' medians (CNN, forest, grid gate) that say
which expert saw what. The clean false-positive rate is measured on the same images, and, with
``--processing``, per kind of modality processing (train.processing), since a hospital's
processed clean image is not tampering.

Sources: NIH (512x512 lossless, never used for training) and the Kermany test split of the
bundle (224x224). Every cell is cached under ``--out/cells`` so an interrupted run resumes::

    nice -n 15 python -m train.zoo_eval --work runs/zoo --out runs/zoo-eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ATTACKS = ("pgd", "mi_fgsm")
DEFAULT_EPS = (0.003, 0.006)
LEVELS = 255  # NIH and Kermany are stored at 8 bits
# each source's storage grid; nih512-12bit: the NIH sample as a 12-bit modality would store it;
# nih1536-12bit: the same, bicubic-upsampled to a CR-sized matrix (what a larger matrix does to
# an attack made through a resize, with the content at 224 unchanged)
SOURCE_LEVELS = {"nih512": LEVELS, "kermany224": LEVELS, "nih512-12bit": 4095,
                 "nih1536-12bit": 4095}
UPSAMPLED = {"nih1536-12bit": ("nih512-12bit", 1536)}
SOURCES = tuple(SOURCE_LEVELS)
DEFAULT_SOURCES = ("nih512", "kermany224")


@dataclass(frozen=True)
class Source:
    """Clean native images of one source (float32 in [0, 1] on k / levels) and where they came
    from."""

    name: str
    x: np.ndarray
    ids: tuple[str, ...]
    seed: int = 0
    levels: int = LEVELS

    @property
    def tag(self) -> str:
        """Which sample: cached cells of another size or seed are other cells."""
        return f"n{len(self.x)}s{self.seed}"


@dataclass(frozen=True)
class SiteRule:
    """A site's operating point after ``sentinel calibrate`` on its clean images: the threshold,
    and the gates it proposed (None: refused or not asked). One rule for detection, the site's
    clean FPR and the processed images alike."""

    threshold: float
    line_gate: float | None = None  # [detector] line_gate: the resampling-line score
    cnn_gate: float | None = None  # [detector] cnn_gate: the detector CNN alone (--cnn-gate)
    line_ramp: float | None = None  # [detector] line_ramp: below the line gate

    def flags(self, scored: dict[str, np.ndarray]) -> np.ndarray:
        """Which of ``score_stored``'s images the site flags (``sentinel calibrate``'s own
        rule, detector.cmd_calibrate.site_flags; no "line" entry: no line scores, for a rule
        without line gate or ramp)."""
        from detector.cmd_calibrate import site_flags

        score = scored["score"]
        return site_flags(score, scored.get("line", np.zeros_like(score)), self.threshold,
                          self.line_gate, scored.get("p_cnn"), self.cnn_gate,
                          line_ramp=self.line_ramp)


def upsampled(src: Source, name: str, size: int) -> Source:
    """``src`` bicubic-upsampled to ``size`` square and rounded to its storage grid: a larger
    stored matrix with the same content at the detector's 224 (OpenCV's bicubic, clipped)."""
    import cv2

    x = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC) for img in src.x])
    x = np.round(np.clip(x, 0.0, 1.0) * src.levels) / src.levels
    return Source(name, x.astype(np.float32), src.ids, src.seed, src.levels)


def load_sources(work: Path, data_root: Path, n_nih: int, n_kermany: int,
                 seed: int, wanted: tuple[str, ...] = ()) -> dict[str, Source]:
    """A seeded sample of NIH (test-only source) and of the bundle's Kermany test split; the
    upsampled NIH sources (``UPSAMPLED``, about 1 GB for 100 images) only when ``wanted``."""
    from train import attacks, datasets, zoo

    out = {}
    nih_dir = data_root / "nih_cxr14_1000"
    files = sorted(p for p in nih_dir.rglob("*.png"))
    if not files:
        raise FileNotFoundError(f"{nih_dir}: no PNG images; set SENTINEL_DATA to the folder "
                                "holding nih_cxr14_1000")
    pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:n_nih])
    xs = []
    for i in pick:
        img = datasets.load_native(files[i])
        if img.levels != LEVELS:
            raise ValueError(f"{files[i]}: expected an 8-bit image")
        xs.append(img.native)
    out["nih512"] = Source("nih512", np.stack(xs).astype(np.float32),
                           tuple(files[i].relative_to(nih_dir).as_posix() for i in pick), seed)
    lv12 = SOURCE_LEVELS["nih512-12bit"]
    out["nih512-12bit"] = Source(
        "nih512-12bit", attacks.lift_bit_depth(out["nih512"].x, lv12, seed), out["nih512"].ids,
        seed, lv12)
    for name in wanted:
        if name in UPSAMPLED:
            base, size = UPSAMPLED[name]
            out[name] = upsampled(out[base], name, size)
    kerm = zoo.load_kermany(work, data_root / "kermany224", parts=("test",))
    pick = np.sort(np.random.default_rng(seed + 1).permutation(len(kerm.y["test"]))[:n_kermany])
    out["kermany224"] = Source("kermany224", kerm.x["test"][pick].astype(np.float32) / 255.0,
                               tuple(f"test[{i}]" for i in pick), seed)
    return out


def score_stored(det: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """The runtime's verdict on stored images (n, rows, cols) in [0, 1]: the gateway's path for
    a decoded unit frame (exact area resize to 224, then features, CNN, forest, rule, gate),
    and each image's resampling-line score (what a site's ``line_gate`` compares)."""
    from detector import preprocess
    from detector.resample_lines import line_peak

    cols: dict[str, list[float]] = {"score": [], "p_cnn": [], "p_rf": [], "grid": [],
                                    "line": []}
    for img in x:
        s = det.score_frames(preprocess.resize_to_input(img[None]))
        cols["score"].append(s.score)
        cols["p_cnn"].append(s.p_cnn)
        cols["p_rf"].append(s.p_rf)
        cols["grid"].append(np.nan if s.grid_peaks is None else s.grid_peaks)
        cols["line"].append(line_peak(img, 1.0))  # the resampling-line score, at the native matrix
    return {k: np.asarray(v, np.float64) for k, v in cols.items()}


def _wilson(k: int, n: int) -> list[float]:
    from train.adaptive import wilson

    return list(wilson(k, n)) if n else [float("nan"), float("nan")]


def _median(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if len(a) else None


def _save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def clean_cell(det: Any, src: Source, out: Path) -> dict:
    path = out / "clean" / f"{src.name}__{src.tag}.json"
    if path.is_file():
        return json.loads(path.read_text())
    s = score_stored(det, src.x)
    flagged = s["score"] >= det.threshold
    cell = {"source": src.name, "n": len(src.x), "flagged": int(flagged.sum()),
            "fpr": float(flagged.mean()), "fpr_ci": _wilson(int(flagged.sum()), len(src.x)),
            "median_score": _median(s["score"]), "median_p_cnn": _median(s["p_cnn"]),
            "median_p_rf": _median(s["p_rf"]), "median_grid": _median(s["grid"]),
            "scores": s["score"].tolist()}
    _save_json(path, cell)
    return cell


def cell_key(meta: dict, src: Source, method: str, eps: float, seed: int) -> str:
    return (f"{meta['family']}__{meta['pipeline_tag']}__{src.name}__{src.tag}__{method}__"
            f"{eps:g}__s{seed}")


@dataclass(frozen=True)
class AttackedImages:
    """One cell's stored attacked images (native matrix, the source's bit depth) and which
    fooled the member."""

    adv: np.ndarray  # float32 on k / the source's levels
    fooled: np.ndarray  # bool
    attack_wall_s: float


def attacked_images(member: Any, meta: dict, src: Source, method: str, eps: float, out: Path,
                    seed: int, batch_size: int) -> AttackedImages:
    """The attack of one (family, source, method, eps) cell, rounded to the source's storage
    grid and cached as integer arrays (uint8, or uint16 above 8 bits) under ``out/advs``, so
    every detector bundle (the shipped one, each leave-out fold) scores the very same attacked
    images."""
    from train import attacks, zoo

    path = out / "advs" / f"{cell_key(meta, src, method, eps, seed)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return AttackedImages(z["adv"].astype(np.float32) / src.levels,
                                  z["fooled"].astype(bool), float(z["attack_wall_s"]))
    t0 = time.perf_counter()
    label = attacks.predicted_class(zoo.predict_logits(member, src.x))
    adv = attacks.native_attack(member, src.x, label, attacks.NativeAttack(method, eps),
                                levels=src.levels, seed=seed, batch_size=batch_size)
    wall = time.perf_counter() - t0
    fooled = attacks.predicted_class(zoo.predict_logits(member, adv)) != label
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    dtype = np.uint8 if src.levels <= 255 else np.uint16
    np.savez_compressed(tmp, adv=np.round(adv * src.levels).astype(dtype), fooled=fooled,
                        attack_wall_s=wall)
    os.replace(tmp, path)
    return AttackedImages(adv, fooled, wall)


def attack_cell(det: Any, member: Any, meta: dict, src: Source, method: str, eps: float,
                out: Path, seed: int, batch_size: int) -> dict:
    """One (family, source, attack, eps) cell scored by ``det``, cached."""
    key = cell_key(meta, src, method, eps, seed)
    path = out / "cells" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    att = attacked_images(member, meta, src, method, eps, out, seed, batch_size)
    adv, fooled, t_attack = att.adv, att.fooled, att.attack_wall_s
    s = score_stored(det, adv)
    flagged = s["score"] >= det.threshold
    change = np.abs(np.round(adv * src.levels) - np.round(src.x * src.levels))
    k, nf = int((flagged & fooled).sum()), int(fooled.sum())
    cell = {
        "family": meta["family"], "pipeline": meta["pipeline_tag"], "source": src.name,
        "attack": method, "eps": eps, "n": len(src.x), "fooled": nf,
        "fooled_rate": nf / len(src.x),
        "detected_fooled": k, "detection_fooled": k / nf if nf else None,
        "detection_fooled_ci": _wilson(k, nf),
        "detected_all": int(flagged.sum()), "detection_all": float(flagged.mean()),
        "median_score_fooled": _median(s["score"][fooled]),
        "median_p_cnn_fooled": _median(s["p_cnn"][fooled]),
        "median_p_rf_fooled": _median(s["p_rf"][fooled]),
        "median_grid_fooled": _median(s["grid"][fooled]),
        "p_rf_ge_0.9_fooled": (float(np.mean(s["p_rf"][fooled] >= 0.9)) if nf else None),
        "max_stored_change": int(change.max()),
        "changed_pixel_share": float(np.mean(change > 0)),
        "attack_wall_s": t_attack, "threshold": det.threshold,
        "scores": s["score"].tolist(), "fooled_mask": fooled.astype(int).tolist(),
    }
    _save_json(path, cell)
    return cell


# ----------------------------------------------------------------------------- report


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.0f}% ({k}/{n})" if n else "- (0 fooled)"


def markdown(results: dict) -> str:
    """The table the issue asks for: detection among fooled images per family x source x attack."""
    lines = [
        f"# Shipped bundle {results['bundle_id']} against the victim zoo (issue 15 baseline)",
        "",
        f"Threshold {results['threshold']:.4f} (the bundle's). Attacks at the native matrix "
        "through each member's own resize, stored at 8 bits. Detection = flagged among the "
        "images the attack fooled (the member's prediction flipped); [Wilson 95%].",
        "",
        "## Clean false positives (same images)",
        "",
        "| source | flagged | FPR [95%] | median score |",
        "| --- | --- | --- | --- |",
    ]
    for c in results["clean"]:
        lo, hi = c["fpr_ci"]
        lines.append(f"| {c['source']} | {c['flagged']}/{c['n']} | {100 * c['fpr']:.1f}% "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {c['median_score']:.3f} |")
    lines += ["", "## Members", "", "| family | pipeline | test AUC | params | train wall s |",
              "| --- | --- | --- | --- | --- |"]
    for m in results["members"]:
        lines.append(f"| {m['family']} | {m['pipeline_tag']} | {m['test_auc']:.4f} | "
                     f"{m['params']} | {m['train_wall_s']:.0f} |")
    cells = results["cells"]
    combos = sorted({(c["source"], c["attack"]) for c in cells})
    eps_list = sorted({c["eps"] for c in cells})
    for source, attack in combos:
        lines += ["", f"## {source}, {attack}", "",
                  "| family | pipeline | " + " | ".join(
                      f"eps {e:g}: fooled | detected among fooled [95%] | median fused / "
                      f"CNN / forest / grid" for e in eps_list) + " |",
                  "| --- | --- | " + " | ".join("--- | --- | ---" for _ in eps_list) + " |"]
        fams = [m for m in results["members"]]
        for m in fams:
            row = [m["family"], m["pipeline_tag"]]
            for e in eps_list:
                c = next((c for c in cells if c["family"] == m["family"]
                          and c["source"] == source and c["attack"] == attack
                          and c["eps"] == e), None)
                if c is None:
                    row += ["-", "-", "-"]
                    continue
                lo, hi = c["detection_fooled_ci"]
                ci = f" [{100 * lo:.0f}, {100 * hi:.0f}]" if c["fooled"] else ""
                med = "/".join("-" if c[k] is None else f"{c[k]:.2f}" for k in (
                    "median_score_fooled", "median_p_cnn_fooled", "median_p_rf_fooled",
                    "median_grid_fooled"))
                row += [f"{c['fooled']}/{c['n']}",
                        _pct(c["detected_fooled"], c["fooled"]) + ci, med]
            lines.append("| " + " | ".join(row) + " |")
    if results.get("processing"):
        lines += ["", "## Clean FPR per modality processing kind (train.processing)", "",
                  "| kind | setting | source | flagged | FPR [95%] | median score |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in results["processing"]:
            lo, hi = c["fpr_ci"]
            lines.append(f"| {c['kind']} | {c['setting']} | {c['source']} | "
                         f"{c['flagged']}/{c['n']} | {100 * c['fpr']:.1f}% "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {c['median_score']:.3f} |")
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: Path) -> None:
    """Detection among fooled images, one panel per source x attack, bars per family x eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    combos = sorted({(c["source"], c["attack"]) for c in cells})
    if not combos:
        return
    eps_list = sorted({c["eps"] for c in cells})
    fams = [m["family"] for m in results["members"]]
    fig, axes = plt.subplots(len(combos), 1, figsize=(10, 2.8 * len(combos)), squeeze=False)
    width = 0.8 / max(1, len(eps_list))
    for ax, (source, attack) in zip(axes[:, 0], combos, strict=True):
        for j, e in enumerate(eps_list):
            vals, errs, labels = [], [[], []], []
            for f in fams:
                c = next((c for c in cells if c["family"] == f and c["source"] == source
                          and c["attack"] == attack and c["eps"] == e), None)
                if c is None or not c["fooled"]:
                    vals.append(0.0)
                    errs[0].append(0.0)
                    errs[1].append(0.0)
                    labels.append("n/a" if c is None else "0 fooled")
                    continue
                v = c["detection_fooled"]
                lo, hi = c["detection_fooled_ci"]
                vals.append(v)
                errs[0].append(max(0.0, v - lo))
                errs[1].append(max(0.0, hi - v))
                labels.append(f"n={c['fooled']}")
            xs = np.arange(len(fams)) + (j - (len(eps_list) - 1) / 2) * width
            ax.bar(xs, vals, width, yerr=errs, capsize=2, label=f"eps {e:g}")
            for x, lab in zip(xs, labels, strict=True):
                ax.text(x, 0.02, lab, rotation=90, fontsize=6, ha="center", va="bottom")
        ax.set_xticks(np.arange(len(fams)), fams, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.9, color="grey", lw=0.5, ls="--")
        ax.axhline(0.7, color="grey", lw=0.5, ls=":")
        ax.set_ylabel("detected | fooled")
        ax.set_title(f"{source}, {attack} (bundle {results['bundle_id']}, threshold "
                     f"{results['threshold']:.3f})", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from train import zoo

    ap = argparse.ArgumentParser(prog="python -m train.zoo_eval",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/zoo"),
                    help="the zoo's work directory (python -m train.zoo --work ... train)")
    ap.add_argument("--out", type=Path, default=Path("runs/zoo-eval"))
    ap.add_argument("--bundle", type=Path, default=None, help="detector bundle (default: shipped)")
    ap.add_argument("--data", type=Path, default=None,
                    help="data root holding nih_cxr14_1000 and kermany224 "
                    "(default $SENTINEL_DATA or ../shared/data)")
    ap.add_argument("--families", nargs="+", default=list(zoo.FAMILIES),
                    choices=list(zoo.FAMILIES))
    ap.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=SOURCES,
                    help="nih512-12bit: the NIH sample as a 12-bit modality stores it "
                    "(lift_bit_depth), attacked and stored at 12 bits; nih1536-12bit: that, "
                    "upsampled to 1536 (a CR-sized matrix)")
    ap.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS),
                    help="of train.attacks.NATIVE_ATTACKS")
    ap.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS))
    ap.add_argument("--nih", type=int, default=100, help="NIH images (seeded sample)")
    ap.add_argument("--kermany", type=int, default=100, help="Kermany test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processing", action="store_true",
                    help="also the clean FPR per modality processing kind (train.processing)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the table and plot from the cached cells, compute nothing")
    args = ap.parse_args(argv)
    from train import attacks

    bad = [a for a in args.attacks if a not in attacks.NATIVE_ATTACKS]
    if bad:
        ap.error(f"--attacks {bad}: use of {attacks.NATIVE_ATTACKS}")
    import tensorflow as tf
    from tqdm import tqdm

    from detector.scoring import Detector

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    data_root = args.data or zoo.default_data_root()
    det = Detector.load(args.bundle)
    trained = {(m["family"], m["pipeline_tag"]): m for m in zoo.list_members(args.work)
               if m["seed"] == args.seed}
    members = [trained[(f, zoo.FAMILIES[f].pipeline.tag)] for f in args.families
               if (f, zoo.FAMILIES[f].pipeline.tag) in trained]
    missing = [f for f in args.families if f not in {m["family"] for m in members}]
    if missing:
        print(f"not trained yet under {args.work} (skipped; rerun after `python -m train.zoo "
              f"--work {args.work} train`): {missing}", file=sys.stderr, flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cells: list[dict] = []
    clean: list[dict] = []
    processing: list[dict] = []
    if not args.report_only:
        sources = load_sources(args.work, data_root, args.nih, args.kermany, args.seed,
                               tuple(args.sources))
        clean = [clean_cell(det, sources[s], out) for s in args.sources]
        # source-major: every family's NIH cells (the unseen source) come before Kermany's
        jobs = [(m, s, a, e) for s in args.sources for m in members for a in args.attacks
                for e in args.eps]
        bar = tqdm(jobs, desc="zoo cells", unit="cell", file=sys.stdout, mininterval=5)
        loaded: dict[str, Any] = {}
        for m, s, a, e in bar:
            bar.set_postfix_str(f"{m['family']} {s} {a} {e:g}")
            if m["family"] not in loaded:
                loaded.clear()  # one member in memory at a time
                loaded[m["family"]] = zoo.load_member(args.work, m["family"], seed=args.seed,
                                                      digest=m["split_digest"])[0]
            cells.append(attack_cell(det, loaded[m["family"]], m, sources[s], a, e, out,
                                     args.seed, args.batch_size))
        if args.processing and (out / "processing.json").is_file():
            processing = json.loads((out / "processing.json").read_text())
        elif args.processing:
            from train import processing as proc

            processing = proc.clean_fpr_table(
                det, {s: sources[s].x for s in args.sources}, out, seed=args.seed,
                levels={s: sources[s].levels for s in args.sources})
    else:
        clean = [json.loads(p.read_text()) for p in sorted((out / "clean").glob("*.json"))]
        cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
        pp = out / "processing.json"
        processing = json.loads(pp.read_text()) if pp.is_file() else []
    results = {
        "bundle_id": det.bundle_id, "threshold": det.threshold,
        "members": [{k: m[k] for k in ("family", "pipeline_tag", "what", "test_auc",
                                       "test_accuracy", "params", "train_wall_s", "epochs")}
                    for m in members],
        "clean": [{k: v for k, v in c.items() if k != "scores"} for c in clean],
        "cells": [{k: v for k, v in c.items() if k not in ("scores", "fooled_mask")}
                  for c in cells],
        "processing": processing,
        "settings": {"nih": args.nih, "kermany": args.kermany, "seed": args.seed,
                     "attacks": args.attacks, "eps": args.eps,
                     "levels": {s: SOURCE_LEVELS[s] for s in args.sources}},
    }
    _save_json(out / "results.json", results)
    (out / "table.md").write_text(markdown(results))
    bar_plot(results, out / "detection.png")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'detection.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
