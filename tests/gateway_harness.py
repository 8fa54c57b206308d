"""Run the gateway for tests: a config writer, the daemon as a subprocess, metrics parsing.

Why a subprocess for end-to-end tests: signals (SIGHUP reload, SIGTERM drain, SIGKILL crash)
and the service log on stderr are part of what is tested, exactly as systemd would run it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.audit import locked_size
from tests.dcmtk import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_config(
    path: Path,
    *,
    state: Path,
    port: int,
    destinations: str,
    rules: str = "",
    default: str = 'action = "pass"',
    callers: tuple[str, ...] = ("MODALITY", "STORESCU", "ECHOSCU"),
    bundle: Path | None = None,
    metrics_port: int = 0,
    detector_extra: str = "",
    forwarding: str = "backoff_initial_s = 0.2\nbackoff_max_s = 1\nmax_age_s = 600",
    limits: str = "",
    min_free_mb: float = 1,
    relay_unscreened: bool = True,
    extra: str = "",
) -> Path:
    """Write a gateway TOML config for a test and return its path.

    With a ``pass`` default and ``relay_unscreened`` (most tests of receiving and forwarding,
    which load no model), a last rule forwards every instance unscreened, whatever its sender
    (also one recovered from the spool without metadata), with ``allow_unscreened_pixels``: a
    pass default alone no longer forwards pixel data unscreened (gateway.rules). Tests of
    screening itself give ``relay_unscreened=False``. ``extra`` is TOML put before the
    destinations (more ``[[callers]]`` tables, ``[commitment]``).
    """
    caller_tables = "\n".join(
        f'[[callers]]\nae_title = "{c}"\naddresses = ["127.0.0.1", "::1"]\n' for c in callers
    )
    if relay_unscreened and default.strip().startswith('action = "pass"'):
        rules += ('\n[[rules]]\nname = "relay-unscreened"\naction = "pass"\n'
                  'allow_unscreened_pixels = true\n[rules.match]\n'
                  'calling_ae = { regex = ".*" }\n')
    text = f"""
[listener]
ae_title = "SENTINEL"
host = "127.0.0.1"
port = {port}

{caller_tables}

[timeouts]
acse_s = 10
dimse_s = 20
network_s = 20
connect_s = 3

[limits]
{limits}

[state]
dir = "{state}"
min_free_mb = {min_free_mb}

[metrics]
port = {metrics_port}

[detector]
bundle = "{bundle if bundle is not None else 'default'}"
workers = 1
{detector_extra}

[forwarding]
{forwarding}
idle_release_s = 5

{extra}

{destinations}

{rules}

[default]
{default}
"""
    path.write_text(text)
    return path


class GatewayProcess:
    """``sentinel serve`` as a child process; its stderr goes to ``log_path``."""

    def __init__(self, config: Path, log_path: Path, port: int, metrics_port: int = 0) -> None:
        self.config = config
        self.log_path = log_path
        self.port = port
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> GatewayProcess:
        offset = len(self.log())  # a restart appends: look for "ready:" after this point
        log = self.log_path.open("ab")
        full_env = dict(os.environ)
        full_env.setdefault("OPENBLAS_NUM_THREADS", "1")
        full_env["PYTHONPATH"] = str(REPO_ROOT)
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log()[-2000:]}")
            if "ready:" in self.log()[offset:]:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc = int(self.proc.returncode)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}",
                                        timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def audit_events(path: Path, event: str | None = None) -> list[dict]:  # type: ignore[type-arg]
    """The records of a (possibly live) audit log, read only up to its last complete write
    (gateway.audit.locked_size): a line the daemon is still appending is never parsed half.
    ``event``: only the records of that event. A log not written yet has none."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        data = f.read(locked_size(path))
    rows = [json.loads(x) for x in data.splitlines() if x.strip()]
    return [r for r in rows if event is None or r["event"] == event]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def new_ports() -> tuple[int, int]:
    return free_port(), free_port()


def make_pki(directory: Path) -> dict[str, Path]:
    """A test CA plus server and client certificates (openssl CLI), for DICOM TLS tests.

    Returns paths: ca, server_cert, server_key, client_cert, client_key. Skips the calling
    test when openssl is not installed.
    """
    import shutil as _shutil

    import pytest

    openssl = _shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: TLS certificates cannot be made")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=sentinel-test-ca")
    out: dict[str, Path] = {"ca": ca}
    for who in ("server", "client"):
        key, csr, crt = (directory / f"{who}.key", directory / f"{who}.csr",
                         directory / f"{who}.crt")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN=sentinel-test-{who}")
        ext = directory / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))
        out[f"{who}_cert"], out[f"{who}_key"] = crt, key
    return out
