"""The systemd integration: unit file checks and the sd_notify protocol of `sentinel serve`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gateway.notify import Notifier, watchdog_interval
from tests.dcmtk import free_port
from tests.gateway_harness import GatewayProcess, write_config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "xray-sentinel.service"
CONSOLE_UNIT = REPO / "systemd" / "xray-sentinel-console.service"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd): unit not checked")
    return tool


def unit_for_verify(tmp_path: Path, unit: Path = UNIT) -> Path:
    """The unit with its ExecStart programs pointed at ones that exist on this machine
    (verify checks that they are executable; /opt/xray-sentinel is the install location)."""
    text = unit.read_text().replace("/opt/xray-sentinel/bin/sentinel", "/bin/true")
    out = tmp_path / unit.name
    out.write_text(text)
    return out


def test_unit_has_the_required_settings() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "NoNewPrivileges=yes", "SystemCallFilter=@system-service",
                 "CapabilityBoundingSet=\n", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^User=xray-sentinel", text, re.M)
    sysusers = (REPO / "systemd" / "xray-sentinel.sysusers.conf").read_text()
    assert re.search(r"^u xray-sentinel ", sysusers, re.M)


def test_unit_lets_the_scorers_nice_and_read_cpuinfo() -> None:
    """Where real systemd cannot run (test_systemd_real.py skips), the two collisions between
    the hardening and the daemon, checked on the text: a deny of @resources must be followed by
    an allow of setpriority (the scoring processes' `nice`; without it they died with EPERM and
    the unit did not start), and ProcSubset=pid hides /proc/cpuinfo (LiteRT then runs without
    XNNPACK, 3x slower)."""
    lines = UNIT.read_text().splitlines()
    filters = [ln.split("=", 1)[1] for ln in lines if ln.startswith("SystemCallFilter=")]
    deny = max((i for i, f in enumerate(filters) if f.startswith("~") and "@resources" in f),
               default=-1)
    if deny >= 0:
        assert any("setpriority" in f.split() for f in filters[deny + 1:]
                   if not f.startswith("~")), filters
    assert "ProcSubset=pid" not in lines


@pytest.mark.parametrize("unit", [UNIT, CONSOLE_UNIT], ids=["gateway", "console"])
def test_systemd_analyze_verify(tmp_path: Path, unit: Path) -> None:
    tool = analyze()
    r = subprocess.run([tool, "verify", str(unit_for_verify(tmp_path, unit))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("unit", [UNIT, CONSOLE_UNIT], ids=["gateway", "console"])
def test_security_exposure_at_most_2(tmp_path: Path, unit: Path) -> None:
    tool = analyze()
    r = subprocess.run([tool, "security", "--offline=true", str(unit_for_verify(tmp_path, unit))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    if m is None and "offline" in (r.stderr or ""):
        pytest.skip(f"this systemd-analyze has no --offline: {r.stderr.strip()}")
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0


def test_console_unit_runs_the_console_as_the_gateway_user() -> None:
    text = CONSOLE_UNIT.read_text()
    assert re.search(r"^ExecStart=\S+/sentinel console --config ", text, re.M)
    for line in ("User=xray-sentinel\n", "StateDirectory=xray-sentinel\n", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "PrivateTmp=yes",
                 "SystemCallFilter=@system-service"):
        assert line in text, line


def test_notifier_is_a_no_op_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready("x") is False
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert watchdog_interval() == 2.0


def test_serve_speaks_sd_notify(tmp_path: Path, fixture_bundle: Path) -> None:
    """READY with STATUS, WATCHDOG pings, RELOADING/READY on SIGHUP, STOPPING on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                       destinations=f'[destinations.o]\nkind = "directory"\npath = "{tmp_path}/o"',
                       bundle=fixture_bundle)
    gw = GatewayProcess(cfg, tmp_path / "gateway.log", port)
    messages: list[str] = []

    def drain(until: str, count: int = 1, timeout: float = 30.0) -> bool:
        """Collect messages until ``until`` has been seen ``count`` times in all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(until in m for m in messages) >= count:
                return True
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        return False

    try:
        # WATCHDOG_PID unset: systemd sets it only for the main PID; ours is the child itself
        gw.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        assert drain("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=listening SENTINEL@127.0.0.1:" in ready
        assert drain("WATCHDOG=1")
        gw.signal(signal.SIGHUP)
        assert drain("RELOADING=1")
        n_ready = sum("READY=1" in m for m in messages)
        assert drain("READY=1", count=n_ready + 1)  # ready again after the reload
        gw.signal(signal.SIGTERM)
        assert drain("STOPPING=1")
    finally:
        rc = gw.stop()
        sock.close()
    assert rc == 0
    assert os.path.exists(sock_path)
