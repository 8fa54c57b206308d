"""Grey-box evaluation (issue 19): attacks crafted on the PUBLIC bundle, scored by site bundles.

The shipped bundle is public, so ``train.adaptive`` crafts its detector-aware attacks with
every weight of it; a site bundle trained with its own secret (``sentinel train
--secret-file``, train.secret) was never seen by that attacker. This module takes the
attacked images ``train.adaptive --out DIR`` already saved (``DIR/adv/<attack>_<eps>.npy``,
the test subset in ``DIR/subset.json``, which images fooled the victim in
``DIR/result/*.json``) and scores them with each bundle at the bundle's own threshold: the
attack is crafted once, never per site bundle, and the attacker never queries a site bundle.

Per bundle it reports, with 95% Wilson intervals: detection among the attacked images that
fool the victim, and the clean false-positive rate on the whole test split of the training
source (the work dir's ``clean/test.npy``) and on an independent source (NIH), both at that
threshold; and the same at the bundle's *home* threshold, the 1% point of the training
source's own clean validation images (what ``sentinel calibrate --allow-lower`` proposes to
a site whose images are that source), which trades the margin kept for unseen sources for
detection; and at the bundle's own threshold with the site's CNN gate (``sentinel calibrate
--cnn-gate`` on the same validation images: the detector CNN alone flags too, within 1% in
all), which keeps the forest's source-specific statistics out of the lowered point; and, given
``--gate-attacks`` (the public bundle's attacks crafted on validation images, ``train.adaptive
--split val``), with that gate raised to the attacks' low end (``sentinel calibrate
--cnn-gate-attacks``: it still catches all but 5% of them with 95% confidence). Scores are
cached per bundle id under ``--out``; results go to ``greybox.json``,
a markdown table ``greybox.md`` and ``greybox.png`` (detection of the strongest attack against
clean false positives, per bundle and operating point).

    python -m train.greybox --attacks runs/secret-greybox/public-s40 \\
        --bundles detector/models/default runs/secret-site-a ... \\
        --second-source ../shared/data/nih_cxr14_1000 --out runs/secret-greybox/report
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.adaptive import wilson

# the targets of issue 19 (eps 0.006, images that fool the victim)
TARGET_EPS = 0.006
TARGET_DETECTION = 0.80
TARGET_FPR_OWN = 0.01
TARGET_FPR_SECOND = 0.02


@dataclass(frozen=True)
class GreyBoxConfig:
    """Which saved attacks, which bundles, where clean images come from, where results go."""

    attacks: tuple[str, ...]  # train.adaptive --out directories (crafted on the public bundle)
    bundles: tuple[str, ...]
    out: str
    second_source: str | None = None
    work: str | None = None  # training work dir with clean/test.npy (default: subset.json's)
    labels: dict[str, str] = field(default_factory=dict)  # bundle path -> short name
    # train.adaptive --split val --out directories: each bundle's CNN gate is also raised to
    # their low end (detector.cmd_calibrate.raise_cnn_gate), a fourth operating point
    gate_attacks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for a in self.attacks:
            if not (Path(a) / "subset.json").is_file():
                raise ValueError(f"--attacks {a}: no subset.json there; give the --out "
                                 "directory of `python -m train.adaptive`")
        if not self.bundles:
            raise ValueError("--bundles: name at least one bundle directory to score with")
        for d in self.gate_attacks:
            sub = Path(d) / "subset.json"
            split = json.loads(sub.read_text()).get("split") if sub.is_file() else None
            if split != "val":
                raise ValueError(f"--gate-attacks {d}: not a `python -m train.adaptive --split "
                                 "val` output (the gate is placed on validation images, never "
                                 "on the test images it is measured on)")
        labels = [self.labels.get(b, Path(b).name) for b in self.bundles]
        if len(set(labels)) < len(labels):
            raise ValueError(f"bundles {sorted(self.bundles)}: two share a directory name "
                             f"({labels}), which names their columns; link one under "
                             "another name")


@dataclass(frozen=True)
class SavedAttack:
    """One saved attack of train.adaptive: its images and which of them fool the victim."""

    key: str  # "<attack>@<eps>/<steps> steps"
    name: str
    eps: float
    steps: int
    adv_path: Path
    fooled: np.ndarray  # bool per image of the subset
    crafted_on: str  # bundle id the attacker held


def saved_attacks(attack_dir: Path) -> list[SavedAttack]:
    """Every finished (attack, eps) of a train.adaptive output directory."""
    head = json.loads((attack_dir / "suite.json").read_text())
    out = []
    for p in sorted((attack_dir / "result").glob("*.json")):
        r = json.loads(p.read_text())
        adv = attack_dir / "adv" / f"{r['attack']}_{r['eps']}.npy"
        if not adv.is_file() or "home" not in r:
            continue
        out.append(SavedAttack(key=f"{r['attack']}@{r['eps']}/{r['steps']}", name=r["attack"],
                               eps=float(r["eps"]), steps=int(r["steps"]), adv_path=adv,
                               fooled=np.asarray(r["home"]["fooled"], bool),
                               crafted_on=str(head["bundle_id"])))
    return out


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci": wilson(k, n)}


class _Scores:
    """(p_cnn, p_rf, fused score) of image sets per bundle, cached as .npy under
    ``root/<bundle id>/<kind>.parts.npy``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, det: Any, kind: str, x: Any) -> np.ndarray:
        from train.adaptive import detector_scores

        p = self.root / det.bundle_id / f"{kind}.parts.npy"
        if p.is_file():
            return np.load(p)
        s = detector_scores(det, np.asarray(x))
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, s)
        return s


