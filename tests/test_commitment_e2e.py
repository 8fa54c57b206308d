"""Storage Commitment end to end, with real peers on loopback (issue 17).

Debian's Orthanc plays both sides: Orthanc A is the modality (it sends through its REST API
``/modalities/{id}/store`` with ``StorageCommitment`` and reads the report the gateway sends
back at ``/storage-commitment/{transaction}``), ``sentinel serve`` is in the middle, Orthanc B
is the PACS. A pynetdicom SCU sends what Orthanc cannot express: malformed N-ACTIONs, 100,000
UIDs, a caller not allowed commitment.

Fast cases use the fixture bundle and a rule with ``threshold = 0`` for images whose PatientID
is ``ATTACK`` (whatever that rule screens is flagged); one case uses the trained default bundle
and a `sentinel attack` PGD copy of the real NEMA CR RG1 (skips without SENTINEL_DATA).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from gateway.commitment import ref_items
from tests.dcmtk import free_port, require_dcmtk
from tests.dicom_factory import sentinel_attack, sop_uid_of, synthetic
from tests.gateway_harness import GatewayProcess, metric, wait_until, write_config
from tests.orthanc import OrthancServer, require_orthanc

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

COMMITMENT = "1.2.840.10008.1.20.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
PROCESSING_FAILURE, NO_SUCH_INSTANCE = 0x0110, 0x0112
RULES = """
[[rules]]
name = "attacked-stand-in"
action = "screen"
threshold = 0.0
destinations = ["pacs"]
[rules.match]
PatientID = ["ATTACK"]

[[rules]]
name = "modality-a"
action = "pass"
allow_unscreened_pixels = true
destinations = ["pacs"]
[rules.match]
calling_ae = ["MODALITYA"]
"""


@dataclass
class Site:
    """Orthanc A (modality), the gateway, Orthanc B (PACS), and the files they share."""

    tmp: Path
    a: OrthancServer
    b: OrthancServer
    gw: GatewayProcess
    state: Path

    def upload(self, files: list[Path]) -> list[str]:
        """Put files into Orthanc A (the modality's own store); return A's instance ids."""
        ids = []
        for f in files:
            req = urllib.request.Request(self.a._url("/instances"), data=f.read_bytes(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                ids.append(json.loads(r.read())["ID"])
        return ids

    def send_and_commit(self, files: list[Path]) -> str:
        """C-STORE from Orthanc A to the gateway, then N-ACTION; return the Transaction UID."""
        ids = self.upload(files)
        answer = self.a.post("/modalities/gateway/store", json.dumps(
            {"Resources": ids, "StorageCommitment": True, "Synchronous": True}))
        assert answer["FailedInstancesCount"] == 0, answer
        return str(answer["StorageCommitmentTransactionUID"])

    def report(self, txn: str) -> dict[str, Any]:
        return dict(self.a.get(f"/storage-commitment/{txn}"))

    def wait_report(self, txn: str, timeout: float = 90) -> dict[str, Any]:
        """The report Orthanc A received, once the gateway has also audited sending it (A may
        see the report a moment before the gateway's `commit-reported` line is written)."""
        assert wait_until(lambda: self.report(txn)["Status"] != "Pending", timeout), \
            self.gw.log()[-3000:]
        assert wait_until(lambda: any(e["event"] == "commit-reported"
                                      and e.get("transaction_uid") == txn
                                      for e in self.audit()), 10), self.gw.log()[-3000:]
        return self.report(txn)

    def audit(self) -> list[dict[str, Any]]:
        path = self.state / "audit" / "audit.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def site(tmp: Path, bundle: Path, *, hold_s: float = 0, pacs_up: bool = True,
         rules: str = RULES, pacs_commits: bool = False, pacs_lua: str | None = None
         ) -> Iterator[Site]:
    """``pacs_commits``: the destination has ``commitment = true`` (the gateway asks Orthanc B,
    which reports on an association of its own: B is then an allowed caller)."""
    require_dcmtk()
    require_orthanc()
    port, mport = free_port(), free_port()
    a = OrthancServer(tmp / "a", {"gateway": ("SENTINEL", port)}, aet="MODALITYA")
    b = OrthancServer(tmp / "b", {"sentinel": ("SENTINEL", port)}, aet="PACS", lua=pacs_lua)
    state = tmp / "state"
    extra = (f'[[callers]]\nae_title = "MODALITYA"\naddresses = ["127.0.0.1"]\n'
             f'commitment = true\nport = {a.dicom_port}\n\n'
             + ('[[callers]]\nae_title = "PACS"\naddresses = ["127.0.0.1"]\n\n'
                if pacs_commits else "")
             + f'[commitment]\nquarantine_hold_s = {hold_s}\n')
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {b.dicom_port}\nae_title = "PACS"\n'
            + ("commitment = true\n" if pacs_commits else ""))
    cfg = write_config(tmp / "c.toml", state=state, port=port, destinations=dest, rules=rules,
                       metrics_port=mport,
                       default='action = "screen"\ndestinations = ["pacs"]', bundle=bundle,
                       extra=extra, relay_unscreened=False,
                       forwarding="backoff_initial_s = 0.2\nbackoff_max_s = 1\nmax_age_s = 600")
    a.start()
    if pacs_up:
        b.start()
    gw = GatewayProcess(cfg, tmp / "gateway.log", port, mport)
    try:
        gw.start()
        yield Site(tmp, a, b, gw, state)
    finally:
        gw.stop()
        a.stop()
        b.stop()


