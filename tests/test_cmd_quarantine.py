"""``sentinel quarantine list|show|release|purge``: exit codes, the PNG, the outbox hand-off,
the audit trail with the operator's name, and no patient data in the audit log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_cmd_audit import write_config
from test_quarantine import make_dicom, record_for

from gateway.audit import verify
from gateway.cli import main
from gateway.cmd_quarantine import operator_name, sudo_claim
from gateway.quarantine import Quarantine
from gateway.residual_map import panel_size


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    """A state dir holding two flagged instances of study 1.2.3 and one of study 4.5."""
    state = tmp_path / "state"
    q = Quarantine(state / "quarantine")
    for sop, study in (("1.2.3.1", "1.2.3"), ("1.2.3.2", "1.2.3"), ("4.5.1", "4.5")):
        src = make_dicom(tmp_path / "spool" / f"{sop}.dcm", sop, study)
        q.put(src, record_for(sop, study, destinations=("pacs",)))
    (state / "spool" / "outbox" / "pacs").mkdir(parents=True)  # as the daemon makes it at start
    return state


def audit_events(state: Path) -> list[dict[str, object]]:
    log = state / "audit" / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_list_table_and_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quarantine", "list", "--state-dir", str(state)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("QUARANTINED AT") and len(rows) == 4
    assert all("CR" in row and "0.910" in row for row in rows[1:])
    assert main(["quarantine", "list", "--state-dir", str(state), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sorted(r["sop_uid"] for r in records) == ["1.2.3.1", "1.2.3.2", "4.5.1"]


def test_list_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quarantine", "list", "--state-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_show_and_not_found(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quarantine", "show", "4.5.1", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "chest-cr" in out and "fixture-1" in out and "CR_ROOM1" in out
    assert main(["quarantine", "show", "9.9.9", "--state-dir", str(state)]) == 1
    assert "not in the quarantine" in capsys.readouterr().err
    assert main(["quarantine", "show", "../../etc/passwd", "--state-dir", str(state)]) == 2
    assert "not a DICOM UID" in capsys.readouterr().err


def test_show_png_has_the_expected_size(state: Path, tmp_path: Path) -> None:
    png = tmp_path / "out" / "view.png"
    argv = ["quarantine", "show", "1.2.3.1", "--state-dir", str(state), "--png", str(png),
            "--height", "192"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size == panel_size(96, 80, 192) == (2 * 160 + 8, 192 + 22)
        assert img.mode == "RGB"


def test_show_png_of_a_real_cr(tmp_path: Path, nema_dir: Path) -> None:
    src = tmp_path / "in" / "RG3.dcm"
    src.parent.mkdir()
    shutil.copyfile(nema_dir / "RG3_J2KR.dcm", src)  # JPEG 2000: decoded through the plugins
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    Quarantine(tmp_path / "state" / "quarantine").put(
        src, record_for(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    )
    png = tmp_path / "rg3.png"
    argv = ["quarantine", "show", str(ds.SOPInstanceUID), "--state-dir",
            str(tmp_path / "state"), "--png", str(png)]
    assert main(argv) == 0
    with Image.open(png) as img:
        assert img.size == panel_size(int(ds.Rows), int(ds.Columns), 512)


def test_release_puts_the_bytes_in_the_outbox_and_audits(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = state / "quarantine" / "1.2.3" / "1.2.3.1.dcm"
    original = held.read_bytes()
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason",
            "reviewed: benign processing artefact"]
    assert main(argv) == 0
    assert "released 1.2.3.1: queued for pacs" in capsys.readouterr().out
    (queued,) = sorted((state / "spool" / "outbox" / "pacs").glob("*.dcm"))
    assert queued.read_bytes() == original and not held.exists()
    meta = json.loads(queued.with_suffix(".json").read_text())
    assert meta["sop_uid"] == "1.2.3.1" and meta["study_uid"] == "1.2.3"
    (event,) = audit_events(state)
    assert event["event"] == "released" and event["actor"] == operator_name()
    assert event["reason"] == "reviewed: benign processing artefact"
    assert event["destination"] == "pacs"
    assert main(argv) == 1  # already released


def test_release_to_named_destinations_via_config(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(state.parent)
    base = ["quarantine", "release", "4.5.1", "--config", str(cfg), "--reason", "ok"]
    assert main([*base, "--destination", "nowhere"]) == 2
    assert "unknown destination" in capsys.readouterr().err
    assert main([*base, "--destination", "pacs", "--destination", "archive"]) == 0
    for name in ("pacs", "archive"):
        assert len(list((state / "spool" / "outbox" / name).glob("*.dcm"))) == 1
    assert [e["destination"] for e in audit_events(state)] == ["pacs", "archive"]


def test_release_needs_a_reason(state: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quarantine", "release", "1.2.3.1", "--state-dir", str(state)])
    assert exc.value.code == 2
    assert main(["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason",
                 " "]) == 2
    assert (state / "quarantine" / "1.2.3" / "1.2.3.1.dcm").exists()


def test_purge_instance_study_and_age(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--state-dir", str(state), "--reason", "withdrawn by radiology"]
    assert main(["quarantine", "purge", "1.2.3.1", *base]) == 0
    assert main(["quarantine", "purge", "1.2.3.1", *base]) == 1
    assert main(["quarantine", "purge", "--study", "1.2.3", *base]) == 0
    assert main(["quarantine", "purge", "--study", "1.2.3", *base]) == 1
    assert main(["quarantine", "purge", "--older-than", "30", *base]) == 0  # all held today
    assert main(["quarantine", "purge", "--older-than", "0", *base]) == 0
    capsys.readouterr()
    assert [r.sop_uid for r in Quarantine(state / "quarantine").list()] == []
    events = audit_events(state)
    assert [e["sop_uid"] for e in events] == ["1.2.3.1", "1.2.3.2", "4.5.1"]
    assert {e["event"] for e in events} == {"purged"}
    assert {e["actor"] for e in events} == {operator_name()}
    with pytest.raises(SystemExit):
        main(["quarantine", "purge", "--state-dir", str(state), "--reason", "x"])  # no target


def test_no_patient_data_in_the_audit_log(state: Path) -> None:
    """The instances carry PatientName DOE^JANE and PatientID PID-0042 (see make_dicom);
    operator actions on them must log UIDs only."""
    base = ["--state-dir", str(state), "--reason", "review done"]
    assert main(["quarantine", "release", "1.2.3.1", *base]) == 0
    assert main(["quarantine", "purge", "--study", "1.2.3", *base]) == 0
    assert main(["quarantine", "purge", "4.5.1", *base]) == 0
    text = (state / "audit" / "audit.jsonl").read_text()
    assert len(text.splitlines()) == 3 and verify(state / "audit" / "audit.jsonl").ok
    for phi in ("DOE", "JANE", "PID-0042"):
        assert phi not in text


def test_residual_map_lights_up_a_perturbed_region() -> None:
    """A smooth image with L-inf sign noise (eps 0.004, as the attacks add at 224x224) on its
    left half only: the map is brighter there; on the clean image both halves match."""
    from gateway.residual_map import residual_strength

    yy, xx = np.mgrid[0:448, 0:448] / 448.0
    clean = (0.3 + 0.4 * yy + 0.1 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8)).astype(
        np.float32
    )
    noise = np.random.default_rng(1).choice([-0.004, 0.004], size=(224, 224))
    noise[:, 112:] = 0.0
    attacked = np.clip(clean + np.kron(noise, np.ones((2, 2))), 0.0, 1.0).astype(np.float32)

    before, after = residual_strength(clean), residual_strength(attacked)
    assert before.shape == after.shape == (224, 224)
    assert abs(np.median(before[:, :100]) - np.median(before[:, 124:])) < 0.05
    assert np.median(after[:, :100]) > np.median(after[:, 124:]) + 0.3


def test_unreadable_instance_is_listed_and_show_png_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An instance held because it cannot be decoded: list/show work, --png exits 2 naming the
    reason, and with its sidecar gone it is still listed."""
    src = make_dicom(tmp_path / "in" / "6.1.dcm", "6.1", "6")
    src.write_bytes(src.read_bytes()[:400])  # truncated inside the header
    state = tmp_path / "state"
    q = Quarantine(state / "quarantine")
    held = q.put(src, record_for("6.1", "6", reason="unreadable", score=None, p_cnn=None,
                                 p_rf=None, threshold=None))
    assert main(["quarantine", "show", "6.1", "--state-dir", str(state)]) == 0
    assert "unreadable" in capsys.readouterr().out
    png = tmp_path / "x.png"
    argv = ["quarantine", "show", "6.1", "--state-dir", str(state), "--png", str(png)]
    assert main(argv) == 2 and not png.exists()
    assert "sentinel quarantine:" in capsys.readouterr().err
    held.with_suffix(".json").write_text("not json")
    assert [r.reason for r in q.list()] == ["sidecar-invalid"]


