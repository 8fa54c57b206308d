"""Sign-in, sign-out and (admin) user management pages."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.console.accounts import MAX_FAILED, ROLES, AccountError, check_name
from gateway.console.app import Console, authenticate, client_address, error, guard, page
from gateway.console.sessions import COOKIE, csrf_ok

_NEXT = re.compile(r"^/[A-Za-z0-9._/-]*$")  # a local path only: no //host, no scheme


def _safe_next(value: object) -> str:
    text = value if isinstance(value, str) else ""
    ok = _NEXT.fullmatch(text) and not text.startswith("//") and ".." not in text
    return text if ok else "/"


def _anonymous(console: Console, request: Request) -> tuple[str, str]:
    """(session id, CSRF token) of the login form's anonymous session (new if none)."""
    session = console.sessions.get(request.cookies.get(COOKIE))
    if session is None:
        session = console.sessions.new()
        request.state.set_cookie = session.sid
    return session.sid, session.csrf


async def home(request: Request) -> Response:
    console: Console = request.app.state.console
    auth = authenticate(console, request)
    if auth is None:
        return RedirectResponse("/login", 303)
    return RedirectResponse("/quarantine" if auth.user.can("quarantine") else "/audit", 303)


async def login_form(request: Request, message: str = "", status: int = 200) -> Response:
    console: Console = request.app.state.console
    _, csrf = _anonymous(console, request)
    return page(request, "login.html", {"login_csrf": csrf, "message": message,
                                        "next": _safe_next(request.query_params.get("next"))},
                status)


async def login(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await request.form()
    session = console.sessions.get(request.cookies.get(COOKIE))
    token = form.get("csrf")
    if not csrf_ok(session, token if isinstance(token, str) else None):
        return await login_form(request, "The form expired: sign in again.", 403)
    assert session is not None
    address = client_address(request)
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    if console.throttle.blocked(address):
        return await login_form(request, "Too many failed sign-ins from your address: wait a "
                                "few minutes.", 429)
    try:
        check_name(name)
    except AccountError:
        name = ""
    user, locked_now = (console.accounts.authenticate(name, password) if name
                        else (None, False))
    if user is None:
        console.throttle.failed(address)
        shown = name or "(invalid name)"
        console.audit.append("console-login-failed", actor=shown, peer=address)
        if locked_now:
            console.audit.append("console-locked", actor=shown, peer=address,
                                 detail=f"{MAX_FAILED} wrong passwords in a row")
            console.sessions.drop_user(name)
        return await login_form(request, "Wrong user name or password, or the account is "
                                "disabled or locked.", 401)
    # A new session id at sign-in: an id planted before it (session fixation) stays anonymous.
    console.sessions.drop(session.sid)
    fresh = console.sessions.new(user.name)
    request.state.set_cookie = fresh.sid
    console.audit.append("console-login", actor=user.name, peer=address)
    return RedirectResponse(_safe_next(form.get("next")), 303)


@guard(None)
async def logout(request: Request) -> Response:
    console: Console = request.app.state.console
    console.sessions.drop(request.state.auth.session.sid)
    request.state.clear_cookie = True
    return RedirectResponse("/login", 303)


@guard("users")
async def users(request: Request) -> Response:
    console: Console = request.app.state.console
    return page(request, "users.html", {"users": console.accounts.list(), "roles": ROLES,
                                        "message": request.query_params.get("m", "")})


@guard("users")
async def users_change(request: Request) -> Response:
    console: Console = request.app.state.console
    form = request.state.form
    action, name = str(form.get("action", "")), str(form.get("username", ""))
    actor = request.state.auth.user.name
    try:
        check_name(name)
        if action == "add":
            console.accounts.add(name, str(form.get("role", "")), str(form.get("password", "")))
            what = f"added {name} as {form.get('role')}"
        elif action == "role":
            console.accounts.set_role(name, str(form.get("role", "")))
            what = f"set the role of {name} to {form.get('role')}"
        elif action == "disable":
            if name == actor:
                raise AccountError("you cannot disable your own account")
            console.accounts.disable(name)
            what = f"disabled {name}"
        elif action == "enable":
            console.accounts.enable(name)
            what = f"enabled and unlocked {name}"
        else:
            return error(request, 400, f"unknown action {action!r}")
    except AccountError as exc:
        return error(request, 400, str(exc))
    if action in ("disable", "role"):
        console.sessions.drop_user(name)
    console.audit.append("console-user", actor=actor, detail=what)
    return RedirectResponse("/users", 303)


ROUTES = [
    Route("/", home),
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/users", users, methods=["GET"]),
    Route("/users", users_change, methods=["POST"]),
]
