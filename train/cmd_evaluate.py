"""Evaluate a bundle on the test split it records and, optionally, on a second independent
source; write an HTML report with PNG figures (the paper's Figs. 2-8 regenerated from our runs)
and a metrics.json. Perturbed test copies are cached under --work and reused on reruns.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle directory (default: the shipped default bundle); its "
                        "victim, reference CNNs and split.json are read from its training "
                        "bundle, DIR-training beside it (train/models/default for the shipped "
                        "bundle)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the folder the bundle was trained on (its test split is used); "
                        "required except with --grey-box")
    parser.add_argument("--out", required=True, type=Path, help="report directory to write")
    parser.add_argument("--second-source", type=Path, default=None,
                        help="an independent folder (e.g. nih_cxr14_1000): clean FPR and PGD "
                        "0.006 detection at the operating threshold")
    parser.add_argument("--dicom-check", type=Path, default=None, metavar="DIR",
                        help="a folder of real DICOM files (e.g. dicom_cr_nema): each scored "
                        "as it is and as `sentinel attack` PGD copies at eps 0.003 and 0.006")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache directory (default: <out>/cache)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--adaptive", type=Path, default=None,
                        help="output directory (or results.json) of `python -m train.adaptive` "
                        "against this bundle: adds the report's 'Adaptive attacks' section")
    parser.add_argument("--ablation", type=Path, default=None,
                        help="ablation.json (or its directory) of `python -m train.ablation`: adds "
                        "the 'Ablation' section")
    parser.add_argument("--hardened", type=Path, default=None,
                        help="output directory of `python -m train.adaptive` against a hardened "
                        "bundle (`python -m train.ablation --harden-bundle`): adds its section")
    parser.add_argument("--bundles-second-source", type=Path, default=None,
                        help="second_source.json (or its directory) of `python -m train.adaptive "
                        "--second-source` (bundles on an independent source): adds the comparison")
    parser.add_argument("--zoo", type=Path, default=None, metavar="DIR",
                        help="output directory of `python -m train.zoo_lofo` for this bundle: "
                        "adds the 'Victim zoo' section (leave-one-family-out detection, clean "
                        "FPR per source and per processing kind) to the report and model card")
    parser.add_argument("--grey-box", nargs="+", type=Path, default=None, metavar="ATTACK_DIR",
                        help="instead of the report: score the attacks `python -m "
                        "train.adaptive --out ATTACK_DIR` crafted on --bundle (the public one) "
                        "with --site-bundles at their own thresholds (train.greybox; results "
                        "in OUT/greybox.md and greybox.json)")
    parser.add_argument("--site-bundles", nargs="+", type=Path, default=(), metavar="DIR",
                        help="with --grey-box: the bundles the attacker does not hold (e.g. "
                        "`sentinel train --secret-file` ones)")
    parser.add_argument("--gate-attacks", nargs="+", type=Path, default=(), metavar="DIR",
                        help="with --grey-box: `python -m train.adaptive --split val` outputs "
                        "(the public bundle's attacks on validation images); adds each site "
                        "bundle's CNN gate raised to their low end as a fourth operating point "
                        "(`sentinel calibrate --cnn-gate-attacks`)")
    parser.add_argument("--model-card", action="store_true",
                        help="also write MODEL_CARD.md from these measurements into the bundle "
                        "(re-writing its manifest, same bundle id)")


REPRODUCE = """\
# train (26 min 4 s on 2 CPU cores, measured; resumable: rerun the same command after a stop)
sentinel train --data ../shared/data/kermany224 --out detector/models/default \\
    --work runs/train-full --seed 0 --no-zoo
# evaluate: HTML report, PNG figures, metrics.json (reuses the training work dir's caches)
sentinel evaluate --bundle detector/models/default --data ../shared/data/kermany224 \\
    --second-source ../shared/data/nih_cxr14_1000 --dicom-check ../shared/data/dicom_cr_nema \\
    --out runs/report --work runs/train-full --model-card
