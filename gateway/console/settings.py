"""The ``[console]`` table of the gateway's TOML file, validated at load (gateway.config).

Why in the same file as the gateway's config: the console reads the same state directory, and
``sentinel check`` must refuse a console that would listen in plain HTTP on the network before
anyone starts it. Stdlib only: gateway.config imports this while loading any config.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import _Reader

DEFAULT_PORT = 8470
KEYS = ("host", "port", "tls_cert", "tls_key", "session_timeout_min", "users_file",
        "second_reviewer", "proxy_user_header", "proxy_addresses")


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console listens and how it authenticates (see README, "Review console")."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session_timeout_min: float = 15.0  # idle time after which a session ends
    users_file: Path | None = None  # None: <state dir>/console/users.json
    second_reviewer: bool = False  # a release needs a second reviewer's confirmation
    proxy_user_header: str = ""  # e.g. "X-Remote-User"; empty: off
    proxy_addresses: tuple[str, ...] = ()  # the reverse proxies trusted to set that header

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def users_path(console: ConsoleConfig | None, state_dir: Path) -> Path:
    """The users file: configured, or ``console/users.json`` under the state directory."""
    if console is not None and console.users_file is not None:
        return console.users_file
    return state_dir / "console" / "users.json"


def parse_console(r: _Reader, base: Path) -> ConsoleConfig:
    """Validate ``[console]``; refuse a non-loopback listener without TLS (a password and the
    session cookie would cross the network in clear), naming the key and the fix."""
    r.check_known(KEYS)
    host = r.str_("host", "127.0.0.1").strip()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise r.fail("host", f"{host!r} is not an IP address",
                     'host = "127.0.0.1" (or the address of the interface to serve on)') from exc
    cert = r.path_("tls_cert", base) if "tls_cert" in r.table else None
    key = r.path_("tls_key", base) if "tls_key" in r.table else None
    if (cert is None) != (key is None):
        raise r.fail("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together",
                     "set both (PEM files), or neither for a loopback-only console")
    for name, p in (("tls_cert", cert), ("tls_key", key)):
        if p is not None and not p.is_file():
            raise r.fail(name, f"file {p} does not exist", "point it at a readable PEM file")
    if not ip.is_loopback and cert is None:
        raise r.fail("host", f"{host} is not loopback and the console has no TLS: passwords and "
                     "session cookies would cross the network in clear",
                     "set tls_cert and tls_key, or host = \"127.0.0.1\" behind a TLS reverse "
                     "proxy")
    header = r.str_("proxy_user_header").strip() if "proxy_user_header" in r.table else ""
    raw = r.table.get("proxy_addresses", [])
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise r.fail("proxy_addresses", "must be a list of IP addresses", '["127.0.0.1"]')
    proxies = []
    for a in raw:
        try:
            proxies.append(str(ipaddress.ip_address(a.strip())))
        except ValueError as exc:
            raise r.fail("proxy_addresses", f"{a!r} is not an IP address",
                         "list the reverse proxy's own addresses, e.g. [\"127.0.0.1\"]") from exc
    if header and not proxies:
        raise r.fail("proxy_addresses", "proxy_user_header is set but no proxy is trusted: any "
                     "client could name itself", "add proxy_addresses = [\"<the proxy's IP>\"]")
    if proxies and not header:
        raise r.fail("proxy_user_header", "proxy_addresses given without the header to read",
                     'add proxy_user_header = "X-Remote-User", or remove proxy_addresses')
    return ConsoleConfig(
        host=host,
        port=r.int_("port", DEFAULT_PORT, 1, 65535),
        tls_cert=cert,
        tls_key=key,
        session_timeout_min=r.num("session_timeout_min", 15.0, 1.0, 24 * 60),
        users_file=r.path_("users_file", base) if "users_file" in r.table else None,
        second_reviewer=r.bool_("second_reviewer", False),
        proxy_user_header=header,
        proxy_addresses=tuple(proxies),
    )
