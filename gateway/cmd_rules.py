"""Show which routing rule matches each file and why: ``sentinel rules test --config F FILE...``.

The association facts a rule may test (calling/called AE title, peer address) are not in a file:
give them with --calling-ae, --called-ae and --peer (the called AE defaults to the listener's).
The SOP class of the presentation context is the file meta's (what storescu proposes) unless
--sop-class names another. The outcome shown is the gateway's real one: a ``pass`` that the
instance's pixel data overrides is shown as ``screen``, with the reason (gateway.rules).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", required=True)
    t = sub.add_parser("test", help="show the rule that applies to each file, and why")
    t.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    t.add_argument("--calling-ae", default="", help="calling AE title to assume")
    t.add_argument("--called-ae", default=None, help="called AE title (default: the listener's)")
    t.add_argument("--peer", default="127.0.0.1", help="peer address to assume")
    t.add_argument("--sop-class", default="",
                   help="SOP class UID of the negotiated presentation context (default: the "
                   "file meta's MediaStorageSOPClassUID)")
    t.add_argument("files", nargs="+", type=Path, metavar="FILE")


def run(args: argparse.Namespace) -> int:
    import pydicom

    from gateway.config import ConfigError, load_config
    from gateway.rules import Association, decide

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    assoc = Association(
        calling_ae=args.calling_ae,
        called_ae=args.called_ae if args.called_ae is not None else cfg.listener.ae_title,
        peer=args.peer,
    )
    for c in cfg.find_caller(assoc.calling_ae):
        if c.commitment:
            print(f"storage commitment for {c.ae_title}: Success only for what every destination "
                  f"of its rule received; reports go to {c.host or assoc.peer}:{c.port}; a "
                  f"quarantined instance is held {cfg.commitment.quarantine_hold_s:g} s for a "
                  "release, then reported failed")
    status = 0
    for f in args.files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=False, defer_size=64 * 1024)
        except Exception as exc:
            print(f"{f}: unreadable ({type(exc).__name__}): the gateway quarantines it "
                  "(reason unreadable)")
            status = 1
            continue
        d = decide(cfg, ds, assoc, sop_class=args.sop_class, path=f)
        thr = "bundle default" if d.threshold is None else f"{d.threshold:g}"
        if d.at_most_bundle:
            thr += " or the bundle's if lower"
        extra = " shadow" if d.shadow else ""
        unscreened = " UNSCREENED" if d.action == "pass" and d.override else ""
        print(f"{f}: rule {d.rule.name!r} -> {d.action}{extra}{unscreened} to "
              f"{', '.join(_dest_label(cfg, n) for n in d.destinations) or '(none)'}"
              + (f", threshold {thr}" if d.action == "screen" else ""))
        for why in d.reasons:
            print(f"    {why}")
    return status


def _dest_label(cfg: Any, name: str) -> str:
    """A destination's name, with its URL when it is DICOMweb (DICOM and directory destinations
    are known by name; a URL says which server a STOW-RS destination really is). The URL has no
    credentials: the config refuses them in it."""
    dest = cfg.destinations.get(name)
    if dest is not None and dest.kind == "dicomweb":
        return f"{name} (DICOMweb {dest.url})"
    return name