# red-team a real DICOM and score it
sentinel attack ../shared/data/dicom_cr_nema/RG1_UNCR.dcm /tmp/rg1_pgd.dcm --method pgd --eps 0.006
sentinel score /tmp/rg1_pgd.dcm
"""


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from detector.bundle import DEFAULT_BUNDLE
    from detector.errors import BundleError
    from train.bundle_eval import EvalConfig, run_evaluation
    from train.report import write_report

    bundle = args.bundle or DEFAULT_BUNDLE
    if args.grey_box:
        return _grey_box(args, Path(bundle))
    if args.data is None or not Path(args.data).is_dir():
        print(f"sentinel evaluate: --data {args.data} is not a folder", file=sys.stderr)
        return 2
    cfg = EvalConfig(bundle=str(bundle), data=str(args.data), out=str(args.out),
                     work=str(args.work or Path(args.out) / "cache"),
                     second_source=str(args.second_source) if args.second_source else None,
                     dicom_check=str(args.dicom_check) if args.dicom_check else None,
                     n_boot=args.bootstrap)
    try:
        result = run_evaluation(cfg)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"sentinel evaluate: {exc}", file=sys.stderr)
        return 2
    index = write_report(result, Path(args.out))
    if args.adaptive or args.ablation or args.hardened or args.bundles_second_source:
        add_adaptive_sections(Path(index), Path(args.out), result["metrics"], args.adaptive,
                              args.ablation, args.hardened, args.bundles_second_source)
    zoo_md = ""
    if args.zoo:
        zoo_md = add_zoo_section(Path(index), Path(args.out), args.zoo)
    from train.report import add_model_card, model_card, readme_table

    table = readme_table(result["metrics"])
    (Path(args.out) / "readme_table.md").write_text(table + "\n")
    if args.model_card:
        m = result["metrics"]
        extra = {"second_source": {k: v for k, v in m.get("second_source", {}).items()
                                   if k in ("source", "images", "clean_fpr_at_threshold",
                                            "pgd_0.006_detection_at_threshold", "auc_ci")},
                 "latency_ms": m.get("latency_ms", {}),
                 **({"dicom_check": m["dicom_check"]} if "dicom_check" in m else {})}
        from detector.bundle import load_manifest

        # the card's limits name what the bundle trained on (its manifest's training data)
        card = model_card({**m, "training_data": load_manifest(Path(bundle)).training_data},
                          table, REPRODUCE)
        if zoo_md:
            card += "\n" + zoo_md.replace("# Victim zoo", "## Victim zoo", 1)
        add_model_card(Path(bundle), card, extra)
        print(f"model card: {Path(bundle) / 'MODEL_CARD.md'}")
    m = result["metrics"]
    per = m["per_perturbation"]
    print(f"report: {index}")
    for k in ("pgd_0.003", "pgd_0.006"):
        e = per[k]["ensemble"]
        print(f"{k}: ensemble AUC {e['auc_ci'][0]:.4f} [{e['auc_ci'][1]:.4f}, "
              f"{e['auc_ci'][2]:.4f}], detection {e['at_threshold']['recall']:.4f}")
    print(f"test clean FPR at threshold {m['threshold']:.5f}: {m['clean_fpr_at_threshold']:.4f}")
    if "second_source" in m:
        s = m["second_source"]
        print(f"second source: clean FPR {s['clean_fpr_at_threshold']:.4f}, PGD 0.006 "
              f"detection {s['pgd_0.006_detection_at_threshold']:.4f}")
    if "dicom_check" in m:
        from train.bundle_eval import dicom_check_kinds

        for row in m["dicom_check"]["files"]:
            print(f"{row['file']}: " + ", ".join(
                f"{k} {row[k]['score']:.3f}{' flagged' if row[k]['flagged'] else ''}"
                for k in dicom_check_kinds(m["dicom_check"]["eps"])))
    return 0


def _grey_box(args: argparse.Namespace, bundle: Path) -> int:
    """``sentinel evaluate --grey-box``: train.greybox on saved attacks, public bundle first."""
    from detector.errors import BundleError
    from train.greybox import GreyBoxConfig, markdown_table, run_greybox
    from train.pipeline import log

    try:
        res = run_greybox(GreyBoxConfig(
            attacks=tuple(map(str, args.grey_box)),
            bundles=tuple(map(str, (bundle, *args.site_bundles))), out=str(args.out),
            second_source=str(args.second_source) if args.second_source else None,
            work=str(args.work) if args.work else None,
            gate_attacks=tuple(map(str, args.gate_attacks))), log=log)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"sentinel evaluate: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    return 0


def add_adaptive_sections(index: Path, out: Path, metrics: dict, adaptive: Path | None,
                          ablation: Path | None, hardened: Path | None = None,
                          bundles_second_source: Path | None = None) -> None:
    """Splice the adaptive-attack and ablation sections (train.adaptive_report) into the
    evaluation report: the HTML before ``</body>``, the figures under ``out/adaptive``, and the
    numbers into metrics.json under "adaptive"."""
    import json

    from train.adaptive import load_results
    from train.adaptive_report import write_sections

    def results(path: Path | None) -> dict | None:
        if path is None:
            return None
        return load_results(path) if path.is_dir() else json.loads(path.read_text())

    def json_of(path: Path | None, name: str) -> dict | None:
        if path is None:
            return None
        return json.loads((path / name if path.is_dir() else path).read_text())

    res = write_sections(out / "adaptive", results(adaptive), json_of(ablation, "ablation.json"),
                         metrics, hardened=results(hardened),
                         second_source=json_of(bundles_second_source, "second_source.json"))
    fragment = res["html"].replace("src='", "src='adaptive/")
    page = index.read_text()
    index.write_text(page.replace("</body>", fragment + "</body>", 1))
    metrics_path = out / "metrics.json"
    doc = json.loads(metrics_path.read_text())
    doc["adaptive"] = res["json"]
    metrics_path.write_text(json.dumps(doc, indent=1, default=str))


def add_zoo_section(index: Path, out: Path, zoo_dir: Path) -> str:
    """Splice the victim-zoo section (train.zoo_lofo) into the report and metrics.json;
    returns its markdown for the model card."""
    import json

    from train.zoo_lofo import report_section

    html_text, md, results = report_section(zoo_dir, out)
    page = index.read_text()
    index.write_text(page.replace("</body>", html_text + "</body>", 1))
    metrics_path = out / "metrics.json"
    doc = json.loads(metrics_path.read_text())
    doc["zoo"] = results
    metrics_path.write_text(json.dumps(doc, indent=1, default=str))
    return md
