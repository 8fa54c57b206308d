"""Local console accounts: a JSON file of argon2id hashes, roles, and the lockout counter.

Why a file and not a database: the site has one small team of reviewers, and the file is managed
with ``sentinel console user ...`` on the host like the rest of the configuration. It is written
atomically (temp file, fsync, rename) with mode 0600 under an ``flock``, so the CLI and the
running console can both change it (a failed login counts in the file, so a restart does not
reset a lockout). No password is ever stored, logged or taken from the command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.audit import utc_now_iso
from gateway.quarantine import _write_atomic

# What each role may do. ``images``: see PHI-bearing pixels (image, heat map).
PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"quarantine", "audit", "health"}),
    "reviewer": frozenset({"quarantine", "images", "release", "purge", "audit", "health"}),
    "auditor": frozenset({"audit", "health"}),
    "admin": frozenset({"quarantine", "images", "release", "purge", "audit", "health", "users"}),
}
ROLES = tuple(PERMISSIONS)
MAX_FAILED = 10  # consecutive bad passwords that lock an account
MIN_PASSWORD = 10
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HASHER = PasswordHasher()  # argon2id, the library's current defaults
# Verified against when the account does not exist, so an unknown name costs the same time.
_DUMMY_HASH = _HASHER.hash("not-a-password-of-anyone")


class AccountError(ValueError):
    """An account operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    disabled: bool = False
    locked: bool = False
    failed: int = 0

    @property
    def active(self) -> bool:
        return not self.disabled and not self.locked

    def can(self, permission: str) -> bool:
        return self.active and permission in PERMISSIONS.get(self.role, frozenset())


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise AccountError(f"user name {name!r}: use 1-64 letters, digits, or _ . @ -")
    return name


def check_role(role: str) -> str:
    if role not in PERMISSIONS:
        raise AccountError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password too short: use at least {MIN_PASSWORD} characters")
    return password


class Accounts:
    """The users file at ``path``; every method reads it fresh (the CLI may have changed it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The file's users, under an exclusive lock; what the block leaves is written back."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self._read()
            before = json.dumps(users, sort_keys=True)
            yield users
            if json.dumps(users, sort_keys=True) != before:
                self._write(users)
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise AccountError(f"{self.path}: not a users file ({exc}); restore it from a "
                               "backup or move it away and add the users again") from exc
        users = doc.get("users") if isinstance(doc, dict) else None
        if not isinstance(users, dict):
            raise AccountError(f"{self.path}: has no 'users' object; restore it from a backup")
        return users

    def _write(self, users: dict[str, Any]) -> None:
        data = json.dumps({"version": 1, "users": users}, indent=1, sort_keys=True).encode()
        _write_atomic(self.path, data, mode=0o600)
        os.chmod(self.path, 0o600)  # a temp file left by a crash may have had another mode

    @staticmethod
    def _user(name: str, entry: dict[str, Any]) -> User:
        return User(name=name, role=str(entry.get("role", "")),
                    disabled=bool(entry.get("disabled", False)),
                    locked=bool(entry.get("locked", False)), failed=int(entry.get("failed", 0)))

    def list(self) -> list[User]:
        users = self._read()
        return [self._user(n, users[n]) for n in sorted(users)]

    def get(self, name: str) -> User | None:
        entry = self._read().get(name)
        return None if entry is None else self._user(name, entry)

    def add(self, name: str, role: str, password: str) -> User:
        check_name(name)
        check_role(role)
        check_password(password)
        with self._locked() as users:
            if name in users:
                raise AccountError(f"user {name!r} exists: use `user passwd` to change it")
            users[name] = {"role": role, "hash": _HASHER.hash(password), "disabled": False,
                           "locked": False, "failed": 0, "changed": utc_now_iso()}
            return self._user(name, users[name])

    def _change(self, name: str, **values: Any) -> User:
        with self._locked() as users:
            if name not in users:
                raise AccountError(f"no user {name!r} (see `sentinel console user list`)")
            users[name].update(values, changed=utc_now_iso())
            return self._user(name, users[name])

    def set_password(self, name: str, password: str) -> User:
        """New password; also unlocks the account (the admin chose to let it in again)."""
        check_password(password)
        return self._change(name, hash=_HASHER.hash(password), locked=False, failed=0)

    def set_role(self, name: str, role: str) -> User:
        return self._change(name, role=check_role(role))

    def disable(self, name: str) -> User:
        return self._change(name, disabled=True)

    def enable(self, name: str) -> User:
        """Enable and unlock."""
        return self._change(name, disabled=False, locked=False, failed=0)

    def authenticate(self, name: str, password: str) -> tuple[User | None, bool]:
        """(the user, when the password is right and the account active; whether this attempt
        locked the account). A wrong password counts toward MAX_FAILED even on a locked or
        disabled account's name; an unknown name costs the same argon2 time."""
        with self._locked() as users:
            entry = users.get(name)
            if entry is None:
                with contextlib.suppress(VerificationError, InvalidHashError):
                    _HASHER.verify(_DUMMY_HASH, password)
                return None, False
            try:
                _HASHER.verify(str(entry.get("hash", "")), password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                entry["failed"] = int(entry.get("failed", 0)) + 1
                newly = not entry.get("locked") and entry["failed"] >= MAX_FAILED
                if newly:
                    entry["locked"] = True
                return None, newly
            user = self._user(name, entry)
            if not user.active:
                return None, False
            entry["failed"] = 0
            if _HASHER.check_needs_rehash(str(entry["hash"])):
                entry["hash"] = _HASHER.hash(password)
            return self._user(name, entry), False
