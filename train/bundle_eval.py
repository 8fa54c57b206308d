"""``sentinel evaluate``: measure a bundle on the test split of its own data and on a second,
independent source, and collect everything the report shows into one metrics dict.

The test split is the one recorded in the bundle (split.json, checked by content hash); the
perturbed test copies are crafted with the victim the bundle carries, exactly as in training
(train.pipeline stages, cached under the work directory). The second source (e.g. NIH) is never
used for fitting or thresholds: it is scored at the bundle's operating threshold only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.scoring import parse_rule
from train import datasets, pipeline
from train.attacks import BY_NAME


@dataclass(frozen=True)
class EvalConfig:
    bundle: str
    data: str
    out: str
    work: str
    second_source: str | None = None
    dicom_check: str | None = None  # folder of real DICOM files: clean and attacked copies
    seed: int = 0
    n_boot: int = 1000
    latency_samples: int = 300


def _check_split_files(split: datasets.Split, root: Path) -> datasets.Split:
    """Re-root the recorded split onto --data and verify the test files are the same bytes."""
    for r in split.test:
        p = root / r.rel
        if not p.is_file() or datasets.file_sha256(p) != r.sha256:
            raise ValueError(
                f"{p}: missing or not the file the bundle was tested on (sha256 differs); pass "
                "the --data folder the bundle was trained on"
            )
    return datasets.Split(root=str(root.resolve()), seed=split.seed, fractions=split.fractions,
                          train=split.train, val=split.val, test=split.test,
                          dropped_duplicates=split.dropped_duplicates)


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    from detector import bundle as bundle_mod
    from detector.forest import ForestArrays
    from train import evaluate, training_bundle, victim

    t0 = time.time()
    tfiles = training_bundle.load_training(
        Path(cfg.bundle), ("victim", "split", "paper_cnn", "baseline_cnn"))
    manifest = tfiles.runtime
    work = pipeline.Work(Path(cfg.work))
    split = _check_split_files(datasets.Split.from_json(tfiles.path_of("split")),
                               Path(cfg.data))
    victim_sha = tfiles.sha256["victim"]
    key = {"split": split.digest, "victim": victim_sha}
    if work.has("cache_key.json") and work.load_json("cache_key.json") != key:
        raise ValueError(
            f"work dir {work.root} caches another split or victim "
            f"({work.load_json('cache_key.json')} vs {key}): pass an empty --work directory"
        )
    work.save_json("cache_key.json", key)
    te = pipeline.stage_arrays(split, "test", work)
    model = victim.load_victim(tfiles.path_of("victim"))
    attack_fn = pipeline.attacks.make_gradient_attack(model)
    seed = int(manifest.training_data.get("config", {}).get("seed", cfg.seed))
    tcfg = pipeline.TrainConfig(data=cfg.data, out="", work=cfg.work, seed=seed)
    pipeline.log("perturbing the test split")
    te_pert = pipeline.stage_perturb_eval(tcfg, work, te, model, attack_fn)
    rule = parse_rule(manifest.extra.get("rule"), manifest.bundle_dir)
    gate = None if rule.gate_threshold is None else (rule.gate_threshold, rule.gate_slope)
    models = pipeline.ScoringModels(
        cnn_tflite=manifest.path_of("cnn"), paper_keras=tfiles.path_of("paper_cnn"),
        baseline_keras=tfiles.path_of("baseline_cnn"), forest_path=manifest.path_of("forest"),
        forest=ForestArrays.load(manifest.path_of("forest")),
        feature_set=bundle_mod.manifest_feature_set(manifest),
        grid=gate is not None)
    pipeline.log("scoring the test split")
    book = pipeline.score_book(work, models, te, te_pert, fusion=rule.fusion, gate=gate,
                               either=rule.either)
    part_thresholds = manifest.training_data["part_thresholds"]
    metrics = evaluate.compute_metrics(book, w_cnn=manifest.w_cnn, threshold=manifest.threshold,
                                       part_thresholds=part_thresholds, seed=seed,
                                       n_boot=cfg.n_boot)
    metrics["victim"] = pipeline.victim_accuracy(model, te, te_pert)
    metrics["split"] = split.summary()
    metrics["bundle_id"] = manifest.bundle_id
    metrics["rule"] = manifest.extra.get("rule")
    metrics["training"] = {k: manifest.training_data.get(k) for k in
                           ("grid", "models", "timings_s", "config", "victim")}
    if cfg.second_source:
        pipeline.log("second source")
        metrics["second_source"] = second_source(cfg, manifest, model, attack_fn, models,
                                                 book)
    if cfg.dicom_check:
        pipeline.log("real DICOM files and their attacked copies")
        metrics["dicom_check"] = dicom_check(Path(cfg.bundle), Path(cfg.dicom_check), model,
                                             Path(cfg.work) / "dicom_check")
    pipeline.log("latency")
    metrics["latency_ms"] = measure_latency(Path(cfg.bundle), te.x, cfg.latency_samples)
    metrics["evaluate_seconds"] = round(time.time() - t0, 1)
    curves = roc_data(book, manifest.w_cnn, seed)
    return {"metrics": metrics, "book": book, "curves": curves}


def second_source(cfg: EvalConfig, manifest: Any, model: Any, attack_fn: Any,
                  models: pipeline.ScoringModels, book: Any) -> dict[str, Any]:
    """Clean FPR and PGD eps 0.006 detection at the operating threshold on a source never used
    for fitting; PGD is crafted against the victim at 224 and mapped onto the native grid.
    ``book`` (the test split's ScoreBook) gives the decision rule: fusion and gate."""
    from train import evaluate, fit_detector

    root = Path(cfg.second_source)  # type: ignore[arg-type]
    recs, dropped = datasets.drop_duplicates(datasets.scan_folder(root))
    split = datasets.Split(root=str(root.resolve()), seed=0, fractions=(1.0, 0.0, 0.0),
                           train=(), val=(), test=tuple(recs), dropped_duplicates=tuple(dropped))
    work = pipeline.Work(Path(cfg.work) / "second_source")
    arr = pipeline.stage_arrays(split, "test", work)
    tcfg = pipeline.TrainConfig(data=str(root), out="", work=str(work.root), seed=cfg.seed)
    pgd = BY_NAME["pgd_0.006"]
    pert = pipeline.perturb_and_store(pgd, arr, np.arange(len(arr.x)), model, attack_fn, work,
                                      "pert/test", tcfg.seed * 1000 + 1, f"{root.name} pgd_0.006")
    clean = pipeline.stage_scores(work, "test", "clean", arr.x,
                                  pipeline.features_of(work, "test", "clean", arr.x,
                                                       models.feature_set),
                                  models, ("cnn", "forest"))
    kind = pipeline.mapped_name(arr, pgd.name)  # features and scores are cached by name
    attacked = pipeline.stage_scores(work, "test", kind, pert,
                                     pipeline.features_of(work, "test", kind, pert,
                                                          models.feature_set),
                                     models, ("cnn", "forest"))
    if models.grid:
        clean["grid"] = pipeline.grid_values(work, "test", "clean", arr.x)
        attacked["grid"] = pipeline.grid_values(work, "test", kind, pert)
    w, t = manifest.w_cnn, manifest.threshold
    ens_c, ens_a = book.combine(clean, w), book.combine(attacked, w)
    y = np.r_[np.zeros(len(ens_c)), np.ones(len(ens_a))]
    out: dict[str, Any] = {
        "source": str(root), "images": len(arr.x), "dropped_duplicates": len(dropped),
        "clean_fpr_at_threshold": float(np.mean(ens_c >= t)),
        "pgd_0.006_detection_at_threshold": float(np.mean(ens_a >= t)),
        "auc_ci": list(fit_detector.bootstrap_ci(y, np.r_[ens_c, ens_a], fit_detector.roc_auc,
                                                 n_resamples=cfg.n_boot, seed=cfg.seed)),
        "parts_at_threshold": {
            part: {"clean_fpr": float(np.mean(clean[part] >= manifest.training_data[
                "part_thresholds"][part])),
                   "detection": float(np.mean(attacked[part] >= manifest.training_data[
                       "part_thresholds"][part]))}
            for part in ("cnn", "forest")},
        "ensemble_scores": {"clean": ens_c.tolist(), "pgd_0.006": ens_a.tolist()},
    }
    if np.all(arr.y >= 0):
        from train import victim

        lc = victim.predict_logits(model, arr.x)
        la = victim.predict_logits(model, pert)
        out["victim"] = {"clean_accuracy": float(np.mean((lc > 0) == (arr.y == 1))),
                         "clean_auc": fit_detector.roc_auc(arr.y, lc),
                         "pgd_0.006_accuracy": float(np.mean((la > 0) == (arr.y == 1)))}
    fpr, tpr = evaluate.roc_curve(y, np.r_[ens_c, ens_a])
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


DICOM_CHECK_EPS = (0.003, 0.006)


def dicom_check(bundle_dir: Path, folder: Path, victim_model: Any, work: Path,
                eps: tuple[float, ...] = DICOM_CHECK_EPS) -> dict[str, Any]:
    """Each DICOM file of ``folder`` (uncompressed and lossless syntaxes, any bit depth) scored
    by the runtime as it is, and its `sentinel attack` PGD copy at each eps (crafted against
    the bundle's victim at 224, mapped onto the native matrix, same bit depth and syntax):
    the issue's "clean copies pass, attacked copies are flagged" on real files."""
    from detector.scoring import Detector
    from train.dicom_attack import attack_dicom

    det = Detector.load(bundle_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    if not files:
        raise ValueError(f"--dicom-check {folder}: no .dcm files there")
    rows = []
    for f in files:
        clean = det.score_path(f)
        row: dict[str, Any] = {"file": f.name, "threshold": det.threshold,
                               "clean": _verdict(clean)}
        for e, kind in zip(eps, dicom_check_kinds(eps)[1:], strict=True):
            out = work / f"{f.stem}_pgd{e}.dcm"
            res = attack_dicom(f, out, method="pgd", param=e, model=victim_model)
            row[kind] = {**_verdict(det.score_path(out)),
                               "victim_logit": [res.victim_logit_before,
                                                res.victim_logit_after]}
        rows.append(row)
    ok = all(not r["clean"]["flagged"] and all(r[k]["flagged"] for k in dicom_check_kinds(eps)[1:])
             for r in rows)
    return {"folder": str(folder), "eps": list(eps), "files": rows, "all_as_expected": ok}


def dicom_check_kinds(eps: Any) -> list[str]:
    """The keys of one file's row in ``dicom_check``: "clean", then "pgd_<eps>" per eps."""
    return ["clean", *(f"pgd_{e}" for e in eps)]


def _verdict(score: Any) -> dict[str, Any]:
    return {"score": score.score, "p_cnn": score.p_cnn, "p_rf": score.p_rf,
            "grid_peaks": score.grid_peaks, "flagged": score.flagged}


def measure_latency(bundle_dir: Path, x: np.ndarray, n: int) -> dict[str, Any]:
    """Per-sample latency of each part at one thread (the runtime's Detector), median and IQR;
    beside it the paper's architecture as a standalone TFLite CNN on the same images."""

    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # BLAS threads would wake per np.dot (detector notes)
        return _measure_latency(bundle_dir, x, n)


def _measure_latency(bundle_dir: Path, x: np.ndarray, n: int) -> dict[str, Any]:
    from detector.cnn import LiteRTModel
    from detector.scoring import Detector

    det = Detector.load(bundle_dir, num_threads=1)
    imgs = x[: max(1, n)]
    for img in imgs[:20]:  # warm-up
        det.score_frames([img])
    rows: dict[str, list[float]] = {"features": [], "cnn": [], "forest": [], "total": []}
    for img in imgs:
        t = det.score_frames([img]).timings_ms
        for k in rows:
            rows[k].append(t[k])
    from train import training_bundle

    paper_path = training_bundle.load_training(bundle_dir, ("paper_cnn_tflite",)).path_of(
        "paper_cnn_tflite")
    paper = LiteRTModel(paper_path, num_threads=1)
    for img in imgs[:10]:
        paper.predict(img)
    pt = []
    for img in imgs[: min(len(imgs), 100)]:
        s = time.perf_counter()
        paper.predict(img)
        pt.append((time.perf_counter() - s) * 1e3)
    rows["paper_cnn_standalone"] = pt

    def stats(v: list[float]) -> dict[str, float]:
        a = np.asarray(v)
        return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)),
                "p75": float(np.percentile(a, 75)), "n": len(a)}

    return {k: stats(v) for k, v in rows.items()}


def roc_data(book: Any, w_cnn: float, seed: int) -> dict[str, Any]:
    from train import evaluate

    out: dict[str, Any] = {}
    y, mix = book.mixed(seed, w_cnn)
    out["overall"] = {p: evaluate.roc_curve(y, mix[p]) for p in evaluate.PARTS}
    for name in ("pgd_0.003", "pgd_0.006", "fgsm_0.003", "fgsm_0.006"):
        out[name] = {p: evaluate.roc_curve(*book.pair(name, p, w_cnn)) for p in
                     evaluate.PARTS}
    return out
