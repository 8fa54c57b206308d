"""Downstream outage: the PACS is down while instances arrive, then comes back.

What is promised: the modality keeps getting Success (the spool is the buffer), the backlog and
the age of its oldest item are visible in ``/metrics`` while the outage lasts, and once Orthanc
is back every instance is delivered, in study order, none twice (counted per C-STORE by a Lua
hook in Orthanc, not only by Orthanc's index). When the outage outlasts the maximum age, the
instances go to the dead-letter folder, audited and counted, instead of being retried forever.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from bench.reliability import counting_orthanc, env_count, orthanc_store_counts, record_figures
from gateway.audit import verify
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import make_series, sop_uid_of
from tests.gateway_harness import GatewayProcess, audit_events, metric, wait_until, write_config
from tests.orthanc import require_orthanc

pytestmark = pytest.mark.integration


def _studies(directory: Path, n: int, per_study: int) -> list[list[Path]]:
    out: list[list[Path]] = []
    left, i = n, 0
    while left > 0:
        k = min(per_study, left)
        out.append(make_series(directory / f"study{i:03d}", k, seed=i * 1000, rows=48, cols=48))
        left -= k
        i += 1
    return out


def run_outage(tmp: Path, bundle: Path, n_instances: int, per_study: int = 50,
               associations: int = 1) -> dict[str, object]:
    """The outage scenario; with ``associations`` > 1 study order is counted, not required
    (instances of a study may then finish out of order, by design)."""
    port, mport = free_port(), free_port()
    orthanc = counting_orthanc(tmp / "orthanc", {"sentinel": ("SENTINEL", port)})
    state = tmp / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\nassociations = {associations}\n'
            # these 48x48 instances never make the 16 MB backlog that brings a second in
            'extra_association_backlog_mb = 0\n')
    cfg = write_config(tmp / "c.toml", state=state, port=port, destinations=dest,
                       bundle=bundle, metrics_port=mport,
                       forwarding="backoff_initial_s = 0.2\nbackoff_max_s = 1\nmax_age_s = 3600")
    studies = _studies(tmp / "in", n_instances, per_study)
    gw = GatewayProcess(cfg, tmp / "gateway.log", port, mport).start()
    try:
        # Orthanc is down (never started yet): interleave the studies over two associations
        t_send = time.monotonic()
        half = len(studies) // 2 or 1
        for group in (studies[:half], studies[half:]):
            files = [f for s in group for f in s]
            if files:
                r = storescu(port, files, timeout=600)
                assert r.returncode == 0, r.stderr[-2000:]
        send_s = time.monotonic() - t_send
        text = ""

        def backlog_complete() -> bool:
            nonlocal text
            text = gw.metrics()
            return metric(text, "sentinel_queue_depth", destination="pacs") == n_instances

        assert wait_until(backlog_complete, timeout=120, interval=0.5), text[-3000:]
        age1 = metric(text, "sentinel_queue_oldest_age_seconds", destination="pacs")
        age2 = age1

        def age_grows() -> bool:
            nonlocal age2, text
            text = gw.metrics()
            age2 = metric(text, "sentinel_queue_oldest_age_seconds", destination="pacs")
            return age2 >= age1 + 1.0

        # visible and growing while it lasts (the forwarder refreshes the gauge on its rescans,
        # every second or so, later while a connection attempt is in progress)
        assert age1 > 0 and wait_until(age_grows, 15, 0.25), (age1, age2)
        assert metric(text, "sentinel_forward_failures_total", destination="pacs") >= 1
        assert gw.http_status("/healthz") == 200
        audit = (state / "audit" / "audit.jsonl").read_text()
        assert '"event":"forward-failed"' in audit

        t_up = time.monotonic()
        orthanc.start()
        assert orthanc.wait_for_count(n_instances, timeout=600) == n_instances
        drain_s = time.monotonic() - t_up
        assert wait_until(lambda: metric(gw.metrics(), "sentinel_queue_depth",
                                         destination="pacs") == 0, 30)
        time.sleep(1.0)
        text = gw.metrics()
        assert metric(text, "sentinel_forwarded_total", destination="pacs") == n_instances
        assert metric(text, "sentinel_queue_oldest_age_seconds", destination="pacs") == 0
    finally:
        rc = gw.stop()
        orthanc.stop()
    assert rc == 0

    deliveries = orthanc_store_counts(orthanc)
    sent = {sop_uid_of(f): (si, int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
            for si, s in enumerate(studies) for f in s}
    assert set(deliveries) == set(sent), "every instance delivered"
    twice = [u for u, c in deliveries.items() if c != 1]
    assert not twice, f"{len(twice)} delivered more than once"
    # study order: within each study, instance numbers reach Orthanc in increasing order
    order = [line.strip() for line in (tmp / "orthanc" / "stores.txt").read_text().splitlines()]
    last: dict[int, int] = {}
    out_of_order = 0
    for uid in order:
        study, number = sent[uid]
        if number < last.get(study, 0):
            out_of_order += 1
        last[study] = number
    if associations == 1:
        assert out_of_order == 0
    assert verify(state / "audit" / "audit.jsonl").ok
    return {
        "associations": associations,
        "instances": n_instances,
        "studies": len(studies),
        "delivered": len(deliveries),
        "delivered_twice": len(twice),
        "out_of_study_order": out_of_order,
        "max_backlog_seen": n_instances,
        "oldest_age_visible_s": round(age2, 1),
        "receive_s_while_pacs_down": round(send_s, 1),
        "drain_s_after_pacs_up": round(drain_s, 1),
    }


def test_outage_backlog_visible_then_all_delivered_once_in_order(
        tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    record_figures("outage_ci", run_outage(tmp_path, fixture_bundle, 150, per_study=25))


def test_outage_with_two_associations_delivers_each_once(
        tmp_path: Path, fixture_bundle: Path) -> None:
    """Both senders find the PACS down (the destination is held, not one sender resting), then
    drain the backlog together: every instance once."""
    require_dcmtk()
    require_orthanc()
    figures = run_outage(tmp_path, fixture_bundle, 100, per_study=25, associations=2)
    assert figures["delivered"] == 100 and figures["delivered_twice"] == 0


@pytest.mark.slow
def test_outage_full(tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    n = env_count("outage_instances", 1000)
    record_figures("outage_full", run_outage(tmp_path, fixture_bundle, n))


def test_dead_letter_after_max_age_audited_and_counted(tmp_path: Path,
                                                       fixture_bundle: Path) -> None:
    require_dcmtk()
    port, mport, nobody = free_port(), free_port(), free_port()  # nothing listens on `nobody`
    state = tmp_path / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {nobody}\nae_title = "GONE"\n')
    cfg = write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                       bundle=fixture_bundle, metrics_port=mport,
                       forwarding="backoff_initial_s = 0.2\nbackoff_max_s = 0.5\nmax_age_s = 2")
    files = make_series(tmp_path / "in", 3, rows=32, cols=32)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port, mport).start()
    try:
        assert storescu(port, files).returncode == 0
        assert wait_until(lambda: metric(gw.metrics(), "sentinel_dead_lettered_total",
                                         destination="pacs") == 3, 30)
        text = gw.metrics()
        assert metric(text, "sentinel_dead_letter_depth", destination="pacs") == 3
        assert metric(text, "sentinel_queue_depth", destination="pacs") == 0
    finally:
        rc = gw.stop()
    assert rc == 0
    dead = state / "spool" / "dead" / "pacs"
    assert sorted(p.name.split("-", 1)[1][:-4] for p in dead.glob("*.dcm")) == sorted(
        sop_uid_of(f) for f in files)
    events = audit_events(state / "audit" / "audit.jsonl")
    dl = [e for e in events if e["event"] == "dead-letter"]
    assert sorted(e["sop_uid"] for e in dl) == sorted(sop_uid_of(f) for f in files)
    assert all(e["destination"] == "pacs" and e.get("error") for e in dl)
    assert not [e for e in events if e["event"] == "forwarded"]
    assert verify(state / "audit" / "audit.jsonl").ok
    assert "dead-lettered" in gw.log()
