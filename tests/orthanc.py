"""A real Orthanc (Debian's /usr/sbin/Orthanc) as the PACS in integration tests.

Why these settings: Orthanc 1.10 has no DICOM bind address, so its DICOM port is kept to
loopback callers through its access list: only the modalities registered here (by AE title
*and* host 127.0.0.1, ``DicomCheckModalityHost``) may store or echo. The HTTP API is loopback
only (``RemoteAccessAllowed`` false). Each server has its own temporary storage and free ports;
a restart waits for the old process to exit before starting another on the same database.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.dcmtk import dcmtk_env, free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"
REPO = Path(__file__).resolve().parents[1]
SENTINEL_LOADER = REPO / "systemd" / "orthanc_sentinel.py"  # the plugin form's PythonScript


def require_orthanc() -> None:
    if not os.access(ORTHANC, os.X_OK):
        pytest.skip("Orthanc not installed: apt-get install orthanc")


def require_dicomweb_plugin() -> None:
    require_orthanc()
    if not os.path.isfile(DICOMWEB_PLUGIN):
        pytest.skip(f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}) not installed: "
                    "apt-get install orthanc-dicomweb")


def require_python_plugin() -> None:
    require_orthanc()
    if not os.path.isfile(PYTHON_PLUGIN):
        pytest.skip(f"Orthanc's Python plugin ({PYTHON_PLUGIN}) not installed: "
                    "apt-get install orthanc-python")


class OrthancServer:
    """Start/stop an Orthanc; REST helpers for what a test needs to check.

    ``dicomweb``: load the DICOMweb plugin (STOW-RS at ``{dicomweb_url}/studies``).
    ``users``: HTTP basic authentication on (``RegisteredUsers``); the REST helpers log in as
    the first user. ``lua``: a Lua script of the test's own (``LuaScripts``).
    ``python_script``: load the Python plugin with this ``PythonScript`` (the sentinel plugin's
    loader); ``env``: added to Orthanc's environment; ``extra``: more top-level config keys."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]],
                 aet: str = "ORTHANC", *, dicomweb: bool = False,
                 users: dict[str, str] | None = None, lua: str | None = None,
                 python_script: Path | None = None, env: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.env = dict(env or {})
        self.aet = aet
        self.users = dict(users or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "orthanc.json"
        config = {
            "Name": "sentinel-test",
            "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"),
            "Plugins": ([DICOMWEB_PLUGIN] if dicomweb else [])
            + ([PYTHON_PLUGIN] if python_script is not None else []),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: [ae, "127.0.0.1", port] for name, (ae, port) in modalities.items()
            },
            "StorageCompression": False,
            "OverwriteInstances": True,
            "DicomScpTimeout": 30,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "SaveJobs": False,
            "MaximumPduLength": int(os.environ.get("SENTINEL_TEST_ORTHANC_PDU", "16384")),
        }
        if dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.users:
            config["RegisteredUsers"] = self.users
        if lua is not None:  # a Lua script of the test's own (e.g. an OnStoredInstance hook)
            script = workdir / "hooks.lua"
            script.write_text(lua)
            config["LuaScripts"] = [str(script)]
        if python_script is not None:
            config["PythonScript"] = str(python_script)
        config.update(extra or {})
        self.config_path.write_text(json.dumps(config, indent=1))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> OrthancServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env={**dcmtk_env(), **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not come up")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _open(self, path: str, body: bytes | None = None, timeout: float = 10) -> Any:
        req = urllib.request.Request(self._url(path), data=body,
                                     method="POST" if body is not None else "GET")
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(req, timeout=timeout)

    def get(self, path: str) -> Any:
        with self._open(path) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(path, timeout=30) as r:
            return r.read()

    def post(self, path: str, body: str) -> Any:
        with self._open(path, body.encode()) as r:
            return json.loads(r.read())

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))

    def find_instance(self, sop_uid: str) -> str | None:
        hits = self.post("/tools/lookup", sop_uid)
        for h in hits:
            if h.get("Type") == "Instance":
                return str(h["ID"])
        return None

    def instance_file(self, sop_uid: str) -> bytes | None:
        oid = self.find_instance(sop_uid)
        return None if oid is None else self.get_bytes(f"/instances/{oid}/file")

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))

    def wait_for_count(self, n: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = int(self.statistics()["CountInstances"])
            if count >= n:
                return count
            time.sleep(0.1)
        return count


# -- the sentinel plugin form (gateway.orthanc_plugin) ----------------------------------------


def sentinel_plugin_orthanc(workdir: Path, toml: Path, modalities: dict[str, tuple[str, int]],
                            **kw: Any) -> OrthancServer:
    """An Orthanc that screens with the sentinel plugin, configured by ``toml`` (write it before
    ``start``; ``plugin_toml`` writes one). Orthanc's Python finds this checkout first, then the
    test interpreter's packages (PYTHONPATH, as the README's service drop-in sets it)."""
    site = sysconfig.get_paths()["purelib"]
    return OrthancServer(workdir, modalities, python_script=SENTINEL_LOADER,
                         env={"PYTHONPATH": f"{REPO}:{site}"},
                         extra={"XraySentinel": {"Config": str(toml)}}, **kw)


def plugin_toml(path: Path, *, state: Path, bundle: Path, url: str, rules: str = "",
                default: str = 'action = "screen"', python: str = sys.executable) -> Path:
    """A sentinel TOML for the plugin form: no [listener] (Orthanc receives), one scoring
    process, released instances go back into the Orthanc at ``url`` (kind orthanc-rest)."""
    path.write_text(f"""
[state]
dir = "{state}"
min_free_mb = 1

[detector]
bundle = "{bundle}"
workers = 1

[orthanc_plugin]
python = "{python}"

[destinations.pacs]
kind = "orthanc-rest"
url = "{url}"

{rules}

[default]
destinations = ["pacs"]
{default}
""")
    return path
