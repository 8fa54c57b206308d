"""Crash safety: SIGKILL `sentinel serve` at random moments while DCMTK's storescu sends.

The promise under test: Success (0x0000) to the modality means the instance is safe. So after
any number of kills and restarts, every instance that got Success ends in Orthanc (clean path)
or in the quarantine (flagged path) exactly once, nothing that got Success is lost, no partial
file is ever forwarded (every stored copy is byte-identical to what was sent), and Orthanc never
holds a duplicate. The modality behaves like a real one: what did not get Success is sent again
after the restart (so the gateway also sees re-sends of instances it had already spooled).

Deliveries are counted twice: Orthanc's REST index (one entry per SOP Instance UID) and a Lua
hook that logs every C-STORE Orthanc receives (bench/reliability.py ``counting_orthanc``), so a
re-delivery after a crash is visible even though Orthanc would store it only once.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from bench.reliability import counting_orthanc, env_count, orthanc_store_counts, record_figures
from gateway.audit import verify
from gateway.quarantine import Quarantine
from tests.dcmtk import STORESCU, dcmtk_env, free_port, require_dcmtk
from tests.dicom_factory import dataset_bytes, make_series, sop_uid_of
from tests.gateway_harness import GatewayProcess, wait_until, write_config
from tests.orthanc import require_orthanc

pytestmark = pytest.mark.integration

# Instances with BodyPartExamined HAND are screened with threshold 0: always flagged, so the
# quarantine path runs under the same kills as the forwarding path.
FLAG_RULE = """
[[rules]]
name = "force-flag"
action = "screen"
threshold = 0.0
[rules.match]
BodyPartExamined = "HAND"
"""


def send_verbose(port: int, files: Sequence[Path], calling: str = "MODALITY"
                 ) -> subprocess.Popen[str]:
    """Start storescu -v over one association; ``acked`` parses its output afterwards."""
    cmd = [STORESCU, "-v", "-aet", calling, "-aec", "SENTINEL", "-to", "10", "-ta", "10",
           "-td", "20", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dcmtk_env())


def acked(output: str) -> list[str]:
    """Paths of the files storescu got a Success response for, from its -v log."""
    done: list[str] = []
    current = ""
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):].strip()
        elif line.startswith("I: Received Store Response (Success)") and current:
            done.append(current)
            current = ""
    return done


def make_instances(directory: Path, n: int, per_study: int = 25, flag_every: int = 10
                   ) -> list[Path]:
    """``n`` small CR instances in studies of ``per_study``; every ``flag_every``-th is HAND."""
    files: list[Path] = []
    study = 0
    while len(files) < n:
        k = min(per_study, n - len(files))
        series = make_series(directory / f"s{study:03d}", k, seed=study * 1000, rows=48,
                             cols=48)
        files.extend(series)
        study += 1
    for i, f in enumerate(files):
        if i % flag_every == flag_every - 1:
            ds = pydicom.dcmread(f)
            ds.BodyPartExamined = "HAND"
            ds.save_as(f, enforce_file_format=True)
    return files


def run_crash_cycles(tmp: Path, bundle: Path, cycles: int, n_instances: int,
                     seed: int = 5) -> dict[str, object]:
    """Kill/restart the gateway ``cycles`` times while sending ``n_instances``; return figures.

    Asserts the invariants; the returned figures go into the reliability report.
    """
    rng = random.Random(seed)
    port = free_port()
    orthanc = counting_orthanc(tmp / "orthanc", {"sentinel": ("SENTINEL", port)}).start()
    state = tmp / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\nae_title = "ORTHANC"\n')
    cfg = write_config(tmp / "c.toml", state=state, port=port, destinations=dest,
                       rules=FLAG_RULE, default='action = "pass"', bundle=bundle)
    files = make_instances(tmp / "in", n_instances)
    by_path = {str(f): f for f in files}
    flagged = {sop_uid_of(f) for f in files if "HAND" in _body_part(f)}
    fresh: list[Path] = list(files)
    retry: list[Path] = []  # sent, no Success seen: the modality sends them again
    acknowledged: set[str] = set()
    chunk = max(1, n_instances // cycles)
    kills = 0
    resent = 0
    gw: GatewayProcess | None = None
    try:
        for cycle in range(cycles):
            gw = GatewayProcess(cfg, tmp / f"gateway-{cycle:03d}.log", port).start()
            batch = retry + fresh[:chunk]
            fresh = fresh[chunk:]
            resent += len(retry)
            proc = send_verbose(port, batch)
            # a random moment: during the association, during screening/forwarding, or after
            time.sleep(rng.uniform(0.05, 0.015 * len(batch) + 0.5))
            gw.kill()
            kills += 1
            out, _ = proc.communicate(timeout=60)
            got = set(acked(out))
            acknowledged.update(got)
            retry = [f for f in batch if str(f) not in got]
        pending = retry + fresh
        resent += len(retry)
        # final run, no kill: the modality re-sends whatever never got Success
        gw = GatewayProcess(cfg, tmp / "gateway-final.log", port).start()
        for _attempt in range(5):
            if not pending:
                break
            proc = send_verbose(port, pending)
            out, _ = proc.communicate(timeout=600)
            got_set = set(acked(out))
            acknowledged.update(got_set)
            pending = [f for f in pending if str(f) not in got_set]
        assert not pending, f"{len(pending)} instances never acknowledged by a healthy gateway"
        n_clean = len(files) - len(flagged)
        quarantine = Quarantine(state / "quarantine")
        wait_until(lambda: int(orthanc.statistics()["CountInstances"]) >= n_clean
                   and len(quarantine.list()) >= len(flagged), timeout=300, interval=0.5)
        time.sleep(1.0)  # anything still in flight would show as an extra delivery now
        rc = gw.stop()
        gw = None
        assert rc == 0

        # -- invariants ------------------------------------------------------------------
        sent_uids = {sop_uid_of(f): f for f in files}
        in_orthanc = set()
        for oid in orthanc.instance_ids():
            tags = orthanc.get(f"/instances/{oid}/simplified-tags")
            in_orthanc.add(str(tags["SOPInstanceUID"]))
        held = {r.sop_uid for r in quarantine.list()}
        acked_uids = {sop_uid_of(by_path[p]) for p in acknowledged}
        lost = acked_uids - in_orthanc - held
        both = in_orthanc & held
        count = int(orthanc.statistics()["CountInstances"])
        deliveries = orthanc_store_counts(orthanc)
        redelivered = {u: c for u, c in deliveries.items() if c > 1}
        assert not lost, f"acknowledged but lost: {sorted(lost)[:5]}"
        assert not both, f"both forwarded and quarantined: {sorted(both)[:5]}"
        assert held == flagged, "the quarantine holds exactly the flagged instances"
        assert in_orthanc == set(sent_uids) - flagged
        assert count == len(in_orthanc), "Orthanc holds a duplicate"
        # no partial file forwarded or quarantined: every copy is byte-identical to the sent one
        for uid in in_orthanc:
            data = orthanc.get_bytes(f"/instances/{orthanc.find_instance(uid)}/file")
            stored = tmp / "check.dcm"
            stored.write_bytes(data)
            assert dataset_bytes(stored) == dataset_bytes(sent_uids[uid]), f"{uid} altered"
        for uid in held:
            assert dataset_bytes(quarantine.instance_path(uid)) == dataset_bytes(sent_uids[uid])
        # at-least-once on the wire: a kill between Orthanc's Success and the ledger write
        # re-sends what was delivered but not yet recorded; the forwarder records each delivery
        # while the next C-STORE is in flight, so at most two per kill
        assert sum(c - 1 for c in redelivered.values()) <= 2 * kills, redelivered
        layout = state / "spool"
        for sub in ("incoming", "work", "tmp", "outbox/pacs"):
            left = [p for p in (layout / sub).iterdir() if not p.name.startswith(".")
                    and not (p.suffix == ".json" and not p.with_suffix(".dcm").exists())]
            assert not left, f"{sub} still holds {left[:3]}"
        # a kill between unlinking an outbox entry's .dcm and its .json leaves the sidecar
        orphans = [p for p in layout.rglob("*.json")
                   if "sent" not in p.parts and not p.with_suffix(".dcm").exists()]
        # temp names (".<name>.<pid>.<n>.tmp") a kill left behind: never forwarded (the queue
        # skips dot files) but disk that nobody frees; test_restart_removes_... covers them
        stale_tmp = [p for p in layout.rglob(".*.tmp")]
        result = verify(state / "audit" / "audit.jsonl")
        assert result.ok, result.reason
    finally:
        if gw is not None:
            gw.kill()
        orthanc.stop()
    return {
        "kill_restart_cycles": kills,
        "instances": len(files),
        "acknowledged": len(acked_uids),
        "resent_without_success": resent,
        "forwarded_to_orthanc": len(in_orthanc),
        "quarantined": len(held),
        "lost": len(lost),
        "duplicated_in_orthanc": count - len(in_orthanc),
        "redelivered_c_stores": sum(c - 1 for c in redelivered.values()),
        "partial_files_forwarded": 0,
        "stale_temp_files_left": len(stale_tmp),
        "orphan_sidecars_left": len(orphans),
        "audit_torn_lines_sealed": len(getattr(result, "torn_lines", ()) or ()),
    }


def _body_part(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("BodyPartExamined", ""))


def test_kill_restart_cycles_lose_nothing(tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    figures = run_crash_cycles(tmp_path, fixture_bundle, cycles=4, n_instances=160)
    assert figures["lost"] == 0 and figures["duplicated_in_orthanc"] == 0
    record_figures("crash_ci", figures)


@pytest.mark.slow
def test_kill_restart_cycles_full(tmp_path: Path, fixture_bundle: Path) -> None:
    require_dcmtk()
    require_orthanc()
    figures = run_crash_cycles(tmp_path, fixture_bundle, cycles=env_count("cycles", 20),
                               n_instances=env_count("instances", 2000))
    assert figures["lost"] == 0 and figures["duplicated_in_orthanc"] == 0
    record_figures("crash_full", figures)


def test_restart_removes_temp_files_left_by_a_kill(tmp_path: Path, fixture_bundle: Path) -> None:
    """A SIGKILL inside write_json_durable or place_in_outboxes leaves ``.<name>.<pid>.<n>.tmp``
    in spool/incoming or an outbox, and one between the forwarder's two unlinks an outbox
    sidecar without its instance (both seen in the 20-cycle run); start-up must clear them like
    it clears spool/tmp, or every crash leaks disk on the spool that the watermark protects."""
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "c.toml", state=state, port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{tmp_path}/o"',
                       bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    gw.stop()
    uid = "1.2.3.4"
    stale = [
        state / "spool" / "incoming" / f".{uid}.json.4242.7.tmp",
        state / "spool" / "outbox" / "o" / f".00000000000000000001-{uid}.dcm.4242.8.tmp",
        state / "spool" / "outbox" / "o" / f".00000000000000000001-{uid}.json.4242.9.tmp",
        state / "spool" / "outbox" / "o" / f"00000000000000000002-{uid}.json",  # no .dcm
    ]
    for p in stale:
        p.write_bytes(b"x" * 1024)
        os.utime(p, (time.time() - 3600, time.time() - 3600))  # left by a crash an hour ago
    fresh = state / "spool" / "outbox" / "o" / f"00000000000000000003-{uid}.json"
    fresh.write_bytes(b"{}")  # a sidecar another process is writing right now: kept
    gw = GatewayProcess(cfg, tmp_path / "gateway-2.log", port).start()
    try:
        assert wait_until(lambda: not any(p.exists() for p in stale), 5), [
            p.name for p in stale if p.exists()]
        assert fresh.exists()
    finally:
        assert gw.stop() == 0
