"""Write an attacked copy of a DICOM file (red-teaming): the perturbation is computed on the
victim's 224x224 input and mapped back onto the native matrix and bit depth, in the same
transfer syntax, with a new SOP Instance UID unless --keep-uid. PGD and FGSM use the victim
classifier carried by the bundle; the adaptive attacks (issue 7: they know the detector too)
also fit their statistics on clean images from --data.

Given a folder, every DICOM file under it is attacked into the output folder at the same
relative path, with the victim loaded and the attacker's statistics fitted once (a site making
300 copies to raise its CNN gate with, `sentinel calibrate --cnn-gate-attacks`, pays the fit
once, not 300 times). Each copy is written whole or not at all, so an interrupted run is
resumed by running it again: copies already written are kept and skipped. A file that cannot
be attacked is reported by name and the rest go on; the exit status is 1 if any failed.

With --victim MODEL (a site's own Keras model or SavedModel) the attack is made the way an
attacker who targets that AI makes it: at the DICOM's native matrix, through the model's own
resize (--input-size, --resize, --antialias), rounded to BitsStored and written back in the same
transfer syntax (issue 15).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("pgd", "fgsm", "gaussian", "saltpepper", "contrast")
# gradient attacks at the native matrix through --victim's own resize (train.attacks
# .NATIVE_ATTACKS with dashes; a test holds the two equal)
NATIVE = ("pgd", "fgsm", "mi-fgsm", "di-fgsm", "pgd-l2")
RESIZES = ("bilinear", "area", "bicubic")  # train.zoo.RESIZE_METHODS
ADAPTIVE = ("adaptive-cnn", "adaptive-stats", "adaptive-hfc", "adaptive-surrogate",
            "adaptive-all", "adaptive-stats-cand")  # train.adaptive.ATTACKS (a test checks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path,
                        help="DICOM file to attack, or a folder: every DICOM file under it")
    parser.add_argument("output", type=Path,
                        help="where to write the attacked copy (a folder when INPUT is one: "
                        "copies keep their relative paths)")
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


AttackOne = Callable[[Path, Path, int], Any]  # (input, output, seed) -> AttackResult


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from detector.errors import BundleError
    from train.dicom_attack import AttackWriteError

    problem = _check_paths(args)
    if problem is None:
        problem = _check_method(args)
    if problem is not None:
        print(f"sentinel attack: {problem}", file=sys.stderr)
        return 2
    try:
        attack_one, describe = (_native_attack(args) if args.victim is not None
                                else _bundle_attack(args))
        if args.input.is_dir():
            return _run_folder(args, attack_one)
        res = attack_one(args.input, args.output, args.seed)
    except (AttackWriteError, BundleError, OSError, ValueError) as exc:  # a full disk too
        print(f"sentinel attack: {exc}", file=sys.stderr)
        return 2
    print(describe(res))
    return 0


def _check_paths(args: argparse.Namespace) -> str | None:
    """Why INPUT / OUTPUT cannot be used (None: they can)."""
    if args.input.is_dir():
        if args.output.exists() and not args.output.is_dir():
            return f"{args.input} is a folder, so OUTPUT must be one too; {args.output} is a file"
        inp, out = args.input.resolve(), args.output.resolve()
        if out == inp or inp in out.parents:
            return (f"the output folder {args.output} is inside the input folder {args.input}: "
                    "a second run would attack the copies; choose a folder outside it")
        return None
    if not args.input.is_file():
        return f"{args.input} is neither a file nor a folder"
    if args.output.is_dir():
        return (f"{args.output} is a folder: give the attacked copy a file name (or give a "
                "folder as INPUT to attack every DICOM in it)")
    return None


def _check_method(args: argparse.Namespace) -> str | None:
    """Why the method and its options do not go together (None: they do)."""
    if args.victim is not None:
        if args.method not in NATIVE:
            return (f"--victim takes a gradient attack ({', '.join(NATIVE)}), not "
                    f"{args.method}")
        return None
    if args.method in NATIVE[2:]:
        return (f"--method {args.method} runs at the native matrix through a victim of yours: "
                "pass --victim MODEL (with --input-size and --resize)")
    if args.method in ADAPTIVE and (args.data is None or not args.data.is_dir()):
        return (f"--method {args.method} needs --data DIR, a folder of clean images to fit the "
                "attacker's statistics on (e.g. ../shared/data/kermany224)")
    return None


def _bundle_attack(args: argparse.Namespace) -> tuple[AttackOne, Callable[[Any], str]]:
    """The bundle's victim (Table II and adaptive attacks), loaded and fitted once."""
    from train import attacks
    from train.dicom_attack import adaptive_adversary, attack_dicom, load_victim_from_bundle

    adaptive = args.method in ADAPTIVE
    param = (args.eps if args.eps is not None
             else 0.006 if adaptive else attacks.DEFAULT_PARAM[args.method])
    adversary = None
    if adaptive:
        adversary, model = adaptive_adversary(
            args.method, param, bundle_dir=args.bundle, data_dir=args.data,
            n_fit=args.fit_images, steps=args.steps, seed=args.seed,
            det_weight=args.det_weight, log=lambda m: print(m, file=sys.stderr))
    else:
        model = (load_victim_from_bundle(args.bundle)
                 if args.method in ("pgd", "fgsm") else None)

    def attack_one(src: Path, dst: Path, seed: int) -> Any:
        return attack_dicom(src, dst, method=args.method, param=param, model=model,
                            keep_uid=args.keep_uid, seed=seed, upsample=args.upsample,
                            adversary=adversary)

    def describe(res: Any) -> str:
        return (f"wrote {res.out_path}: {res.method} {res.param}, syntax {res.transfer_syntax}, "
                f"SOP Instance UID {res.sop_instance_uid}; stored values changed on "
                f"{100 * res.changed_pixel_share:.1f}% of pixels (max {res.max_stored_change}); "
                f"victim logit {res.victim_logit_before:+.3f} -> {res.victim_logit_after:+.3f}")

    return attack_one, describe


