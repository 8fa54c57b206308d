"""Write an attacked copy of a DICOM file (red-teaming): the perturbation is computed on the
victim's 224x224 input and mapped back onto the native matrix and bit depth, in the same
transfer syntax, with a new SOP Instance UID unless --keep-uid. PGD and FGSM use the victim
classifier carried by the bundle; the adaptive attacks (issue 7: they know the detector too)
also fit their statistics on clean images from --data.

With --victim MODEL (a site's own Keras model or SavedModel) the attack is made the way an
attacker who targets that AI makes it: at the DICOM's native matrix, through the model's own
resize (--input-size, --resize, --antialias), rounded to BitsStored and written back in the same
transfer syntax (issue 15).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

METHODS = ("pgd", "fgsm", "gaussian", "saltpepper", "contrast")
# gradient attacks at the native matrix through --victim's own resize (train.attacks
# .NATIVE_ATTACKS with dashes; a test holds the two equal)
NATIVE = ("pgd", "fgsm", "mi-fgsm", "di-fgsm", "pgd-l2")
RESIZES = ("bilinear", "area", "bicubic")  # train.zoo.RESIZE_METHODS
ADAPTIVE = ("adaptive-cnn", "adaptive-stats", "adaptive-hfc", "adaptive-surrogate",
            "adaptive-all", "adaptive-stats-cand")  # train.adaptive.ATTACKS (a test checks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="DICOM file to attack")
    parser.add_argument("output", type=Path, help="where to write the attacked copy")
    parser.add_argument("--method", choices=METHODS + ADAPTIVE + NATIVE[2:], default="pgd",
                        help="a perturbation of the paper's Table II, or an adaptive attack "
                        "(needs --data)")
    parser.add_argument("--eps", type=float, default=None,
                        help="eps for pgd/fgsm; sigma (gaussian), amount (saltpepper) or factor "
                        "(contrast) for the others; default: the paper's setting")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="runtime bundle whose victim to attack with (default: the "
                        "shipped one); the victim is read from its training bundle, DIR-training "
                        "beside it (train/models/default for the shipped bundle)")
    parser.add_argument("--keep-uid", action="store_true",
                        help="keep the SOP Instance UID (default: a new one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None,
                        help="adaptive attacks: a folder of clean images (with labels.csv if "
                        "any) to fit the attacker's statistics on, e.g. ../shared/data/kermany224")
    parser.add_argument("--fit-images", type=int, default=200,
                        help="adaptive attacks: how many images of --data to fit on")
    parser.add_argument("--steps", type=int, default=60, help="adaptive attacks: PGD steps")
    parser.add_argument("--det-weight", type=float, default=None,
                        help="adaptive attacks: weight of the detector terms against the victim "
                        "term (default 0.5; 2 with --steps 100 is the strongest attack the "
                        "README measures, what `sentinel calibrate --cnn-gate-attacks` copies "
                        "are made with)")
    parser.add_argument("--upsample", choices=("exact", "bilinear", "nearest"), default="exact",
                        help="how the 224x224 delta is mapped onto a larger native matrix: exact "
                        "(default: read back through the area resize, the victim sees exactly "
                        "the crafted image), bilinear (smooth, keeps about half of the attack) "
                        "or nearest (blocks; stays inside eps on the native grid)")
    site = parser.add_argument_group(
        "your own victim", "attack at the DICOM's native matrix through your own classifier "
        "and its resize, as an attacker who targets your AI would (pgd, fgsm, mi-fgsm, "
        "di-fgsm, pgd-l2)")
    site.add_argument("--victim", type=Path, default=None, metavar="MODEL",
                      help="a Keras model file (.keras/.h5) or a TensorFlow SavedModel "
                      "directory: input (N, N, 1 or 3), output one logit/probability or "
                      "class scores")
    site.add_argument("--input-size", type=int, default=224, metavar="N",
                      help="the model's input size (default 224)")
    site.add_argument("--resize", choices=RESIZES, default="bilinear",
                      help="how your pipeline resizes the stored image to N (default bilinear)")
    site.add_argument("--antialias", action="store_true",
                      help="anti-aliased bilinear/bicubic downsampling (PIL-like)")
    site.add_argument("--input-scale", type=float, default=1.0,
                      help="multiply the [0, 1] image by this before the model (255 for a "
                      "model trained on 0..255)")
    site.add_argument("--victim-output", choices=("auto", "logit", "probability"),
                      default="auto", help="what the model answers (auto: a Keras model's last "
                      "activation decides; a SavedModel is taken to answer logits)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from detector.errors import BundleError
    from train import attacks
    from train.dicom_attack import (
        AttackWriteError,
        adaptive_adversary,
        attack_dicom,
        load_victim_from_bundle,
    )

    if args.victim is not None:
        return _run_native(args)
    if args.method in NATIVE[2:]:
        print(f"sentinel attack: --method {args.method} runs at the native matrix through a "
              "victim of yours: pass --victim MODEL (with --input-size and --resize)",
              file=sys.stderr)
        return 2
    adaptive = args.method in ADAPTIVE
    param = (args.eps if args.eps is not None
             else 0.006 if adaptive else attacks.DEFAULT_PARAM[args.method])
    if not args.input.is_file():
        print(f"sentinel attack: {args.input} is not a file", file=sys.stderr)
        return 2
    if adaptive and (args.data is None or not args.data.is_dir()):
        print(f"sentinel attack: --method {args.method} needs --data DIR, a folder of clean "
              "images to fit the attacker's statistics on (e.g. ../shared/data/kermany224)",
              file=sys.stderr)
        return 2
    try:
        adversary = None
        if adaptive:
            adversary, model = adaptive_adversary(
                args.method, param, bundle_dir=args.bundle, data_dir=args.data,
                n_fit=args.fit_images, steps=args.steps, seed=args.seed,
                det_weight=args.det_weight,
                log=lambda m: print(m, file=sys.stderr))
        else:
            model = (load_victim_from_bundle(args.bundle)
                     if args.method in ("pgd", "fgsm") else None)
        res = attack_dicom(args.input, args.output, method=args.method, param=param,
                           model=model, keep_uid=args.keep_uid, seed=args.seed,
                           upsample=args.upsample, adversary=adversary)
    except (AttackWriteError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"sentinel attack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res.out_path}: {res.method} {res.param}, syntax {res.transfer_syntax}, "
          f"SOP Instance UID {res.sop_instance_uid}; stored values changed on "
          f"{100 * res.changed_pixel_share:.1f}% of pixels (max {res.max_stored_change}); "
          f"victim logit {res.victim_logit_before:+.3f} -> {res.victim_logit_after:+.3f}")
    return 0


def _run_native(args: argparse.Namespace) -> int:
    """--victim: the attack runs at the native matrix through the site's model and resize."""
    if args.method not in NATIVE:
        print(f"sentinel attack: --victim takes a gradient attack ({', '.join(NATIVE)}), not "
              f"{args.method}", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"sentinel attack: {args.input} is not a file", file=sys.stderr)
        return 2
    from train import attacks, zoo
    from train.dicom_attack import AttackWriteError, attack_dicom_native, load_site_victim

    try:
        pipeline = zoo.Pipeline(args.input_size, args.resize, args.antialias)
        attack = attacks.NativeAttack(args.method.replace("-", "_"),
                                      args.eps if args.eps is not None else 0.006)
        victim = load_site_victim(args.victim, pipeline, output=args.victim_output,
                                  input_scale=args.input_scale)
        res = attack_dicom_native(args.input, args.output, victim, attack,
                                  keep_uid=args.keep_uid, seed=args.seed)
    except (AttackWriteError, FileNotFoundError, ValueError) as exc:
        print(f"sentinel attack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res.out_path}: {res.method} {res.param} at the native matrix through "
          f"{args.victim} [{pipeline.tag}], syntax {res.transfer_syntax}, SOP Instance UID "
          f"{res.sop_instance_uid}; stored values changed on {100 * res.changed_pixel_share:.1f}% "
          f"of pixels (max {res.max_stored_change}); victim margin for its own prediction "
          f"{res.victim_logit_before:+.3f} -> {res.victim_logit_after:+.3f}"
          f"{' (fooled)' if res.victim_logit_after < 0 < res.victim_logit_before else ''}")
    return 0
