"""The shipped unit under real systemd, installed exactly as the README says (issue 20).

systemd 252 boots as PID 1 of a private PID and mount namespace (``tests/systemd_ns.py``: its
own /tmp, /var/tmp and /run, copy-on-write /etc, /var and /opt, so the host is left as it was).
The test runs the two command blocks of the README's "As a systemd service" section, in order,
inside it, and checks between them what each promises:

- install + ``systemctl enable --now``: the service reaches READY (active, running), and its
  scoring processes run at the config's ``nice`` (the unit's system-call filter once denied
  ``setpriority`` and the service could not start);
- DCMTK on the host C-ECHOes it and C-STOREs a clean NEMA CR, forwarded byte for byte, and a
  ``sentinel attack`` PGD copy of it, quarantined;
- ``systemctl reload`` (SIGHUP): a ``config-loaded`` reload in the audit log, same main PID;
- alive for longer than ``WatchdogSec``: pings arrive, no restart;
- ``systemctl stop``: exit 0, nothing half-done in the spool, the audit chain verifies;
- ``journalctl -u``: no error, no traceback, and LiteRT found /proc/cpuinfo (its XNNPACK
  kernels, 3x faster, need it; ``ProcSubset=pid`` hid it).

What differs from a real install, and only that: the venv (Debian's /usr/bin/python3, built
once per source version under /opt/xray-sentinel-test and bound at /opt/xray-sentinel inside the
namespace, so the unit file is installed byte for byte), the config's two ports (free ones), and
``--since`` on journalctl (the host's journal files hold earlier runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dcmtk import echoscu, free_port, require_dcmtk, storescu
from tests.dicom_factory import dataset_bytes, sop_uid_of
from tests.systemd_ns import SystemdNamespace, skip_unless_possible

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "xray-sentinel.service"
EXAMPLE = REPO / "systemd" / "sentinel.example.toml"
README = REPO / "README.md"
SECTION = "### As a systemd service"
VENV_ROOT = Path("/opt/xray-sentinel-test")  # outside /tmp (private inside) and /root (hidden)
INSTALL = "/opt/xray-sentinel"  # where the README and the unit expect the gateway
STAGE = "/run/xray-sentinel-src"  # the namespace's copy of what the README's commands read
STATE = "/var/lib/xray-sentinel"
SERVICE = "xray-sentinel"
PACKAGE_PARTS = ("setup.cfg", "pyproject.toml", "README.md", "detector", "gateway", "train")
# what must never appear in the service's journal
JOURNAL_BAD = re.compile(
    r"Traceback|^(ERROR|CRITICAL)\b|Error in cpuinfo|Watchdog timeout|Failed with result|"
    r"Failed to|Main process exited, code=(killed|dumped)|mode is different|Scheduled restart",
    re.M)


def readme_blocks() -> list[list[str]]:
    """The shell commands of each ``sh`` block in the README's service section (comments and
    continuation-comment lines dropped, one command a line)."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    out = []
    for block in blocks:
        cmds = []
        for line in block.splitlines():
            cmd = line.split(" #", 1)[0].strip()
            if cmd and not cmd.startswith("#"):
                cmds.append(cmd)
        out.append(cmds)
    assert len(out) == 2 and all(out), f"expected two command blocks in '{SECTION}': {out}"
    return out