def _native_attack(args: argparse.Namespace) -> tuple[AttackOne, Callable[[Any], str]]:
    """--victim: the attack runs at the native matrix through the site's model and resize."""
    from train import attacks, zoo
    from train.dicom_attack import attack_dicom_native, load_site_victim

    pipeline = zoo.Pipeline(args.input_size, args.resize, args.antialias)
    attack = attacks.NativeAttack(args.method.replace("-", "_"),
                                  args.eps if args.eps is not None else 0.006)
    victim = load_site_victim(args.victim, pipeline, output=args.victim_output,
                              input_scale=args.input_scale)

    def attack_one(src: Path, dst: Path, seed: int) -> Any:
        return attack_dicom_native(src, dst, victim, attack, keep_uid=args.keep_uid, seed=seed)

    def describe(res: Any) -> str:
        return (f"wrote {res.out_path}: {res.method} {res.param} at the native matrix through "
                f"{args.victim} [{pipeline.tag}], syntax {res.transfer_syntax}, SOP Instance UID "
                f"{res.sop_instance_uid}; stored values changed on "
                f"{100 * res.changed_pixel_share:.1f}% of pixels (max {res.max_stored_change}); "
                f"victim margin for its own prediction {res.victim_logit_before:+.3f} -> "
                f"{res.victim_logit_after:+.3f}{' (fooled)' if fooled(res) else ''}")

    return attack_one, describe


def fooled(res: Any) -> bool:
    """The victim's answer changed side: a logit (bundle victim) or the margin for its own
    prediction (``--victim``) crossed zero."""
    return bool(res.victim_logit_before * res.victim_logit_after < 0)


def file_seed(seed: int, rel: str) -> int:
    """A copy's seed from the run's seed and its relative path: the same copy whether the run
    went through in one go or was resumed, and whatever other files the folder holds."""
    return (seed * 1_000_003 + zlib.crc32(rel.encode())) % (1 << 31)


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM Part 10 file under ``folder`` (by content, not name), in sorted order."""
    from detector.cmd_score import collect_files
    from detector.preprocess import sniff_format

    return [f for f, _ in collect_files([str(folder)]) if sniff_format(f) == "dicom"]


def _run_folder(args: argparse.Namespace, attack_one: AttackOne) -> int:
    from tqdm import tqdm

    from train.dicom_attack import AttackWriteError

    files = dicom_files(args.input)
    if not files:
        print(f"sentinel attack: no DICOM files under {args.input} (a DICOM Part 10 file has "
              "'DICM' at offset 128)", file=sys.stderr)
        return 2
    written = skipped = n_fooled = 0
    failed: list[str] = []
    for src in tqdm(files, desc=f"attack {args.method}", unit="file", file=sys.stderr):
        rel = src.relative_to(args.input)
        dst = args.output / rel
        if dst.exists():  # written whole by an earlier run (copies are renamed into place)
            skipped += 1
            continue
        try:
            res = attack_one(src, dst, file_seed(args.seed, rel.as_posix()))
        except (AttackWriteError, ValueError, OSError) as exc:  # PreprocessError too
            failed.append(f"{rel}: {exc}")
            continue
        written += 1
        n_fooled += fooled(res)
    for line in failed:
        print(f"sentinel attack: not attacked: {line}", file=sys.stderr)
    print(f"{args.output}: wrote {written} attacked copies ({args.method}; the victim's answer "
          f"changed on {n_fooled} of them), kept {skipped} written by an earlier run, "
          f"{len(failed)} failed")
    return 1 if failed else 0
