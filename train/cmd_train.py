"""Train a detector bundle on a folder of images: split by patient, train the victim, craft the
perturbation suite, fit the CNN and forest, choose w_cnn and the threshold on validation,
measure the test split, write the bundle. Seeded and resumable: rerun the same command with the
same --work directory after an interruption and finished stages are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train.pipeline import TrainConfig

# detector.scoring.FUSIONS, spelt out: importing it here would load numpy and pydicom for every
# `sentinel --help` (tests/test_scoring.py holds the two equal)
FUSION_CHOICES = ("stack", "logit")
FEATURE_SET_CHOICES = ("sentinel-features-v1", "sentinel-features-v3")
CNN_POOL_CHOICES = ("global", "tile-min")  # train.detector_cnn.CNN_POOLS (numpy), spelt out


# A site bundle's CNN (--secret-file) unless --cnn-members / --cnn-stems say otherwise: two
# networks on the trained stem and two on the random stem. Measured on disjoint-patient site
# bundles from up to seven secrets (README, "Two stems"): the recipes tried detect 85-88% of the
# strongest public-bundle attack on average and which secret a site draws matters more than the
# recipe; this one stays within the 2.0 ms budget for every shape a secret draws.
SITE_CNN = {"cnn_members": 2, "cnn_stems": 2}
RANDOM_STEM_CHOICES = ("full", "strided")  # train.pipeline.RANDOM_STEMS, spelt out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="folder of DICOM/PNG/JPEG images with labels.csv "
                        "(filename,label,patient_id)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument("--work", type=Path, default=None,
                        help="work directory for checkpoints (default: runs/train-<data name>"
                        "-seed<N>[-quick])")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, attacks, models")
    parser.add_argument("--quick", action="store_true",
                        help="small subsets and few epochs: a smoke run of the whole pipeline")
    parser.add_argument("--max-depth", type=int, default=8,
                        help="forest max_depth (size and speed of the shipped forest)")
    parser.add_argument("--fusion", choices=FUSION_CHOICES, default="logit",
                        help="how the CNN and forest are weighted: their log-odds (default) or, "
                        "as in the paper, their probabilities")
    parser.add_argument("--resample-noise", type=float, default=None, metavar="LEVELS",
                        help="largest sensor-noise sigma (8-bit grey levels at the native size) "
                        "of the resampled clean copies (default 2: the shipped bundle); raise "
                        "it when your clean images are noisier than the training set's")
    parser.add_argument("--resample-sizes", type=int, nargs="+", default=None,
                        metavar="N", help="native sizes of the resampled copies "
                        "(default 320 448 512 640 768)")
    parser.add_argument("--feature-set", choices=FEATURE_SET_CHOICES,
                        default="sentinel-features-v1",
                        help="the forest's inputs: v1 (default) or v3, v1 plus the stride-grid "
                        "spectral peaks (measured: unsure of clean images from a new source)")
    parser.add_argument("--no-grid-gate", action="store_true",
                        help="leave out the stride-grid gate (bundles before 2026-12-01)")
    parser.add_argument("--cnn-epochs", type=int, default=None, metavar="N",
                        help="epochs of the detector CNN (default 3; measured with the zoo: "
                        "validation AUC 0.868-0.901 after epochs 1-3 and 0.936 after 8, but at "
                        "8 the CNN flagged 16%% of clean NIH images at a 1%% Kermany gate "
                        "against 7%% at 3: it fits the training source more closely)")
    parser.add_argument("--no-zoo", action="store_true",
                        help="train without the victim zoo's attacks and processed clean "
                        "images (bundles before issue 15)")
    parser.add_argument("--zoo-work", type=Path, default=None, metavar="DIR",
                        help="cache of trained zoo members (default WORK/zoo-members; the "
                        "README's `python -m train.zoo --work runs/zoo train` fills runs/zoo)")
    parser.add_argument("--zoo-holdout", nargs="+", default=(), metavar="FAMILY",
                        help="leave these zoo families' attacks out of the detector's training "
                        "(a fold of the leave-one-family-out evaluation, python -m "
                        "train.zoo_lofo)")
    parser.add_argument("--zoo-12bit", action="store_true",
                        help="also train on zoo examples stored at 12 bits (half as many as "
                        "the 8-bit ones; for sites whose CR/DX is stored at 10-16 bits: the "
                        "README's \"Stored at 12 bits\")")
    parser.add_argument("--secret-file", type=Path, default=None, metavar="FILE",
                        help="a site bundle: draw the detector CNN's shape and seed, the "
                        "forest's features and seed, and the zoo families from the secret in "
                        "FILE (mode 0600; the bundle records only its salted digest)")
    parser.add_argument("--harden-with", nargs="+", type=Path, default=(), metavar="DIR",
                        help="adversarial training of the detector CNN: add the adaptive "
                        "examples of `python -m train.adaptive --split train --out DIR` (same "
                        "--work) to its training; thresholds stay calibrated on clean images. "
                        "With --patient-part, only the examples made from that part's images")
    parser.add_argument("--patient-part", type=_patient_part, default=None, metavar="K/N",
                        help="train the detector on part K of N disjoint parts of the training "
                        "split's patients (with --no-zoo; victim, validation and test stay "
                        "whole): bundles on different parts share no training image, which "
                        "measures what a site's own images buy against attacks crafted on "
                        "another bundle (README, \"Site bundles from a secret\")")
    parser.add_argument("--cnn-pool", choices=CNN_POOL_CHOICES, default="global",
                        help="how the detector CNN scores an image: global (default, the "
                        "shipped bundle) or tile-min, by its least suspicious of 3x3 tiles "
                        "(experimental: measured over several training runs, no reliable gain; "
                        "README, \"Tile-min pooling\")")
    parser.add_argument("--cnn-members", type=int, default=None, metavar="K",
                        help="the detector CNN as the mean of K networks (1 to 5; default 1, "
                        f"with --secret-file {SITE_CNN['cnn_members']}) trained from different "
                        "seeds on one shared first layer: each further one adds a training run "
                        "and about 0.12 ms per image (README, \"Averaging CNNs\")")
    parser.add_argument("--cnn-stems", type=int, choices=(1, 2), default=None,
                        help="2: also train networks on a frozen first layer of random "
                        "high-pass kernels drawn from the run's CNN seed (a site bundle's: from "
                        "its secret) and average them all. Default "
                        f"1, with --secret-file {SITE_CNN['cnn_stems']} (README, \"Two stems\")")
    parser.add_argument("--cnn-random-members", type=int, default=None, metavar="R",
                        help="with --cnn-stems 2: how many networks train on the random stem "
                        "(default K); K + R at most 6")
    parser.add_argument("--cnn-random-stem", choices=RANDOM_STEM_CHOICES, default="full",
                        help="the random stem's networks: full (default: every pixel) or "
                        "strided (the residual at every second pixel: about 0.25 ms less per "
                        "image and as many attacks caught on average, but more false alarms on "
                        "an unseen source for one of two fresh secrets; README, \"Two stems\")")
    parser.add_argument("--new-secret", action="store_true",
                        help="first write a fresh random secret to --secret-file (refuses to "
                        "overwrite an existing file); the file names the draw scheme its "
                        "secret is drawn by (train.secret.DRAW_SCHEMES; files without one are "
                        "scheme 1), so it always makes the same bundle")


def _cnn_ensemble(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig's CNN ensemble fields: ``cnn_members`` and ``cnn_stems`` as given, else one
    network, else for a site bundle ``SITE_CNN``; the random stem's count and shape as given."""
    site = args.secret_file is not None or args.new_secret
    default = SITE_CNN if site else {"cnn_members": 1, "cnn_stems": 1}
    return {"cnn_members": default["cnn_members"] if args.cnn_members is None
            else args.cnn_members,
            "cnn_stems": default["cnn_stems"] if args.cnn_stems is None else args.cnn_stems,
            "cnn_random_members": args.cnn_random_members,
            "cnn_random_stem": args.cnn_random_stem}


