"""The one console script, ``sentinel``: argparse subcommands that delegate to command modules.

Each command lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules must stay light at import time (no TensorFlow, no model loading), so that
``sentinel --help`` and the gateway start fast and the daemon's install stays small; the
``train`` commands import TensorFlow inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Order is the order shown by ``sentinel --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.cmd_serve", "run the gateway daemon"),
    "check": ("gateway.cmd_check", "validate a config file without starting"),
    "score": ("detector.cmd_score", "score DICOM or image files with a model bundle"),
    "calibrate": ("detector.cmd_calibrate",
                  "the threshold for a false-positive rate on your own clean images"),
    "rules": ("gateway.cmd_rules", "show which routing rule matches each file and why"),
    "quarantine": ("gateway.cmd_quarantine", "list, show, release or purge quarantined instances"),
    "audit": ("gateway.cmd_audit", "query the audit log or verify its hash chain"),
    "console": ("gateway.console.cmd", "the web review console, and its accounts"),
    "attack": ("train.cmd_attack", "write an attacked copy of a DICOM file (red-teaming)"),
    "train": ("train.cmd_train", "train a detector bundle on a folder of images"),
    "evaluate": ("train.cmd_evaluate", "evaluate a bundle and write an HTML report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentinel",
        description="xray-sentinel: a DICOM gateway that screens X-ray images for "
        "adversarial perturbations before they reach the PACS.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
