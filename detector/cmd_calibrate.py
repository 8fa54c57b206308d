"""Calibrate the operating threshold on your own clean images: ``sentinel calibrate``.

Why: the shipped bundle's threshold was calibrated for a 1% false-positive rate on Kermany
validation images. Another site's clean images can score higher: the NIH set, never used in
training, passes (0.1% flagged), but the same images after a modality's local contrast
equalisation (CLAHE, clip 3) are 57% flagged (README, "Victim zoo"). This command scores a
folder of images you know to be clean (untouched radiographs from your modalities), and prints
the threshold that flags at most ``--fpr`` of them, overall and per DICOM Modality, as config
lines: the overall point as ``[default] threshold`` (Modality is sender-written, so per-Modality
thresholds in ``[detector.thresholds]`` only ever tighten it and are printed only where they
do). The proposal is never below the bundle's own threshold unless ``--allow-lower`` is given
and there are enough images (at least 3 / fpr). Raising the threshold costs sensitivity.
Lowering it to your own images' 1% point keeps 1% of them flagged and makes an attacker who
knows the detector work much harder: the bundle's threshold is also calibrated on resampled
copies that stand in for noisier sources it never saw, and an adaptive attacker uses that margin
(README, "Adaptive attacks": on Kermany, the strongest adaptive attack at eps 0.006 goes from
about 1% detected at the bundle's threshold to about two thirds at Kermany's own 1% point).
Measure detection at the new threshold with attacked copies before relying on it (``sentinel
attack`` then ``sentinel score --threshold T``). Calibrate on one set of images and check the
false-positive rate on another.

It also scores each image's resampling lines (detector.resample_lines) and proposes
``[detector] line_gate`` where the site's clean images carry none: the gate catches attacks made
through another network's resize, which the CNN and forest often miss, but it flags every image
that was itself resampled, so only a site's own images can say whether it may be used. With the
gate it proposes ``[detector] line_ramp``, a floor below it: an image whose score, raised by
how far its line lies above the floor, reaches the threshold is flagged too, which catches
attacks that blur the line (input diversity, L2, weak 12-bit ones) without flagging any of
the site's clean images (detector.scoring.apply_line_ramp).

With ``--cnn-gate`` it also proposes ``[detector] cnn_gate``: flag an image when the detector
CNN alone reaches the gate, set where, with 95% confidence, it keeps the site's clean images
within ``--fpr`` together with the threshold and line gate proposed. It is for a site's own
bundle trained with a secret (``sentinel train --secret-file``): an attacker who holds the
public bundle keeps every forest feature at clean values and fools the public CNN, but the
site's CNN, whose weights the attacker lacks, still sees most of it (README, "Adaptive
attacks"); on the public bundle itself the gate adds nothing against such an attacker.

Exit status: 0 when a threshold was found; 2 when no image could be scored or the bundle is
unusable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR",
                        help="clean images (DICOM, PNG or JPEG files or directories)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="model bundle directory (default: the shipped bundle)")
    parser.add_argument("--fpr", type=float, default=0.01,
                        help="false-positive rate to allow on these images (default 0.01)")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads for the CNN")
    parser.add_argument("--allow-lower", action="store_true",
                        help="propose a threshold below the bundle's where these images allow "
                        "it (at least 3 / fpr of them, per modality): harder for an adaptive "
                        "attacker on this source, more false alarms on any other")
    parser.add_argument("--cnn-gate", action="store_true",
                        help="also propose [detector] cnn_gate: flag an image when the detector "
                        "CNN alone reaches it, at the point that keeps these images within "
                        "--fpr with the threshold and line gate proposed (for a site's own "
                        "bundle trained with a secret: README, \"Adaptive attacks\")")
    parser.add_argument("--cnn-gate-attacks", nargs="+", default=(), metavar="FILE|DIR",
                        help="with --cnn-gate: attacked images (DICOM, PNG or JPEG files or "
                        "directories, or .npy stacks of 224x224 images in [0,1] from `python -m "
                        "train.adaptive --split val`) made from clean images the bundle never "
                        "trained on; the gate is raised to the highest point that still "
                        f"catches all but {100 * CNN_GATE_ATTACK_MISS:g}%% of them with 95%% "
                        "confidence, which passes more clean images from other sources; make "
                        "them at the smallest eps you want caught (the gate rises to the weakest "
                        "attack it is shown, so attacks only at 0.006 let 0.003 ones through)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _modality(path: Path) -> str:
    from detector.preprocess import parse_dicom, sniff_format

    try:
        if sniff_format(path) != "dicom":
            return ""
        return str(parse_dicom(path).get("Modality", "") or "").strip()
    except Exception:  # scoring reports the error; the label is cosmetic
        return ""


MEASURE_LINES = float("inf")  # a line gate nothing reaches: measure the lines, flag nothing


def min_images_to_lower(fpr: float) -> int:
    """Clean images needed before a threshold may go below the bundle's: enough that at least
    three of them lie above the proposed point, so one odd image does not set it."""
    return int(np.ceil(3.0 / fpr - 1e-9))


def calibrate(scores: dict[str, list[float]], fpr: float, bundle_threshold: float,
              allow_lower: bool = False) -> dict[str, Any]:
    """Thresholds overall and per modality from clean ``scores`` grouped by Modality.

    By default a threshold is never proposed below the bundle's: calibration exists to stop
    false alarms on a source noisier than the training data. ``allow_lower`` lets a group with
    at least ``min_images_to_lower(fpr)`` images go below it, to its own ``fpr`` point: measured
    on Kermany, that is what keeps an adaptive attacker from hiding in the margin the bundle's
    threshold leaves for unseen sources (README, "Adaptive attacks").
    """
    from detector.calibration import calibrate_threshold

    def one(values: list[float]) -> dict[str, Any]:
        s = np.asarray(values, np.float64)
        own = calibrate_threshold(s, fpr)
        may_lower = allow_lower and len(s) >= min_images_to_lower(fpr)
        t = own if may_lower else max(own, bundle_threshold)
        return {"images": len(s), "threshold": t, "fpr_at_threshold": float(np.mean(s >= t)),
                "fpr_at_bundle_threshold": float(np.mean(s >= bundle_threshold)),
                "enough_images": len(s) * fpr >= 1.0,
                "below_bundle": bool(t < bundle_threshold),
                "lower_refused": bool(allow_lower and not may_lower and own < bundle_threshold)}

    everything = [v for vs in scores.values() for v in vs]
    return {"overall": one(everything),
            "by_modality": {m: one(v) for m, v in sorted(scores.items()) if m}}


LINE_GATE_MIN_IMAGES = 100  # fewer cannot show that the site's images carry no line


def propose_line_gate(peaks: list[float], fpr: float = 0.01) -> dict[str, Any]:
    """The resampling-line gate for these clean images, or why not.

    A clean image's line score is the largest of a few hundred noisy spectral ratios, so its
    tail is that of a maximum: a Gumbel law, fitted here by its moments. The gate takes half
    of the site's ``fpr`` (the other half is the CNN and forest's): the fitted (1 - fpr/2)
    point, never below the floor measured on NIH. Why not the empirical point: 300 images
    cannot show a 0.5% tail; on NIH, 300 images' highest score (2.04) let 1.5% of 600 others
    through, the fitted 0.5% point (2.30) none. Refused where that point, or more than ``fpr``
    of the images, lie above the ceiling: the site's own images then carry lines (resampled by
    the modality or a PACS, or a grid), and the gate would flag them."""
    from detector.resample_lines import CEILING, FLOOR

    s = np.asarray(peaks, np.float64)
    out: dict[str, Any] = {"images": len(s), "highest": float(s.max()) if len(s) else None,
                           "gate": None, "why_not": ""}
    if len(s) < LINE_GATE_MIN_IMAGES:
        out["why_not"] = (f"{len(s)} image(s): at least {LINE_GATE_MIN_IMAGES} are needed to "
                          "show that this site's images carry no resampling line")
        return out
    beta = float(s.std()) * np.sqrt(6.0) / np.pi
    fitted = float(s.mean()) - 0.5772 * beta - beta * np.log(-np.log(1.0 - fpr / 2.0))
    out["fitted"] = fitted
    lined = float(np.mean(s >= CEILING))
    if lined > fpr:
        out["why_not"] = (f"{100 * lined:.1f}% of these clean images carry a resampling line "
                          f"(score over {CEILING}; highest {s.max():.2f}): they were resampled "
                          "by the modality or a PACS (or show a grid), and the gate would flag "
                          "them")
        return out
    if fitted >= CEILING:
        out["why_not"] = (f"at --fpr {fpr:g} the gate would sit at {fitted:.2f}, above "
                          f"{CEILING}, where it misses attacks; allow a larger --fpr")
        return out
    out["gate"] = float(max(FLOOR, np.ceil(fitted * 1e4) / 1e4))
    out["flagged"] = float(np.mean(s >= out["gate"]))  # of these images, by the gate alone
    return out


# The line ramp's floor is searched from here up to the gate: clean NIH's median line score is
# 1.35-1.5, so a floor below this would weigh the line of every clean image
LINE_RAMP_LOWEST = 1.5


def propose_line_ramp(fused: np.ndarray, lines: np.ndarray, threshold: float,
                      line_gate: float | None, fpr: float) -> dict[str, Any]:
    """The line ramp for these clean images, or why not: the lowest floor (from
    ``LINE_RAMP_LOWEST``, in steps of 0.01, up to the gate) at which the ramp
    flags none of the images that the threshold and the line gate pass.

    Why none: the ramp flags an image whose score, raised by its line
    (detector.scoring.apply_line_ramp), reaches the threshold, so its clean rate is that of the
    site's images with both a raised score and a line, a tail 300 images barely show; flagging
    none of ``n`` puts its rate under 3 / n with 95% confidence, hence at least 3 / ``fpr``
    images. Measured on NIH (300 site images; the ramp at 1.92-2.05): the site's other images
    0.0-0.3% flagged by it (README, "The line ramp")."""
    from detector.scoring import ramp_flags

    n = len(lines)
    out: dict[str, Any] = {"images": n, "ramp": None, "why_not": ""}
    if line_gate is None:
        out["why_not"] = "no line gate: the ramp works below it, on the line score it measures"
        return out
    need = int(np.ceil(3.0 / fpr))
    if n < need:
        out["why_not"] = (f"{n} image(s) cannot show that it flags under {100 * fpr:g}% of "
                          f"images like them; use at least {need}")
        return out
    already = site_flags(fused, lines, threshold, line_gate)
    # floors on a grid of hundredths, each strictly under the gate (the gate is proposed to
    # four decimals: rounding to six leaves 2.2 * 100 = 220.00000000000003 a whole number)
    for k in range(round(LINE_RAMP_LOWEST * 100), int(np.ceil(round(line_gate * 100, 6)))):
        floor = k / 100
        if not np.any(ramp_flags(fused, lines, threshold, floor) & ~already):
            out["ramp"] = floor
            return out
    out["why_not"] = "even just under the line gate it would flag some of these clean images"
    return out


CNN_GATE_CONFIDENCE = 0.95  # the gate keeps its share of the budget with this confidence


def _most_above(n: int, rate: float, confidence: float = CNN_GATE_CONFIDENCE) -> int:
    """The most of ``n`` clean images a gate may leave above it while, with ``confidence``, it
    flags at most ``rate`` of future images like them: the largest k with P(Bin(n, rate) <= k)
    <= 1 - confidence (-1: too few images for any)."""
    total, k = 0.0, -1
    log_p, log_q = math.log(rate), math.log1p(-rate)
    for j in range(n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                          + j * log_p + (n - j) * log_q)
        if total > 1.0 - confidence:
            return k
        k = j
    return k


def site_flags(fused: np.ndarray, lines: np.ndarray, threshold: float, line_gate: float | None,
           cnn: np.ndarray | None = None, cnn_gate: float | None = None,
           line_ramp: float | None = None) -> np.ndarray:
    """Which images a site's rule flags: the threshold, the line gate and line ramp where
    there are, and the CNN gate where one is given (what the gateway applies, one frame per
    image; also the zoo evaluation's train.zoo_eval.SiteRule)."""
    from detector.scoring import ramp_flags

    out = fused >= threshold
    if line_gate is not None:
        out = out | (lines >= line_gate)
    if line_ramp is not None:
        out = out | ramp_flags(fused, lines, threshold, line_ramp)
    if cnn is not None and cnn_gate is not None:
        out = out | (cnn >= cnn_gate)
    return out


def propose_cnn_gate(fused: np.ndarray, lines: np.ndarray, cnn: np.ndarray, threshold: float,
                     line_gate: float | None, fpr: float,
                     line_ramp: float | None = None) -> dict[str, Any]:
    """The CNN gate for these clean images, or why not.

    The gate takes what the proposed threshold and line gate leave of ``fpr`` on these images,
    and is placed where, with 95% confidence, it flags at most that share of future clean
    images like them: it may leave k of the site's other images above it only where k or fewer
    out of that many would be unlikely (5%) if its true rate were the share. Why not the plain
    empirical point: the CNN's upper tail is heavy, and a point set on 300 clean NIH images that
    flagged 1% of them flagged 2.7-4.0% of 600 others (five bundles); placed this way (above
    all 300, k = 0) it flagged 0.8-2.2%, and on 869 Kermany validation images (k = 3) 0.1-0.5%
    of the 873 test images. Needs about 3 / share images."""
    n = len(cnn)
    out: dict[str, Any] = {"images": n, "gate": None, "why_not": ""}
    already = site_flags(fused, lines, threshold, line_gate, line_ramp=line_ramp)
    share = fpr - float(already.mean())
    if share <= 0:
        out["why_not"] = (f"the threshold and line gate already flag {100 * already.mean():.2f}% "
                          f"of these images, all of --fpr {fpr:g}")
        return out
    rest = np.sort(cnn[~already])[::-1]
    k = _most_above(len(rest), share)
    if k < 0 or k >= len(rest):
        out["why_not"] = (f"{n} image(s) cannot show a share of {100 * share:.2f}% for the gate "
                          f"(what the threshold and line gate leave of --fpr {fpr:g}); use at "
                          f"least {int(np.ceil(3.0 / share))}")
        return out
    gate = float(np.nextafter(rest[k], np.inf))  # just above the first image it leaves clean
    if gate > 1.0:
        out["why_not"] = "the CNN is certain of these clean images; no gate can pass them"
        return out
    out.update(gate=gate, above=k, fpr_with_gate=float((already | (cnn >= gate)).mean()))
    return out


# The share of a known attack a raised CNN gate may miss, with CNN_GATE_CONFIDENCE
CNN_GATE_ATTACK_MISS = 0.05


def raise_cnn_gate(gate: float | None, fused: np.ndarray, lines: np.ndarray, cnn: np.ndarray,
                   threshold: float, line_gate: float | None,
                   miss: float = CNN_GATE_ATTACK_MISS,
                   line_ramp: float | None = None) -> dict[str, Any]:
    """Raise a clean-budget CNN gate toward a known attack's scores: the highest gate at which,
    with 95% confidence, the threshold, line gate and CNN gate together still flag all but
    ``miss`` of attacks like these; never below ``gate`` (the clean budget's point).

    Why: the clean budget places the gate by the site's clean images alone, so it flags that
    budget's share of them and more of any other source's. Where the site's CNN tells the
    attack apart with room to spare (measured: attacks crafted on the public bundle score
    0.6-1.0 on a site CNN hardened with them, clean images of an unseen source at most 0.46),
    the gate belongs at the attack's low end, which keeps nearly all of it and passes clean
    images from elsewhere. ``fused``, ``lines``, ``cnn``: the attacked images' scores, made from
    images the bundle never trained on (train.adaptive --split val, or `sentinel attack` copies
    of held-out clean images)."""
    n = len(cnn)
    out: dict[str, Any] = {"attack_images": n, "gate": gate, "raised": False, "why_not": ""}
    if gate is None:
        out["why_not"] = "no clean-budget gate to raise"
        return out
    already = site_flags(fused, lines, threshold, line_gate, line_ramp=line_ramp)
    rest = np.sort(cnn[~already])
    k = _most_above(n, miss)  # the most of them the gate may leave unflagged
    if k < 0:
        out["why_not"] = (f"{n} attacked image(s) cannot show a miss rate of {100 * miss:g}%; "
                          f"use at least {int(np.ceil(3.0 / miss))}")
    elif k < len(rest) and float(rest[k]) > gate:
        out.update(gate=float(rest[k]), raised=True)
    elif k >= len(rest):
        out["why_not"] = "the threshold and line gate already flag these attacks"
    else:
        out["why_not"] = ("the clean budget's gate is already at the attack's low end: "
                          "the CNN does not separate them further")
    out["attack_caught"] = float((already | (cnn >= out["gate"])).mean())
    return out


def config_lines(result: dict[str, Any]) -> str:
    """The TOML that applies the calibrated thresholds in the gateway.

    Why the overall threshold goes on ``[default]`` and not per Modality: Modality is written by
    the sender, so a per-Modality threshold only ever tightens the sender's baseline (a
    relabelled image must never pick a more lenient one; gateway.rules). The overall point is
    the site's baseline; a Modality whose own point lies below it (a quieter modality) may keep
    it in ``[detector.thresholds]``, where it can only make screening stricter.
    """
    overall = result["overall"]["threshold"]
    lines = ["[default]", f"threshold = {overall:.6f}"]
    tighter = {m: r["threshold"] for m, r in result["by_modality"].items()
               if r["threshold"] < overall}
    if tighter:
        lines += ["", "[detector.thresholds]  # only ever tightens [default]'s threshold"]
        lines += [f"{m} = {t:.6f}" for m, t in tighter.items()]
    detector = []
    gate = (result.get("line_gate") or {}).get("gate")
    if gate is not None:
        detector.append(f"line_gate = {gate:.4f}")
    ramp = (result.get("line_ramp") or {}).get("ramp")
    if ramp is not None:
        detector.append(f"line_ramp = {ramp:.2f}")
    cnn_gate = (result.get("cnn_gate") or {}).get("gate")
    if cnn_gate is not None:
        detector.append(f"cnn_gate = {cnn_gate!r}")
    if detector:
        lines += ["", "[detector]", *detector]
    return "\n".join(lines)


def _score_all(det: Any, files: list[tuple[Path, str]], desc: str
               ) -> tuple[dict[str, list[float]], list[float], list[dict[str, Any]],
                          np.ndarray]:
    """Scores grouped by Modality, line peaks and error rows of ``files`` under ``det``, and
    (fused score, line peak, CNN peak, longer side of the matrix) of each scored image, in
    order."""
    from detector.cmd_score import score_one

    scores: dict[str, list[float]] = {}
    peaks: list[float] = []
    errors: list[dict[str, Any]] = []
    parts: list[tuple[float, float, float, float]] = []
    try:
        from tqdm import tqdm

        it: Any = tqdm(files, desc=desc, unit="image", disable=len(files) < 50,
                       file=sys.stderr)
    except ImportError:
        it = files
    for path, _ in it:
        row = score_one(det, path, None, line_gate=MEASURE_LINES)
        if row["verdict"] == "error":
            errors.append(row)
            continue
        scores.setdefault(_modality(path), []).append(float(row["score"]))
        peaks.append(float(row["line_peak"]))
        parts.append((float(row["score"]), float(row["line_peak"]), float(row["cnn_peak"]),
                      float(max(row.get("matrix") or [0]))))
    return scores, peaks, errors, np.asarray(parts, np.float64).reshape(-1, 4)


# A site whose images are this large (the median's longer side, pixels) reads them through an
# area resize that averages most of an attack made through a resize without antialiasing away:
# measured, none caught at 1536 and on the NEMA CRs (1,760-1,955), most at 512 (README, "Real
# CRs at their own matrix"); the resampling-line gate, read at the native matrix, still sees them.
LARGE_MATRIX_SIDE = 1000


def large_matrix_note(sides: np.ndarray) -> dict[str, Any]:
    """Whether the site's images are large enough for the area view to lose such attacks."""
    median = float(np.median(sides)) if len(sides) else 0.0
    return {"median_side": median, "large": median >= LARGE_MATRIX_SIDE,
            "side_from": LARGE_MATRIX_SIDE}


# The default bundle flagging more than this many times --fpr of a site's clean images is the
# sign of a modality that processes its images (measured: CLAHE at clip 3 on NIH, 57% flagged).
ZOO_SUGGEST_FACTOR = 3.0


def _try_zoo_bundle(args: argparse.Namespace, files: list[tuple[Path, str]],
                    result: dict[str, Any]) -> dict[str, Any] | None:
    """Where the default bundle flags many of the site's clean images, score them with the
    shipped zoo bundle too, and recommend it where it flags at most half as many.

    Why: strong modality processing (CLAHE, unsharp masking, multi-scale contrast) looks like
    perturbation to the default bundle, and raising its threshold to pass those images gives
    up most of its detection; the zoo bundle was trained with such processing as clean."""
    from detector.bundle import BUILTIN_BUNDLES, DEFAULT_BUNDLE, resolve_bundle
    from detector.errors import BundleError
    from detector.scoring import Detector

    if resolve_bundle(args.bundle).resolve() != DEFAULT_BUNDLE.resolve():
        return None
    flagged = result["overall"]["fpr_at_bundle_threshold"]
    if flagged <= ZOO_SUGGEST_FACTOR * args.fpr:
        return None
    try:
        zoo = Detector.load(BUILTIN_BUNDLES["zoo"], num_threads=max(1, args.threads))
    except BundleError:
        return None
    scores, _, _, _ = _score_all(zoo, files, "scoring (zoo bundle)")
    if not scores:
        return None
    alt = calibrate(scores, args.fpr, zoo.threshold)["overall"]
    rate = alt["fpr_at_bundle_threshold"]
    return {"bundle_id": zoo.bundle_id, "bundle_threshold": zoo.threshold,
            "fpr_at_bundle_threshold": rate, "recommended": rate <= flagged / 2.0}


def _score_attacks(det: Any, paths: list[str]) -> np.ndarray:
    """(fused score, line peak, CNN peak) of each attacked image in ``paths``: image files as
    ``sentinel score`` reads them, and .npy stacks of 224x224 unit images (no line peak)."""
    from detector.cmd_score import collect_files

    stacks = [p for p in paths if p.endswith(".npy") and Path(p).is_file()]
    files = collect_files([p for p in paths if p not in stacks]) if len(stacks) < len(paths) else []
    rows = [_score_all(det, files, "scoring attacked images")[3][:, :3]] if files else []
    for p in stacks:
        x = np.load(p, mmap_mode="r")
        if x.ndim != 3 or x.shape[1:] != (224, 224):
            raise ValueError(f"{p}: a stack of 224x224 images is (n, 224, 224), not {x.shape}")
        parts = np.array([det.score_unit(np.asarray(img, np.float32)) for img in x], np.float64)
        rows.append(np.c_[parts[:, 2], np.zeros(len(parts)), parts[:, 0]])
    return np.concatenate(rows) if rows else np.empty((0, 3))


def run(args: argparse.Namespace) -> int:
    from detector.cmd_score import collect_files
    from detector.errors import BundleError
    from detector.scoring import Detector

    if not 0.0 < args.fpr < 1.0:
        print("sentinel calibrate: --fpr must lie between 0 and 1, e.g. 0.01", file=sys.stderr)
        return 2
    if args.cnn_gate_attacks and not args.cnn_gate:
        print("sentinel calibrate: --cnn-gate-attacks raises the CNN gate: add --cnn-gate",
              file=sys.stderr)
        return 2
    try:
        det = Detector.load(args.bundle, num_threads=max(1, args.threads))
    except BundleError as exc:
        print(f"sentinel calibrate: {exc}", file=sys.stderr)
        return 2
    files = collect_files(args.paths)
    scores, peaks, errors, parts = _score_all(det, files, "scoring")
    if not scores:
        print(f"sentinel calibrate: no image could be scored in {' '.join(args.paths)} "
              f"({len(errors)} error(s))", file=sys.stderr)
        return 2
    result = calibrate(scores, args.fpr, det.threshold, allow_lower=args.allow_lower)
    result["line_gate"] = propose_line_gate(peaks, args.fpr)
    thr, gate = result["overall"]["threshold"], result["line_gate"]["gate"]
    result["line_ramp"] = propose_line_ramp(parts[:, 0], parts[:, 1], thr, gate, args.fpr)
    ramp = result["line_ramp"]["ramp"]
    result["matrix"] = large_matrix_note(parts[:, 3])
    if args.cnn_gate:
        result["cnn_gate"] = propose_cnn_gate(parts[:, 0], parts[:, 1], parts[:, 2], thr, gate,
                                              args.fpr, line_ramp=ramp)
    if args.cnn_gate_attacks:
        try:
            att = _score_attacks(det, list(args.cnn_gate_attacks))
        except ValueError as exc:
            print(f"sentinel calibrate: {exc}", file=sys.stderr)
            return 2
        if not len(att):
            print("sentinel calibrate: no attacked image could be scored in "
                  f"{' '.join(args.cnn_gate_attacks)}", file=sys.stderr)
            return 2
        raised = raise_cnn_gate(result["cnn_gate"]["gate"], att[:, 0], att[:, 1], att[:, 2],
                                thr, gate, line_ramp=ramp)
        result["cnn_gate_attacks"] = raised
        if raised["raised"]:
            cg = result["cnn_gate"]
            flagged = site_flags(parts[:, 0], parts[:, 1], thr, gate, parts[:, 2], raised["gate"],
                             line_ramp=ramp)
            cg.update(gate=raised["gate"], clean_budget_gate=cg["gate"],
                      fpr_with_gate=float(flagged.mean()))
    result.update(bundle_id=det.bundle_id, bundle_threshold=det.threshold, target_fpr=args.fpr,
                  errors=len(errors), config=config_lines(result))
    result["alternative"] = _try_zoo_bundle(args, files, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    o = result["overall"]
    print(f"bundle {det.bundle_id}: {o['images']} clean image(s) scored, {len(errors)} "
          f"could not be ({', '.join(sorted({e['error']['reason'] for e in errors})) or '-'})")
    now = 100 * o["fpr_at_bundle_threshold"]
    print(f"at the bundle's threshold {det.threshold:.6f}: {now:.2f}% of them flagged")
    print(f"threshold for at most {100 * args.fpr:g}% flagged: {o['threshold']:.6f} "
          f"({100 * o['fpr_at_threshold']:.2f}% of these images)")
    for m, r in result["by_modality"].items():
        print(f"  {m}: {r['images']} image(s), {r['threshold']:.6f} "
              f"(now {100 * r['fpr_at_bundle_threshold']:.2f}% flagged)")
    if not o["enough_images"]:
        print(f"warning: {o['images']} image(s) cannot show a rate of {args.fpr:g}; use at "
              f"least {int(np.ceil(1 / args.fpr))}", file=sys.stderr)
    groups = {"overall": o, **result["by_modality"]}
    lowered = [g for g, r in groups.items() if r["below_bundle"]]
    refused = [g for g, r in groups.items() if r["lower_refused"]]
    if lowered:
        print(f"below the bundle's threshold ({', '.join(lowered)}): right for images like "
              "these only; images from another source or modality will be flagged more often. "
              "Check the false-positive rate on a second clean set.", file=sys.stderr)
    if refused:
        print(f"not lowered ({', '.join(refused)}): --allow-lower needs at least "
              f"{min_images_to_lower(args.fpr)} clean images per group at --fpr {args.fpr:g}",
              file=sys.stderr)
    alt = result["alternative"]
    if alt is not None:
        print(f"the shipped zoo bundle ({alt['bundle_id']}, trained with processed images as "
              f"clean) flags {100 * alt['fpr_at_bundle_threshold']:.2f}% of these images at its "
              f"own threshold {alt['bundle_threshold']:.6f}"
              + (": these images look processed by the modality; use it (`bundle = \"zoo\"` "
                 "in [detector]) and calibrate again with `--bundle zoo`"
                 if alt["recommended"] else ""))
    lg = result["line_gate"]
    if lg["gate"] is not None:
        print(f"resampling-line gate: {lg['gate']:.4f} (the highest of these images scores "
              f"{lg['highest']:.4f}; placed on the tail fitted to them, it flags "
              f"{100 * lg['flagged']:.2f}% of them): catches attacks made through another "
              "network's resize; leave it out if this site's images are ever resampled before "
              "they reach the gateway")
    else:
        print(f"resampling-line gate: not proposed: {lg['why_not']}")
    lr = result["line_ramp"]
    if lr["ramp"] is not None:
        print(f"line ramp: {lr['ramp']:.2f}: below the gate, a line above this raises the "
              "score toward the threshold and flags the image where the two reach it together "
              "(attacks that blur the line: input-diversity and L2 attacks, weak 12-bit ones); "
              "it flags none of these images; leave it out with the gate")
    elif lg["gate"] is not None:
        print(f"line ramp: not proposed: {lr['why_not']}")
    mx = result["matrix"]
    if mx["large"]:
        print(f"these images are {mx['median_side']:.0f} pixels a side (median): the detector "
              "reads them at 224 by area averaging, which averages away most of an attack made "
              "through a network's resize without antialiasing (measured: none of them caught "
              "at 1536 pixels or on real CRs; README, \"Real CRs at their own matrix\"). Only "
              "the resampling-line gate, read at the native matrix, sees those: use it unless "
              "this site's images are resampled on their way", file=sys.stderr)
    cg = result.get("cnn_gate")
    if cg is not None and cg["gate"] is not None:
        print(f"CNN gate: {cg['gate']!r}: with the threshold and line gate above, "
              f"{100 * cg['fpr_with_gate']:.2f}% of these images are flagged (it is set to "
              "keep within --fpr on images like them with 95% confidence). It catches "
              "attacks crafted on another bundle that your bundle's CNN still sees; it adds "
              "nothing against an attacker who holds your bundle, and images from another "
              "source or modality will be flagged more often: check a second clean set")
    elif cg is not None:
        print(f"CNN gate: not proposed: {cg['why_not']}")
    ra = result.get("cnn_gate_attacks")
    if ra is not None:
        print(f"CNN gate and the attacked images ({ra['attack_images']}): "
              + (f"raised from {cg['clean_budget_gate']!r} to the attack's low end; "
                 if ra["raised"] else f"not raised ({ra['why_not']}); ")
              + (f"{100 * ra['attack_caught']:.1f}% of them are flagged"
                 if "attack_caught" in ra else "measure detection before relying on it"))
    print("\nto use it, put these keys in the gateway config's tables of the same name (the "
          "[default] table exists already; a [[rules]] entry keyed on calling_ae may carry the "
          "threshold for one sender instead), then `sentinel check`, and SIGHUP:\n")
    print(result["config"])
    print("\nmeasure detection at the new threshold before relying on it: `sentinel attack` "
          "copies, then `sentinel score --threshold T`")
    return 0
