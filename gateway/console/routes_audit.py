"""The audit page: search (gateway.audit.query, as ``sentinel audit query``), the chain's
verification (gateway.audit.verify, as ``sentinel audit verify``) and export."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.audit import EVENTS, FIELDS, VerifyResult, parse_time, query, verify
from gateway.console.app import Console, error, guard, page
from gateway.quarantine import check_uid

SHOWN = 500  # newest matches shown on the page; export has them all
CSV_COLUMNS = ("time", "event", *sorted(FIELDS), "prev", "hash")
_verified: dict[str, tuple[tuple[int, int], VerifyResult]] = {}
_verify_lock = threading.Lock()


def _search(request: Request) -> tuple[dict[str, Any], str]:
    q = request.query_params
    args: dict[str, Any] = {}
    for key in ("since", "until"):
        if q.get(key, "").strip():
            args[key] = parse_time(q[key].strip())
    event = q.get("event", "").strip()
    if event:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        args["event"] = event
    if q.get("caller", "").strip():
        args["calling_ae"] = q["caller"].strip()
    if q.get("study", "").strip():
        args["study_uid"] = check_uid(q["study"].strip(), "Study Instance UID")
    if q.get("verdict", "").strip():
        args["verdict"] = q["verdict"].strip()
    shown = {k: q.get(k, "").strip() for k in ("since", "until", "event", "caller", "study",
                                               "verdict")}
    return args, urlencode({k: v for k, v in shown.items() if v})


def chain_status(console: Console) -> VerifyResult | None:
    """``verify`` of the whole log, cached until the file changes (None: no log yet)."""
    path = console.cfg.audit_path
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_size, st.st_mtime_ns)
    with _verify_lock:
        cached = _verified.get(str(path))
        if cached is not None and cached[0] == key:
            return cached[1]
    result = verify(path)
    with _verify_lock:
        _verified[str(path)] = (key, result)
    return result


def _matches(console: Console, args: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        yield from query(console.cfg.audit_path, **args)
    except FileNotFoundError:
        return


@guard("audit")
async def audit_page(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        args, qs = _search(request)
    except ValueError as exc:
        return error(request, 400, f"bad search: {exc}")

    def newest() -> tuple[list[dict[str, Any]], int]:
        rows: deque[dict[str, Any]] = deque(maxlen=SHOWN)
        n = 0
        for record in _matches(console, args):
            rows.append(record)
            n += 1
        return list(reversed(rows)), n

    rows, total = await run_in_threadpool(newest)
    status = await run_in_threadpool(chain_status, console)
    return page(request, "audit.html", {
        "rows": rows, "total": total, "shown": SHOWN, "status": status, "qs": qs,
        "events": sorted(EVENTS), "q": dict(request.query_params),
        "hidden": ("time", "event", "prev", "hash"),
    })


@guard("audit")
async def export(request: Request) -> Response:
    console: Console = request.app.state.console
    fmt = request.path_params["fmt"]
    if fmt not in ("jsonl", "csv"):
        return error(request, 404, "export as audit.jsonl or audit.csv")
    try:
        args, _ = _search(request)
    except ValueError as exc:
        return error(request, 400, f"bad search: {exc}")

    def lines() -> Iterator[str]:
        if fmt == "jsonl":
            for record in _matches(console, args):
                yield json.dumps(record, separators=(",", ":")) + "\n"
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in _matches(console, args):
            writer.writerow(record)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()

    media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    return StreamingResponse(lines(), media_type=media, headers={
        "Content-Disposition": f'attachment; filename="audit.{fmt}"'})


ROUTES = [
    Route("/audit", audit_page, methods=["GET"]),
    Route("/audit/export.{fmt}", export, methods=["GET"]),
]
