"""Query the audit log or verify its hash chain.

  sentinel audit query  (--config F | --log PATH) [--since ISO] [--until ISO] [--event E]
                        [--caller AE] [--study UID] [--verdict clean|flagged] [--json]
  sentinel audit verify (--config F | --log PATH) [--anchor HASH ...]

``verify`` exits 0 when the chain is intact, 1 when it is broken (naming the first bad line and
why), 2 when the log cannot be read. It prints the hash of the last line (``head``): keep it
somewhere else (a ticket, another host); ``--anchor HASH`` later proves that the chain still
holds that line, i.e. nothing up to it was cut off or rewritten, which the chain alone cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.audit import EVENTS, find_line_hash, parse_time, query, verify

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2
_SHOWN_FIRST = ("time", "event")
_HIDDEN = ("prev", "hash")


@dataclass(frozen=True)
class StatePaths:
    """Where the gateway keeps its state, from ``--config`` or ``--state-dir``/``--log``."""

    state_dir: Path | None
    quarantine_dir: Path | None
    audit_log: Path
    destinations: tuple[str, ...] | None  # None: unknown (no config given)


def add_location_arguments(parser: argparse.ArgumentParser, *, log_option: bool) -> None:
    """``--config F`` or ``--state-dir DIR`` (or ``--log PATH`` for the audit commands)."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the gateway's TOML config file")
    where.add_argument("--state-dir", type=Path, help="the gateway's state directory")
    if log_option:
        where.add_argument("--log", type=Path, help="an audit log file (audit.jsonl)")


def locate(args: argparse.Namespace) -> StatePaths:
    """Resolve the state paths; raises ValueError (ConfigError) naming the problem."""
    if getattr(args, "log", None) is not None:
        return StatePaths(None, None, args.log, None)
    if args.state_dir is not None:
        state = args.state_dir
        return StatePaths(state, state / "quarantine", state / "audit" / "audit.jsonl", None)
    from gateway.config import load_config  # parses TOML and validates; only when asked

    cfg = load_config(args.config)
    return StatePaths(cfg.state_dir, cfg.quarantine_dir, cfg.audit_path, tuple(cfg.destinations))


def _time_arg(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-11-25 or 2026-11-25T13:00:00Z)"
        ) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage lines above
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    q = sub.add_parser("query", help="print the events that match every filter")
    add_location_arguments(q, log_option=True)
    q.add_argument("--since", type=_time_arg, help="from this time (inclusive, ISO 8601, UTC)")
    q.add_argument("--until", type=_time_arg, help="before this time (exclusive)")
    q.add_argument("--event", choices=sorted(EVENTS), help="only this event")
    q.add_argument("--caller", metavar="AE", help="only this calling AE title")
    q.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    q.add_argument("--verdict", choices=("clean", "flagged"), help="only this screening verdict")
    q.add_argument("--json", action="store_true", help="one JSON object per line, as stored")

    v = sub.add_parser("verify", help="check the hash chain; exit 1 naming the first bad line")
    add_location_arguments(v, log_option=True)
    v.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="HASH",
        help="a head printed by an earlier verify and kept elsewhere: it must still be in the "
        "chain (proves nothing up to it was cut off or rewritten); repeatable",
    )


def _format(record: dict[str, object]) -> str:
    rest = " ".join(
        f"{k}={v}" for k, v in record.items() if k not in _SHOWN_FIRST and k not in _HIDDEN
    )
    return f"{record.get('time', '?'):<24} {record.get('event', '?'):<15} {rest}"


def _run_query(args: argparse.Namespace, log: Path) -> int:
    matches = query(
        log,
        since=args.since,
        until=args.until,
        event=args.event,
        calling_ae=args.caller,
        study_uid=args.study,
        verdict=args.verdict,
    )
    count = 0
    for record in matches:
        count += 1
        print(json.dumps(record) if args.json else _format(record))
    if not args.json:
        print(f"{count} event(s)", file=sys.stderr)
    return EXIT_OK


def _run_verify(log: Path, anchors: list[str]) -> int:
    result = verify(log)
    missing = [a for a in anchors if result.ok and find_line_hash(log, a) is None]
    if missing:
        print(
            f"BROKEN: {log}: anchor(s) {missing} are not in the chain: lines up to them were "
            "removed or the log was rewritten",
            file=sys.stderr,
        )
        return EXIT_BROKEN
    if result.ok:
        print(f"OK: {log}: {result.lines_checked} lines, chain intact; head {result.head}")
        if result.torn_lines:
            print(
                f"WARNING: lines {list(result.torn_lines)} are writes cut short by a crash "
                "(sealed and chained over by the next append; their events are incomplete)",
                file=sys.stderr,
            )
        return EXIT_OK
    print(f"BROKEN: {log}: {result.reason}", file=sys.stderr)
    print(f"first bad line: {result.first_bad_line}; last good head {result.head}")
    return EXIT_BROKEN


def run(args: argparse.Namespace) -> int:
    try:
        log = locate(args).audit_log
        if args.audit_command == "verify":
            return _run_verify(log, args.anchor)
        return _run_query(args, log)
    except FileNotFoundError as exc:
        print(
            f"sentinel audit: {exc.filename}: no such audit log (check --log/--config)",
            file=sys.stderr,
        )
    except (OSError, ValueError) as exc:
        print(f"sentinel audit: {exc}", file=sys.stderr)
    return EXIT_ERROR
