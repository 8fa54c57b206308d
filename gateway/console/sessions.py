"""Server-side sessions, CSRF tokens and the per-address login throttle.

Why server-side: the cookie holds only a random id, so logging out or disabling a user ends
the session at once, and nothing about the user can be read or forged from the cookie. A new id
is issued at login (a session id planted before login is worthless: no session fixation). Every
session, also the anonymous one behind the login form, has its own CSRF token, which every POST
must echo in a form field.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "sentinel_session"
MAX_ANONYMOUS = 10_000  # login forms open at once; beyond it the oldest are dropped
ABSOLUTE_S = 12 * 3600.0  # a session ends after this however active it is
THROTTLE_WINDOW_S = 300.0
THROTTLE_MAX = 30  # failed logins per client address per window, whatever the account names


@dataclass
class Session:
    sid: str
    csrf: str
    user: str | None = None  # None: anonymous (the login form)
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    via_proxy: bool = False


class SessionStore:
    def __init__(self, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock()

    def new(self, user: str | None = None, via_proxy: bool = False) -> Session:
        now = self._now()
        s = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), user=user,
                    created=now, seen=now, via_proxy=via_proxy)
        with self._lock:
            self._sessions[s.sid] = s
            anonymous = [x for x in self._sessions.values() if x.user is None]
            if len(anonymous) > MAX_ANONYMOUS:
                for old in sorted(anonymous, key=lambda x: x.created)[:len(anonymous) // 10]:
                    self._sessions.pop(old.sid, None)
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id (its idle clock restarted), or None."""
        if not sid:
            return None
        now = self._now()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if now - s.seen > self.idle_timeout_s or now - s.created > ABSOLUTE_S:
                del self._sessions[sid]
                return None
            s.seen = now
            return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def drop_user(self, user: str) -> None:
        """End every session of ``user`` (disabled, locked, password changed)."""
        with self._lock:
            for sid in [k for k, s in self._sessions.items() if s.user == user]:
                del self._sessions[sid]


def csrf_ok(session: Session | None, token: str | None) -> bool:
    return (session is not None and bool(token)
            and hmac.compare_digest(session.csrf.encode(), str(token).encode()))


class LoginThrottle:
    """Failed logins per client address; beyond THROTTLE_MAX in the window, refuse to try
    (the per-account lockout stops guessing one password; this stops spraying many names)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str) -> deque[float]:
        now = self._clock()
        q = self._failures.setdefault(address, deque())
        while q and now - q[0] > THROTTLE_WINDOW_S:
            q.popleft()
        return q

    def blocked(self, address: str) -> bool:
        with self._lock:
            return len(self._recent(address)) >= THROTTLE_MAX

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self._clock())
