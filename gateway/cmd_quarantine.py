"""List, show, release or purge quarantined instances.

  sentinel quarantine list    (--config F | --state-dir DIR) [--json]
  sentinel quarantine show    SOP_UID [--png FILE] [--json] (--config F | --state-dir DIR)
  sentinel quarantine release SOP_UID --reason TEXT [--destination NAME ...]
                              [--resend-duplicate] (...)
  sentinel quarantine purge   (SOP_UID | --study UID | --older-than DAYS) --reason TEXT (...)

Release sends the held bytes on unchanged and without re-scoring, to the destinations recorded
when the instance was quarantined (or ``--destination``); the running gateway's forwarder picks
them up from its outbox. A destination of kind ``orthanc-rest`` (the plugin form, where no
forwarder runs: gateway.orthanc_plugin) gets them now, by ``POST /instances``, with
``--config``; if that upload fails the instance stays held. Release and purge are written to
the audit log with the operator's OS user name (the real uid's account; under sudo, what
SUDO_USER says is recorded beside it as ``sudo_user``, a claim and not an identity) and the
reason.

A release is refused (exit 3, the instance stays held) when its SOP Instance UID was already
forwarded to a destination within the sent ledger's retention, or a different copy of it is
still waiting in that destination's outbox. Why: the gateway sends each UID once per
destination, so the forwarder would drop the released copy (typically a tampered copy of an
instance already delivered); sent anyway, the PACS would get a second, different object under
one UID, which most PACS reject or store over the first. ``--resend-duplicate`` sends it anyway
(the audit log says so); ``purge`` discards it.

Destination names are path parts: they must be names ([A-Za-z0-9_.-], not . or ..), known to
the config with ``--config``, and, with only ``--state-dir``, existing outboxes of the gateway.

Exit codes: 0 done, 1 no such instance, 2 error, 3 release refused (see above).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit import AuditLog
from gateway.cmd_audit import StatePaths, add_location_arguments, locate
from gateway.quarantine import NotQuarantined, Quarantine, QuarantineRecord

if TYPE_CHECKING:
    from gateway.config import Config, DestinationConfig

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2, 3


class ReleaseRefused(Exception):
    """The release would not do what the operator asks (the forwarder would drop it)."""


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
    rel.add_argument(
        "--resend-duplicate",
        action="store_true",
        help="send even when this SOP Instance UID was already forwarded to a destination: the "
        "PACS gets a second object under the same UID (most reject it or overwrite the first)",
    )

    purge = sub.add_parser("purge", help="delete held instances (audited)")
    target = purge.add_mutually_exclusive_group(required=True)
    target.add_argument("sop_uid", nargs="?", metavar="SOP_UID")
    target.add_argument("--study", metavar="UID", help="every held instance of this study")
    target.add_argument("--older-than", type=float, metavar="DAYS", help="held longer than this")
    add_location_arguments(purge, log_option=False)
    purge.add_argument("--reason", required=True, help="why (goes into the audit log)")


def operator_name() -> str:
    """Who is acting, for the audit log's ``actor``: the account of the real uid, which the
    caller cannot choose (not ``$USER`` nor ``$SUDO_USER``, which any caller can set)."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def sudo_claim() -> str | None:
    """What ``SUDO_USER`` says (sudo sets it to the account that ran sudo, but so can anyone):
    recorded beside ``actor`` as ``sudo_user``, never instead of it."""
    claim = os.environ.get("SUDO_USER", "").strip()
    return claim or None


def check_account(state_dir: Path) -> None:
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


def _outbox_enqueuer(state_dir: Path, resend_duplicate: bool,
                     direct: Mapping[str, DestinationConfig] | None = None,
                     ) -> Callable[[Path, QuarantineRecord], None]:
    """Queue the held bytes for every destination of the record, leaving the source in place
    (the quarantine removes it after this returns); the daemon's forwarder sends them.
    ``resend_duplicate`` marks the entries so the forwarder sends them even under a UID it
    already delivered (only the operator's explicit --resend-duplicate sets it). ``direct``:
    the ``orthanc-rest`` destinations, uploaded to now (SendError if one did not store it)."""
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
        if resend_duplicate:
            meta["resend_duplicate"] = True
        now = [n for n in record.destinations if n in (direct or {})]
        if now:
            from gateway.orthanc_plugin import release_to_orthanc

            for name in now:
                release_to_orthanc((direct or {})[name], src, meta)
        queued = tuple(n for n in record.destinations if n not in now)
        if queued:
            place_in_outboxes(SpoolLayout(state_dir), queued, src, meta, remove_src=False)

    return enqueue


