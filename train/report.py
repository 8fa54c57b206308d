"""The evaluation report: PNG figures regenerating the paper's Figs. 2-8 from our runs, a
``metrics.json`` and one self-contained ``index.html`` with the tables (per-perturbation
detection, parts side by side, paper against ours, second source, victim under attack).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from train.attacks import SUITE
from train.bundle_eval import dicom_check_kinds
from train.evaluate import PART_LABELS, PARTS

# The paper's figures (paper-summary.md), for the side-by-side table.
PAPER = {
    "overall_auc_ensemble": 0.891,
    "auc_0.003_ensemble": 0.863, "auc_0.003_cnn": 0.842,
    "auc_0.006_ensemble": 0.919, "auc_0.006_cnn": 0.901,
    "accuracy_0.006_ensemble": 0.838,
    "baseline_0.006_accuracy": 0.712, "baseline_0.006_auc": 0.700,
    "fp_ensemble": 108, "fp_cnn": 138, "fp_forest": 113, "fn_ensemble": 244, "fn_forest": 313,
    "latency_ensemble_ms": 2.74, "latency_cnn_ms": 13.04, "latency_forest_ms": 0.74,
}
BASELINE_DEFINITION = (
    "Adversarial-training baseline (the paper's 'CNN retrained on PGD examples'), as built here: "
    "the paper's CNN architecture (3 conv blocks of 32/64/128 filters, batch norm, dropout 0.25, "
    "Adam), trained from scratch as a clean-vs-perturbed classifier on PGD examples only: the "
    "training-split images whose drawn perturbation is PGD (eps 0.003 or 0.006, 40 steps, crafted "
    "against the victim), each with its own clean copy, capped at the same image budget and "
    "epochs as the paper-architecture reference row; no forest and no other perturbation kinds. "
    "It is evaluated on the same test set as every other row, at threshold 0.5 and at its own "
    "threshold calibrated on validation clean images for 1% FPR."
)



def fusion_formula(m: dict) -> str:
    """How the bundle weights its parts, in words a reader can check (detector.scoring.fuse)."""
    if m.get("fusion", "stack") == "logit":
        return ("score = sigmoid(w_cnn * logit(p_cnn) + (1 - w_cnn) * logit(p_rf)), a weighted "
                "mean of the parts' log-odds (the paper stacks probabilities)")
    return "score = w_cnn * p_cnn + (1 - w_cnn) * p_rf (the paper's stacking)"

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_ci(v: list[float]) -> str:
    return f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"


def figures(result: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write every figure; returns (file name, caption) pairs in report order."""
    plt = _plt()
    m, curves = result["metrics"], result["curves"]
    figs: list[tuple[str, str]] = []

    # Fig 2: metrics against w_cnn (test, mixed) and the validation choice
    grid = m["w_grid_test"]
    w = [g["w_cnn"] for g in grid]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("auc", "accuracy", "precision", "recall", "f1", "recall_at_operating_threshold"):
        ax.plot(w, [g[key] for g in grid], marker=".", label=key)
    ax.axvline(m["w_cnn"], color="k", ls="--", lw=1, label=f"chosen on validation ({m['w_cnn']})")
    ax.set_xlabel("w_cnn"), ax.set_ylabel("metric (test, all perturbations mixed)")
    ax.set_ylim(min(0.5, min(min(g[k] for g in grid) for k in ("auc", "accuracy"))) - 0.02, 1.01)
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    figs.append(_save(fig, out, "fig2_w_grid.png",
                      "Fig. 2: metrics against the weight w_cnn (threshold 0.5 unless named; "
                      f"fusion: {fusion_formula(m)}); dashed: the weight chosen on validation."))

    # Fig 3: ROC overall
    fig, ax = plt.subplots(figsize=(5, 5))
    for part in PARTS:
        fpr, tpr = curves["overall"][part]
        auc = m["overall"][part]["auc_ci"][0]
        ax.plot(fpr, tpr, label=f"{PART_LABELS[part]} (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate"), ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    figs.append(_save(fig, out, "fig3_roc_overall.png",
                      "Fig. 3: ROC, all perturbations mixed (balanced test set)."))

    # Fig 4: ROC per eps (PGD and FGSM)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, name in zip(axes, ("pgd_0.003", "pgd_0.006", "fgsm_0.003", "fgsm_0.006"), strict=True):
        for part in PARTS:
            fpr, tpr = curves[name][part]
            auc = m["per_perturbation"][name][part]["auc_ci"][0]
            ax.plot(fpr, tpr, label=f"{PART_LABELS[part]} {auc:.4f}")
        ax.set_title(name), ax.set_xscale("symlog", linthresh=0.01), ax.set_xlim(0, 1)
        ax.set_xlabel("FPR (symlog)"), ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylabel("TPR")
    figs.append(_save(fig, out, "fig4_roc_per_eps.png",
                      "Fig. 4: ROC per attack and eps (x axis symlog to show the low-FPR region)."))

    # Fig 5: heatmaps of AUC and accuracy (parts x perturbations)
    kinds = [p.name for p in SUITE]
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
    for ax, (title, getter) in zip(axes, (
            ("AUC", lambda b: b["auc_ci"][0]),
            ("accuracy at each part's calibrated threshold",
             lambda b: b["at_threshold"]["accuracy"])), strict=True):
        mat = np.array([[getter(m["per_perturbation"][k][p]) for k in kinds] for p in PARTS])
        im = ax.imshow(mat, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(PARTS)), [PART_LABELS[p] for p in PARTS], fontsize=7)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=6,
                        color="w" if mat[i, j] < 0.8 else "k")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    figs.append(_save(fig, out, "fig5_heatmaps.png",
                      "Fig. 5: AUC and accuracy of every part (incl. the adversarial-training "
                      "baseline) per perturbation."))

    # Fig 6: bars with 95% bootstrap CIs
    sets = ["overall", "pgd_0.003", "pgd_0.006"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, (title, key) in zip(axes, (("AUC", "auc_ci"),
                                       ("accuracy at calibrated threshold",
                                        "accuracy_ci_at_threshold")), strict=True):
        width = 0.8 / len(PARTS)
        for i, part in enumerate(PARTS):
            vals = [(m["overall"] if s == "overall" else m["per_perturbation"][s])[part][key]
                    for s in sets]
            v = np.array([x[0] for x in vals])
            err = np.array([[x[0] - x[1] for x in vals], [x[2] - x[0] for x in vals]])
            ax.bar(np.arange(len(sets)) + i * width, v, width, yerr=err, capsize=3,
                   label=PART_LABELS[part])
        ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2, sets)
        ax.set_ylim(0.4, 1.02), ax.set_title(f"{title}, 95% bootstrap CI "
                                             f"({m['n_bootstrap']} resamples)", fontsize=9)
        ax.legend(fontsize=6)
    figs.append(_save(fig, out, "fig6_bars_ci.png", "Fig. 6: AUC and accuracy with 95% CIs."))

    # Fig 7: confusion matrices (overall, each part at its calibrated threshold) + histograms
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, part in zip(axes, ("ensemble", "cnn", "forest"), strict=True):
        c = m["overall"][part]["at_threshold"]
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(mat, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(mat[i, j]), ha="center", va="center")
        ax.set_xticks([0, 1], ["pred clean", "pred perturbed"])
        ax.set_yticks([0, 1], ["clean", "perturbed"])
        ax.set_title(f"{PART_LABELS[part]} (t={c.get('threshold', 0) or 0:.3g})", fontsize=8)
    figs.append(_save(fig, out, "fig7_confusion.png",
                      "Fig. 7a: confusion matrices on the mixed test set, each part at its "
                      "validation-calibrated threshold."))
    book = result["book"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, name in zip(axes, ("pgd_0.003", "pgd_0.006", "contrast_1.1"), strict=True):
        c = book.ensemble("clean", m["w_cnn"])
        p = book.ensemble(name, m["w_cnn"])
        bins = np.linspace(0, 1, 51)
        ax.hist(c, bins, alpha=0.6, label="clean"), ax.hist(p, bins, alpha=0.6, label=name)
        ax.axvline(m["threshold"], color="k", ls="--", lw=1, label="operating threshold")
        ax.set_yscale("log"), ax.set_xlabel("ensemble score"), ax.legend(fontsize=7)
    figs.append(_save(fig, out, "fig7_histograms.png",
                      "Fig. 7b: ensemble score histograms, clean against perturbed (log counts)."))

    # Fig 8: latency per part
    lat = m.get("latency_ms", {})
    if lat:
        keys = ["features", "cnn", "forest", "total", "paper_cnn_standalone"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        med = [lat[k]["median"] for k in keys]
        err = [[lat[k]["median"] - lat[k]["p25"] for k in keys],
               [lat[k]["p75"] - lat[k]["median"] for k in keys]]
        ax.bar(keys, med, yerr=err, capsize=4)
        for i, v in enumerate(med):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("ms per image, one thread (median, IQR)")
        figs.append(_save(fig, out, "fig8_latency.png",
                          "Fig. 8: per-sample inference time by part (this machine)."))
    ss = m.get("second_source")
    if ss:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.linspace(0, 1, 51)
        ax.hist(ss["ensemble_scores"]["clean"], bins, alpha=0.6, label="clean")
        ax.hist(ss["ensemble_scores"]["pgd_0.006"], bins, alpha=0.6, label="PGD 0.006")
        ax.axvline(m["threshold"], color="k", ls="--", lw=1, label="operating threshold")
        ax.set_yscale("log"), ax.legend(fontsize=7), ax.set_xlabel("ensemble score")
        figs.append(_save(fig, out, "fig9_second_source.png",
                          f"Second source ({Path(ss['source']).name}): ensemble scores."))
    return figs


def _save(fig: Any, out: Path, name: str, caption: str) -> tuple[str, str]:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name, caption


def _table(header: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def paper_rows(m: dict[str, Any]) -> list[list[str]]:
    """The side-by-side table: paper's figure, ours (same definition where possible)."""
    per, ov = m["per_perturbation"], m["overall"]
    lat = m.get("latency_ms", {})
    rows = [
        ["AUC, all perturbations mixed (ensemble)", PAPER["overall_auc_ensemble"],
         _fmt_ci(ov["ensemble"]["auc_ci"])],
        ["AUC PGD eps 0.003 (ensemble)", PAPER["auc_0.003_ensemble"],
         _fmt_ci(per["pgd_0.003"]["ensemble"]["auc_ci"])],
        ["AUC PGD eps 0.003 (CNN)", PAPER["auc_0.003_cnn"],
         _fmt_ci(per["pgd_0.003"]["cnn"]["auc_ci"])],
        ["AUC PGD eps 0.006 (ensemble)", PAPER["auc_0.006_ensemble"],
         _fmt_ci(per["pgd_0.006"]["ensemble"]["auc_ci"])],
        ["AUC PGD eps 0.006 (CNN)", PAPER["auc_0.006_cnn"],
         _fmt_ci(per["pgd_0.006"]["cnn"]["auc_ci"])],
        ["accuracy PGD eps 0.006 (ensemble, threshold 0.5)", PAPER["accuracy_0.006_ensemble"],
         f"{per['pgd_0.006']['ensemble']['at_0.5']['accuracy']:.4f}"],
        ["adv.-training baseline, PGD 0.006: accuracy (0.5) / AUC",
         f"{PAPER['baseline_0.006_accuracy']} / {PAPER['baseline_0.006_auc']}",
         f"{per['pgd_0.006']['baseline_cnn']['at_0.5']['accuracy']:.4f} / "
         f"{per['pgd_0.006']['baseline_cnn']['auc_ci'][0]:.4f}"],
        ["paper-architecture CNN, PGD 0.006 AUC (reference row)", PAPER["auc_0.006_cnn"],
         _fmt_ci(per["pgd_0.006"]["paper_cnn"]["auc_ci"])],
        ["false positives ensemble / CNN / forest (mixed set, threshold 0.5)",
         f"{PAPER['fp_ensemble']} / {PAPER['fp_cnn']} / {PAPER['fp_forest']} (of their test set)",
         " / ".join(str(ov[p]["at_0.5"]["fp"]) for p in ("ensemble", "cnn", "forest"))
         + f" (of {ov['ensemble']['at_0.5']['fp'] + ov['ensemble']['at_0.5']['tn']} clean)"],
        ["false negatives ensemble / forest (mixed, 0.5)",
         f"{PAPER['fn_ensemble']} / {PAPER['fn_forest']}",
         f"{ov['ensemble']['at_0.5']['fn']} / {ov['forest']['at_0.5']['fn']}"],
    ]
    if lat:
        rows.append(["latency per sample: ensemble / standalone CNN / forest (ms)",
                     f"{PAPER['latency_ensemble_ms']} / {PAPER['latency_cnn_ms']} / "
                     f"{PAPER['latency_forest_ms']} (their hardware)",
                     f"{lat['total']['median']:.2f} / {lat['paper_cnn_standalone']['median']:.2f}"
                     f" (paper arch.) / {lat['forest']['median']:.2f} (one thread, median)"])
    return rows


def write_report(result: dict[str, Any], out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = result["metrics"]
    (out / "metrics.json").write_text(json.dumps(m, indent=1, default=_jd))
    figs = figures(result, out)
    per = m["per_perturbation"]
    parts_hdr = ["perturbation"] + [f"{PART_LABELS[p]} AUC [95% CI]" for p in PARTS]
    auc_rows = [[k] + [_fmt_ci(per[k][p]["auc_ci"]) for p in PARTS] for k in per]
    auc_rows.append(["overall (mixed)"] + [_fmt_ci(m["overall"][p]["auc_ci"]) for p in PARTS])
    det_rows = [[k] + [f"{per[k][p]['at_threshold']['recall']:.4f}" for p in PARTS] for k in per]
    det_rows.append(["clean FPR (test)"] +
                    [f"{per[SUITE[0].name][p]['at_threshold']['fpr']:.4f}" for p in PARTS])
    thr = m["part_thresholds"]
    det_hdr = ["perturbation"] + [f"{PART_LABELS[p]} (t={thr[p]:.4g})" for p in PARTS]
    vic = m.get("victim", {})
    vic_rows = [[k, f"{v['accuracy']:.4f}", f"{v['auc']:.4f}"] for k, v in vic.items()
                if isinstance(v, dict)]
    split = m["split"]
    split_rows = [[n, split[n]["images"], split[n]["patients"], split[n]["positive"],
                   split[n]["negative"]] for n in ("train", "val", "test")]
    parts_html = [
        "<!doctype html><html><head><meta charset='utf-8'><title>xray-sentinel evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:"
        "collapse;margin:8px 0}td,th{border:1px solid #aaa;padding:3px 6px;font-size:13px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>xray-sentinel evaluation: bundle {html.escape(str(m['bundle_id']))}</h1>",
        f"<p>Fusion: {html.escape(fusion_formula(m))}. "
        f"Operating point: w_cnn = {m['w_cnn']}, threshold = {m['threshold']:.5f} "
        f"(calibrated on validation clean images for FPR &le; 1%). Test clean FPR at it: "
        f"{m['clean_fpr_at_threshold']:.4f} ({m['n_clean']} clean test images).</p>",
        "<h2>Split (by patient, seeded)</h2>",
        _table(["split", "images", "patients", "pneumonia", "normal"], split_rows),
        f"<p>seed {split['seed']}, digest {split['digest']}, exact duplicates dropped: "
        f"{split['dropped_duplicates']}</p>",
        "<h2>Victim classifier under each perturbation (test split, stored images)</h2>",
        _table(["images", "accuracy", "AUC"], vic_rows),
        "<h2>AUC per perturbation (balanced: clean test images vs their perturbed copies)</h2>",
        _table(parts_hdr, auc_rows),
        "<h2>Detection rate at each part's calibrated threshold (1% FPR on validation clean)</h2>",
        _table(det_hdr, det_rows),
        "<h2>Paper against ours</h2>",
        _table(["figure", "paper (IRMA, their hardware)", "ours (test split, 95% CI)"],
               paper_rows(m)),
        f"<p><b>Baseline definition.</b> {html.escape(BASELINE_DEFINITION)}</p>",
    ]
    ss = m.get("second_source")
    if ss:
        parts_html += [
            f"<h2>Second source: {html.escape(ss['source'])} (never used for fitting or "
            "thresholds)</h2>",
            _table(["figure", "value"], [
                ["images (after duplicate removal)", ss["images"]],
                ["clean FPR at operating threshold", f"{ss['clean_fpr_at_threshold']:.4f}"],
                ["PGD eps 0.006 detection at operating threshold",
                 f"{ss['pgd_0.006_detection_at_threshold']:.4f}"],
                ["ensemble AUC clean vs PGD 0.006 [95% CI]", _fmt_ci(ss["auc_ci"])],
                *[[f"{p}: clean FPR / detection at its threshold",
                   f"{v['clean_fpr']:.4f} / {v['detection']:.4f}"]
                  for p, v in ss["parts_at_threshold"].items()],
                *[[f"victim {k}", f"{v:.4f}"] for k, v in ss.get("victim", {}).items()],
            ]),
        ]
    dc = m.get("dicom_check")
    if dc:
        kinds = dicom_check_kinds(dc["eps"])
        parts_html += [
            f"<h2>Real DICOM files: {html.escape(dc['folder'])}, as they are and as "
            "<code>sentinel attack</code> PGD copies (runtime scores at the operating "
            "threshold)</h2>",
            _table(["file", *kinds], [
                [r["file"], *(f"{r[k]['score']:.3f} ({'flagged' if r[k]['flagged'] else 'passes'}"
                              f"; CNN {r[k]['p_cnn']:.3f}, forest {r[k]['p_rf']:.3f}"
                              + (f", grid {r[k]['grid_peaks']:.2f}"
                                 if r[k]["grid_peaks"] is not None else "") + ")"
                              for k in kinds)] for r in dc["files"]]),
        ]
    for name, caption in figs:
        parts_html.append(f"<figure><img src='{name}'><figcaption>{html.escape(caption)}"
                          "</figcaption></figure>")
    parts_html.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts_html))
    return index


def _jd(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def gate_sentence(m: dict[str, Any]) -> str:
    """The stride-grid gate in words, or "" for a bundle without one."""
    gate = (m.get("rule") or {}).get("gate")
    if not gate:
        return ""
    return (" Then a stride-grid gate: where the image's `stride_grid_peaks` (mean power at the "
            "off-axis 1/8-cycle frequencies over the median power around each, log10; what a "
            "gradient attack through a network with stride-2 layers leaves) exceeds "
            f"{gate['threshold']:.4f}, its 99.9th percentile on the validation clean images, "
            f"the score's log-odds rise by {gate['slope']:g} per decade above it; below, the "
            "score is unchanged. The operating threshold was calibrated with the gate in place.")


def model_card(m: dict[str, Any], readme_table: str, commands: str) -> str:
    """MODEL_CARD.md text from measured metrics (nothing here is typed in by hand)."""
    split = m["split"]
    per = m["per_perturbation"]
    lat = m.get("latency_ms", {})
    ss = m.get("second_source")
    lines = [
        f"# Model card: xray-sentinel default detector bundle `{m['bundle_id']}`",
        "",
        "## What it is",
        "A hybrid detector of pixel-level tampering in chest radiographs: a small residual CNN "
        "(trainable high-pass first layer, about 6 M multiply-adds) and a 200-tree Random Forest "
        f"on 11 image statistics, fused as {fusion_formula(m)}. "
        f"w_cnn = {m['w_cnn']}, operating threshold = {m['threshold']:.5f} (calibrated on "
        "validation clean images for a false-positive rate of at most 1%)." + gate_sentence(m)
        + pool_sentence(m) + members_sentence(m),
        "",
        "## Training data",
        "`kermany224`: 5,840 paediatric chest X-rays (Guangzhou Women and Children's Medical "
        "Center), 224x224 8-bit, JPEG; licence CC BY 4.0; Kermany D, Zhang K, Goldbaum M et al., "
        "Cell 2018;172(5):1122-1131, doi:10.17632/rscbjbr9sj.2.",
        f"Split by patient (seed {split['seed']}, digest {split['digest']}), exact duplicates "
        f"dropped ({split['dropped_duplicates']}):",
        "",
        "| split | images | patients | pneumonia | normal |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {n} | {split[n]['images']} | {split[n]['patients']} | {split[n]['positive']} | "
          f"{split[n]['negative']} |" for n in ("train", "val", "test")],
        *patient_part_lines(m),
        "",
        "Perturbations (paper's Table II) computed at 224x224 in [0,1], rounded to the 8-bit grid "
        "and read back through the runtime's own preprocessing, exactly as clean images are: PGD "
        "(40 steps, alpha eps/10) and FGSM at eps 0.003 and 0.006 against the bundled victim "
        "classifier, Gaussian sigma 0.008, salt & pepper 0.008, contrast 1.1.",
        "",
        "## Results (kermany224 test split; 95% bootstrap CIs, "
        f"{m['n_bootstrap']} resamples)",
        "",
        readme_table,
        "",
        "Detection rate at the operating threshold per perturbation (ensemble): "
        + ", ".join(f"{k} {per[k]['ensemble']['at_threshold']['recall']:.4f}" for k in per)
        + f"; clean test FPR {m['clean_fpr_at_threshold']:.4f}.",
    ]
    if lat:
        lines += ["", f"Latency per image at one thread on the 2-core build machine (median): "
                  f"features {lat['features']['median']:.2f} ms, CNN {lat['cnn']['median']:.2f} "
                  f"ms, forest {lat['forest']['median']:.2f} ms, total "
                  f"{lat['total']['median']:.2f} ms."]
    lines += ["", "## Known limits"]
    weak = {k: v["ensemble"]["at_threshold"]["recall"] for k, v in per.items()
            if v["ensemble"]["at_threshold"]["recall"] < 0.95}
    if weak:
        lines.append(
            "- Perturbations of the paper's Table II detected under 95% at the operating "
            "threshold (Kermany test): " + ", ".join(f"{k} {r:.4f}" for k, r in weak.items())
            + ". A global contrast change alters no pixel's noise and is not what this "
            "detector models.")
    if ss:
        lines.append(
            f"- Second source `{Path(ss['source']).name}` (adult NIH chest X-rays, 512x512 "
            "lossless PNG; never used for fitting or thresholds): clean false-positive rate "
            f"{ss['clean_fpr_at_threshold']:.4f} and PGD eps 0.006 detection "
            f"{ss['pgd_0.006_detection_at_threshold']:.4f} at the operating threshold. The "
            "detector learned what a clean *Kermany* image's noise looks like; images from "
            "another acquisition and encode chain can sit on the wrong side of the threshold: "
            "recalibrate (or retrain with `sentinel train`) on your own clean images.")
    dc = m.get("dicom_check")
    if dc:
        lines.append(
            f"- Real DICOM files (`{Path(dc['folder']).name}`, scored by the runtime at the "
            "operating threshold, clean and as `sentinel attack` PGD copies): "
            + "; ".join(f"{r['file']} " + ", ".join(
                f"{k} {r[k]['score']:.3f}{' flagged' if r[k]['flagged'] else ' passes'}"
                for k in dicom_check_kinds(dc["eps"])) for r in dc["files"])
            + ". Two images: a check of the DICOM path, not a rate. The copies are made "
            "through the bundled victim, whose resize averages like the detector's; made "
            "through other networks' resizes at the file's own matrix, most pass (`python -m "
            "train.zoo_dicom`).")
    if (m.get("rule") or {}).get("gate"):
        lines.append(
            "- The stride-grid gate knows one kind of attacker: gradient attacks through a "
            "network that downsamples with stride-2 layers (most CNNs), whose perturbation "
            "repeats every 2-8 pixels. An attacker who smooths the perturbation or holds that "
            "feature down (README, \"Adaptive attacks\") is not caught by it; nor are "
            "noise, salt and pepper or contrast changes, which the CNN and forest handle. "
            "Measured with the bundled victim's attacks only: a diagnostic network that "
            "downsamples differently leaves other or weaker peaks.")
    lines += [
        "- Non-adaptive attacks only in these tables: attackers who know the detector are "
        "measured apart (README, \"Adaptive attacks\") and it does not withstand them.",
        bit_depth_limit(m),
        "- The victim classifier (victim.weights.h5) exists only for red-teaming (`sentinel "
        "attack`); it is not a diagnostic model. It ships with the reference CNNs and "
        "split.json in a training bundle apart from this runtime bundle (train/models/default "
        "for the shipped one, OUT-training beside a bundle `sentinel train --out OUT` wrote), "
        "so the gateway hashes only what scoring reads.",
        "",
        "## Reproduce",
        "```",
        commands.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def readme_table(m: dict[str, Any]) -> str:
    """Markdown table, paper against ours, for README.md and the model card."""
    rows = ["| figure | paper (IRMA) | ours (kermany224 test, 95% CI) |", "| --- | --- | --- |"]
    rows += [f"| {a} | {b} | {c} |" for a, b, c in paper_rows(m)]
    ss = m.get("second_source")
    per = m["per_perturbation"]
    rows.append(f"| detection at operating threshold, PGD 0.003 / 0.006 | n/a | "
                f"{per['pgd_0.003']['ensemble']['at_threshold']['recall']:.4f} / "
                f"{per['pgd_0.006']['ensemble']['at_threshold']['recall']:.4f} |")
    rows.append(f"| clean FPR at operating threshold (test) | n/a | "
                f"{m['clean_fpr_at_threshold']:.4f} |")
    if ss:
        rows.append(f"| NIH (never trained on): clean FPR / PGD 0.006 detection | n/a | "
                    f"{ss['clean_fpr_at_threshold']:.4f} / "
                    f"{ss['pgd_0.006_detection_at_threshold']:.4f} |")
    dc = m.get("dicom_check")
    if dc:
        kinds = dicom_check_kinds(dc["eps"])[1:]
        rows.append(
            "| real CR DICOMs (" + ", ".join(r["file"] for r in dc["files"]) + "): clean "
            f"passed / attacked through the bundled victim (PGD "
            f"{' and '.join(str(e) for e in dc['eps'])}) flagged | n/a | "
            f"{sum(not r['clean']['flagged'] for r in dc['files'])} of {len(dc['files'])} / "
            f"{sum(r[k]['flagged'] for r in dc['files'] for k in kinds)} of "
            f"{len(dc['files']) * len(kinds)} |")
    return "\n".join(rows)


def add_model_card(bundle_dir: Path, text: str, extra_metrics: dict[str, Any]) -> None:
    """Re-write a bundle's manifest with MODEL_CARD.md added (same id, same model files)."""
    from detector import bundle as bundle_mod
    from detector.forest import ForestArrays

    bundle_dir = Path(bundle_dir)
    man = bundle_mod.load_manifest(bundle_dir)
    card = bundle_dir / "MODEL_CARD.md"
    card.write_text(text)
    extras = {n: man.path_of(n) for n in man.files if n not in ("cnn", "forest")}
    extras["model_card"] = card
    bundle_mod.write_bundle(
        bundle_dir, cnn_tflite=man.path_of("cnn"), forest=ForestArrays.load(man.path_of("forest")),
        feature_names=man.feature_names, w_cnn=man.w_cnn, threshold=man.threshold,
        thresholds=man.thresholds, training_data=man.training_data,
        metrics={**man.metrics, **extra_metrics}, extra_files=extras, bundle_id=man.bundle_id,
        versions=man.versions, rule=man.extra.get("rule"),
        feature_set=bundle_mod.manifest_feature_set(man))


def _training_data(manifest: dict) -> dict:
    """The manifest's ``training_data`` record ({} for a bundle written without one)."""
    return manifest.get("training_data") or {}


def pool_sentence(manifest: dict) -> str:
    """The card's note on the CNN's pooling when it is not the shipped one (``sentinel train
    --cnn-pool tile-min``), or nothing."""
    config = _training_data(manifest).get("config") or {}
    return pool_note(config.get("cnn_pool", "global"))


def pool_note(cnn_pool: str) -> str:
    """One sentence (with a leading space) on a pooling other than the shipped "global"."""
    if cnn_pool == "global":
        return ""
    return (" The CNN scores each image by its least suspicious of 3x3 tiles (`--cnn-pool "
            "tile-min`): a perturbation has to show in every tile, a clean image's local "
            "oddity (text, markers, an edge) in one tile does not raise the score.")


def members_sentence(manifest: dict) -> str:
    """The card's note on a CNN averaged over several networks (``sentinel train
    --cnn-members``, ``--cnn-stems``, ``--cnn-random-members``), or nothing."""
    training = _training_data(manifest)
    config = training.get("config") or {}
    # a two-stem bundle before session 20 read its random stem at every pixel
    strided = any(name.endswith("-strided") for name in training.get("models") or {})
    return members_note(int(config.get("cnn_members", 1)), int(config.get("cnn_stems", 1)),
                        strided, config.get("cnn_random_members"))


def members_note(members: int, stems: int = 1, strided: bool = False,
                 random: int | None = None) -> str:
    """One sentence (with a leading space) on a CNN of more than one network; ``random``: the
    networks on the random stem (None: as many as ``members``)."""
    if stems == 2:
        random = members if random is None else random
        flags = f"--cnn-members {members} --cnn-stems 2" + (
            f" --cnn-random-members {random}" if random != members else "") + (
            " --cnn-random-stem strided" if strided else "")
        return (f" The CNN's probability is the mean of {members + random} networks (`{flags}`) "
                f"trained from different seeds: {members} on one shared, trained high-pass "
                f"first layer and {random} on a frozen first layer of random high-pass kernels "
                "drawn from the run's CNN seed (a site bundle's: from its secret, so they are as "
                "secret as it)" + (", read at every second pixel" if strided else "")
                + ": an attack has to fool their average, not one network.")
    if members == 1:
        return ""
    return (f" The CNN's probability is the mean of {members} networks (`--cnn-members "
            f"{members}`) trained from different seeds on one shared high-pass first layer: an "
            "attack has to fool their average, not one network.")


def patient_part_lines(manifest: dict) -> list[str]:
    """The card's note that the detector saw one patient part of the training split only
    (``sentinel train --patient-part``), or nothing."""
    part = _training_data(manifest).get("patient_part")
    if not part:
        return []
    return ["", f"The detector (CNN and forest) trained on part {part['part']} of {part['of']} "
            f"of the training patients only: {part['images']:,} images of {part['patients']:,} "
            "patients, no patient shared with another part. The victim, validation and test "
            "sets are the whole split's."]


def bit_depth_limit(manifest: dict) -> str:
    """The model card's line on bit depth: what the bundle trained on (8-bit Kermany, and
    with ``sentinel train --zoo-12bit`` zoo examples stored at 12 bits)."""
    sets = (_training_data(manifest).get("zoo") or {}).get("example_sets") or {}
    twelve = sets.get("zoo12")
    if twelve:
        return ("- Trained on 8-bit JPEG-derived images and on "
                f"{twelve['train']:,} zoo pairs stored at 12 bits (those images lifted within "
                "their 8-bit rounding cells, then processed and attacked at 12 bits); real "
                "10-16-bit DICOM from a modality was not in the training data.")
    return ("- Trained on 8-bit JPEG-derived images; clinical 10-16-bit DICOM is handled by the "
            "same normalisation but was not in the training data.")
