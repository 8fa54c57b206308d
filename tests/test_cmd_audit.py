"""``sentinel audit query|verify``: exit codes, filters, output formats, config lookup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_config(directory: Path) -> Path:
    """A minimal valid gateway config whose state dir is ``directory/state``."""
    cfg = directory / "sentinel.toml"
    cfg.write_text(
        '[listener]\nae_title = "SENTINEL"\nport = 11112\n\n'
        '[state]\ndir = "state"\n\n'
        '[destinations.pacs]\nkind = "directory"\npath = "out"\n\n'
        '[destinations.archive]\nkind = "directory"\npath = "archive"\n'
    )
    return cfg


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "state" / "audit" / "audit.jsonl")
    log.append("association", calling_ae="CR1", called_ae="SENTINEL", peer="10.1.1.5")
    log.append(
        "scored",
        calling_ae="CR1",
        study_uid="1.1",
        sop_uid="1.1.1",
        verdict="clean",
        score=0.12,
        threshold=0.5,
    )
    log.append(
        "scored",
        calling_ae="DX2",
        study_uid="2.2",
        sop_uid="2.2.1",
        verdict="flagged",
        score=0.93,
        threshold=0.5,
    )
    log.append("quarantined", calling_ae="DX2", study_uid="2.2", sop_uid="2.2.1", reason="flagged")
    return tmp_path / "state"


def test_verify_ok(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "4 lines" in out and "head " in out


def test_verify_broken_names_the_line(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = state / "audit" / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("0.93", "0.03")  # someone lowers a score after the fact
    log.write_text("".join(lines))
    assert main(["audit", "verify", "--log", str(log)]) == 1
    captured = capsys.readouterr()
    assert "line 3" in captured.err and "edited" in captured.err
    assert "first bad line: 3" in captured.out


def test_verify_missing_log_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--log", str(tmp_path / "none.jsonl")]) == 2
    assert "no such audit log" in capsys.readouterr().err


def test_verify_via_config(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(state.parent)
    assert main(["audit", "verify", "--config", str(cfg)]) == 0
    assert str(state / "audit" / "audit.jsonl") in capsys.readouterr().out


def test_invalid_config_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[listener\n")
    assert main(["audit", "verify", "--config", str(cfg)]) == 2
    assert "bad.toml" in capsys.readouterr().err


def test_query_filters_and_table(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "query", "--state-dir", str(state), "--caller", "DX2"]) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()
    assert len(rows) == 2 and "scored" in rows[0] and "quarantined" in rows[1]
    assert "prev=" not in captured.out and "2 event(s)" in captured.err


def test_query_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "audit",
        "query",
        "--state-dir",
        str(state),
        "--event",
        "scored",
        "--verdict",
        "flagged",
        "--json",
    ]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["sop_uid"] == "2.2.1" and record["score"] == 0.93 and len(record["prev"]) == 64


def test_query_time_range(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "audit",
                "query",
                "--state-dir",
                str(state),
                "--since",
                "2000-01-01",
                "--until",
                "2000-01-02",
                "--json",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    assert (
        main(
            [
                "audit",
                "query",
                "--state-dir",
                str(state),
                "--since",
                "2000-01-01",
                "--study",
                "1.1",
                "--json",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_bad_arguments_exit_2(state: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["audit", "query", "--state-dir", str(state), "--since", "last tuesday"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["audit", "verify"])  # neither --config, --state-dir nor --log
    assert exc.value.code == 2


def test_console_entry_exit_codes(state: Path) -> None:
    """The real process: exit status 0 for an intact chain, 1 after a line is deleted."""
    log = state / "audit" / "audit.jsonl"
    cmd = [sys.executable, "-m", "gateway.cli", "audit", "verify", "--log", str(log)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:1] + lines[2:]))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "line 2" in done.stderr


def test_verify_warns_about_sealed_torn_lines(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = state / "audit" / "audit.jsonl"
    log.write_bytes(log.read_bytes()[:-30])  # crash mid-write: the last line is cut short
    assert main(["audit", "verify", "--log", str(log)]) == 1
    assert "line 4" in capsys.readouterr().err
    AuditLog(log).append("config-loaded", config_path="/etc/sentinel/sentinel.toml")
    assert main(["audit", "verify", "--log", str(log)]) == 0
    captured = capsys.readouterr()
    assert "5 lines" in captured.out and "WARNING: lines [4]" in captured.err


def test_verify_anchor_detects_lines_cut_off_the_end(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = state / "audit" / "audit.jsonl"
    assert main(["audit", "verify", "--log", str(log)]) == 0
    head = capsys.readouterr().out.split("head ")[1].strip()
    AuditLog(log).append("purged", sop_uid="2.2.1", actor="mallory", reason="tidy up")
    assert main(["audit", "verify", "--log", str(log), "--anchor", head]) == 0
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]))  # whole lines removed from the end: the chain is intact
    assert main(["audit", "verify", "--log", str(log)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--log", str(log), "--anchor", head]) == 1
    assert "not in the chain" in capsys.readouterr().err
