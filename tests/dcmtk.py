"""Run DCMTK's programs (the modality side) against loopback servers.

Always /usr/bin/storescu and /usr/bin/echoscu (pynetdicom installs other programs with the same
names into the venv), always with TCP_NODELAY=1 (DCMTK's loopback delayed-ACK stall otherwise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def require_dcmtk() -> None:
    if not (os.access(STORESCU, os.X_OK) and os.access(ECHOSCU, os.X_OK)):
        pytest.skip("DCMTK (storescu, echoscu) not installed: apt-get install dcmtk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def storescu(port: int, files: Sequence[Path], *, calling: str = "MODALITY",
             called: str = "SENTINEL", host: str = "127.0.0.1", extra: Sequence[str] = (),
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Send ``files`` over one association; returns the finished process (check returncode)."""
    cmd = [STORESCU, "-aet", calling, "-aec", called, "-to", "10", "-ta", "10", "-td", "20",
           *extra, host, str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def echoscu(port: int, *, calling: str = "MODALITY", called: str = "SENTINEL",
            host: str = "127.0.0.1", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [ECHOSCU, "-aet", calling, "-aec", called, "-to", "5", "-ta", "5", host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def have(program: str) -> bool:
    return shutil.which(program) is not None
