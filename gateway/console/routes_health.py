"""The health page: counts over time and flag rates (from the audit log, as the console's
index follows it), queues and dead letters per destination and spool space (from the spool
itself), and the model bundle in use."""

from __future__ import annotations

import functools
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.console.app import Console, guard, page
from gateway.console.charts import bar_chart, line_chart
from gateway.spool import SpoolLayout, free_bytes, list_outbox

SERIES = ("received", "screened", "flagged", "forwarded", "quarantined")
WINDOWS = {"24h": 24, "7d": 24 * 7}


@functools.lru_cache(maxsize=4)
def bundle_info(bundle: str | None) -> dict[str, Any]:
    """The bundle's id and threshold (its digests are verified once, as ``sentinel check``)."""
    from detector.bundle import load_manifest
    from detector.errors import BundleError

    try:
        m = load_manifest(bundle)
    except (BundleError, OSError, ValueError) as exc:
        return {"id": "unavailable", "threshold": None, "error": str(exc)}
    return {"id": getattr(m, "bundle_id", "?"), "threshold": getattr(m, "threshold", None),
            "error": ""}


def queues(console: Console) -> list[dict[str, Any]]:
    """Per destination: waiting instances, the oldest one's age, dead letters."""
    layout = SpoolLayout(console.cfg.state_dir)
    now = time.time()
    out = []
    for name in console.cfg.destinations:
        waiting = list_outbox(layout.outbox(name))
        oldest = None
        if waiting:
            seq = waiting[0].split("-", 1)[0]  # <time_ns>-<uid>.dcm, in receipt order
            oldest = max(0.0, now - int(seq) / 1e9) if seq.isdigit() else None
        out.append({"name": name, "depth": len(waiting), "oldest_s": oldest,
                    "dead": len(list_outbox(layout.dead(name)))})
    return out


def _rates(totals: dict[str, int], kind: str) -> list[tuple[str, float, str]]:
    rows = []
    for key, screened in sorted(totals.items()):
        parts = key.split("|", 2)
        if len(parts) != 3 or parts[0] != "screened" or parts[1] != kind:
            continue
        flagged = totals.get(f"flagged|{kind}|{parts[2]}", 0)
        rows.append((parts[2], flagged / screened if screened else 0.0,
                     f"({flagged}/{screened})"))
    return rows


@guard("health")
async def health(request: Request) -> Response:
    console: Console = request.app.state.console
    window = request.query_params.get("window", "24h")
    hours = WINDOWS.get(window, 24)
    series = console.health.series(hours)
    labels = [h for h, _ in series]
    counts = {name: [float(c.get(name, 0)) for _, c in series] for name in SERIES}
    totals: dict[str, int] = {}
    for _, c in series:
        for k, v in c.items():
            totals[k] = totals.get(k, 0) + v
    layout = SpoolLayout(console.cfg.state_dir)
    try:
        free = free_bytes(layout.root if layout.root.exists() else console.cfg.state_dir)
    except OSError:
        free = None
    bundle = console.cfg.detector.bundle
    info = await run_in_threadpool(bundle_info, str(bundle) if bundle else None)
    return page(request, "health.html", {
        "window": window, "windows": WINDOWS,
        "counts_svg": line_chart(labels, counts, title=f"instances per hour, last {window}"),
        "mod_svg": bar_chart(_rates(totals, "mod"), title="flag rate per modality"),
        "caller_svg": bar_chart(_rates(totals, "ae"), title="flag rate per caller"),
        "queues": await run_in_threadpool(queues, console),
        "free_mb": None if free is None else free / 2**20,
        "min_free_mb": console.cfg.state.min_free_bytes / 2**20,
        "bundle": info, "thresholds": dict(console.cfg.detector.thresholds),
        "caught_up": console.follower.caught_up or not console.follow,
    })


ROUTES = [Route("/health", health, methods=["GET"])]
