"""List, show, release or purge quarantined instances.

  sentinel quarantine list    (--config F | --state-dir DIR) [--json]
  sentinel quarantine show    SOP_UID [--png FILE] [--json] (--config F | --state-dir DIR)
  sentinel quarantine release SOP_UID --reason TEXT [--destination NAME ...] (...)
  sentinel quarantine purge   (SOP_UID | --study UID | --older-than DAYS) --reason TEXT (...)

Release sends the held bytes on unchanged and without re-scoring, to the destinations recorded
when the instance was quarantined (or ``--destination``); the running gateway's forwarder picks
them up from its outbox. Release and purge are written to the audit log with the operator's OS
user name and the reason. Exit codes: 0 done, 1 no such instance, 2 error.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from gateway.audit import AuditLog
from gateway.cmd_audit import StatePaths, add_location_arguments, locate
from gateway.quarantine import NotQuarantined, Quarantine, QuarantineRecord

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage lines above
    sub = parser.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="every held instance, oldest first")
    add_location_arguments(ls, log_option=False)
    ls.add_argument("--json", action="store_true", help="a JSON array of sidecar records")

    show = sub.add_parser("show", help="one instance's record; --png renders its residual map")
    show.add_argument("sop_uid", metavar="SOP_UID")
    add_location_arguments(show, log_option=False)
    show.add_argument("--png", type=Path, metavar="FILE", help="write image + residual map PNG")
    show.add_argument("--height", type=int, default=512, help="PNG panel height (default 512)")
    show.add_argument("--json", action="store_true", help="the sidecar record as JSON")

    rel = sub.add_parser("release", help="forward a held instance without re-scoring")
    rel.add_argument("sop_uid", metavar="SOP_UID")
    add_location_arguments(rel, log_option=False)
    rel.add_argument("--reason", required=True, help="why (goes into the audit log)")
    rel.add_argument(
        "--destination",
        action="append",
        metavar="NAME",
        help="send here instead of the recorded destinations (repeatable)",
    )

    purge = sub.add_parser("purge", help="delete held instances (audited)")
    target = purge.add_mutually_exclusive_group(required=True)
    target.add_argument("sop_uid", nargs="?", metavar="SOP_UID")
    target.add_argument("--study", metavar="UID", help="every held instance of this study")
    target.add_argument("--older-than", type=float, metavar="DAYS", help="held longer than this")
    add_location_arguments(purge, log_option=False)
    purge.add_argument("--reason", required=True, help="why (goes into the audit log)")


def operator_name() -> str:
    """Who is acting, for the audit log: the account of the real uid (not ``$USER``, which any
    caller can set) and, under sudo, the account that ran sudo."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid {os.getuid()}"
    invoker = os.environ.get("SUDO_USER")
    return f"{invoker} (sudo as {name})" if invoker and invoker != name else name