def series(tmp: Path, n: int, attacked: int = 0) -> list[Path]:
    """``n`` small clean CRs and ``attacked`` stand-ins (PatientID ATTACK: flagged)."""
    out = [synthetic(tmp / "src" / f"clean{i}.dcm", 64, 64, seed=i) for i in range(n)]
    out += [synthetic(tmp / "src" / f"attack{i}.dcm", 64, 64, seed=100 + i, patient_id="ATTACK")
            for i in range(attacked)]
    return out


def failures(report: dict[str, Any]) -> list[tuple[str, int]]:
    """(SOP Instance UID, Failure Reason) of each failure Orthanc A received."""
    return [(str(f["SOPInstanceUID"]), int(f["FailureReason"])) for f in report["Failures"]]


def uids(entries: list[dict[str, Any]]) -> set[str]:
    return {str(e["SOPInstanceUID"]) for e in entries}


def test_success_only_after_the_pacs_holds_them_and_failure_for_the_flagged_one(
        tmp_path: Path, fixture_bundle: Path) -> None:
    files = series(tmp_path, 3, attacked=1)
    clean, flagged = {sop_uid_of(f) for f in files[:3]}, sop_uid_of(files[3])
    with site(tmp_path, fixture_bundle) as s:
        txn = s.send_and_commit(files)
        rep = s.wait_report(txn)
        assert rep["Status"] == "Failure"  # Orthanc's word for "a report with failures"
        assert uids(rep["Success"]) == clean
        assert failures(rep) == [
            (flagged, PROCESSING_FAILURE)]
        assert {s.b.find_instance(u) is not None for u in clean} == {True}
        assert s.b.find_instance(flagged) is None
        events = s.audit()
    order = [e["event"] for e in events]
    reported_at = order.index("commit-reported")
    forwarded = [i for i, e in enumerate(events) if e["event"] == "forwarded"]
    assert len(forwarded) == 3 and max(forwarded) < reported_at  # B held them first
    (failed,) = [e for e in events if e["event"] == "commit-failed"]
    assert (failed["sop_uid"], failed["reason"]) == (flagged, "flagged")
    (reported,) = [e for e in events if e["event"] == "commit-reported"]
    assert (reported["success"], reported["failed"], reported["transaction_uid"]) == (3, 1, txn)


VANISH_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags["PatientID"] == "VANISH" then
    Delete(instanceId)
  end
