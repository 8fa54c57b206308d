"""Tamper evidence, end to end: audit lines the daemon wrote, and model bundles.

Audit: a real `sentinel serve` writes its hash-chained log while storescu sends (forwarded and
quarantined instances); then one line is edited, deleted, or two are swapped, and
``sentinel audit verify --log FILE`` (the CLI, as an operator runs it) exits 1 naming that line.

Bundle: a bundle whose file digest does not match its manifest stops ``serve`` from starting
with a message naming the file; the same tampered bundle offered to a running gateway by a
config change and SIGHUP is refused (audited ``config-rejected``, naming the file) and the
running model keeps scoring. A bundle tampered in place under a running gateway is not reloaded
(the model in memory stays the verified one) and the next start refuses it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.reliability import record_figures
from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import make_series, synthetic
from tests.gateway_harness import REPO_ROOT, GatewayProcess, audit_events, wait_until, write_config

FLAG_RULE = """
[[rules]]
name = "force-flag"
action = "screen"
threshold = 0.0
[rules.match]
BodyPartExamined = "HAND"
"""


def audit_verify(log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--log",
                           str(log)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def events(state: Path) -> list[dict]:  # type: ignore[type-arg]
    """The records of the daemon's live audit log, read up to its last complete write
    (gateway.audit.locked_size): a line the daemon is still appending is not read half."""
    return audit_events(state / "audit" / "audit.jsonl")


@pytest.fixture(scope="module")
def daemon_log(tmp_path_factory: pytest.TempPathFactory, fixture_bundle: Path) -> Path:
    """An audit log written by the real daemon: received, scored, forwarded, quarantined."""
    require_dcmtk()
    tmp = tmp_path_factory.mktemp("audit")
    port = free_port()
    cfg = write_config(tmp / "c.toml", state=tmp / "state", port=port, rules=FLAG_RULE,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{tmp}/o"\n',
                       default='action = "screen"\nthreshold = 1.0', bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp / "gateway.log", port).start()
    try:
        files = make_series(tmp / "in", 4, rows=32, cols=32)
        files.append(synthetic(tmp / "hand.dcm", 32, 32, body_part="HAND"))
        assert storescu(port, files).returncode == 0
        assert wait_until(lambda: sum(e["event"] in ("forwarded", "quarantined")
                                      for e in events(tmp / "state")) == 5, 30)
    finally:
        assert gw.stop() == 0
    log = tmp / "state" / "audit" / "audit.jsonl"
    assert len(log.read_text().splitlines()) >= 15
    return log


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_audit_verify_names_the_tampered_line(how: str, daemon_log: Path, tmp_path: Path) -> None:
    clean = audit_verify(daemon_log)
    assert clean.returncode == 0, clean.stderr
    lines = daemon_log.read_text().splitlines(keepends=True)
    k = len(lines) // 2  # 0-based index of the line we touch; the CLI counts from 1
    target = next(i for i in range(k, len(lines)) if '"event":"scored"' in lines[i])
    if how == "edit":  # a flagged verdict quietly turned clean, say
        record = json.loads(lines[target])
        record["score"] = 0.0001
        lines[target] = json.dumps(record, separators=(",", ":")) + "\n"
    elif how == "delete":
        del lines[target]
    else:
        lines[target], lines[target + 1] = lines[target + 1], lines[target]
    bad = tmp_path / "audit.jsonl"
    bad.write_text("".join(lines))
    r = audit_verify(bad)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"line {target + 1}:" in r.stderr, r.stderr
    record_figures(f"tamper_audit_{how}", {"exit": r.returncode, "named_line": target + 1})


def _tamper(bundle: Path) -> Path:
    """Flip one byte of the forest file (same size, different digest); return the file."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    victim = bundle / manifest["files"]["forest"]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim


def test_tampered_bundle_stops_serve(tmp_path: Path, fixture_bundle: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fixture_bundle, bundle)
    victim = _tamper(bundle)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\n'
                                    f'path = "{tmp_path}/o"\n', bundle=bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port)
    with pytest.raises(RuntimeError, match="exited 2"):
        gw.start(timeout=60)
    log = gw.log()
    assert "model bundle refused" in log and victim.name in log, log[-1500:]
    assert "ready:" not in log


def test_tampered_bundle_on_reload_keeps_the_running_model(tmp_path: Path,
                                                           fixture_bundle: Path) -> None:
    require_dcmtk()
    good = tmp_path / "good"
    shutil.copytree(fixture_bundle, good)
    bad = tmp_path / "bad"
    shutil.copytree(fixture_bundle, bad)
    victim = _tamper(bad)  # same bundle id as the good one: only the digest differs
    port = free_port()
    state = tmp_path / "state"
    dest = f'[destinations.o]\nkind = "directory"\npath = "{tmp_path}/o"\n'

    def config(bundle: Path) -> Path:
        return write_config(tmp_path / "c.toml", state=state, port=port, destinations=dest,
                            default='action = "screen"\nthreshold = 1.0', bundle=bundle)

    cfg = config(good)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
    good_id = json.loads((good / "manifest.json").read_text())["bundle_id"]

    def scored_ids() -> list[str]:
        return [e.get("bundle_id", "") for e in events(state) if e["event"] == "scored"]

    try:
        assert storescu(port, [synthetic(tmp_path / "a.dcm", 32, 32, seed=1)]).returncode == 0
        assert wait_until(lambda: len(scored_ids()) == 1, 20)
        config(bad)
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: any(e["event"] == "config-rejected" for e in events(state)), 20)
        rejected = [e for e in events(state) if e["event"] == "config-rejected"]
        assert victim.name in rejected[0]["reason"], rejected[0]["reason"]
        assert storescu(port, [synthetic(tmp_path / "b.dcm", 32, 32, seed=2)]).returncode == 0
        assert wait_until(lambda: len(scored_ids()) == 2, 20)
        assert scored_ids() == [good_id, good_id]  # the running, verified model still scores
        assert not [e for e in events(state)
                    if e["event"] == "config-loaded" and e.get("status") == "reload"]
        # tampered in place under the running gateway: kept in memory, refused at next start
        config(good)
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: sum(e["event"] == "config-loaded" for e in events(state)) >= 2,
                          20)
        _tamper(good)
        gw.signal(signal.SIGHUP)
        assert storescu(port, [synthetic(tmp_path / "c.dcm", 32, 32, seed=3)]).returncode == 0
        assert wait_until(lambda: len(scored_ids()) == 3, 20)
        assert scored_ids()[-1] == good_id
    finally:
        assert gw.stop() == 0
    assert "config reload refused" in gw.log()
    again = GatewayProcess(cfg, tmp_path / "gateway-restart.log", port)
    with pytest.raises(RuntimeError, match="exited 2"):
        again.start(timeout=60)
    assert "model bundle refused" in again.log()
    record_figures("tamper_bundle", {"start_with_tampered_bundle": "refused (exit 2)",
                                     "sighup_to_tampered_bundle": "rejected, running model kept",
                                     "restart_after_in_place_tamper": "refused (exit 2)"})