def _patient_part(text: str) -> tuple[int, int]:
    """``K/N`` as (K, N); its range is checked by TrainConfig."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give K/N, e.g. 1/2") from None
    return k, n


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from dataclasses import replace

    from train.pipeline import TrainConfig, run_pipeline

    data = Path(args.data)
    if not data.is_dir():
        print(f"sentinel train: --data {data} is not a folder of images", file=sys.stderr)
        return 2
    work = args.work or Path("runs") / (
        f"train-{data.resolve().name}-seed{args.seed}{'-quick' if args.quick else ''}")
    try:
        cfg = TrainConfig(data=str(data), out=str(args.out), work=str(work), seed=args.seed,
                          quick=args.quick, max_depth=args.max_depth, fusion=args.fusion,
                          feature_set=args.feature_set, grid_gate=not args.no_grid_gate,
                          zoo=not args.no_zoo, zoo_holdout=tuple(args.zoo_holdout),
                          zoo_work=str(args.zoo_work or ""), zoo_12bit=args.zoo_12bit,
                          harden=tuple(str(d) for d in args.harden_with),
                          patient_part=args.patient_part, cnn_pool=args.cnn_pool,
                          **_cnn_ensemble(args))
    except ValueError as exc:  # an unknown zoo family, every family held out, ...
        print(f"sentinel train: {exc}", file=sys.stderr)
        return 2
    if args.secret_file is not None or args.new_secret:
        cfg = _with_secret(cfg, args)
        if cfg is None:
            return 2
    if args.cnn_epochs is not None:
        cfg = replace(cfg, cnn_epochs=args.cnn_epochs)
    if args.resample_noise is not None:
        cfg = replace(cfg, resample_noise_levels=args.resample_noise)
    if args.resample_sizes:
        cfg = replace(cfg, resample_sizes=tuple(args.resample_sizes))
    out = run_pipeline(cfg)
    print(f"bundle: {out}")
    return 0


def _with_secret(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig | None:
    """``cfg`` with the choices the site secret draws (train.secret); None after an error."""
    from dataclasses import replace

    from train import secret

    if args.secret_file is None:
        print("sentinel train: --new-secret needs --secret-file FILE (where to write it)",
              file=sys.stderr)
        return None
    try:
        if args.new_secret:
            secret.new_secret_file(args.secret_file)
            print(f"sentinel train: wrote a new secret to {args.secret_file} (mode 0600): keep "
                  "it off the gateway host, it is what an attacker would need to rebuild this "
                  "site's training choices", file=sys.stderr)
        site_secret = secret.read_secret(args.secret_file)
    except secret.SecretError as exc:
        print(f"sentinel train: {exc}", file=sys.stderr)
        return None
    families: tuple[str, ...] = ()
    if cfg.zoo:
        pool = cfg.quickened().zoo_families if cfg.quick else cfg.zoo_families
        families = tuple(f for f in pool if f not in cfg.zoo_holdout)
    draws = secret.draw(site_secret, cfg.feature_set, families)
    holdout = tuple(sorted({*cfg.zoo_holdout,
                            *(f for f in families if f not in draws.zoo_families)}))
    return replace(cfg, secret=draws, zoo_holdout=holdout)
