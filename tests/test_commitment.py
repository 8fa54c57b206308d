"""Storage Commitment SCP, in process: request parsing, where an instance is, when a request
settles, durability, reporting with retries (gateway.commitment). The end-to-end cases with
real Orthancs are in tests/test_commitment_e2e.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.commitment import (
    DEAD,
    DELIVERED,
    FAILURE_NO_SUCH_INSTANCE,
    FAILURE_PROCESSING,
    PENDING,
    QUARANTINED,
    STATUS_DUPLICATE_INVOCATION,
    STATUS_INVALID_ARGUMENT,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_NO_SUCH_ACTION,
    STATUS_NOT_AUTHORIZED,
    STATUS_RESOURCE_LIMITATION,
    STATUS_SUCCESS,
    UNKNOWN,
    CommitmentRequest,
    CommitmentService,
    InstanceLocator,
    RequestRefused,
    RequestStore,
    parse_request,
    ref_items,
    report_dataset,
    settle,
)
from gateway.config import ConfigError, parse_config
from gateway.spool import SentLedger, SpoolLayout

CR = "1.2.840.10008.5.1.4.1.1.1"


def action_info(txn: str | None, uids: list[str], cls: str = CR) -> Dataset:
    ds = Dataset()
    if txn is not None:
        ds.TransactionUID = txn
    ds.ReferencedSOPSequence = ref_items((cls, uid) for uid in uids)
    return ds


# -- the request -------------------------------------------------------------------------------


def test_parse_request_takes_a_valid_list() -> None:
    req = parse_request(1, action_info("1.2.9", ["1.2.3.1", "1.2.3.2"]), "MOD", "127.0.0.1",
                        10, 5.0)
    assert req.transaction_uid == "1.2.9" and req.requested_at == 5.0
    assert req.refs == ((CR, "1.2.3.1"), (CR, "1.2.3.2"))


@pytest.mark.parametrize(("action", "info", "status"), [
    (2, action_info("1.2.9", ["1.2.3"]), STATUS_NO_SUCH_ACTION),
    (1, None, STATUS_MISSING_ATTRIBUTE),
    (1, action_info(None, ["1.2.3"]), STATUS_MISSING_ATTRIBUTE),
    (1, action_info("1.2.9", []), STATUS_MISSING_ATTRIBUTE),
    (1, action_info("../../etc/passwd", ["1.2.3"]), STATUS_INVALID_ARGUMENT),
    (1, action_info("1.2.9", ["1.2.3", "../../x"]), STATUS_INVALID_ARGUMENT),
    (1, action_info("1.2.9", ["1.2.3"], cls="not-a-uid"), STATUS_INVALID_ARGUMENT),
    (1, action_info("1.2.9", [f"1.2.3.{i}" for i in range(11)]), STATUS_RESOURCE_LIMITATION),
])
def test_parse_request_refuses_with_the_status_that_says_why(
        action: int, info: Dataset | None, status: int) -> None:
    with pytest.raises(RequestRefused) as exc:
        parse_request(action, info, "MOD", "127.0.0.1", 10, 0.0)
    assert exc.value.status == status


def test_request_store_is_durable_and_sets_aside_what_it_cannot_read(tmp_path: Path) -> None:
    store = RequestStore(tmp_path)
    req = CommitmentRequest("1.2.9", "MOD", "127.0.0.1", 1.5, ((CR, "1.2.3"),))
    store.put(req)
    (store.dir / "1.2.10.json").write_text("{not json")
    assert store.load_all() == [req]
    assert (store.dir / "1.2.10.bad").exists()
    assert RequestStore(tmp_path).get("1.2.9") == req
    store.remove("1.2.9")
    assert store.load_all() == [] and store.get("1.2.9") is None
    with pytest.raises(ValueError):
        store.get("../x")


# -- where an instance is ---------------------------------------------------------------------


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class Spool:
    """A state directory laid out as the gateway lays it out, with one ledger per destination."""

    def __init__(self, root: Path) -> None:
        self.layout = SpoolLayout(root)
        self.layout.create(("pacs", "archive"))
        self.quarantine = root / "quarantine"
        self.ledgers = {d: SentLedger(self.layout.sent_log(d), 86400) for d in ("pacs", "archive")}
        self.locator = InstanceLocator(self.layout, self.quarantine, lambda: self.ledgers)

    def quarantine_it(self, uid: str, reason: str) -> None:
        _touch(self.quarantine / "1.2.3" / f"{uid}.dcm")
        _touch(self.quarantine / "1.2.3" / f"{uid}.json", json.dumps({"reason": reason}))


def test_locator_reads_every_place_an_instance_can_be(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    _touch(s.layout.incoming / "1.1.dcm")
    _touch(s.layout.work / "1.2~00000000000000000001.dcm")
    _touch(s.layout.outbox("archive") / "00000000000000000002-1.3.dcm")
    s.ledgers["pacs"].add("1.3")  # delivered to one destination, waiting for the other
    s.quarantine_it("1.4", "flagged")
    dead = _touch(s.layout.dead("pacs") / "00000000000000000003-1.5.dcm")
    s.ledgers["pacs"].add("1.6")
    s.ledgers["archive"].add("1.6")
    old = time.time() - 60  # dead-lettered once, delivered by a later resend
    _touch(s.layout.dead("pacs") / "00000000000000000004-1.7.dcm")
    os.utime(s.layout.dead("pacs") / "00000000000000000004-1.7.dcm", (old, old))
    s.ledgers["pacs"].add("1.7")
    where = s.locator.locate([f"1.{i}" for i in range(1, 9)])
    assert {u: loc.state for u, loc in where.items()} == {
        "1.1": PENDING, "1.2": PENDING, "1.3": PENDING, "1.4": QUARANTINED, "1.5": DEAD,
        "1.6": DELIVERED, "1.7": DELIVERED, "1.8": UNKNOWN,
    }
    assert where["1.4"].reason == "flagged" and where["1.5"].reason == "dead-letter:pacs"
    assert dead.exists()


def test_settle_waits_for_pending_and_held_quarantine_then_reports_each_reason(
        tmp_path: Path) -> None:
    s = Spool(tmp_path)
    req = CommitmentRequest("1.2.9", "MOD", "127.0.0.1", 100.0,
                            ((CR, "1.1"), (CR, "1.2"), (CR, "1.3"), (CR, "1.4")))
    s.ledgers["pacs"].add("1.1")
    s.quarantine_it("1.2", "rejected-by-rule")
    _touch(s.layout.dead("archive") / "00000000000000000001-1.3.dcm")
    _touch(s.layout.outbox("pacs") / "00000000000000000002-1.4.dcm")
    where = s.locator.locate(u for _c, u in req.refs)
    assert not settle(req, where, 200.0, 0.0).ready  # 1.4 still waits in an outbox
    os.unlink(s.layout.outbox("pacs") / "00000000000000000002-1.4.dcm")  # ... sent:
    s.ledgers["pacs"].add("1.4")
    where = s.locator.locate(u for _c, u in req.refs)
    assert not settle(req, where, 200.0, 3600.0).ready  # 1.2 quarantined, inside the hold
    done = settle(req, where, 200.0 + 3600.0, 3600.0)
    assert done.ready and done.success == ((CR, "1.1"), (CR, "1.4"))
    assert done.failed == ((CR, "1.2", FAILURE_PROCESSING, "rejected-by-rule"),
                           (CR, "1.3", FAILURE_PROCESSING, "dead-letter:archive"))
    ds, event = report_dataset(req, done)
    assert event == 2 and ds.TransactionUID == "1.2.9"
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.1", "1.4"]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] == [
        ("1.2", FAILURE_PROCESSING), ("1.3", FAILURE_PROCESSING)]
    # the reason of a quarantine stays off the wire: only the standard code travels
    assert "rejected" not in repr(ds)


def test_a_never_seen_instance_fails_as_no_such_instance(tmp_path: Path) -> None:
    s = Spool(tmp_path)
    req = CommitmentRequest("1.2.9", "MOD", "127.0.0.1", 0.0, ((CR, "9.9.9"),))
    done = settle(req, s.locator.locate(["9.9.9"]), 1.0, 3600.0)
    assert done.ready and done.failed == ((CR, "9.9.9", FAILURE_NO_SUCH_INSTANCE, "unknown"),)
    ds, event = report_dataset(req, done)
    assert event == 2 and "ReferencedSOPSequence" not in ds


# -- the service: requests, reports, retries, restart -----------------------------------------


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def append(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


def service_config(tmp_path: Path, **commitment: Any) -> Any:
    extra = "".join(f"{k} = {v}\n" for k, v in commitment.items())
    text = f"""
