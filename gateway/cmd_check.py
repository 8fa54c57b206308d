"""Validate a config file without starting: ``sentinel check --config FILE``.

Exit 0 when the file is usable (and the model bundle verifies, unless --no-bundle), 2 otherwise;
each message names the file, the key and the fix. A usable file can still say something it does
not do: rules that decide by a header the sender writes (a ``pass`` on Modality, a threshold per
Modality, ``allow_unscreened_pixels``). Each such rule gets a ``WARNING:`` line, what it means
and the fix (gateway.rules.config_warnings); the exit status stays 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import DestinationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    parser.add_argument("--no-bundle", action="store_true",
                        help="skip verifying the model bundle's digests")


def run(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    bundle_note = "not checked"
    bundle_threshold: float | None = None
    if not args.no_bundle:
        from detector.bundle import DEFAULT_BUNDLE, load_manifest
        from detector.errors import BundleError

        bundle = cfg.detector.bundle or DEFAULT_BUNDLE
        try:
            manifest = load_manifest(bundle)
        except (BundleError, OSError, ValueError) as exc:
            print(f"invalid: {cfg.path}: detector.bundle: {exc}; fix: restore the bundle or "
                  "point detector.bundle at a verified bundle", file=sys.stderr)
            return 2
        bundle_note = f"{bundle} ({getattr(manifest, 'bundle_id', '?')}) verified"
        bundle_threshold = getattr(manifest, "threshold", None)
    if cfg.orthanc_plugin is not None:  # what Orthanc's start would refuse, said now
        from gateway.orthanc_plugin import check_for_orthanc

        try:  # Orthanc's own settings are checked when Orthanc starts
            check_for_orthanc(cfg, {"DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False,
                                    "DicomCheckModalityHost": True})
        except ValueError as exc:
            print(f"invalid for the Orthanc plugin: {exc}", file=sys.stderr)
            return 2
    print(f"ok: {cfg.path}")
    print(f"  listener {cfg.listener.ae_title} on {cfg.listener.host}:{cfg.listener.port}"
          f"{' (TLS)' if cfg.listener.tls else ''}")
    print(f"  {len(cfg.callers)} allowed caller(s); state in {cfg.state_dir}")
    print(f"  destinations: {', '.join(_describe(n, d) for n, d in cfg.destinations.items())}")
    rules = [f"{r.name}:{r.action}" for r in cfg.rules] + [f"default:{cfg.default.action}"]
    print(f"  rules: {', '.join(rules)}")
    print(f"  bundle: {bundle_note}")
    if cfg.orthanc_plugin is not None:
        op = cfg.orthanc_plugin
        print(f"  orthanc plugin: scoring with {op.python}; refused 0x{op.refused_status:04X}, "
              f"error 0x{op.error_status:04X}")
    if cfg.console is not None:
        c = cfg.console
        print(f"  review console: {'https' if c.tls else 'http'}://{c.host}:{c.port}/"
              f"{', second reviewer required' if c.second_reviewer else ''}")
    from gateway.rules import config_warnings

    for what, meaning, fix in config_warnings(cfg, bundle_threshold):
        print(f"WARNING: {cfg.path}: {what}")
        print(f"    means: {meaning}")
        print(f"    fix: {fix}")
    return 0


def _describe(name: str, dest: DestinationConfig) -> str:
    """``pacs (dicom, 2 associations)``, ``archive (directory)``,
    ``web (dicomweb https://pacs/dicom-web, basic auth as 'gw', 2 connections)``: the URL as
    configured (credentials in it are refused at load) and where the secret comes from, never
    the secret."""
    if dest.kind == "dicom" and dest.associations > 1:
        return f"{name} (dicom, {dest.associations} associations)"
    if dest.kind in ("dicomweb", "orthanc-rest"):
        parts = [f"{dest.kind} {dest.url}"]
        if dest.token_file is not None:
            parts.append(f"bearer token from {dest.token_file}")
        elif dest.password_file is not None:
            parts.append(f"basic auth as {dest.username!r}, password from {dest.password_file}")
        if dest.ca is not None:
            parts.append(f"CA {dest.ca}")
        if dest.allow_plain_http and dest.url.startswith("http:"):
            parts.append("PLAIN HTTP allowed")
        if dest.associations > 1:
            parts.append(f"{dest.associations} connections")
        return f"{name} ({', '.join(parts)})"
    return f"{name} ({dest.kind})"
