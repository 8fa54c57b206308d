"""The operator actions behind the console's buttons: release (optionally confirmed by a
second reviewer) and purge, through gateway.cmd_quarantine's own functions, the code behind
``sentinel quarantine release|purge``; nothing here moves a file itself."""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.audit import utc_now_iso
from gateway.cmd_quarantine import ReleaseRefused, check_account, purge_held, release_instance
from gateway.console.app import Console
from gateway.quarantine import NotQuarantined, QuarantineRecord
from gateway.spool import write_json_durable


def actor_name(user: str) -> str:
    """The audit log's actor for a console user (the CLI records an OS account)."""
    return f"console:{user}"


@dataclass(frozen=True)
class Pending:
    """A release one reviewer asked for and a second must confirm."""

    id: str
    sop_uids: tuple[str, ...]
    study_uid: str
    reason: str
    requested_by: str
    requested_at: str
    resend_duplicate: bool = False


class PendingReleases:
    """Requests waiting for a second reviewer, in a JSON file under the state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def all(self) -> list[Pending]:
        try:
            items = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [Pending(**{**i, "sop_uids": tuple(i["sop_uids"])}) for i in items["pending"]]

    def _save(self, items: list[Pending]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        write_json_durable(self.path, {"pending": [asdict(p) for p in items]})

    def add(self, item: Pending) -> None:
        with self._lock:
            self._save([*self.all(), item])

    def take(self, pending_id: str) -> Pending | None:
        with self._lock:
            items = self.all()
            found = next((p for p in items if p.id == pending_id), None)
            if found is not None:
                self._save([p for p in items if p.id != pending_id])
            return found

    def for_instance(self, sop_uid: str) -> list[Pending]:
        return [p for p in self.all() if sop_uid in p.sop_uids]


def pending_store(console: Console) -> PendingReleases:
    return PendingReleases(console.cfg.state_dir / "console" / "pending.json")


def targets(console: Console, record: QuarantineRecord, scope: str) -> list[str]:
    """The SOP Instance UIDs an action on ``record`` covers: itself, or its whole study."""
    if scope == "study":
        return console.index.sops_of_study(record.study_uid) or [record.sop_uid]
    return [record.sop_uid]


def release(console: Console, sop_uids: list[str], *, reason: str, actor: str,
            resend_duplicate: bool = False) -> tuple[list[str], list[str]]:
    """Release each instance as the CLI does; (released UIDs, error messages)."""
    if not reason.strip():
        raise ValueError("a release needs a reason (it goes into the audit log)")
    check_account(console.cfg.state_dir)
    done, errors = [], []
    for sop in sop_uids:
        try:
            release_instance(console.quarantine, console.paths, sop, reason=reason,
                             actor=actor, resend_duplicate=resend_duplicate, cfg=console.cfg)
            done.append(sop)
        except (OSError, ValueError, ReleaseRefused, NotQuarantined) as exc:
            errors.append(str(exc))
    console.sync()
    return done, errors


def request_release(console: Console, record: QuarantineRecord, sop_uids: list[str], *,
                    reason: str, user: str, resend_duplicate: bool) -> Pending:
    if not reason.strip():
        raise ValueError("a release needs a reason (it goes into the audit log)")
    item = Pending(id=secrets.token_hex(8), sop_uids=tuple(sop_uids),
                   study_uid=record.study_uid, reason=reason, requested_by=user,
                   requested_at=utc_now_iso(), resend_duplicate=resend_duplicate)
    pending_store(console).add(item)
    for sop in sop_uids:
        console.audit.append("release-requested", actor=actor_name(user), sop_uid=sop,
                             study_uid=record.study_uid, reason=reason,
                             detail="waiting for a second reviewer")
    return item


def purge(console: Console, record: QuarantineRecord, scope: str, *, reason: str,
          actor: str) -> list[QuarantineRecord]:
    if not reason.strip():
        raise ValueError("a purge needs a reason (it goes into the audit log)")
    check_account(console.cfg.state_dir)
    if scope == "study":
        purged = purge_held(console.quarantine, actor=actor, reason=reason,
                            study=record.study_uid)
    else:
        purged = purge_held(console.quarantine, actor=actor, reason=reason,
                            sop_uid=record.sop_uid)
    console.sync()
    return purged
