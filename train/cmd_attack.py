"""Write an attacked copy of a DICOM file (red-teaming): the perturbation is computed on the
victim's 224x224 input and mapped back onto the native matrix and bit depth, in the same
transfer syntax, with a new SOP Instance UID unless --keep-uid. PGD and FGSM use the victim
classifier carried by the bundle.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

METHODS = ("pgd", "fgsm", "gaussian", "saltpepper", "contrast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="DICOM file to attack")
    parser.add_argument("output", type=Path, help="where to write the attacked copy")
    parser.add_argument("--method", choices=METHODS, default="pgd")
    parser.add_argument("--eps", type=float, default=None,
                        help="eps for pgd/fgsm; sigma (gaussian), amount (saltpepper) or factor "
                        "(contrast) for the others; default: the paper's setting")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle carrying the victim classifier (default: the shipped one)")
    parser.add_argument("--keep-uid", action="store_true",
                        help="keep the SOP Instance UID (default: a new one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upsample", choices=("exact", "bilinear", "nearest"), default="exact",
                        help="how the 224x224 delta is mapped onto a larger native matrix: exact "
                        "(default: read back through the area resize, the victim sees exactly "
                        "the crafted image), bilinear (smooth, keeps about half of the attack) "
                        "or nearest (blocks; stays inside eps on the native grid)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from train import attacks
    from train.dicom_attack import AttackWriteError, attack_dicom, load_victim_from_bundle

    param = args.eps if args.eps is not None else attacks.DEFAULT_PARAM[args.method]
    if not args.input.is_file():
        print(f"sentinel attack: {args.input} is not a file", file=sys.stderr)
        return 2
    try:
        model = (load_victim_from_bundle(args.bundle)
                 if args.method in ("pgd", "fgsm") else None)
        res = attack_dicom(args.input, args.output, method=args.method, param=param,
                           model=model, keep_uid=args.keep_uid, seed=args.seed,
                           upsample=args.upsample)
    except (AttackWriteError, FileNotFoundError, ValueError) as exc:
        print(f"sentinel attack: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res.out_path}: {res.method} {res.param}, syntax {res.transfer_syntax}, "
          f"SOP Instance UID {res.sop_instance_uid}; stored values changed on "
          f"{100 * res.changed_pixel_share:.1f}% of pixels (max {res.max_stored_change}); "
          f"victim logit {res.victim_logit_before:+.3f} -> {res.victim_logit_after:+.3f}")
    return 0
