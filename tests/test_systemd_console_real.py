"""The review console's unit under real systemd, installed as the README's "Review console"
section says, beside the gateway's (tests/test_systemd_real.py's namespace and venv).

The hardening (a system-call filter without @resources, MemoryDenyWriteExecute, ProcSubset=pid,
no capabilities) must not break what the console does at run time: listen, hash passwords with
argon2, decode a held image in its forkserver child, release through the gateway's outbox,
append to the audit log. So: the gateway quarantines a `sentinel attack` copy of a NEMA CR sent
by DCMTK from the host; over HTTP from the host, a reviewer signs in, sees it, fetches its
image and heat map, releases it, and the gateway forwards it; the console stops cleanly and its
journal holds no error.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.dcmtk import free_port, require_dcmtk, storescu
from tests.dicom_factory import sop_uid_of
from tests.systemd_ns import SystemdNamespace, skip_unless_possible
from tests.test_systemd_real import (
    INSTALL,
    JOURNAL_BAD,
    README,
    STAGE,
    STATE,
    attacked_copy,
    audit_events,
    readme_blocks,
    service_venv,
    stage_sources,
    wait_for,
)

httpx = pytest.importorskip("httpx", reason="httpx (the test extra) drives the console")
SECTION = "## Review console"
UNIT = "xray-sentinel-console"
PASSWORD = "systemd reviewer 1"


def console_block() -> list[str]:
    """The shell commands of the README's first ``sh`` block in the console section."""
    section = README.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    return [line.split(" #", 1)[0].strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_console_unit_runs_under_real_systemd(tmp_path: Path, nema_dir: Path) -> None:
    skip_unless_possible()
    require_dcmtk()
    venv = service_venv()
    attacked = attacked_copy(nema_dir / "RG1_UNCR.dcm")
    uid = sop_uid_of(attacked)
    port, metrics_port, cport = free_port(), free_port(), free_port()
    install_cmds, _ = readme_blocks()
    commands = console_block()
    assert commands[0].startswith(f"{INSTALL}/bin/pip install"), commands
    since = time.time() - 1
    with SystemdNamespace(tmp_path / "boot.log", binds={INSTALL: venv}) as ns:
        stage_sources(ns, port, metrics_port)
        config = ns.path(STAGE) / "systemd" / "sentinel.example.toml"
        config.write_text(config.read_text() + f"\n[console]\nport = {cport}\n")
        for cmd in install_cmds:  # the gateway, as its README section installs it
            ns.run(cmd, cwd=STAGE, timeout=180)
        # the console block, verbatim but for pip (the venv has the extra) and the password,
        # which comes from a pipe instead of the terminal
        for cmd in commands[1:]:
            if " user add " in cmd:
                cmd = f"printf '%s\\n' '{PASSWORD}' | {cmd} --password-stdin"
            r = ns.run(cmd, cwd=STAGE, timeout=120, check=False)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:],
                                       ns.journal(UNIT, since)[-4000:])
        wait_for("the console active", lambda: ns.show(UNIT, "ActiveState")["ActiveState"]
                 == "active", 60)
        base = f"http://127.0.0.1:{cport}"
        web = httpx.Client(base_url=base, follow_redirects=False, timeout=30)

        def answers() -> bool:
            try:
                return web.get("/login").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the console's sign-in page", answers, 60)
        assert storescu(port, [attacked], calling="STORESCU").returncode == 0
        wait_for("the attacked copy quarantined",
                 lambda: any(e["event"] == "quarantined" and e.get("sop_uid") == uid
                             for e in audit_events(ns)), 120)

        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)
        r = web.post("/login", data={"csrf": token, "username": "alice", "password": PASSWORD})
        assert r.status_code == 303, r.text[:500]
        wait_for("the instance in the list", lambda: uid in web.get("/quarantine").text, 30)
        page = web.get(f"/quarantine/{uid}")
        assert page.status_code == 200
        for which in ("image", "heatmap"):  # decoded in the forkserver child, under the unit
            r = web.get(f"/quarantine/{uid}/{which}.png")
            assert r.status_code == 200 and r.content[:4] == b"\x89PNG", r.text[:500]
        assert web.get("/health").status_code == 200
        css = web.get("/static/console.css")  # the package's own assets, installed with it
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = web.post(f"/quarantine/{uid}/release", data={"csrf": csrf, "reason": "systemd"})
        assert r.status_code == 303 and "released+1" in r.headers["location"], r.headers
        forwarded = ns.path(STATE) / "forwarded"
        wait_for("the released copy forwarded", lambda: any(forwarded.rglob(f"{uid}.dcm")), 60)
        events = [e for e in audit_events(ns) if e.get("sop_uid") == uid]
        assert {"image-viewed", "released", "forwarded"} <= {e["event"] for e in events}
        assert ns.run([f"{INSTALL}/bin/sentinel", "audit", "verify", "--state-dir", STATE]
                      ).returncode == 0

        ns.systemctl("stop", UNIT)
        stopped = ns.show(UNIT, "ActiveState", "Result")
        assert stopped == {"ActiveState": "inactive", "Result": "success"}, stopped
        journal = ns.journal(UNIT, since)
        bad = [m.group(0) for m in JOURNAL_BAD.finditer(journal)]
        assert not bad, f"errors in the console's journal: {bad}\n{journal[-4000:]}"
        assert f"console: http://127.0.0.1:{cport}/" in journal, journal[-3000:]