def _flagged(parts: np.ndarray, threshold: float, cnn_gate: float | None) -> np.ndarray:
    """The gateway's verdict on (n, 3) parts (p_cnn, p_rf, fused score): the site rule the zoo
    evaluation applies (train.zoo_eval.SiteRule, one frame: the CNN's peak is its probability;
    224x224 inputs have no line gate)."""
    from train.zoo_eval import SiteRule

    return SiteRule(threshold, cnn_gate=cnn_gate).flags({"score": parts[:, 2],
                                                        "p_cnn": parts[:, 0]})


def second_source_clean(data_dir: Path, cache: Path) -> np.ndarray:
    """Clean 224x224 detector inputs of every image of an independent folder, cached (the
    runtime's read and resize, as train.adaptive.second_source_check loads them)."""
    from train import datasets, pipeline

    recs, dropped = datasets.drop_duplicates(datasets.scan_folder(data_dir))
    split = datasets.Split(root=str(data_dir.resolve()), seed=0, fractions=(1.0, 0.0, 0.0),
                           train=(), val=(), test=tuple(recs), dropped_duplicates=tuple(dropped))
    return pipeline.stage_arrays(split, "test", pipeline.Work(cache)).x


def run_greybox(cfg: GreyBoxConfig, log: Any = print) -> dict[str, Any]:
    """Score every saved attack and the clean sets with every bundle; write JSON + markdown."""
    from detector.calibration import calibrate_threshold
    from detector.cmd_calibrate import propose_cnn_gate, raise_cnn_gate
    from detector.scoring import Detector
    from train import pipeline

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = _Scores(out / "scores")
    attacks: list[SavedAttack] = []
    works = set()
    for a in cfg.attacks:
        attacks += saved_attacks(Path(a))
        works.add(json.loads((Path(a) / "subset.json").read_text())["work"])
    work_dir = cfg.work or (works.pop() if len(works) == 1 else None)
    if work_dir is None:
        raise ValueError(f"attack directories come from several work dirs {sorted(works)}: "
                         "pass --work")
    work = pipeline.Work(Path(work_dir))
    x_test = work.load_npy("clean/test.npy")
    x_val = work.load_npy("clean/val.npy")
    # caches are named by what they hold, so one --out can serve other work dirs and sources
    second_name = Path(cfg.second_source).name if cfg.second_source else ""
    x_second = (second_source_clean(Path(cfg.second_source), out / "second-source" / second_name)
                if cfg.second_source else None)
    own = Path(work_dir).name
    res: dict[str, Any] = {
        "work": str(work_dir), "second_source": cfg.second_source,
        "crafted_on": sorted({a.crafted_on for a in attacks}),
        "attacks": {a.key: {"name": a.name, "eps": a.eps, "steps": a.steps,
                            "dir": str(a.adv_path.parent.parent), "n": len(a.fooled),
                            "n_fooled": int(a.fooled.sum())} for a in attacks},
        "bundles": {},
    }
    for b in cfg.bundles:
        det = Detector.load(b, num_threads=1)
        label = cfg.labels.get(b, Path(b).name)
        secret = det.manifest.training_data.get("config", {}).get("secret")
        val = scores.get(det, f"{own}-val-clean", x_val)
        home = calibrate_threshold(val[:, 2])
        # the site's CNN gate as `sentinel calibrate --cnn-gate` proposes it on these clean
        # images (224x224 inputs: no line gate), beside the bundle's own threshold
        gate = propose_cnn_gate(val[:, 2], np.zeros(len(val)), val[:, 0],
                                float(det.threshold), None, TARGET_FPR_OWN)
        c_own = scores.get(det, f"{own}-test-clean", x_test)
        c2 = (scores.get(det, f"{second_name}-clean", x_second) if x_second is not None
              else None)
        adv = {a.key: scores.get(det, f"adv-{Path(a.adv_path.parent.parent).name}-"
                                      f"{a.adv_path.stem}", np.load(a.adv_path, mmap_mode="r"))
               for a in attacks}
        gate_adv = [scores.get(det, f"gate-{Path(d).name}-{f.stem}", np.load(f, mmap_mode="r"))
                    for d in cfg.gate_attacks
                    for f in sorted((Path(d) / "adv").glob("adaptive*.npy"))]
        row: dict[str, Any] = {"bundle": str(b), "bundle_id": det.bundle_id,
                               "secret": bool(secret),
                               "public": det.bundle_id in res["crafted_on"]}
        points = (("own", float(det.threshold), None), ("home", float(home), None),
                  ("cnn_gate", float(det.threshold), gate["gate"]))
        if cfg.gate_attacks:
            if not gate_adv:
                raise ValueError(f"--gate-attacks {list(cfg.gate_attacks)}: no adv/adaptive*.npy "
                                 "there; craft them with train.adaptive --split val")
            g = np.concatenate(gate_adv)
            raised = raise_cnn_gate(gate["gate"], g[:, 2], np.zeros(len(g)), g[:, 0],
                                    float(det.threshold), None)
            row["gate_attacks"] = {k: raised[k] for k in ("attack_images", "raised", "why_not",
                                                          "attack_caught") if k in raised}
            points += (("cnn_gate_attacks", float(det.threshold), raised["gate"]),)
        for point, thr, cnn_gate in points:
            r: dict[str, Any] = {"threshold": thr, "cnn_gate": cnn_gate,
                                 "clean_fpr_own": _rate(int(_flagged(c_own, thr, cnn_gate).sum()),
                                                        len(c_own)),
                                 "attacks": {}}
            if point.startswith("cnn_gate") and cnn_gate is None:
                r["why_not"] = gate["why_not"]
            if c2 is not None:
                r["clean_fpr_second"] = _rate(int(_flagged(c2, thr, cnn_gate).sum()), len(c2))
            for a in attacks:
                flagged = _flagged(adv[a.key], thr, cnn_gate)
                r["attacks"][a.key] = {
                    "detected_fooled": _rate(int((flagged & a.fooled).sum()),
                                             int(a.fooled.sum())),
                    "detected_all": _rate(int(flagged.sum()), len(flagged))}
            row[point] = r
        res["bundles"][label] = row
        row = row["own"]
        log(f"{label} ({det.bundle_id}, threshold {row['threshold']:.4f}, home {home:.4f}): "
            "own clean FPR "
            f"{row['clean_fpr_own']['rate']:.4f}"
            + (f", second source {row['clean_fpr_second']['rate']:.4f}"
               if "clean_fpr_second" in row else "")
            + "; " + ", ".join(f"{k} {v['detected_fooled']['rate']:.3f}"
                               for k, v in row["attacks"].items()))
    (out / "greybox.json").write_text(json.dumps(res, indent=1))
    (out / "greybox.md").write_text(markdown_table(res))
    plot_tradeoff(res, out / "greybox.png")
    return res


