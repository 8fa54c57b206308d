"""``sentinel console`` as a real process (uvicorn) with TLS: the certificate from [console]
is served, the session cookie is Secure, HSTS is sent, and plain HTTP gets no page."""

from __future__ import annotations

import http.client
import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.console_site import console_process, write_site
from tests.dcmtk import free_port
from tests.test_tls import make_ca, make_cert

pytest.importorskip("uvicorn", reason="the console extra is not installed: pip install .[console]")


def test_console_over_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make the test CA")
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    make_cert(pki, "console", "ca")
    port = free_port()
    cfg = write_site(tmp_path, f'host = "127.0.0.1"\nport = {port}\n'
                     f'tls_cert = "{pki / "console.pem"}"\ntls_key = "{pki / "console.key"}"')
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    url = f"https://127.0.0.1:{port}"
    with console_process(cfg, url, tmp_path / "console.log", ctx):
        with urllib.request.urlopen(f"{url}/login", context=ctx, timeout=10) as r:
            cookie = r.headers["Set-Cookie"].lower()
            assert r.status == 200 and b'name="csrf"' in r.read()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5).read()