def _check_destinations(names: Sequence[str], paths: StatePaths, given: bool) -> None:
    """Every destination must be a safe name that the gateway knows: in the config with
    --config; with only --state-dir, an existing outbox (the daemon makes one per destination
    at start). ``given``: the names came from --destination (else from the held record)."""
    from gateway.spool import SpoolLayout, check_destination_name

    assert paths.state_dir is not None
    for name in names:
        check_destination_name(name)
    origin = "--destination" if given else "the destination recorded for this instance"
    if paths.destinations is not None:
        unknown = [n for n in names if n not in paths.destinations]
        if unknown:
            raise ValueError(
                f"unknown destination(s) {unknown} ({origin}); the config defines: "
                f"{', '.join(paths.destinations)}"
                + ("" if given else "; name one of those with --destination")
            )
        return
    layout = SpoolLayout(paths.state_dir)
    known = sorted(p.name for p in layout.outbox_root.iterdir()
                   if p.is_dir() and not p.is_symlink()) if layout.outbox_root.is_dir() else []
    for name in names:
        outbox = layout.outbox(name)  # refuses a path that leaves the outbox directory
        if not outbox.is_dir() or outbox.is_symlink():
            raise ValueError(
                f"no outbox for destination {name!r} ({origin}) under {layout.outbox_root}; "
                f"the gateway's outboxes are: {', '.join(known) or 'none'}; name one of those "
                "with --destination, or pass --config so the names come from the gateway's "
                "config"
            )


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duplicates(q: Quarantine, sop_uid: str, names: Sequence[str], paths: StatePaths,
                retention_days: float) -> dict[str, str]:
    """Per destination, why the forwarder would drop this release (already delivered under the
    UID, or a different copy of the UID queued ahead of it); absent where it would be sent."""
    from gateway.spool import SpoolLayout, delivered_at, waiting_in_outbox

    assert paths.state_dir is not None
    layout = SpoolLayout(paths.state_dir)
    held = q.instance_path(sop_uid).read_bytes()
    found: dict[str, str] = {}
    for name in names:
        t = delivered_at(layout, name, sop_uid, retention_days * 86400)
        if t is not None:
            found[name] = f"already forwarded to {name} on {_when(t)}"
            continue
        for entry in waiting_in_outbox(layout, name, sop_uid):
            with contextlib.suppress(FileNotFoundError):  # sent meanwhile: the ledger has it
                if entry.read_bytes() != held:  # the same bytes again: an interrupted release
                    found[name] = f"a different copy is waiting in the outbox of {name}"
                    break
    return found


def direct_destinations(cfg: Config | None) -> dict[str, DestinationConfig]:
    """The ``orthanc-rest`` destinations of ``cfg``: a release uploads to them itself, since
    the plugin form (gateway.orthanc_plugin) runs no forwarder to drain an outbox."""
    if cfg is None:
        return {}
    return {n: d for n, d in cfg.destinations.items() if d.kind == "orthanc-rest"}


