"""A review console for tests: a config with [console], a state directory with held
instances, accounts of every role, and a signed-in TestClient (starlette's, in process)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from starlette.testclient import TestClient

from gateway.audit import AuditLog
from gateway.config import load_config
from gateway.console.accounts import Accounts
from gateway.console.app import create_app
from gateway.quarantine import Quarantine, QuarantineRecord
from tests.test_quarantine import make_dicom, record_for

PASSWORD = "correct horse battery"
ROLES = {"view": "viewer", "rev": "reviewer", "rev2": "reviewer", "aud": "auditor",
         "adm": "admin"}
HELD = (("1.2.3.1", "1.2.3"), ("1.2.3.2", "1.2.3"), ("4.5.1", "4.5"))


def write_site(tmp: Path, console: str = "", users: bool = True) -> Path:
    """Config + state: three held instances (two of study 1.2.3), outboxes, and accounts."""
    cfg = tmp / "sentinel.toml"
    cfg.write_text(
        '[listener]\nae_title = "SENTINEL"\nport = 11112\n\n'
        '[state]\ndir = "state"\n\n'
        f'[console]\n{console}\n\n'
        '[destinations.pacs]\nkind = "directory"\npath = "out"\n')
    state = tmp / "state"
    for sop, study in HELD:
        hold(state, make_dicom(tmp / "spool" / f"{sop}.dcm", sop, study),
             record_for(sop, study, destinations=("pacs",)))
    (state / "spool" / "outbox" / "pacs").mkdir(parents=True, exist_ok=True)
    (state / "spool" / "dead" / "pacs").mkdir(parents=True, exist_ok=True)
    if users:
        accounts = Accounts(state / "console" / "users.json")
        for name, role in ROLES.items():
            accounts.add(name, role, PASSWORD)
    return cfg


def hold(state: Path, src: Path, record: QuarantineRecord) -> None:
    """Quarantine ``src`` as the gateway does: the sidecar and file, then the audit line."""
    Quarantine(state / "quarantine").put(src, record)
    AuditLog(state / "audit" / "audit.jsonl").append(
        "quarantined", sop_uid=record.sop_uid, study_uid=record.study_uid,
        calling_ae=record.calling_ae, reason=record.reason, rule=record.rule)


def client(cfg: Path, **kw: object) -> TestClient:
    return TestClient(create_app(load_config(cfg), follow=False), follow_redirects=False,
                      **kw)  # type: ignore[arg-type]


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1)


def login(c: TestClient, name: str, password: str = PASSWORD) -> int:
    """Sign in through the form; returns the POST's status (303 when signed in)."""
    token = csrf_of(c.get("/login").text)
    r = c.post("/login", data={"csrf": token, "username": name, "password": password,
                               "next": "/"})
    return r.status_code


def signed_in(cfg: Path, name: str, **kw: object) -> TestClient:
    c = client(cfg, **kw)
    assert login(c, name) == 303
    return c


def page_csrf(c: TestClient, path: str = "/quarantine/1.2.3.1") -> str:
    r = c.get(path)
    assert r.status_code == 200, r.text[:500]
    return csrf_of(r.text)


def events(cfg: Path, name: str | None = None) -> list[dict[str, object]]:
    import json

    log = load_config(cfg).audit_path
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if name is None or r["event"] == name]


@contextlib.contextmanager
def console_process(cfg: Path, url: str, log: Path, ssl_context: object = None
                    ) -> Iterator[subprocess.Popen[bytes]]:
    """``sentinel console --config cfg`` as its own process (as systemd runs it), until
    ``url``/login answers; stopped (SIGTERM, then SIGKILL) when the block ends."""
    repo = Path(__file__).resolve().parents[1]
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "console", "--config",
                                 str(cfg)], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(repo)})
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"console exited {proc.returncode}: {log.read_text()}")
                try:
                    with urllib.request.urlopen(f"{url}/login", timeout=2,
                                                context=ssl_context):  # type: ignore[arg-type]
                        break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"console not answering: {log.read_text()}") from None
                    time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
