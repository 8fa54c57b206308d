"""Load: 8 concurrent associations (DCMTK storescu, 2 callers x 4) into one `sentinel serve`.

What is promised: nothing acknowledged is lost (every instance is screened and delivered), the
daemon's memory stays bounded (peak RSS, VmHWM, reported), and the association limits hold while
the load runs (limits 4 per caller, 9 in all): a fifth association from a caller that already
has four open is refused, and so is any caller once the overall limit is reached, both with
A-ASSOCIATE-RJ rejected-transient / service-provider (presentation) / local-limit-exceeded
(PS3.8 Table 9-21: 2, 3, 2).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.reliability import env_count, record_figures, vm_hwm_kib
from gateway.audit import verify
from tests.dcmtk import STORESCU, dcmtk_env, free_port, require_dcmtk
from tests.dicom_factory import make_series, sop_uid_of
from tests.gateway_harness import GatewayProcess, audit_events, metric, wait_until, write_config

pytestmark = pytest.mark.integration
CALLERS = ("LOADA", "LOADB")
PER_CALLER = 4


def _try_associate(port: int, calling: str) -> tuple[int, int, int] | None:
    """None when accepted (then released), else the (result, source, reason) of the RJ."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


def run_load(tmp: Path, bundle: Path, per_association: int, rows: int = 192
             ) -> dict[str, object]:
    port, mport = free_port(), free_port()
    state, out = tmp / "state", tmp / "out"
    cfg = write_config(tmp / "c.toml", state=state, port=port, bundle=bundle,
                       destinations=f'[destinations.out]\nkind = "directory"\npath = "{out}"\n',
                       callers=(*CALLERS, "LOADC"), metrics_port=mport,
                       default='action = "screen"\nshadow = true',
                       limits=f"max_associations = {PER_CALLER * len(CALLERS) + 1}\n"
                              f"max_associations_per_caller = {PER_CALLER}")
    batches = [make_series(tmp / "in" / f"a{i}", per_association, seed=i * 10_000, rows=rows,
                           cols=rows) for i in range(PER_CALLER * len(CALLERS))]
    gw = GatewayProcess(cfg, tmp / "gateway.log", port, mport).start()
    assert gw.proc is not None
    rss_idle = vm_hwm_kib(gw.proc.pid)
    procs: list[subprocess.Popen[str]] = []
    refusals: dict[str, tuple[int, int, int] | None] = {}
    max_active = 0
    try:
        t0 = time.monotonic()
        for i, files in enumerate(batches):
            cmd = [STORESCU, "-aet", CALLERS[i % len(CALLERS)], "-aec", "SENTINEL",
                   "-to", "30", "-ta", "30", "-td", "60", "127.0.0.1", str(port),
                   *map(str, files)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          env=dcmtk_env()))

        def all_open() -> bool:
            nonlocal max_active
            active = int(metric(gw.metrics(), "sentinel_active_associations"))
            max_active = max(max_active, active)
            return active == len(batches)

        saw_all = wait_until(all_open, timeout=30, interval=0.02)
        if saw_all:  # the limits, tested while the 8 associations are busy
            refusals["fifth-from-one-caller"] = _try_associate(port, CALLERS[0])
            # a third caller takes the last slot of the total; the next one is refused
            third = AE(ae_title="LOADC")
            third.add_requested_context(Verification)
            held = third.associate("127.0.0.1", port, ae_title="SENTINEL")
            refusals["other-caller-over-total"] = _try_associate(port, "LOADC")
            assert held.is_established
            held.release()
        outputs = [p.communicate(timeout=1800)[0] for p in procs]
        send_s = time.monotonic() - t0
        codes = [p.returncode for p in procs]
        assert codes == [0] * len(procs), outputs[codes.index(next(c for c in codes if c))][-2000:]
        n = per_association * len(batches)
        assert wait_until(lambda: len(list(out.rglob("*.dcm"))) >= n, timeout=1800, interval=0.5)
        total_s = time.monotonic() - t0
        time.sleep(0.5)
        rss_peak = vm_hwm_kib(gw.proc.pid)
        text = gw.metrics()
    finally:
        rc = gw.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc == 0
    assert saw_all, f"never saw all {len(batches)} associations open at once (max {max_active})"
    assert refusals["fifth-from-one-caller"] == (2, 3, 2)
    assert refusals["other-caller-over-total"] == (2, 3, 2)
    sent = {sop_uid_of(f) for b in batches for f in b}
    delivered = {p.stem for p in out.rglob("*.dcm")}
    lost = sent - delivered
    assert not lost and len(delivered) == n
    assert metric(text, "sentinel_screened_total") == n
    events = audit_events(state / "audit" / "audit.jsonl")
    reasons = sorted(e.get("reason", "") for e in events if e["event"] == "rejected")
    assert reasons == ["association-limit", "caller-association-limit"]
    assert verify(state / "audit" / "audit.jsonl").ok
    peak_mib = rss_peak / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    return {
        "associations": len(batches),
        "instances_per_association": per_association,
        "matrix": f"{rows}x{rows} 12-bit",
        "instances": n,
        "lost": len(lost),
        "screened": int(metric(text, "sentinel_screened_total")),
        "peak_rss_mib": round(peak_mib, 1),
        "rss_after_start_mib": round(rss_idle / 1024, 1),
        "acknowledged_per_s": round(n / send_s, 1),
        "delivered_per_s": round(n / total_s, 1),
        "refused_fifth_from_one_caller": str(refusals["fifth-from-one-caller"]),
        "refused_over_total_limit": str(refusals["other-caller-over-total"]),
    }


def test_eight_associations_nothing_lost_limits_hold(tmp_path: Path,
                                                     fixture_bundle: Path) -> None:
    require_dcmtk()
    record_figures("load_ci", run_load(tmp_path, fixture_bundle, per_association=80))


@pytest.mark.slow
def test_eight_associations_full(tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    n = env_count("load_per_association", 500)
    record_figures("load_full", run_load(tmp_path, fixture_bundle, per_association=n))