def test_operator_name_uses_the_real_uid_and_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import pwd

    real = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("USER", "someone-else")
    monkeypatch.setenv("LOGNAME", "someone-else")
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert operator_name() == real
    assert sudo_claim() is None
    monkeypatch.setenv("SUDO_USER", "alice")  # a claim anyone can make: beside, not instead
    assert operator_name() == real and sudo_claim() == "alice"


@pytest.mark.integration
def test_daemon_quarantines_then_operator_releases_and_purges(
    tmp_path: Path, fixture_bundle: Path
) -> None:
    """Against the real daemon: DCMTK storescu sends two CRs carrying a patient name and ID; a
    rule with threshold 0 flags both; ``quarantine release`` (a separate process, as an operator
    would run it) makes the running gateway deliver one unchanged; ``purge`` deletes the other.
    The audit chain verifies and neither the audit log nor the service log holds the PHI."""
    import subprocess
    import sys

    from tests.dcmtk import require_dcmtk, storescu
    from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, dataset_bytes, synthetic
    from tests.gateway_harness import GatewayProcess, new_ports, wait_until
    from tests.gateway_harness import write_config as write_gateway_config

    require_dcmtk()
    port, _ = new_ports()
    state, pacs = tmp_path / "state", tmp_path / "pacs"
    cfg = write_gateway_config(
        tmp_path / "sentinel.toml", state=state, port=port, bundle=fixture_bundle,
        destinations=f'[destinations.pacs]\nkind = "directory"\npath = "{pacs}"\n',
        default='action = "screen"\nthreshold = 0.0',
    )
    sent = [synthetic(tmp_path / "send" / f"{i}.dcm", rows=128, cols=128, seed=i)
            for i in range(2)]
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent]
    studies = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sent]
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    try:
        assert storescu(port, sent).returncode == 0
        q = Quarantine(state / "quarantine")
        assert wait_until(lambda: len(q.list()) == 2, timeout=60), gateway.log()[-2000:]
        assert {r.sop_uid for r in q.list()} == set(sops)
        assert all(r.reason == "flagged" and r.destinations == ("pacs",) for r in q.list())

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "gateway.cli", "quarantine", *argv,
                                   "--config", str(cfg)], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1], timeout=120)

        done = cli("release", sops[0], "--reason", "reviewed, not tampered")
        assert done.returncode == 0, done.stderr
        delivered = pacs / studies[0] / f"{sops[0]}.dcm"
        assert wait_until(delivered.exists, timeout=60), gateway.log()[-2000:]
        assert dataset_bytes(delivered) == dataset_bytes(sent[0])  # unchanged, not re-scored
        done = cli("purge", sops[1], "--reason", "confirmed tampered, reported")
        assert done.returncode == 0, done.stderr
        assert q.list() == []
    finally:
        assert gateway.stop() == 0

    log = state / "audit" / "audit.jsonl"
    assert main(["audit", "verify", "--log", str(log)]) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    by_event = {e["event"]: e for e in events}
    assert sum(e["event"] == "quarantined" for e in events) == 2
    assert by_event["released"]["actor"] == operator_name() == by_event["purged"]["actor"]
    assert by_event["forwarded"]["sop_uid"] == sops[0]
    service_log = gateway.log()
    for phi in (*PATIENT_NAME.split("^"), PATIENT_ID):
        assert phi not in log.read_text() and phi not in service_log


