"""Placeholder: this command is being built (replace this module)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments yet."""


def run(args: argparse.Namespace) -> int:
    print(f"sentinel {args.command}: not built yet", file=sys.stderr)
    return 2
