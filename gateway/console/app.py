"""The console's Starlette application: shared state, authentication and the page routes.

Every route declares the permission it needs (``guard``); the check runs in the handler, so an
API call without the button is refused the same way (403). POSTs must carry the session's CSRF
token. Pages are Jinja2 templates with autoescaping; the only assets are the package's own
``static/`` files, and the responses forbid scripts altogether (Content-Security-Policy).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from gateway.audit import AuditLog
from gateway.cmd_audit import StatePaths
from gateway.config import Config
from gateway.console.accounts import Accounts, User
from gateway.console.imaging import Renderer
from gateway.console.index import AuditFollower, HealthCounts, QuarantineIndex
from gateway.console.sessions import COOKIE, LoginThrottle, Session, SessionStore, csrf_ok
from gateway.console.settings import ConsoleConfig, users_path
from gateway.quarantine import Quarantine

LOG = logging.getLogger("sentinel.console")
HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")

Handler = Callable[[Request], Awaitable[Response]]


class Console:
    """What the routes share: the config, the gateway's state, accounts and sessions."""

    def __init__(self, cfg: Config, *, follow: bool = True) -> None:
        self.cfg = cfg
        self.settings: ConsoleConfig = cfg.console or ConsoleConfig()
        self.accounts = Accounts(users_path(cfg.console, cfg.state_dir))
        self.audit = AuditLog(cfg.audit_path)
        self.quarantine = Quarantine(cfg.quarantine_dir, audit=self.audit)
        self.paths = StatePaths(cfg.state_dir, cfg.quarantine_dir, cfg.audit_path,
                                tuple(cfg.destinations))
        self.index = QuarantineIndex(self.quarantine)
        self.health = HealthCounts()
        self.follower = AuditFollower(cfg.audit_path, self.index, self.health)
        self.sessions = SessionStore(self.settings.session_timeout_min * 60.0)
        self.throttle = LoginThrottle()
        self.renderer = Renderer()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.follow = follow

    def sync(self) -> None:
        """Apply the audit lines written so far (after an action: the next page shows it)."""
        self.follower.poll()


@dataclass
class Auth:
    session: Session
    user: User


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _proxy_user(console: Console, request: Request) -> str | None:
    """The user a trusted reverse proxy names, or None (header off, absent, or from a client
    that is not a configured proxy: then it is ignored)."""
    s = console.settings
    if not s.proxy_user_header:
        return None
    name = request.headers.get(s.proxy_user_header)
    if not name:
        return None
    try:
        peer = str(ipaddress.ip_address(client_address(request)))
    except ValueError:
        return None
    if peer not in s.proxy_addresses:
        LOG.warning("ignored %s from %s: not a configured proxy", s.proxy_user_header, peer)
        return None
    return name.strip()


def authenticate(console: Console, request: Request) -> Auth | None:
    """The signed-in user of this request (session cookie, or a trusted proxy's header)."""
    session = console.sessions.get(request.cookies.get(COOKIE))
    proxied = _proxy_user(console, request)
    if proxied is not None and (session is None or session.user != proxied):
        user = console.accounts.get(proxied)
        if user is None or not user.active:
            return None
        session = console.sessions.new(proxied, via_proxy=True)
        request.state.set_cookie = session.sid
    if session is None or session.user is None:
        return None
    user = console.accounts.get(session.user)
    if user is None or not user.active:  # disabled or locked since: the session ends
        console.sessions.drop(session.sid)
        return None
    return Auth(session, user)


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200
         ) -> Response:
    console: Console = request.app.state.console
    auth: Auth | None = getattr(request.state, "auth", None)
    ctx = {"auth": auth, "user": auth.user if auth else None,
           "csrf": auth.session.csrf if auth else "", "settings": console.settings,
           "index": console.index, **context}
    return console.templates.TemplateResponse(request, name, ctx, status_code=status_code)


def error(request: Request, status: int, message: str) -> Response:
    return page(request, "error.html", {"status": status, "message": message}, status)


def guard(permission: str | None) -> Callable[[Handler], Handler]:
    """Require a signed-in user with ``permission`` (None: any signed-in user); a POST must
    also carry the session's CSRF token, checked before the handler reads anything else."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def inner(request: Request) -> Response:
            console: Console = request.app.state.console
            auth = authenticate(console, request)
            if auth is None:
                if request.method == "GET":
                    return RedirectResponse(f"/login?next={request.url.path}", 303)
                return Response("not signed in\n", 401, media_type="text/plain")
            request.state.auth = auth
            if request.method == "POST":
                form = await request.form()
                token = form.get("csrf")
                if not csrf_ok(auth.session, token if isinstance(token, str) else None):
                    return error(request, 403, "missing or wrong CSRF token: reload the page "
                                 "and try again")
                request.state.form = form
            if permission is not None and not auth.user.can(permission):
                return error(request, 403, f"your role ({auth.user.role}) may not do this "
                             f"({permission})")
            return await handler(request)

        return inner

    return wrap


class SecurityHeaders(BaseHTTPMiddleware):
    """Headers on every response, and the session cookie a request asked to set."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        request.state.set_cookie = None
        request.state.clear_cookie = False
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Cache-Control", "no-store")
        console: Console = request.app.state.console
        if console.settings.tls:
            h.setdefault("Strict-Transport-Security", "max-age=31536000")
        if request.state.set_cookie:
            response.set_cookie(COOKIE, request.state.set_cookie, httponly=True,
                                secure=console.settings.tls, samesite="strict", path="/")
        elif request.state.clear_cookie:
            response.delete_cookie(COOKIE, path="/", httponly=True,
                                   secure=console.settings.tls, samesite="strict")
        return response


def create_app(cfg: Config, *, follow: bool = True) -> Starlette:
    """The ASGI app for ``cfg``; ``follow=False`` (tests) leaves the audit follower thread
    out: call ``console.follower.poll()`` / ``console.index.rebuild()`` instead."""
    from gateway.console import routes_audit, routes_auth, routes_health, routes_quarantine

    console = Console(cfg, follow=follow)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if console.follow:
            console.follower.start()
        try:
            yield
        finally:
            if console.follow:
                console.follower.stop()
            console.renderer.close()

    routes = [
        *routes_auth.ROUTES,
        *routes_quarantine.ROUTES,
        *routes_audit.ROUTES,
        *routes_health.ROUTES,
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)], lifespan=lifespan)
    app.state.console = console
    if not follow:
        console.index.rebuild()
    return app


__all__ = ["Auth", "Console", "Route", "create_app", "error", "guard", "page"]