def test_release_and_purge_refused_for_another_account(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    monkeypatch.setattr(os, "geteuid", lambda: state.stat().st_uid + 4242)
    base = ["--state-dir", str(state), "--reason", "r"]
    assert main(["quarantine", "purge", "4.5.1", *base]) == 2
    assert "run this as that account" in capsys.readouterr().err
    assert main(["quarantine", "release", "4.5.1", *base]) == 2
    assert main(["quarantine", "list", "--state-dir", str(state)]) == 0  # reading is fine
    assert len(Quarantine(state / "quarantine").list()) == 3


# -- issue 20, defect 4: a release the forwarder would drop is refused at release time ---------


def _forwarded_before(state: Path, dest: str, sop: str, when: float) -> None:
    """The daemon's sent ledger for ``dest`` says ``sop`` was delivered at ``when``, and the
    destination's outbox exists (the daemon creates it at start)."""
    sent = state / "spool" / "sent"
    sent.mkdir(parents=True, exist_ok=True)
    with (sent / f"{dest}.log").open("a") as fh:
        fh.write(f"{sop}\t{when:.3f}\n")
    (state / "spool" / "outbox" / dest).mkdir(parents=True, exist_ok=True)


def test_release_of_an_already_forwarded_uid_is_refused_with_the_reason(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tampered copy of an instance already forwarded was quarantined: releasing it would make
    the forwarder drop it (idempotency per UID) while the log says released. The CLI refuses,
    says to whom and when the UID went, and keeps the instance held."""
    import time as _time

    _forwarded_before(state, "pacs", "1.2.3.1", _time.time() - 3600)
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason", "ok"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "already forwarded to pacs" in err and "--resend-duplicate" in err
    assert (state / "quarantine" / "1.2.3" / "1.2.3.1.dcm").exists()
    assert not list((state / "spool" / "outbox" / "pacs").glob("*.dcm"))
    assert [e for e in audit_events(state) if e["event"] == "released"] == []


def test_release_with_resend_duplicate_is_queued_marked_and_audited(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time as _time

    _forwarded_before(state, "pacs", "1.2.3.1", _time.time() - 3600)
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason", "ok",
            "--resend-duplicate"]
    assert main(argv) == 0
    assert "second object under the same UID" in capsys.readouterr().err
    (queued,) = (state / "spool" / "outbox" / "pacs").glob("*.dcm")
    assert json.loads(queued.with_suffix(".json").read_text())["resend_duplicate"] is True
    (event,) = [e for e in audit_events(state) if e["event"] == "released"]
    assert event["outcome"] == "queued-duplicate"


def test_release_of_a_uid_still_waiting_in_the_outbox_is_refused(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clean copy of the UID is still queued for the destination: the released copy would be
    dropped behind it just the same."""
    from gateway.spool import SpoolLayout, place_in_outboxes

    clean = make_dicom(state.parent / "clean" / "1.2.3.1.dcm", "1.2.3.1", "1.2.3", seed=5)
    place_in_outboxes(SpoolLayout(state), ("pacs",), clean, {"sop_uid": "1.2.3.1"})
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason", "ok"]
    assert main(argv) == 3
    assert "waiting in the outbox of pacs" in capsys.readouterr().err


# -- issue 20, defect 5: destination names are path parts -----------------------------------


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "../../../../tmp/evil", ""])
def test_release_refuses_a_destination_that_is_not_a_name(
    state: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p for p in state.parent.rglob("*")}
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason", "ok",
            "--destination", name]
    assert main(argv) == 2
    assert "destination" in capsys.readouterr().err
    assert {p for p in state.parent.rglob("*")} == before  # nothing written anywhere
    assert (state / "quarantine" / "1.2.3" / "1.2.3.1.dcm").exists()


def test_release_with_state_dir_needs_an_existing_outbox(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quarantine", "release", "1.2.3.1", "--state-dir", str(state), "--reason", "ok",
            "--destination", "pacz"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no outbox for destination 'pacz'" in err and "pacs" in err and "--config" in err
    assert not (state / "spool" / "outbox" / "pacz").exists()
    assert main([*argv[:-1], "pacs"]) == 0


# -- issue 20, defect 6a: the actor is the real account; SUDO_USER is only a claim -----------


def test_audit_actor_is_the_real_account_and_sudo_user_is_recorded_beside_it(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import pwd

    real = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("SUDO_USER", "chief-radiologist")  # anyone can set this
    assert main(["quarantine", "release", "1.2.3.1", "--state-dir", str(state),
                 "--reason", "ok"]) == 0
    assert main(["quarantine", "purge", "4.5.1", "--state-dir", str(state), "--reason", "x"]) == 0
    events = [e for e in audit_events(state) if e["event"] in ("released", "purged")]
    assert len(events) == 2
    for e in events:
        assert e["actor"] == real
        assert e["sudo_user"] == "chief-radiologist"