[listener]
ae_title = "SENTINEL"
[[callers]]
ae_title = "MOD"
commitment = true
port = 4242
[[callers]]
ae_title = "MOD2"
commitment = true
port = 4243
[[callers]]
ae_title = "NOCOMMIT"
[state]
dir = "{tmp_path}"
[forwarding]
backoff_initial_s = 1
backoff_max_s = 4
max_age_s = 100
[commitment]
{extra}
[destinations.pacs]
kind = "directory"
path = "{tmp_path / 'out'}"
[default]
action = "pass"
destinations = ["pacs"]
"""
    import tomllib
    return parse_config(tomllib.loads(text), tmp_path / "c.toml")


class Sender:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Dataset, int]] = []
        self.fail = False

    def __call__(self, cfg: Any, caller: Any, peer: str, ds: Dataset, event: int) -> int:
        self.calls.append((caller.ae_title, f"{caller.host or peer}:{caller.port}", ds, event))
        if self.fail:
            raise ConnectionError("modality down")
        return 0


def make_service(tmp_path: Path, now: list[float], **commitment: Any
                 ) -> tuple[CommitmentService, Spool, Audit, Sender]:
    cfg = service_config(tmp_path, **commitment)
    spool = Spool(tmp_path)
    audit, sender = Audit(), Sender()
    svc = CommitmentService(lambda: cfg, spool.locator, audit, sender, clock=lambda: now[0])
    return svc, spool, audit, sender


def test_only_callers_allowed_commitment_may_ask(tmp_path: Path) -> None:
    svc, _spool, audit, _sender = make_service(tmp_path, [0.0])
    info = action_info("1.2.9", ["1.1"])
    assert svc.request(1, info, "NOCOMMIT", "127.0.0.1") == STATUS_NOT_AUTHORIZED
    assert svc.request(1, info, "STRANGER", "127.0.0.1") == STATUS_NOT_AUTHORIZED
    assert svc.open_count() == 0 and not svc.store.load_all()
    assert [f["reason"] for f in audit.named("commit-refused")] == [
        "caller not allowed storage commitment"] * 2


def test_request_report_retry_and_a_repeat_is_one_request(tmp_path: Path) -> None:
    now = [1000.0]
    svc, spool, audit, sender = make_service(tmp_path, now)
    _touch(spool.layout.outbox("pacs") / "00000000000000000001-1.1.dcm")
    assert svc.request(1, action_info("1.2.9", ["1.1"]), "MOD", "10.0.0.7") == STATUS_SUCCESS
    assert svc.request(1, action_info("1.2.9", ["1.1"]), "MOD", "10.0.0.7") == STATUS_SUCCESS
    assert svc.open_count() == 1 and len(audit.named("commit-requested")) == 1
    svc.process_all()
    assert sender.calls == []  # still in the outbox: no report
    os.unlink(spool.layout.outbox("pacs") / "00000000000000000001-1.1.dcm")
    spool.ledgers["pacs"].add("1.1")
    sender.fail = True
    svc.process_all()
    assert len(sender.calls) == 1 and svc.open_count() == 1  # kept for the next attempt
    item = next(iter(svc._open.values()))
    assert item.next_attempt == now[0] + 1  # forwarding.backoff_initial_s
    sender.fail = False
    now[0] += 1
    svc.process_all()
    ae, address, ds, event = sender.calls[-1]
    assert (ae, address, event) == ("MOD", "10.0.0.7:4242", 1)
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.1"]
    assert svc.open_count() == 0 and not svc.store.load_all()
    (reported,) = audit.named("commit-reported")
    assert (reported["success"], reported["failed"], reported["attempts"]) == (1, 0, 2)


def test_the_same_transaction_from_another_caller_is_a_duplicate(tmp_path: Path) -> None:
    svc, _spool, audit, _sender = make_service(tmp_path, [0.0])
    assert svc.request(1, action_info("1.2.9", ["1.1"]), "MOD", "127.0.0.1") == STATUS_SUCCESS
    assert svc.request(1, action_info("1.2.9", ["1.1"]), "MOD2", "127.0.0.1") == \
        STATUS_DUPLICATE_INVOCATION
    assert svc.open_count() == 1
    assert svc.store.get("1.2.9").calling_ae == "MOD"  # type: ignore[union-attr]
    assert audit.named("commit-refused")[0]["status"] == "0x0210"


def test_open_requests_survive_a_restart_and_give_up_after_max_age(tmp_path: Path) -> None:
    now = [0.0]
    svc, spool, _audit, _sender = make_service(tmp_path, now)
    spool.ledgers["pacs"].add("1.1")
    assert svc.request(1, action_info("1.2.9", ["1.1"]), "MOD", "127.0.0.1") == STATUS_SUCCESS
    # a crash here: a new service on the same state directory finds the request
    again, _spool, audit2, sender2 = make_service(tmp_path, now)
    again._send = sender2
    assert again.start() == 1
    again.stop()
    sender2.fail = True
    now[0] = 99.0
    again.process_all()
    assert again.open_count() == 1
    now[0] = 100.0  # forwarding.max_age_s after the request
    again.process(next(iter(again._open.values())))
    assert again.open_count() == 0 and not again.store.load_all()
    (gave_up,) = audit2.named("commit-abandoned")
    assert gave_up["transaction_uid"] == "1.2.9" and "modality down" in gave_up["error"]


def test_caller_commitment_needs_a_port_and_an_ip_host(tmp_path: Path) -> None:
    import tomllib

    base = f'[listener]\n[state]\ndir = "{tmp_path}"\n[destinations.d]\nkind = "directory"\n' \
           f'path = "{tmp_path}"\n[default]\naction = "pass"\ndestinations = ["d"]\n'
    with pytest.raises(ConfigError, match=r"callers.*port.*add port"):
        parse_config(tomllib.loads(base + '[[callers]]\nae_title = "M"\ncommitment = true\n'),
                     tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"host.*not an IP"):
        parse_config(tomllib.loads(base + '[[callers]]\nae_title = "M"\ncommitment = true\n'
                                   'port = 104\nhost = "modality.local"\n'), tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"commitment.*unknown key"):
        parse_config(tomllib.loads(base + '[commitment]\nhold = 3\n'), tmp_path / "c.toml")
    cfg = parse_config(tomllib.loads(base + '[commitment]\nquarantine_hold_s = 60\n'),
                       tmp_path / "c.toml")
    assert cfg.commitment.quarantine_hold_s == 60 and cfg.commitment.max_instances == 5000


# -- towards a destination that commits (gateway.commitment_scu) -------------------------------


def pacs_config(tmp_path: Path) -> Any:
    import tomllib

    text = f"""
