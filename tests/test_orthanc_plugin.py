"""End to end: the plugin form, screening inside a real Orthanc (gateway.orthanc_plugin).

Debian's /usr/sbin/Orthanc 1.10.1 loads libOrthancPython.so (orthanc-python 4.0) with the
repository's loader, systemd/orthanc_sentinel.py, which reads the test's TOML. The modality is
DCMTK's /usr/bin/storescu; each instance's DIMSE status is read from its ``-v`` output. The
sentinel's state (quarantine, audit log) is the same layout ``sentinel serve`` keeps, and the
release is the operator's own ``sentinel quarantine release``.

Skips without orthanc-python; the tests with the real attacked NEMA CR skip without
SENTINEL_DATA (CI has both). The scorer crash is a real SIGSEGV of the scoring child, caused by
a ``sitecustomize`` that only the test's interpreter wrapper (``[orthanc_plugin] python``) adds.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.quarantine import Quarantine
from tests.dcmtk import STORESCU, dcmtk_env, free_port, require_dcmtk
from tests.dicom_factory import make_sr, relabel, sentinel_attack, sop_uid_of, synthetic
from tests.orthanc import plugin_toml, require_python_plugin, sentinel_plugin_orthanc

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "detector" / "models" / "default"
pytestmark = pytest.mark.integration

SUCCESS = "Success"
REFUSED = "Unknown Status: 0x124"  # 0x0124 Refused: Not Authorized (DCMTK has no name for it)
CANNOT_UNDERSTAND = "Error: CannotUnderstand"  # 0xC000, [orthanc_plugin] error_status
OUT_OF_RESOURCES = "Refused: OutOfResources"  # 0xA700: the handler itself failed
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage


class PluginSite:
    """An Orthanc with the sentinel plugin, its TOML, and the modality's and operator's tools."""

    def __init__(self, tmp: Path, *, rules: str = "", default_extra: str = "",
                 python: str = sys.executable) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.toml = tmp / "sentinel.toml"
        self.orthanc = sentinel_plugin_orthanc(tmp / "orthanc", self.toml,
                                               {"modality": ("MODALITY", free_port())})
        plugin_toml(self.toml, state=self.state, bundle=BUNDLE, url=self.orthanc.base_url,
                    rules=rules, default=f'action = "screen"\n{default_extra}', python=python)

    def send(self, files: Sequence[Path]) -> list[str]:
        """storescu over one association; the DIMSE status of each file, in order."""
        cmd = [STORESCU, "-v", "--no-halt", "-aet", "MODALITY", "-aec", self.orthanc.aet,
               "-to", "30", "-ta", "30", "-td", "120", "127.0.0.1", str(self.orthanc.dicom_port),
               *map(str, files)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dcmtk_env())
        statuses = re.findall(r"Received Store Response \(([^)]*)\)", r.stdout + r.stderr)
        assert len(statuses) == len(files), r.stdout + r.stderr + self.log()
        return statuses

    def audit(self) -> list[dict[str, Any]]:
        path = self.state / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def events(self, event: str, sop_uid: str) -> list[dict[str, Any]]:
        return [e for e in self.audit() if e["event"] == event and e.get("sop_uid") == sop_uid]

    def held(self) -> dict[str, Any]:
        return {r.sop_uid: r for r in Quarantine(self.state / "quarantine").list()}

    def stored(self, sop_uid: str) -> bool:
        return self.orthanc.find_instance(sop_uid) is not None

    def sentinel(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config",
                               str(self.toml)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    def log(self) -> str:
        path = self.orthanc.workdir / "orthanc.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextmanager
def plugin_site(tmp: Path, **kw: Any) -> Iterator[PluginSite]:
    require_python_plugin()
    require_dcmtk()
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("no trained default bundle in detector/models/default")
    site = PluginSite(tmp, **kw)
    try:
        site.orthanc.start(timeout=120)
    except RuntimeError:
        pytest.fail(f"Orthanc with the plugin did not start:\n{site.log()}")
    try:
        yield site
    finally:
        site.orthanc.stop()


@pytest.fixture(scope="module")
def attacked_cr(nema_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real NEMA CR RG1 and a `sentinel attack` PGD copy of it (eps 0.006), made once."""
    require_python_plugin()  # skip before the attack's minute of work where nothing could run
    original = nema_dir / "RG1_UNCR.dcm"
    out = tmp_path_factory.mktemp("attack") / "rg1-pgd.dcm"
    return original, sentinel_attack(original, out, BUNDLE)