def _check_account(state_dir: Path) -> None:
    """Refuse to change the state as another account than its owner: files it created (outbox
    sidecars, the audit log) would be unreadable to the daemon."""
    try:
        owner = state_dir.stat().st_uid
    except FileNotFoundError:
        return
    if owner != os.geteuid():
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise ValueError(
            f"{state_dir} belongs to {name!r}; run this as that account "
            f"(sudo -u {name} sentinel quarantine ...) so the gateway can read what it writes"
        )


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(records: list[QuarantineRecord]) -> None:
    header = ("QUARANTINED AT", "SOP INSTANCE UID", "MOD", "REASON", "SCORE", "THR", "CALLER")
    rows = [
        (
            r.quarantined_at,
            r.sop_uid,
            r.modality,
            r.reason,
            _score(r.score),
            _score(r.threshold),
            r.calling_ae,
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _show(q: Quarantine, args: argparse.Namespace) -> int:
    record = q.get(args.sop_uid)
    if record is None:
        raise NotQuarantined(f"SOP Instance {args.sop_uid} is not in the quarantine at {q.root}")
    path = q.instance_path(args.sop_uid)
    if args.json:
        print(json.dumps({**asdict(record), "path": str(path)}, indent=1))
    else:
        for key, value in asdict(record).items():
            shown = ", ".join(value) if isinstance(value, tuple) else value
            print(f"{key:<15} {'-' if shown is None else shown}")
        print(f"{'path':<15} {path}")
    if args.png is not None:
        from gateway.residual_map import render_instance  # numpy/scipy/Pillow only when asked

        caption = f"{record.modality} {record.reason} score {_score(record.score)}"
        try:
            width, height = render_instance(path, args.png, height=args.height, caption=caption)
        except ValueError as exc:  # PreprocessError: the reason it may be held in the first place
            raise ValueError(f"cannot draw {args.png}: {exc}") from exc
        print(f"wrote {args.png} ({width}x{height})", file=sys.stderr)
    return EXIT_OK


def _outbox_enqueuer(state_dir: Path) -> Callable[[Path, QuarantineRecord], None]:
    """Queue the held bytes for every destination of the record, leaving the source in place
    (the quarantine removes it after this returns); the daemon's forwarder sends them."""
    from gateway.spool import SpoolLayout, place_in_outboxes

    def enqueue(src: Path, record: QuarantineRecord) -> None:
        meta = {
            "sop_uid": record.sop_uid,
            "study_uid": record.study_uid,
            "series_uid": record.series_uid,
            "sop_class": record.sop_class,
            "modality": record.modality,
            "calling_ae": record.calling_ae,
            "peer": record.peer,
            "received_at": record.received_at,
            "released_from_quarantine": True,
        }
        place_in_outboxes(SpoolLayout(state_dir), record.destinations, src, meta, remove_src=False)

    return enqueue


def _release(q: Quarantine, paths: StatePaths, args: argparse.Namespace) -> int:
    if paths.state_dir is None:
        raise ValueError("release needs --config or --state-dir (to find the outbox)")
    if args.destination and paths.destinations is not None:
        unknown = sorted(set(args.destination) - set(paths.destinations))
        if unknown:
            raise ValueError(
                f"unknown destination(s) {unknown}; the config defines: "
                f"{', '.join(paths.destinations)}"
            )
    record = q.release(
        args.sop_uid,
        reason=args.reason,
        actor=operator_name(),
        enqueue=_outbox_enqueuer(paths.state_dir),
        destinations=args.destination,
    )
    print(f"released {record.sop_uid}: queued for {', '.join(record.destinations)}")
    return EXIT_OK


def _purge(q: Quarantine, args: argparse.Namespace) -> int:
    actor = operator_name()
    if args.older_than is not None:
        if args.older_than < 0:
            raise ValueError("--older-than must be zero or more days")
        purged = q.expire(timedelta(days=args.older_than), actor=actor, reason=args.reason)
    elif args.study is not None:
        if not q.has_study(args.study):
            raise NotQuarantined(f"Study {args.study} has nothing in the quarantine at {q.root}")
        purged = q.purge(args.study, actor=actor, reason=args.reason)
    else:
        if q.get(args.sop_uid) is None:
            raise NotQuarantined(
                f"SOP Instance {args.sop_uid} is not in the quarantine at {q.root}"
            )
        purged = q.purge(args.sop_uid, actor=actor, reason=args.reason)
    for record in purged:
        print(f"purged {record.sop_uid} (study {record.study_uid})")
    print(f"{len(purged)} instance(s) purged", file=sys.stderr)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        paths = locate(args)
        if paths.quarantine_dir is None:  # only with --log, which these commands do not offer
            raise ValueError("no quarantine directory: pass --config or --state-dir")
        q = Quarantine(paths.quarantine_dir, audit=AuditLog(paths.audit_log))
        command = args.quarantine_command
        if command in ("release", "purge"):
            _check_account(paths.state_dir or paths.quarantine_dir.parent)
        if command == "list":
            records = q.list()
            if args.json:
                print(json.dumps([asdict(r) for r in records], indent=1))
            else:
                _print_table(records)
            return EXIT_OK
        if command == "show":
            return _show(q, args)
        if command == "release":
            return _release(q, paths, args)
        return _purge(q, args)
    except NotQuarantined as exc:
        print(f"sentinel quarantine: {exc.args[0]}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OSError, ValueError) as exc:
        print(f"sentinel quarantine: {exc}", file=sys.stderr)
        return EXIT_ERROR
