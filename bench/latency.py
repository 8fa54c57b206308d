"""Added latency: end of the C-STORE into the gateway -> end of the forwarded C-STORE into
Orthanc, p50 and p95 per image size.

How it is measured: a pynetdicom SCU (``TCP_NODELAY`` on, one association) sends one instance
at a time; the clock starts when the gateway's C-STORE response arrives (the modality's view
of "stored") and stops at the gateway's ``forwarded`` audit line for that SOP UID, which the
forwarder writes after Orthanc's C-STORE response and its own sent-ledger fsync (so the figure
is, if anything, a millisecond or two pessimistic; audit times have 1 ms resolution). The next
instance is sent once the previous one is forwarded (plus a short gap), so this is the latency
of an unqueued instance: screening + spool moves + forwarding. The first instance of each
repeat opens the forwarding association and is reported apart (cold).

    .venv/bin/python -m bench.latency
    .venv/bin/python -m bench.latency --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from bench.common import (
    GATEWAY_AE,
    MODALITY_AE,
    ORTHANC_AE,
    bundle_dir,
    free_port,
    gateway,
    issue_sets,
    loadavg,
    orthanc,
    percentile,
    print_header,
    summarize,
    tree_hwm_mb,
    wait_until,
    workdir,
)
from tests.dicom_factory import sop_uid_of

TARGET_P50_MS = {"512x512": 50.0, "2048x2500": 150.0}
GAP_S = 0.05


def _nodelay(event: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(port: int, called: str) -> Any:
    # Stream the file as stored (no decode/re-encode), like the gateway's forwarder does.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=MODALITY_AE)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"could not associate with {called} on port {port}")
    return assoc


def direct_store_ms(work: Path, files: list[Path]) -> list[float]:
    """The baseline: each C-STORE's duration from the same SCU straight into a fresh Orthanc."""
    out: list[float] = []
    with orthanc(work / "orthanc-direct") as pacs:
        assoc = _associate(pacs.dicom_port, ORTHANC_AE)
        try:
            for f in files:
                t0 = time.perf_counter()
                status = assoc.send_c_store(f)
                out.append((time.perf_counter() - t0) * 1000.0)
                if int(getattr(status, "Status", -1)) != 0:
                    raise RuntimeError(f"Orthanc answered {status!r} for {f.name}")
                time.sleep(GAP_S)
        finally:
            assoc.release()
    return out[1:]


def measure(work: Path, files: list[Path], bundle: Path, workers: int
            ) -> tuple[list[float], float, float, list[float]]:
    """Latencies (ms) of files[1:], the cold first one, the gateway's peak RSS, and for
    files[1:] the part until the 'scored' audit line (queue, read, decode, score)."""
    port = free_port()
    uids = [sop_uid_of(f) for f in files]
    with orthanc(work / "orthanc", gateway_port=port) as pacs, \
            gateway(work / "gw", pacs.dicom_port, port, bundle, workers=workers) as gw:
        assoc = _associate(port, GATEWAY_AE)
        lat: list[float] = []
        acks: dict[str, float] = {}
        try:
            for f, uid in zip(files, uids, strict=True):
                status = assoc.send_c_store(f)
                t_ack = time.time()
                if int(getattr(status, "Status", -1)) != 0:
                    raise RuntimeError(f"gateway answered {status!r} for {f.name}")
                if not wait_until(lambda u=uid: u in gw.forwarded_times(), timeout=60,
                                  interval=0.005):
                    raise RuntimeError(f"{f.name} not forwarded: {gw.proc.log()[-1500:]}")
                lat.append((gw.forwarded_times()[uid] - t_ack) * 1000.0)
                acks[uid] = t_ack
                time.sleep(GAP_S)
        finally:
            assoc.release()
        rss = tree_hwm_mb(gw.pid)[0]
        scored = gw.scored_times()
        to_scored = [(scored[u] - acks[u]) * 1000.0 for u in uids[1:] if u in scored]
        if pacs.wait_for_count(len(files), timeout=60) != len(files):
            raise RuntimeError("Orthanc does not hold every instance")
    return lat[1:], lat[0], rss, to_scored


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n512", type=int, default=41, help="instances per repeat (first is cold)")
    p.add_argument("--nlarge", type=int, default=21)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/sentinel-bench-cache"))
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="smoke mode: 5 x 512x512, one repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.n512, args.nlarge, args.repeats = 5, 0, 1
    print_header("added latency: C-STORE acknowledged by the gateway -> stored in Orthanc",
                 ["bench.latency", *argv])
    bundle, which = bundle_dir(args.cache, args.bundle)
    print(f"bundle: {which}; gateway workers: {args.workers}")
    with workdir() as work:
        for label, _rows, _cols, files in issue_sets(args.cache, args.n512, args.nlarge,
                                                     min_n=2):
            pooled: list[float] = []
            p50s: list[float] = []
            p95s: list[float] = []
            colds: list[float] = []
            rss: list[float] = []
            direct: list[float] = []
            ratios: list[float] = []
            scored_part: list[float] = []
            for r in range(args.repeats):
                base = direct_store_ms(work, files)
                direct.append(percentile(base, 50))
                lat, cold, peak, to_scored = measure(work, files, bundle, args.workers)
                scored_part.append(percentile(to_scored, 50))
                ratios.append(percentile(lat, 50) / direct[-1])
                pooled += lat
                p50s.append(percentile(lat, 50))
                p95s.append(percentile(lat, 95))
                colds.append(cold)
                rss.append(peak)
                print(f"  repeat {r + 1}: direct C-STORE p50 {direct[-1]:.1f} ms; added p50 "
                      f"{p50s[-1]:.1f} ms, p95 {p95s[-1]:.1f} ms, "
                      f"cold {cold:.1f} ms, load {loadavg()}", flush=True)
            target = TARGET_P50_MS[label]
            print(f"\n## {label}: {len(pooled)} warm instances over {args.repeats} repeat(s)")
            print(f"p50 ms per repeat {summarize(p50s).fmt()}; pooled p50 "
                  f"{percentile(pooled, 50):.1f}")
            print(f"p95 ms per repeat {summarize(p95s).fmt()}; pooled p95 "
                  f"{percentile(pooled, 95):.1f}")
            print(f"direct C-STORE into Orthanc p50 ms per repeat {summarize(direct).fmt()}")
            print("of which until the 'scored' audit line (queue, read, decode, score) p50 ms "
                  f"{summarize(scored_part).fmt()}; the rest is outbox + forwarded C-STORE")
            print(f"first instance (opens the forwarding association) ms {summarize(colds).fmt()}")
            print(f"gateway peak RSS MB {summarize(rss).fmt(0)}")
            print(f"ratio added-latency p50 / direct C-STORE p50 {label}: "
                  f"{summarize(ratios).fmt(2)}")
            print(f"target added p50 <= {target:.0f} ms: "
                  f"{'met' if summarize(p50s).median <= target else 'MISSED'} "
                  f"(median {summarize(p50s).median:.1f} ms)", flush=True)
    print(f"\nloadavg_end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