def test_clean_stored_attacked_refused_held_then_released(tmp_path: Path,
                                                          attacked_cr: tuple[Path, Path]) -> None:
    original, attacked = attacked_cr
    clean_uid, bad_uid = sop_uid_of(original), sop_uid_of(attacked)
    with plugin_site(tmp_path) as site:
        assert site.send([original, attacked]) == [SUCCESS, REFUSED], site.log()
        assert site.stored(clean_uid)
        assert not site.stored(bad_uid)  # refused: not in Orthanc
        held = site.held()
        assert set(held) == {bad_uid}
        assert held[bad_uid].reason == "flagged" and held[bad_uid].destinations == ("pacs",)
        assert site.events("scored", bad_uid)[-1]["verdict"] == "flagged"
        assert site.events("quarantined", bad_uid)[-1]["reason"] == "flagged"
        assert site.events("scored", clean_uid)[-1]["verdict"] == "clean"

        r = site.sentinel("quarantine", "release", bad_uid, "--reason",
                          "reviewed: known test pattern")
        assert r.returncode == 0, r.stderr
        assert "stored in pacs" in r.stdout
        assert site.stored(bad_uid)  # through REST: no second screening
        in_orthanc = pydicom.dcmread(io.BytesIO(site.orthanc.instance_file(bad_uid) or b""))
        assert in_orthanc.PixelData == pydicom.dcmread(attacked).PixelData
        assert site.held() == {}
        released = site.events("released", bad_uid)
        assert released and released[-1]["reason"] == "reviewed: known test pattern"
        assert released[-1]["outcome"] == "stored" and released[-1]["destination"] == "pacs"
        assert len(site.events("scored", bad_uid)) == 1  # the release was not screened
        v = site.sentinel("audit", "verify")
        assert v.returncode == 0, v.stdout + v.stderr


def test_console_release_puts_the_instance_into_the_plugins_orthanc(
        tmp_path: Path, attacked_cr: tuple[Path, Path]) -> None:
    """The review console's release in the plugin form: the same code as the CLI's, so the
    held instance goes into that Orthanc by REST (not into an outbox no forwarder drains),
    byte-identical pixels, audited with the reviewer's name and reason."""
    pytest.importorskip("starlette", reason="the console extra: pip install -e .[console]")
    from gateway.console.accounts import Accounts
    from tests.console_site import PASSWORD, page_csrf, signed_in

    _, attacked = attacked_cr
    bad_uid = sop_uid_of(attacked)
    with plugin_site(tmp_path) as site:
        assert site.send([attacked]) == [REFUSED], site.log()
        assert set(site.held()) == {bad_uid}
        site.toml.write_text(site.toml.read_text() + "\n[console]\n")  # console defaults
        Accounts(site.state / "console" / "users.json").add("rev", "reviewer", PASSWORD)
        c = signed_in(site.toml, "rev")
        token = page_csrf(c, f"/quarantine/{bad_uid}")
        r = c.post(f"/quarantine/{bad_uid}/release",
                   data={"csrf": token, "reason": "reviewed in the console"})
        assert r.status_code == 303, r.text[:500]
        assert site.stored(bad_uid)
        in_orthanc = pydicom.dcmread(io.BytesIO(site.orthanc.instance_file(bad_uid) or b""))
        assert in_orthanc.PixelData == pydicom.dcmread(attacked).PixelData
        assert site.held() == {}
        assert not list((site.state / "spool" / "outbox").glob("*/*.dcm"))
        released = site.events("released", bad_uid)[-1]
        assert (released["actor"], released["reason"], released["outcome"]) == (
            "console:rev", "reviewed in the console", "stored")