[listener]
ae_title = "SENTINEL"
[state]
dir = "{tmp_path}"
[forwarding]
backoff_initial_s = 2
backoff_max_s = 8
[commitment]
pacs_report_timeout_s = 60
[destinations.pacs]
kind = "dicom"
host = "10.0.0.5"
port = 104
ae_title = "PACS"
commitment = true
[default]
action = "pass"
destinations = ["pacs"]
"""
    return parse_config(tomllib.loads(text), tmp_path / "c.toml")


def report_info(txn: str, done: list[str], failed: list[tuple[str, int]]) -> Dataset:
    ds = action_info(txn, done)
    ds.FailedSOPSequence = ref_items((CR, uid, code) for uid, code in failed)
    return ds


def test_only_the_destination_itself_may_report_commitment(tmp_path: Path) -> None:
    from gateway.commitment_scu import PacsCommitment

    cfg = pacs_config(tmp_path)
    audit = Audit()
    pacs = PacsCommitment(lambda: cfg, SpoolLayout(tmp_path), audit)
    info = report_info("1.2.9", ["1.1"], [("1.2", 0x0112)])
    assert pacs.on_report("PACS", "10.0.0.6", 1, info) == 0x0110  # right title, wrong host
    assert pacs.on_report("OTHER", "10.0.0.5", 1, info) == 0x0110  # right host, wrong title
    assert pacs.status("pacs", "1.1") == "awaiting"
    assert pacs.on_report("PACS", "::ffff:10.0.0.5", 2, info) == 0  # a transaction from before
    assert (pacs.status("pacs", "1.1"), pacs.status("pacs", "1.2")) == ("committed", "refused")
    pacs.close()
    again = PacsCommitment(lambda: cfg, SpoolLayout(tmp_path), audit)  # durable
    assert (again.status("pacs", "1.1"), again.status("pacs", "1.2")) == ("committed", "refused")
    (alert,) = audit.named("commit-failed")
    assert (alert["destination"], alert["sop_uid"], alert["status"]) == ("pacs", "1.2", "0x0112")
    assert len(audit.named("commit-refused")) == 2


def test_asks_once_per_timeout_and_backs_off_when_the_pacs_is_down(tmp_path: Path) -> None:
    from gateway.commitment_scu import PacsCommitment

    cfg = pacs_config(tmp_path)
    now = [0.0]
    asked: list[tuple[str, list[tuple[str, str]]]] = []
    down = [True]

    def requester(_cfg: Any, dest: Any, txn: str, refs: list[tuple[str, str]]) -> int:
        if down[0]:
            raise ConnectionError("refused")
        asked.append((dest.name, refs))
        return 0

    pacs = PacsCommitment(lambda: cfg, SpoolLayout(tmp_path), Audit(), requester,
                          clock=lambda: now[0])
    pacs.want("pacs", CR, "1.1")
    pacs.tick()  # down: held for backoff_initial_s
    pacs.want("pacs", CR, "1.1")
    now[0] = 1.0
    pacs.tick()
    assert asked == []
    down[0] = False
    now[0] = 2.0
    pacs.want("pacs", CR, "1.1")
    pacs.tick()
    assert asked == [("pacs", [(CR, "1.1")])]
    now[0] = 30.0  # asked, no report yet: not again before pacs_report_timeout_s
    pacs.want("pacs", CR, "1.1")
    pacs.tick()
    now[0] = 62.0
    pacs.want("pacs", CR, "1.1")
    pacs.tick()
    assert len(asked) == 2
    pacs.close()


def test_locator_waits_for_the_pacs_commitment(tmp_path: Path) -> None:
    s = Spool(tmp_path)

    states = {"1.1": "committed", "1.2": "awaiting", "1.3": "refused"}

    class Pacs:
        def status(self, dest: str, uid: str) -> str:
            return states[uid]

    locator = InstanceLocator(s.layout, s.quarantine, lambda: s.ledgers, Pacs(), lambda: {"pacs"})
    for uid in ("1.1", "1.2", "1.3"):
        s.ledgers["pacs"].add(uid)
    s.ledgers["archive"].add("1.4")  # a destination that does not commit: delivered is enough
    where = locator.locate(["1.1", "1.2", "1.3", "1.4"])
    assert where["1.1"].state == DELIVERED and where["1.4"].state == DELIVERED
    assert where["1.2"].state == PENDING and where["1.2"].awaiting == ("pacs",)
    assert (where["1.3"].state, where["1.3"].reason) == (DEAD, "refused-by-pacs:pacs")
