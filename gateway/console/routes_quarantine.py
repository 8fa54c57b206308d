"""Quarantine pages: the filtered, paged list; one instance's detail with its pictures and
audit trail; release, second-reviewer confirmation and purge."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.audit import parse_time
from gateway.console import review
from gateway.console.app import Console, client_address, error, guard, page
from gateway.console.index import FILTERS
from gateway.quarantine import NotQuarantined, QuarantineRecord, check_uid

PER_PAGE = 50
TRAIL_LIMIT = 200


def _filters(request: Request) -> tuple[dict[str, str], str]:
    """The list's filters from the query string, checked (a bad one is a 400 message)."""
    q = request.query_params
    out = {k: q.get(k, "").strip() for k in FILTERS}
    if out["min_score"]:
        float(out["min_score"])  # ValueError: reported to the user
    for key in ("since", "until"):
        if out[key]:  # stored times are ISO 8601 UTC with Z: compare in that form
            out[key] = parse_time(out[key]).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if out["study"]:
        check_uid(out["study"], "Study Instance UID")
    return out, urlencode({k: v for k, v in out.items() if v})


@guard("quarantine")
async def listing(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        filters, query = _filters(request)
        number = int(request.query_params.get("page", "1"))
    except ValueError as exc:
        return error(request, 400, f"bad filter: {exc}")
    result = console.index.page(filters, number, PER_PAGE)
    return page(request, "quarantine_list.html", {
        "result": result, "filters": filters, "query": query,
        "modalities": console.index.choices("modality"),
        "callers": console.index.choices("calling_ae"),
        "reasons": console.index.choices("reason"),
        "message": request.query_params.get("m", ""),
    })


def _record(console: Console, sop_uid: str) -> QuarantineRecord:
    """The held record, found through the index's study (one folder, not a search of every
    study's: a made-up UID must not cost a walk of 100,000 folders); only while the index is
    still being built, by a search. NotQuarantined or ValueError (not a UID)."""
    check_uid(sop_uid, "SOP Instance UID")
    study = console.index.study_of(sop_uid)
    if study is None:
        console.sync()  # quarantined a moment ago: its audit line may not be read yet
        study = console.index.study_of(sop_uid)
    record = console.quarantine.get_in_study(study, sop_uid) if study else None
    if record is None and not console.index.ready:
        record = console.quarantine.get(sop_uid)
    if record is None:
        console.index.remove(sop_uid)
        raise NotQuarantined(f"SOP Instance {sop_uid} is not in the quarantine")
    return record


def instance_trail(console: Console, sop_uid: str) -> list[dict[str, object]]:
    """The audit lines naming this instance, oldest first (a byte search, then JSON)."""
    needle = f'"sop_uid":"{sop_uid}"'.encode()
    found: list[dict[str, object]] = []
    try:
        with console.cfg.audit_path.open("rb") as f:
            for raw in f:
                if needle in raw:
                    try:
                        found.append(json.loads(raw))
                    except ValueError:
                        continue
    except FileNotFoundError:
        return []
    return found[-TRAIL_LIMIT:]


@guard("quarantine")
async def detail(request: Request) -> Response:
    console: Console = request.app.state.console
    sop = request.path_params["sop_uid"]
    try:
        record = _record(console, sop)
    except (NotQuarantined, ValueError):
        return error(request, 404, "no such instance in the quarantine (released or purged?)")
    trail = await run_in_threadpool(instance_trail, console, sop)
    pending = review.pending_store(console).for_instance(sop)
    return page(request, "quarantine_detail.html", {
        "r": record, "fields": asdict(record), "trail": trail, "pending": pending,
        "study_count": len(console.index.sops_of_study(record.study_uid)),
        "message": request.query_params.get("m", ""),
    })


async def _picture(request: Request, which: str) -> Response:
    console: Console = request.app.state.console
    sop = request.path_params["sop_uid"]
    try:
        record = _record(console, sop)
        path = console.quarantine.instance_path(sop)
        image, heat = await run_in_threadpool(console.renderer.pictures, path)
    except (NotQuarantined, ValueError, OSError):
        return error(request, 404, "no picture: not in the quarantine, or not decodable")
    # PHI access: who saw which instance's pixels, when (the audit line's time)
    console.audit.append("image-viewed", actor=review.actor_name(request.state.auth.user.name),
                         sop_uid=record.sop_uid, study_uid=record.study_uid, detail=which,
                         peer=client_address(request))
    return Response(image if which == "image" else heat, media_type="image/png",
                    headers={"Cache-Control": "no-store, private"})


@guard("images")
async def image(request: Request) -> Response:
    return await _picture(request, "image")


@guard("images")
async def heatmap(request: Request) -> Response:
    return await _picture(request, "heatmap")


def _back(sop: str, message: str) -> Response:
    return RedirectResponse(f"/quarantine/{sop}?{urlencode({'m': message})}", 303)


@dataclass(frozen=True)
class _Action:
    """What a release or purge POST names: the held record, the form, who, and the reason."""

    console: Console
    record: QuarantineRecord
    form: Any
    user: str
    reason: str
    scope: str


def _action(request: Request) -> _Action | Response:
    console: Console = request.app.state.console
    form = request.state.form
    try:
        record = _record(console, request.path_params["sop_uid"])
    except (NotQuarantined, ValueError):
        return error(request, 404, "no such instance in the quarantine")
    return _Action(console, record, form, request.state.auth.user.name,
                   str(form.get("reason", "")).strip(),
                   "study" if form.get("scope") == "study" else "instance")


@guard("release")
async def release(request: Request) -> Response:
    act = _action(request)
    if isinstance(act, Response):
        return act
    console, record, form, user, reason, scope = (act.console, act.record, act.form, act.user,
                                                  act.reason, act.scope)
    sop = record.sop_uid
    resend = form.get("resend_duplicate") == "yes"
    if not reason:
        return _back(sop, "A release needs a reason.")
    sops = review.targets(console, record, scope)
    if console.settings.second_reviewer:
        await run_in_threadpool(review.request_release, console, record, sops, reason=reason,
                                user=user, resend_duplicate=resend)
        return _back(sop, f"Release of {len(sops)} instance(s) requested: a second reviewer "
                     "must confirm it.")
    done, errors = await run_in_threadpool(review.release, console, sops, reason=reason,
                                           actor=review.actor_name(user),
                                           resend_duplicate=resend)
    return _after(sop, done, errors)


def _after(sop: str, done: list[str], errors: list[str]) -> Response:
    """Back to the list when the instance left the quarantine, else to its page, with what
    happened (a refused release names why, as the CLI does)."""
    message = f"released {len(done)} instance(s)" + (f"; not released: {' | '.join(errors)}"
                                                     if errors else "")
    if sop in done:
        return RedirectResponse(f"/quarantine?{urlencode({'m': message})}", 303)
    return _back(sop, message)


@guard("release")
async def confirm(request: Request) -> Response:
    """A second reviewer confirms (or anyone with release rights cancels) a pending release."""
    console: Console = request.app.state.console
    user = request.state.auth.user.name
    store = review.pending_store(console)
    pid = request.path_params["pending_id"]
    item = next((p for p in store.all() if p.id == pid), None)
    if item is None:
        return error(request, 404, "no such pending release")
    sop = request.path_params["sop_uid"]
    if request.state.form.get("action") == "cancel":
        store.take(pid)
        return _back(sop, "pending release cancelled")
    if item.requested_by == user:
        return _back(sop, "the second reviewer must be someone else than the one who asked")
    if store.take(pid) is None:
        return error(request, 404, "no such pending release")
    reason = f"{item.reason} (requested by {item.requested_by}, confirmed by {user})"
    done, errors = await run_in_threadpool(review.release, console, list(item.sop_uids),
                                           reason=reason, actor=review.actor_name(user),
                                           resend_duplicate=item.resend_duplicate)
    return _after(sop, done, errors)


@guard("purge")
async def purge(request: Request) -> Response:
    act = _action(request)
    if isinstance(act, Response):
        return act
    sop = act.record.sop_uid
    if act.form.get("confirm") != "yes":
        return _back(sop, "Tick the confirmation box to purge: the instance is deleted.")
    if not act.reason:
        return _back(sop, "A purge needs a reason.")
    try:
        purged = await run_in_threadpool(review.purge, act.console, act.record, act.scope,
                                         reason=act.reason, actor=review.actor_name(act.user))
    except (NotQuarantined, OSError, ValueError) as exc:
        return _back(sop, f"not purged: {exc}")
    return RedirectResponse(f"/quarantine?{urlencode({'m': f'purged {len(purged)}'})}", 303)


ROUTES = [
    Route("/quarantine", listing, methods=["GET"]),
    Route("/quarantine/{sop_uid}", detail, methods=["GET"]),
    Route("/quarantine/{sop_uid}/image.png", image, methods=["GET"]),
    Route("/quarantine/{sop_uid}/heatmap.png", heatmap, methods=["GET"]),
    Route("/quarantine/{sop_uid}/release", release, methods=["POST"]),
    Route("/quarantine/{sop_uid}/pending/{pending_id}", confirm, methods=["POST"]),
    Route("/quarantine/{sop_uid}/purge", purge, methods=["POST"]),
]