def test_header_edits_do_not_bypass_screening(tmp_path: Path,
                                              attacked_cr: tuple[Path, Path]) -> None:
    """Pass rules by Modality and by SOP class, as a site might write them: the attacked CR
    relabelled OT, and as an SR with its Pixel Data kept, is screened and refused anyway; a
    real SR (no pixels) passes and is stored."""
    _, attacked = attacked_cr
    rules = f"""
[[rules]]
name = "other-modalities"
action = "pass"
destinations = ["pacs"]
[rules.match]
Modality = "OT"

[[rules]]
name = "reports"
action = "pass"
destinations = ["pacs"]
[rules.match]
SOPClassUID = "{SR_CLASS}"
"""
    copies = [relabel(attacked, tmp_path / "src" / "as-ot.dcm", modality="OT"),
              relabel(attacked, tmp_path / "src" / "as-sr.dcm", modality="SR",
                      sop_class=SR_CLASS)]
    report = make_sr(tmp_path / "src" / "report.dcm")
    with plugin_site(tmp_path, rules=rules) as site:
        assert site.send([*copies, report]) == [REFUSED, REFUSED, SUCCESS], site.log()
        for f in copies:
            uid = sop_uid_of(f)
            assert not site.stored(uid)
            assert site.held()[uid].reason == "flagged"
            detail = site.events("received", uid)[-1]["detail"]
            assert "says pass, but the instance carries PixelData" in detail
        assert site.stored(sop_uid_of(report))
        assert site.events("scored", sop_uid_of(report)) == []  # passed: no pixels


CRASHING_SITECUSTOMIZE = '''
"""Test only: the scoring child dies of SIGSEGV on any file that carries the marker."""
import os
import signal

from detector import scoring

_score_path = scoring.Detector.score_path


def score_path(self, path, *args, **kwargs):
    with open(path, "rb") as fh:
        if b"CRASH-THE-DECODER" in fh.read():
            os.kill(os.getpid(), signal.SIGSEGV)
    return _score_path(self, path, *args, **kwargs)


scoring.Detector.score_path = score_path
'''


