"""The review console's quarantine list with a large quarantine: first-page time.

The issue asks for the first page of a 100,000-instance quarantine in under 300 ms (a
benchmark, not a timed test). Measured side by side in one run, on one generated quarantine
(sidecars as the gateway writes them, 100 instances per study, a stand-in .dcm each):
  - the console's page over HTTP (starlette TestClient in process: routing, the session check,
    the SQL query and the Jinja2 rendering), first page, a filtered page and the last page;
  - what the same page would cost by reading every record (``Quarantine.list()``, the CLI's
    ``sentinel quarantine list``), which the console does once at start to build its index;
  - and, for information, one release through the console (the CLI's release code, which
    finds the instance by searching every study folder).

  .venv/bin/python -m bench.console_list [--records 100000] [--repeats 20] [--tiny]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from bench.common import print_header, ratio_line, summarize, workdir
from gateway.quarantine import Quarantine, new_record

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def generate(state: Path, n: int, seed: int = 0) -> None:
    """``n`` held instances: sidecar JSON + a small stand-in file, as Quarantine.put lays out."""
    rng = random.Random(seed)
    root = state / "quarantine"
    for i in range(n):
        study = f"1.2.826.0.1.{i // 100}"
        sop = f"{study}.{i % 100 + 1}"
        d = root / study
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        day, sec = rng.randrange(30), rng.randrange(86400)
        when = f"2026-11-{day + 1:02d}T{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}.000Z"
        record = new_record(
            sop_uid=sop, study_uid=study, series_uid=f"{study}.1", sop_class=CR_STORAGE,
            modality=rng.choice(("CR", "DX", "DX", "CR", "MG")),
            reason=rng.choice(("flagged", "flagged", "flagged", "unreadable", "rejected-by-rule")),
            score=rng.random(), p_cnn=rng.random(), p_rf=rng.random(), threshold=0.5,
            rule="default", bundle_id="bench", calling_ae=f"CR_ROOM{rng.randrange(8)}",
            peer="10.0.0.1", destinations=("pacs",), received_at=when, quarantined_at=when)
        (d / f"{sop}.json").write_text(record.to_json())
        (d / f"{sop}.dcm").write_bytes(b"\0" * 128 + b"DICM")


def timed_get(client: object, url: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = client.get(url)  # type: ignore[attr-defined]
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="1000 records, 3 repeats (smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the generated quarantine")
    args = p.parse_args(argv)
    if args.tiny:
        args.records, args.repeats, args.naive_repeats = 1000, 3, 1
    print_header("review console: quarantine list page", ["bench.console_list", *sys.argv[1:]])
    from starlette.testclient import TestClient

    from gateway.config import load_config
    from gateway.console.accounts import Accounts
    from gateway.console.app import create_app
    from tests.console_site import csrf_of, login

    with workdir(args.keep) as root:
        state = root / "state"
        t0 = time.perf_counter()
        generate(state, args.records)
        print(f"generated {args.records} held instances in {time.perf_counter() - t0:.1f} s "
              f"under {state}")
        cfg = root / "sentinel.toml"
        cfg.write_text('[listener]\nae_title = "SENTINEL"\nport = 11112\n\n[state]\n'
                       f'dir = "{state}"\n\n[destinations.pacs]\nkind = "directory"\n'
                       'path = "out"\n')
        Accounts(state / "console" / "users.json").add("view", "viewer", "bench password")
        t0 = time.perf_counter()
        app = create_app(load_config(cfg), follow=False)  # reads every sidecar once
        build_s = time.perf_counter() - t0
        print(f"index built at start: {build_s:.2f} s for {args.records} records "
              "(once, in the background when served)")
        client = TestClient(app, follow_redirects=False)
        assert login(client, "view", "bench password") == 303
        first = timed_get(client, "/quarantine", args.repeats)
        filtered = timed_get(client, "/quarantine?modality=DX&caller=CR_ROOM3&min_score=0.8",
                             args.repeats)
        last = timed_get(client, f"/quarantine?page={args.records // 50}", args.repeats)
        releases = []
        (state / "spool" / "outbox" / "pacs").mkdir(parents=True, exist_ok=True)
        Accounts(state / "console" / "users.json").add("rev", "reviewer", "bench password")
        reviewer = TestClient(app, follow_redirects=False)
        assert login(reviewer, "rev", "bench password") == 303
        for i in range(args.naive_repeats):
            sop = f"1.2.826.0.1.{i}.{i + 1}"
            token = csrf_of(reviewer.get(f"/quarantine/{sop}").text)
            t0 = time.perf_counter()
            r = reviewer.post(f"/quarantine/{sop}/release", data={"csrf": token,
                                                                  "reason": "bench"})
            releases.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 303 and "released+1" in r.headers["location"], r.headers
        q = Quarantine(state / "quarantine")
        naive = []
        for _ in range(args.naive_repeats):
            t0 = time.perf_counter()
            rows = sorted(q.list(), key=lambda r: r.quarantined_at, reverse=True)[:50]
            naive.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == 50
        n = args.records
        print(f"console first page, {n} held (ms): {summarize(first).fmt(1)}")
        print(f"console filtered page, {n} held (ms): {summarize(filtered).fmt(1)}")
        print(f"console last page, {n} held (ms): {summarize(last).fmt(1)}")
        print(f"read every record per page, {n} held (ms): {summarize(naive).fmt(1)}")
        print(f"console release of one instance, {n} held (ms): {summarize(releases).fmt(1)}")
        med = summarize(first).median
        print(f"target first page < 300 ms: {'met' if med < 300 else 'MISSED'} "
              f"(median {med:.1f} ms)")
        print(ratio_line(f"console list read-every-record/indexed first page, {n} held",
                         [x / summarize(first).median for x in naive]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