end
"""


def test_with_pacs_commitment_success_waits_for_the_pacs_and_its_refusal_fails(
        tmp_path: Path, fixture_bundle: Path) -> None:
    """Orthanc B commits what it holds; one instance it deletes as soon as it is stored (a Lua
    hook), so B reports it failed: the modality hears Failure for it, and the alert is audited."""
    files = series(tmp_path, 2)
    vanish = synthetic(tmp_path / "src" / "vanish.dcm", 64, 64, seed=50, patient_id="VANISH")
    with site(tmp_path, fixture_bundle, pacs_commits=True, pacs_lua=VANISH_LUA) as s:
        txn = s.send_and_commit([*files, vanish])
        rep = s.wait_report(txn)
        events = s.audit()
    assert uids(rep["Success"]) == {sop_uid_of(f) for f in files}
    assert failures(rep) == [(sop_uid_of(vanish), PROCESSING_FAILURE)]
    from_pacs = [i for i, e in enumerate(events)
                 if e["event"] == "commit-reported" and e.get("destination") == "pacs"]
    to_modality = [i for i, e in enumerate(events)
                   if e["event"] == "commit-reported" and e.get("calling_ae") == "MODALITYA"]
    assert from_pacs and to_modality and from_pacs[0] < to_modality[0]
    alerts = [e for e in events if e["event"] == "commit-failed"]
    assert {(e.get("destination"), e["reason"]) for e in alerts} == {
        ("pacs", "pacs-refused"), (None, "refused-by-pacs:pacs")}
    assert all(e["sop_uid"] == sop_uid_of(vanish) for e in alerts)


def test_no_report_while_the_pacs_is_down_then_success(tmp_path: Path,
                                                       fixture_bundle: Path) -> None:
    files = series(tmp_path, 2)
    with site(tmp_path, fixture_bundle, pacs_up=False) as s:
        txn = s.send_and_commit(files)
        time.sleep(5)  # forwarding retries meanwhile; the modality must not hear Success
        assert s.report(txn)["Status"] == "Pending"
        assert not [e for e in s.audit() if e["event"] == "commit-reported"]
        assert metric(s.gw.metrics(), "sentinel_commitment_requests_open") == 1
        s.b.start()
        rep = s.wait_report(txn)
        assert rep["Status"] == "Success" and uids(rep["Success"]) == {sop_uid_of(f)
                                                                      for f in files}
        assert wait_until(lambda: metric(s.gw.metrics(),
                                         "sentinel_commitment_requests_open") == 0, 10)


def test_sigkill_between_request_and_report_the_report_still_comes(
        tmp_path: Path, fixture_bundle: Path) -> None:
    files = series(tmp_path, 2, attacked=1)
    with site(tmp_path, fixture_bundle, pacs_up=False) as s:
        txn = s.send_and_commit(files)
        assert wait_until(lambda: any(e["event"] == "commit-requested" for e in s.audit()), 30)
        s.gw.signal(signal.SIGKILL)
        s.gw.proc.wait(10)  # type: ignore[union-attr]
        assert list((s.state / "commit" / "open").glob("*.json"))  # the request is on disk
        s.b.start()
        s.gw.start()
        rep = s.wait_report(txn)
        assert uids(rep["Success"]) == {sop_uid_of(f) for f in files[:2]}
        assert uids(rep["Failures"]) == {sop_uid_of(files[2])}
        assert not list((s.state / "commit" / "open").glob("*.json"))


def test_a_release_turns_a_pending_failure_into_success(tmp_path: Path,
                                                       fixture_bundle: Path) -> None:
    files = series(tmp_path, 2, attacked=1)
    flagged = sop_uid_of(files[2])
    with site(tmp_path, fixture_bundle, hold_s=600) as s:
        txn = s.send_and_commit(files)
        assert wait_until(lambda: s.b.wait_for_count(2, 1) >= 2, 60)
        assert wait_until(lambda: any(e["event"] == "quarantined" for e in s.audit()), 30)
        time.sleep(2)
        assert s.report(txn)["Status"] == "Pending"  # held: a reviewer may still release it
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "quarantine", "release", flagged,
                            "--config", str(s.tmp / "c.toml"), "--reason", "reviewed: clean"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rep = s.wait_report(txn)
        assert rep["Status"] == "Success"
        assert uids(rep["Success"]) == {sop_uid_of(f) for f in files}
        assert s.b.find_instance(flagged) is not None


def test_unknown_instances_fail_as_no_such_instance(tmp_path: Path,
                                                    fixture_bundle: Path) -> None:
    with site(tmp_path, fixture_bundle) as s:
        answer = s.a.post("/modalities/gateway/storage-commitment", json.dumps({"DicomInstances": [
            {"SOPClassUID": CR, "SOPInstanceUID": "1.2.826.0.1.3680043.99.1"}]}))
        txn = str(answer["ID"])
        rep = s.wait_report(txn)
        assert failures(rep) == [
            ("1.2.826.0.1.3680043.99.1", NO_SUCH_INSTANCE)]


# -- hostile N-ACTIONs, from a pynetdicom SCU ---------------------------------------------------


def n_action(port: int, info: Dataset | None, calling: str = "MODALITYA",
             action_type: int = 1) -> int | None:
    """Send one N-ACTION; the status, or None when the association was refused or aborted."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(COMMITMENT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    if not assoc.is_established:
        return None
    try:
        status, _ = assoc.send_n_action(info, action_type, COMMITMENT, "1.2.840.10008.1.20.1.1")
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def commit_info(txn: str | None, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    if txn is not None:
        ds.TransactionUID = txn
    ds.ReferencedSOPSequence = ref_items(refs)
    return ds


def test_hostile_commitment_requests_get_nothing(tmp_path: Path, fixture_bundle: Path) -> None:
    with site(tmp_path, fixture_bundle) as s:
        port = s.gw.port
        assert n_action(port, commit_info(None, [(CR, "1.2.3")])) == 0x0120
        assert n_action(port, commit_info("1.2.9", [])) == 0x0120
        assert n_action(port, commit_info("1.2.9", [(CR, "../../etc/passwd")])) == 0x0115
        assert n_action(port, commit_info("1.2.9", [(CR, "1.2.3")]), action_type=7) == 0x0123
        assert n_action(port, None) == 0x0120
        many = [(CR, f"1.2.826.0.1.3680043.10.{i}") for i in range(100_000)]
        assert n_action(port, commit_info("1.2.9.1", many)) is None  # cut off, not buffered
        assert n_action(port, commit_info("1.2.9.2", many[:5001])) == 0x0213
        assert n_action(port, commit_info("1.2.9.3", [(CR, "1.2.3")]), calling="INTRUDER") is None
        assert n_action(port, commit_info("1.2.9.4", [(CR, "1.2.3")]), calling="MODALITY") == \
            0x0124  # on the allow-list, but not allowed commitment
        # nothing was taken on, and the gateway still serves
        assert not list((s.state / "commit" / "open").glob("*.json"))
        txn = s.send_and_commit(series(tmp_path, 1))
        assert s.wait_report(txn)["Status"] == "Success"
        events = s.audit()
    refused = [e for e in events if e["event"] == "commit-refused"]
    assert len(refused) >= 7
    assert any(e.get("reason") == "message-too-large" for e in events)
    assert any(e["event"] == "rejected" and e.get("calling_ae") == "INTRUDER" for e in events)


def test_real_attacked_nema_cr_fails_and_the_original_commits(tmp_path: Path,
                                                              nema_dir: Path) -> None:
    """The trained default bundle; RG1 and its PGD copy (eps 0.006) in one request."""
    bundle = REPO / "detector" / "models" / "default"
    original = nema_dir / "RG1_UNCR.dcm"
    attacked = sentinel_attack(original, tmp_path / "src" / "rg1-pgd.dcm", bundle)
    with site(tmp_path, bundle, rules="") as s:
        txn = s.send_and_commit([original, attacked])
        rep = s.wait_report(txn, timeout=180)
    assert uids(rep["Success"]) == {sop_uid_of(original)}
    assert failures(rep) == [
        (sop_uid_of(attacked), PROCESSING_FAILURE)]