def test_scorer_crash_fails_one_instance_and_orthanc_keeps_storing(tmp_path: Path) -> None:
    """A decoder crash in the scoring child: that instance is refused (error_status) and held
    as detector-crashed; Orthanc keeps running and stores the next clean instance. A reject
    rule's instance is refused (refused_status) and held as rejected-by-rule; where it cannot
    be held (the quarantine is not a folder), 0xA700: neither stored nor held."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_SITECUSTOMIZE)
    wrapper = tmp_path / "python-crashing"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{hook}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    crash = synthetic(tmp_path / "src" / "crash.dcm", 256, 256, seed=1)
    ds = pydicom.dcmread(crash)
    ds.StudyDescription = "CRASH-THE-DECODER"
    ds.save_as(crash, enforce_file_format=True)
    clean = synthetic(tmp_path / "src" / "clean.dcm", 256, 256, seed=2)
    nm = relabel(clean, tmp_path / "src" / "nm.dcm", modality="NM")
    rules = '[[rules]]\nname = "no-nm"\naction = "reject"\n[rules.match]\nModality = "NM"\n'
    # threshold 1.0: no score reaches it, so the synthetic image is clean whatever it scores
    with plugin_site(tmp_path, python=str(wrapper), default_extra="threshold = 1.0",
                     rules=rules) as site:
        assert site.send([crash, clean]) == [CANNOT_UNDERSTAND, SUCCESS], site.log()
        assert site.orthanc.proc is not None and site.orthanc.proc.poll() is None
        assert not site.stored(sop_uid_of(crash))
        assert site.stored(sop_uid_of(clean))
        assert site.held()[sop_uid_of(crash)].reason == "detector-crashed"
        assert site.send([clean]) == [SUCCESS]  # a fresh child scores the next association too
        assert site.send([nm]) == [REFUSED]
        assert not site.stored(sop_uid_of(nm))
        assert site.held()[sop_uid_of(nm)].reason == "rejected-by-rule"
        quarantine = site.state / "quarantine"
        quarantine.rename(site.state / "elsewhere")
        quarantine.write_text("not a folder")
        nm2 = relabel(clean, tmp_path / "src" / "nm2.dcm", modality="NM")
        assert site.send([nm2]) == [OUT_OF_RESOURCES], site.log()
        assert not site.stored(sop_uid_of(nm2))
        assert site.orthanc.proc.poll() is None


# -- without Orthanc: what the TOML and the start refuse ---------------------------------------


def _edited(tmp_path: Path, plugin: str, dest: str, rules: str) -> Path:
    path = plugin_toml(tmp_path / "s.toml", state=tmp_path / "state", bundle=BUNDLE,
                       url="http://127.0.0.1:8042", rules=rules)
    text = path.read_text()
    if plugin:
        text = text.replace(f'python = "{sys.executable}"', plugin)
    if dest:
        text = text.replace('url = "http://127.0.0.1:8042"', dest)
    path.write_text(text)
    return path


@pytest.mark.parametrize(("plugin", "key", "fix"), [
    ('python = "/nonexistent/python"', "orthanc_plugin.python", "venv/bin/python"),
    (f'python = "{sys.executable}"\nrefused_status = 0', "orthanc_plugin.refused_status",
     "0x0000 is not a C-STORE failure status"),
    (f'python = "{sys.executable}"\nerror_status = 0xB000', "orthanc_plugin.error_status",
     "not a C-STORE failure status"),
    (f'python = "{sys.executable}"\nstatus = 1', "orthanc_plugin.status", "unknown key"),
])
def test_plugin_table_errors_name_key_and_fix(tmp_path: Path, plugin: str, key: str,
                                              fix: str) -> None:
    from gateway.config import ConfigError, load_config

    with pytest.raises(ConfigError) as ei:
        load_config(_edited(tmp_path, plugin, "", ""))
    assert ei.value.key == key and fix in str(ei.value)


def test_plugin_config_loads_without_listener(tmp_path: Path) -> None:
    from gateway.config import load_config

    cfg = load_config(_edited(tmp_path, "", "", ""))
    assert cfg.orthanc_plugin is not None
    assert (cfg.orthanc_plugin.refused_status, cfg.orthanc_plugin.error_status) == (0x124, 0xC000)
    assert cfg.destinations["pacs"].kind == "orthanc-rest"
    assert cfg.destinations["pacs"].url == "http://127.0.0.1:8042"
    with pytest.raises(ValueError, match="credentials in the URL"):
        load_config(_edited(tmp_path, "", 'url = "http://u:p@127.0.0.1:8042"', ""))
    with pytest.raises(ValueError, match="password_file"):
        load_config(_edited(tmp_path, "", 'url = "http://127.0.0.1:8042"\npassword = "x"', ""))


@pytest.mark.parametrize(("rules", "orthanc", "why"), [
    ('[[rules]]\nname = "ward"\naction = "pass"\nallow_unscreened_pixels = true\n'
     'destinations = ["pacs"]\n[rules.match]\npeer = "10.0.0.5"\n', {}, "matches on peer"),
    ('[[rules]]\nname = "to-b"\naction = "screen"\ndestinations = ["pacs"]\n'
     '[rules.match]\ncalled_ae = "B"\n', {"DicomCheckCalledAet": False}, "DicomCheckCalledAet"),
    ('[destinations.archive]\nkind = "directory"\npath = "/tmp/a"\n[[rules]]\nname = "cr"\n'
     'action = "screen"\ndestinations = ["archive"]\n[rules.match]\nModality = "CR"\n', {},
     'kind = "orthanc-rest"'),
    ('[[rules]]\nname = "ward"\naction = "pass"\nallow_unscreened_pixels = true\n'
     'destinations = ["pacs"]\n[rules.match]\ncalling_ae = "WARD"\n',
     {"DicomCheckModalityHost": True}, "DicomAlwaysAllowStore"),
])
def test_start_refuses_what_orthanc_cannot_honour(tmp_path: Path, rules: str,
                                                  orthanc: dict[str, Any], why: str) -> None:
    from gateway.config import load_config
    from gateway.orthanc_plugin import check_for_orthanc

    cfg = load_config(_edited(tmp_path, "", "", rules))
    with pytest.raises(ValueError, match=why):
        check_for_orthanc(cfg, orthanc)
    check_for_orthanc(load_config(_edited(tmp_path, "", "", "")), orthanc)  # the plain one runs


def test_serve_forwards_to_an_orthanc_rest_destination(tmp_path: Path) -> None:
    """The destination kind the release uses works for `sentinel serve` too (gateway.forward):
    storescu -> gateway -> POST /instances, with basic authentication from a file."""
    from tests.dcmtk import storescu
    from tests.gateway_harness import GatewayProcess, wait_until, write_config
    from tests.orthanc import OrthancServer, require_orthanc

    require_orthanc()
    require_dcmtk()
    secret = tmp_path / "orthanc.password"
    secret.write_text("s3cret\n")
    pacs = OrthancServer(tmp_path / "orthanc", {}, users={"sentinel": "s3cret"}).start()
    try:
        port = free_port()
        dest = (f'[destinations.pacs]\nkind = "orthanc-rest"\nurl = "{pacs.base_url}"\n'
                f'username = "sentinel"\npassword_file = "{secret}"\n')
        cfg = write_config(tmp_path / "c.toml", state=tmp_path / "state", port=port,
                           destinations=dest, default='action = "pass"\ndestinations = ["pacs"]')
        gw = GatewayProcess(cfg, tmp_path / "gateway.log", port).start()
        try:
            f = synthetic(tmp_path / "src" / "a.dcm", 64, 64, seed=3)
            assert storescu(port, [f]).returncode == 0
            assert wait_until(lambda: pacs.find_instance(sop_uid_of(f)) is not None, 60), \
                gw.log()[-2000:]
        finally:
            assert gw.stop() == 0
    finally:
        pacs.stop()


def test_append_many_writes_in_order_chained_and_all_or_nothing(tmp_path: Path) -> None:
    """The plugin writes an instance's lines with one fsync (AuditLog.append_many)."""
    from gateway.audit import AuditLog, verify

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("config-loaded", detail="before")
    records = log.append_many([("received", {"sop_uid": "1.2.3"}),
                               ("scored", {"sop_uid": "1.2.3", "verdict": "clean"})])
    assert [r["event"] for r in records] == ["received", "scored"]
    with pytest.raises(ValueError):  # one bad field: none of them written
        log.append_many([("received", {"sop_uid": "1.2.4"}), ("scored", {"PatientName": "X"})])
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines] == ["config-loaded", "received", "scored"]
    assert verify(tmp_path / "audit.jsonl").ok
    assert log.append_many([]) == []