POINT_TITLES = {"own": "own threshold", "home": "home threshold",
                "cnn_gate": "own threshold + CNN gate",
                "cnn_gate_attacks": "CNN gate raised to val attacks"}


def points_of(res: dict[str, Any]) -> list[str]:
    """The operating points every bundle of ``res`` was scored at, in POINT_TITLES' order."""
    return [p for p in POINT_TITLES if all(p in b for b in res["bundles"].values())]


def strongest_attack(res: dict[str, Any]) -> str | None:
    """The attack that the bundles the attacker did not hold detect least (mean detection
    among fooled images over them and the operating points), among those at the targets'
    eps where any fooled the victim (a smaller budget, detected less, is not what the target
    region judges: it is in the tables); None without one."""
    held = [b for b in res["bundles"].values() if not b["public"]] or list(
        res["bundles"].values())
    fooled = {key: a for key, a in res["attacks"].items() if a["n_fooled"]}
    at_target = {key: a for key, a in fooled.items() if np.isclose(a["eps"], TARGET_EPS)}
    means = {key: np.mean([b[p]["attacks"][key]["detected_fooled"]["rate"]
                           for b in held for p in points_of(res)])
             for key in (at_target or fooled)}
    return min(means, key=lambda k: means[k]) if means else None


def plot_tradeoff(res: dict[str, Any], path: Path) -> Path | None:
    """greybox.png: per operating point, each bundle's detection of the strongest attack
    against its clean false-positive rate (the independent source's where there is one), with
    Wilson intervals and the issue's target region: the trade-off at a glance."""
    key = strongest_attack(res)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    second = bool(res.get("second_source"))
    fpr_key, fpr_max = (("clean_fpr_second", TARGET_FPR_SECOND) if second
                        else ("clean_fpr_own", TARGET_FPR_OWN))
    a = res["attacks"][key]
    points = points_of(res)
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4.4), sharey=True)
    for ax, point in zip(axes, points, strict=True):
        title = POINT_TITLES[point]
        xs = []
        for name, b in res["bundles"].items():
            r = b[point]
            fpr, det = r[fpr_key], r["attacks"][key]["detected_fooled"]
            x, y = 100 * fpr["rate"], 100 * det["rate"]
            xs.append(100 * fpr["ci"][1])
            style = ("x", "tab:red") if b["public"] else (
                ("o", "tab:blue") if b["secret"] else ("s", "tab:grey"))
            ax.errorbar(x, y, xerr=[[x - 100 * fpr["ci"][0]], [100 * fpr["ci"][1] - x]],
                        yerr=[[y - 100 * det["ci"][0]], [100 * det["ci"][1] - y]],
                        fmt=style[0], color=style[1], capsize=2, lw=0.8)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        right = max(1.15 * max(xs), 2 * 100 * fpr_max)
        if np.isclose(a["eps"], TARGET_EPS):
            ax.axvspan(0, 100 * fpr_max, ymin=TARGET_DETECTION / 1.05, ymax=1.0,
                       color="tab:green", alpha=0.12, label="target")
        ax.set_xlim(0, right)
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.set_xlabel("clean false positives, "
                      + (Path(res["second_source"]).name if second else "own source test")
                      + " (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"detected among fooled (%), n={a['n_fooled']}")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{a['name']} (eps {a['eps']:g}, {a['steps']} steps), crafted on "
                 + ", ".join(res["crafted_on"])
                 + ": red x public (white-box), blue o secret, grey square other", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(r: dict[str, Any], ci: bool = True) -> str:
    if not r["n"]:
        return "n/a"
    lo, hi = r["ci"]
    txt = f"{100 * r['rate']:.1f}%"
    return txt + (f" [{100 * lo:.1f}-{100 * hi:.1f}]" if ci else "")


def markdown_table(res: dict[str, Any]) -> str:
    """The operating points' tables: each bundle's own threshold, its home threshold, its
    own threshold with the site's CNN gate, and with that gate raised to validation attacks."""
    titles = (
            ("own", "At each bundle's own threshold (calibrated for 1% on every clean "
                    "validation source, the resampled copies included):"),
            ("home", "At each bundle's home threshold (1% of the training source's clean "
                     "validation images; `sentinel calibrate --allow-lower`):"),
            ("cnn_gate", "At each bundle's own threshold with a CNN gate (flagged also when "
                         "the detector CNN alone reaches the gate, set on the training source's "
                         "clean validation images for 1% in all; `sentinel calibrate "
                         "--cnn-gate`):"),
            ("cnn_gate_attacks", "As the previous, with the CNN gate raised to the low end of "
                                 "the public bundle's attacks on validation images (all but 5% "
                                 "of them still caught, with 95% confidence; `sentinel calibrate "
                                 "--cnn-gate --cnn-gate-attacks`), never below it:"))
    return "\n".join(f"{title}\n\n{_table(res, point)}" for point, title in titles
                     if point in points_of(res))


def _table(res: dict[str, Any], point: str) -> str:
    """Rows: each attack (detection among fooled images), then the clean FPRs; one column per
    bundle at the operating point ``point`` ("own", "home" or "cnn_gate")."""
    names = list(res["bundles"])
    rows = {n: res["bundles"][n][point] for n in names}
    head = ["attack (crafted on " + ", ".join(res["crafted_on"]) + ")", "fools the victim",
            *[f"{n}{' (public, white-box)' if res['bundles'][n]['public'] else ''}"
              for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, a in res["attacks"].items():
        cells = [f"{a['name']} (eps {a['eps']:g}, {a['steps']} steps)",
                 f"{a['n_fooled']}/{a['n']}"]
        cells += [_pct(rows[n]["attacks"][key]["detected_fooled"]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| clean FPR, own source test split | | "
                 + " | ".join(_pct(rows[n]["clean_fpr_own"]) for n in names) + " |")
    if res.get("second_source"):
        lines.append(f"| clean FPR, {Path(res['second_source']).name} | | "
                     + " | ".join(_pct(rows[n]["clean_fpr_second"])
                                  for n in names) + " |")
    lines.append("| threshold | | " + " | ".join(
        f"{rows[n]['threshold']:.4f}" for n in names) + " |")
    if point.startswith("cnn_gate"):
        lines.append("| CNN gate | | " + " | ".join(
            "none" if rows[n]["cnn_gate"] is None else f"{rows[n]['cnn_gate']:.4f}"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: Any) -> None:
    p.add_argument("--attacks", nargs="+", required=True, type=Path,
                   help="--out directories of `python -m train.adaptive` run against the "
                   "public bundle (their saved adv/*.npy are scored, never re-crafted)")
    p.add_argument("--bundles", nargs="+", required=True, type=Path,
                   help="bundles to score with, each at its own threshold (name the public "
                   "one too for the white-box reference column)")
    p.add_argument("--second-source", type=Path, default=None,
                   help="independent clean folder (e.g. nih_cxr14_1000): clean FPR")
    p.add_argument("--work", type=Path, default=None,
                   help="training work dir with clean/test.npy (default: the attacks' own)")
    p.add_argument("--gate-attacks", nargs="+", type=Path, default=(), metavar="DIR",
                   help="`python -m train.adaptive --split val` output directories: also "
                   "score each bundle with its CNN gate raised to these attacks' low end")


def main(argv: list[str] | None = None) -> int:
    """``python -m train.greybox --attacks DIR... --bundles B... --out O``."""
    import argparse
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    from train.pipeline import log

    res = run_greybox(GreyBoxConfig(
        attacks=tuple(map(str, a.attacks)), bundles=tuple(map(str, a.bundles)), out=str(a.out),
        second_source=str(a.second_source) if a.second_source else None,
        work=str(a.work) if a.work else None,
        gate_attacks=tuple(map(str, a.gate_attacks))), log=log)
    print(markdown_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