# -- the test venv: Debian's python, cached per source version -------------------------------
def _source_key() -> str:
    """A digest of everything `pip install .` installs, and of the interpreter it runs on."""
    h = hashlib.sha256()
    h.update(subprocess.run(["/usr/bin/python3", "-VV"], capture_output=True, text=True,
                            check=True).stdout.encode())
    for part in PACKAGE_PARTS:
        root = REPO / part
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for f in files:
            h.update(str(f.relative_to(REPO)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def service_venv() -> Path:
    """A venv of this source tree on /usr/bin/python3 (the unit's ProtectHome=yes hides a
    Python under /root, such as pyenv's), built from a clean copy (setuptools' build/ may hold
    modules deleted since) and reused while the sources are unchanged. About 15 s to build."""
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("real-systemd test: /usr/bin/python3 (Debian's) not found")
    VENV_ROOT.mkdir(mode=0o755, exist_ok=True)
    key = _source_key()
    venv = VENV_ROOT / f"venv-{key[:16]}"
    with (VENV_ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / ".complete"
        if stamp.is_file() and stamp.read_text() == key:
            return venv
        for old in VENV_ROOT.glob("venv-*"):  # one venv at a time: each is ~380 MB
            shutil.rmtree(old)
        with tempfile.TemporaryDirectory(dir=VENV_ROOT, prefix="src-") as src:
            for part in PACKAGE_PARTS:
                if (REPO / part).is_file():
                    shutil.copy2(REPO / part, Path(src) / part)
                else:
                    shutil.copytree(REPO / part, Path(src) / part,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
            # with the review console's extra: tests/test_systemd_console_real.py runs it too
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{src}[console]"],
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"pip install into {venv} failed:\n{r.stderr[-3000:]}"
        os.chmod(venv, 0o755)
        stamp.write_text(key)
    return venv


def attacked_copy(src: Path) -> Path:
    """`sentinel attack` PGD eps 0.006 copy of ``src`` against the default bundle, made once
    per (source, bundle) and kept in build/ (about 12 s)."""
    bundle = REPO / "detector" / "models" / "default"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("no trained default bundle in detector/models/default")
    key = hashlib.sha256(src.read_bytes() + (bundle / "manifest.json").read_bytes()).hexdigest()
    out = REPO / "build" / "systemd-test" / f"{src.stem}-pgd0.006-{key[:12]}.dcm"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part.dcm")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "attack", str(src), str(part),
                        "--method", "pgd", "--eps", "0.006", "--bundle", str(bundle)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    part.replace(out)
    return out


# -- helpers ---------------------------------------------------------------------------------
def wait_for(what: str, cond: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def stage_sources(ns: SystemdNamespace, port: int, metrics_port: int) -> None:
    """The repository's systemd/ folder, as the README's commands read it, in the namespace;
    the config's listener and metrics ports changed to free ones (the README's "edit it")."""
    dest = ns.path(STAGE) / "systemd"
    dest.mkdir(parents=True)
    for f in (REPO / "systemd").iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    text = EXAMPLE.read_text()
    for old, new in ((11112, port), (9464, metrics_port)):
        text, n = re.subn(rf"^port = {old}\b", f"port = {new}", text, flags=re.M)
        assert n == 1, f"{EXAMPLE}: expected one 'port = {old}' line"
    (dest / EXAMPLE.name).write_text(text)


def sent_by_dcmtk(path: Path) -> bytes:
    """The dataset bytes storescu puts on the wire for ``path``: the file's, less a trailing
    Data Set Trailing Padding element (FFFC,FFFC), which DCMTK drops (RG1_UNCR has 126 bytes
    of it). The gateway must forward exactly these."""
    import pydicom

    data = dataset_bytes(path)
    ds = pydicom.dcmread(path, stop_before_pixels=False)
    if 0xFFFCFFFC in ds:
        tail = 12 + len(ds[0xFFFCFFFC].value)  # explicit VR OB: tag, VR, reserved, length
        assert data[-tail:-tail + 4] == b"\xfc\xff\xfc\xff", "padding is not the last element"
        data = data[:-tail]
    return data


def children_nice(ns: SystemdNamespace, pid: int) -> dict[str, int]:
    """Nice value of each child of ``pid`` (a PID inside the namespace), by command line, read
    from the namespace's /proc (field 19 of stat)."""
    proc = ns.path("/proc")
    found = {}
    for child in (proc / str(pid) / "task" / str(pid) / "children").read_text().split():
        cmd = (proc / child / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = (proc / child / "stat").read_text()
        found[f"{child}: {cmd}"] = int(stat.rsplit(")", 1)[1].split()[16])
    return found


def audit_events(ns: SystemdNamespace) -> list[dict]:  # type: ignore[type-arg]
    path = ns.path(STATE) / "audit" / "audit.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def host_footprint() -> dict[str, object]:
    """What a real install would change on the host; the namespace must change none of it."""
    paths = ["/etc/systemd/system/xray-sentinel.service", "/etc/sysusers.d/xray-sentinel.conf",
             "/etc/tmpfiles.d/xray-sentinel.conf", "/etc/xray-sentinel", STATE, INSTALL,
             "/etc/systemd/system/multi-user.target.wants/xray-sentinel.service"]
    found: dict[str, object] = {p: os.path.lexists(p) for p in paths}
    found["passwd"] = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    found["cgroup-fs"] = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "/sys/fs/cgroup"],
                                        capture_output=True, text=True).stdout
    return found


def processes_running(path: Path) -> list[str]:
    """Command lines of host processes that run something under ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if str(path) in cmd:
                found.append(f"{pid}: {cmd}")
    return found


# -- the test --------------------------------------------------------------------------------
def test_shipped_unit_runs_under_real_systemd(tmp_path: Path, nema_dir: Path) -> None:
    skip_unless_possible()
    require_dcmtk()
    timings: dict[str, float] = {}
    t_begin = time.monotonic()
    install_cmds, operate_cmds = readme_blocks()
    operated: set[str] = set()

    def operate(prefix: str) -> str:
        """The README's operating command that starts with ``prefix``; counted as run."""
        hits = [c for c in operate_cmds if c.startswith(prefix)]
        assert len(hits) == 1, f"README '{SECTION}': no single command starting {prefix!r}"
        operated.add(hits[0])
        return hits[0]

    venv = service_venv()
    clean = nema_dir / "RG1_UNCR.dcm"
    attacked = attacked_copy(clean)
    timings["venv and attacked copy ready"] = time.monotonic() - t_begin
    config_nice = int(re.search(r"^nice = (\d+)", EXAMPLE.read_text(), re.M).group(1))
    watchdog_s = int(re.search(r"^WatchdogSec=(\d+)", UNIT.read_text(), re.M).group(1))
    port, metrics_port = free_port(), free_port()
    marker = tmp_path / "host-tmp-survives"  # pytest's tmp_path is in the host's /tmp
    marker.write_text("systemd-tmpfiles --boot must not see this")
    footprint = host_footprint()
    since = time.time() - 1

    with SystemdNamespace(tmp_path / "boot.log", binds={INSTALL: venv}) as ns:
        timings["systemd booted"] = time.monotonic() - t_begin
        stage_sources(ns, port, metrics_port)
        for cmd in install_cmds:  # the README's install block, verbatim, in order
            r = ns.run(cmd, cwd=STAGE, timeout=180, check=False)
            assert r.returncode == 0, (f"README step `{cmd}` exited {r.returncode}:\n"
                                       f"{r.stdout[-2000:]}{r.stderr[-2000:]}\n"
                                       f"the service's journal:\n"
                                       f"{ns.journal(SERVICE, since)[-6000:]}")
        timings["README install block done (READY)"] = time.monotonic() - t_begin
        t_ready = time.monotonic()
        assert ns.path("/etc/systemd/system/xray-sentinel.service").read_bytes() == \
            UNIT.read_bytes(), "the unit must be installed as shipped"
        props = ns.show(SERVICE, "ActiveState", "SubState", "MainPID", "StatusText",
                        "NRestarts", "WatchdogTimestampMonotonic", "WatchdogUSec")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert props["StatusText"].startswith("listening SENTINEL@127.0.0.1:"), props
        assert props["WatchdogUSec"] == f"{watchdog_s}s", props
        main_pid = props["MainPID"]
        status = ns.run(operate("systemctl status")).stdout
        assert "active (running)" in status, status

        # the scoring processes lowered their own priority under the unit's syscall filter
        scorers = {cmd: nice for cmd, nice in children_nice(ns, int(main_pid)).items()
                   if "detector_process" in cmd}
        assert scorers, "no scoring process under the daemon"
        assert all(nice == config_nice for nice in scorers.values()), scorers

        # DCMTK on the host: echo, then a clean CR and its attacked copy
        r = echoscu(port, calling="ECHOSCU")
        assert r.returncode == 0, r.stderr
        r = storescu(port, [clean, attacked], calling="STORESCU")
        assert r.returncode == 0, r.stderr
        clean_uid, attacked_uid = sop_uid_of(clean), sop_uid_of(attacked)
        forwarded = ns.path(STATE) / "forwarded"
        wait_for("the clean CR in the directory destination",
                 lambda: any(forwarded.rglob(f"{clean_uid}.dcm")))
        sent = next(forwarded.rglob(f"{clean_uid}.dcm"))
        assert dataset_bytes(sent) == sent_by_dcmtk(clean), "not forwarded byte for byte"
        wait_for("the attacked copy's verdict",
                 lambda: any(e["event"] == "quarantined" and e.get("sop_uid") == attacked_uid
                             for e in audit_events(ns)))
        held = ns.run(operate(f"{INSTALL}/bin/sentinel quarantine list")).stdout
        rows = [line for line in held.splitlines() if attacked_uid in line]
        assert len(rows) == 1 and "flagged" in rows[0], held
        assert clean_uid not in held, held
        assert not list(forwarded.rglob(f"{attacked_uid}.dcm")), "attacked copy forwarded"
        timings["echo, store, forwarded and quarantined"] = time.monotonic() - t_begin

        # reload through systemd: SIGHUP, a config-loaded reload in the audit log, same PID
        ns.run(operate("systemctl reload"))
        wait_for("config-loaded (reload) in the audit log",
                 lambda: any(e["event"] == "config-loaded" and e.get("status") == "reload"
                             for e in audit_events(ns)), timeout=30)
        wait_for("active again after the reload",
                 lambda: ns.show(SERVICE, "ActiveState")["ActiveState"] == "active", 30)

        # the watchdog sees the daemon alive for longer than WatchdogSec
        pinged = int(ns.show(SERVICE, "WatchdogTimestampMonotonic")
                     ["WatchdogTimestampMonotonic"])
        time.sleep(max(0.0, t_ready + watchdog_s + 5 - time.monotonic()))
        later = ns.show(SERVICE, "ActiveState", "MainPID", "NRestarts",
                        "WatchdogTimestampMonotonic")
        assert later["ActiveState"] == "active" and later["NRestarts"] == "0", later
        assert later["MainPID"] == main_pid, (later, main_pid)
        assert int(later["WatchdogTimestampMonotonic"]) > pinged, "no watchdog ping arrived"
        timings[f"alive past WatchdogSec={watchdog_s}"] = time.monotonic() - t_begin

        # stop: a clean drain, nothing half-done, the audit chain intact
        ns.run(operate("systemctl stop"))
        stopped = ns.show(SERVICE, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
        assert stopped["ActiveState"] == "inactive" and stopped["Result"] == "success", stopped
        assert stopped["ExecMainStatus"] == "0", stopped
        spool = ns.path(STATE) / "spool"
        for sub in ("tmp", "incoming", "work"):
            assert not list((spool / sub).iterdir()), f"spool/{sub} not empty after stop"
        for box in (spool / "outbox").iterdir():
            assert not list(box.iterdir()), f"{box.name} outbox not empty after stop"
        leftovers = [p for p in ns.path(STATE).rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, f"temporary files left after stop: {leftovers}"
        verify = ns.run(operate(f"{INSTALL}/bin/sentinel audit verify"), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        # the service log: no error, and the CNN's fast kernels found the CPU description
        journal_cmd = shlex.split(operate("journalctl -u"))
        journal = ns.run([*journal_cmd, "--no-pager", "-o", "cat", f"--since=@{int(since)}"]
                         ).stdout
        bad = [m.group(0) for m in JOURNAL_BAD.finditer(journal)]
        assert not bad, f"errors in the service's journal: {bad}\n{journal[-4000:]}"
        assert "XNNPACK delegate" in journal, journal[-4000:]
        assert "ready: listening" in journal and "configuration reloaded" in journal
        assert operated == set(operate_cmds), f"README commands not run: " \
            f"{set(operate_cmds) - operated}"
        timings["stopped, journal read"] = time.monotonic() - t_begin

    # the namespace is gone and took everything with it
    assert marker.is_file(), "the host's /tmp was emptied: the namespace's /tmp was not private"
    assert host_footprint() == footprint, "the namespace changed the host"
    assert not processes_running(venv), processes_running(venv)
    timings["namespace torn down"] = time.monotonic() - t_begin
    print("\n" + "\n".join(f"  {t:6.1f} s  {what}" for what, t in timings.items()))