def test_check_says_what_orthanc_would_refuse(tmp_path: Path) -> None:
    """`sentinel check` on a plugin TOML: ok with the plugin's line, or exit 2 naming why
    Orthanc would not start (a rule keyed on peer)."""
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config",
                               str(path), "--no-bundle"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    ok = check(_edited(tmp_path, "", "", ""))
    assert ok.returncode == 0, ok.stderr
    assert "orthanc plugin: scoring with" in ok.stdout and "0x0124" in ok.stdout
    assert "pacs (orthanc-rest http://127.0.0.1:8042)" in ok.stdout
    bad = check(_edited(tmp_path, "", "", '[[rules]]\nname = "ward"\naction = "screen"\n'
                        'destinations = ["pacs"]\n[rules.match]\npeer = "10.0.0.5"\n'))
    assert bad.returncode == 2 and "matches on peer" in bad.stderr


def test_bench_plugin_tiny(tmp_path: Path) -> None:
    """bench/plugin.py end to end in its tiny mode: it prints both ratio lines."""
    require_python_plugin()
    require_dcmtk()
    r = subprocess.run([sys.executable, "-m", "bench.plugin", "--tiny", "--bundle", str(BUNDLE),
                        "--cache", str(tmp_path / "cache")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"ratio throughput plugin/plain 512x512: \d+\.\d+ \[.*\] n=1", r.stdout)
    assert re.search(r"ratio throughput empty-filter/plain 512x512 \(information\): \d", r.stdout)