def release_instance(q: Quarantine, paths: StatePaths, sop_uid: str, *, reason: str, actor: str,
                     sudo_user: str | None = None, destinations: Sequence[str] | None = None,
                     resend_duplicate: bool = False, cfg: Config | None = None,
                     ) -> tuple[QuarantineRecord, dict[str, str]]:
    """Release one held instance as ``sentinel quarantine release`` does (the review console
    calls this too): check the destinations, refuse a duplicate UID unless
    ``resend_duplicate``, queue the bytes and audit. Returns the record and, per destination,
    why it went out as a duplicate (only with ``resend_duplicate``). ``cfg``: the gateway's
    config, for the sent ledger's retention (None: its default) and the ``orthanc-rest``
    destinations, uploaded to now (the plugin form runs no forwarder); if one does not store
    it, ValueError, and the instance stays held."""
    from gateway.config import RetentionConfig
    from gateway.forward import SendError

    direct = direct_destinations(cfg)
    retention_days = (cfg.retention if cfg is not None else RetentionConfig()).sent_ledger_days
    if paths.state_dir is None:
        raise ValueError("release needs --config or --state-dir (to find the outbox)")
    record = q.get(sop_uid)
    if record is None:
        raise NotQuarantined(f"SOP Instance {sop_uid} is not in the quarantine at {q.root}")
    names = list(destinations) if destinations else list(record.destinations)
    _check_destinations(names, paths, given=bool(destinations))
    # an Orthanc says itself whether it holds the UID (AlreadyStored): no ledger to ask
    duplicates = _duplicates(q, sop_uid, [n for n in names if n not in direct], paths,
                             retention_days)
    if duplicates and not resend_duplicate:
        raise ReleaseRefused(
            f"SOP Instance {sop_uid} not released: an instance with this SOP Instance UID "
            f"was {'; '.join(duplicates.values())}. The gateway sends each UID once per "
            "destination, so this copy would be dropped; sent anyway, the PACS would get a "
            "second, different object under the same UID, which most PACS reject or store over "
            "the first. It stays in the quarantine. To send it anyway: --resend-duplicate; to "
            f"discard it: sentinel quarantine purge {sop_uid} --reason ..."
        )
    try:
        record = q.release(
            sop_uid,
            reason=reason,
            actor=actor,
            sudo_user=sudo_user,
            enqueue=_outbox_enqueuer(paths.state_dir, resend_duplicate, direct),
            destinations=names,
            outcomes={**{name: "queued-duplicate" for name in duplicates},
                      **{name: "stored" for name in direct if name in names}},
        )
    except SendError as exc:
        raise ValueError(f"{sop_uid} not released, it stays in the quarantine: {exc}") from None
    return record, duplicates


def _release(q: Quarantine, paths: StatePaths, args: argparse.Namespace) -> int:
    from gateway.config import load_config

    cfg = load_config(args.config) if args.config is not None else None
    record, duplicates = release_instance(
        q, paths, args.sop_uid, reason=args.reason, actor=operator_name(),
        sudo_user=sudo_claim(), destinations=args.destination,
        resend_duplicate=args.resend_duplicate, cfg=cfg)
    for why in duplicates.values():
        print(f"warning: {args.sop_uid} was {why}; sending a second object under the same UID "
              "as asked (--resend-duplicate)", file=sys.stderr)
    direct = direct_destinations(cfg)
    done = [f"stored in {n}" if n in direct else f"queued for {n}" for n in record.destinations]
    print(f"released {record.sop_uid}: {', '.join(done)}")
    return EXIT_OK


def purge_held(q: Quarantine, *, actor: str, reason: str, sop_uid: str | None = None,
               study: str | None = None, older_than_days: float | None = None,
               sudo_user: str | None = None) -> list[QuarantineRecord]:
    """Purge one instance, a whole study, or what is held longer than ``older_than_days``, as
    ``sentinel quarantine purge`` does (the review console calls this too); audited by the
    quarantine. NotQuarantined when there is nothing to purge."""
    if older_than_days is not None:
        if older_than_days < 0:
            raise ValueError("--older-than must be zero or more days")
        return q.expire(timedelta(days=older_than_days), actor=actor, reason=reason,
                        sudo_user=sudo_user)
    if study is not None:
        if not q.has_study(study):
            raise NotQuarantined(f"Study {study} has nothing in the quarantine at {q.root}")
        return q.purge(study, actor=actor, reason=reason, sudo_user=sudo_user)
    if sop_uid is None or q.get(sop_uid) is None:
        raise NotQuarantined(f"SOP Instance {sop_uid} is not in the quarantine at {q.root}")
    return q.purge(sop_uid, actor=actor, reason=reason, sudo_user=sudo_user)


def _purge(q: Quarantine, args: argparse.Namespace) -> int:
    purged = purge_held(q, actor=operator_name(), reason=args.reason, sop_uid=args.sop_uid,
                        study=args.study, older_than_days=args.older_than,
                        sudo_user=sudo_claim())
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
            check_account(paths.state_dir or paths.quarantine_dir.parent)
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
    except ReleaseRefused as exc:
        print(f"sentinel quarantine: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, ValueError) as exc:
        print(f"sentinel quarantine: {exc}", file=sys.stderr)
        return EXIT_ERROR
