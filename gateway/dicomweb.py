"""DICOMweb destination: STOW-RS (PS3.18 10.5) with ``requests``, one instance per request.

Why it looks like this:
- Same interface as ``gateway.forward.DicomSender`` (``send``, ``close``, ``is_open``), so the
  per-destination queue, backoff, ledger, dead letter and audit of ``gateway.forward`` apply
  unchanged. One instance per POST: the queue's unit is one instance, and the server's answer
  then speaks about that instance alone (a 202 cannot leave us guessing which of several failed).
- Byte-for-byte: the outbox file (a Part-10 file) is the multipart part, exactly as on disk,
  streamed from the file (no decode, no re-encode, no copy of a 1 GiB instance in memory). The
  boundary is 128 random bits per request, so it cannot occur in the file by chance.
- What holds the destination and what fails only the instance (``SendError.connection``):
  unreachable, timeout, TLS failure, 5xx, 401/403 (credentials are the destination's, not the
  instance's), 404/405 (a wrong ``url``), 408/429 and redirects hold the whole destination, which
  is retried with backoff and the queue kept in order. 409 and other 4xx, or a 2xx whose Failed
  SOP Sequence (0008,1198) names the instance, fail that instance only: it is retried with
  backoff and dead-lettered after ``max_age_s`` like an instance a DICOM PACS refuses. The
  Failure Reason (0008,1197) and Warning Reason (0008,1196) codes go into the error text (audit
  ``error``) or, for a stored instance with a warning, into the ``forwarded`` audit line.
- Secrets (``token_file``, ``password_file``) are read from their files when a session opens
  (after an authentication failure the session is closed, so a corrected file is picked up
  without a restart), never kept in the config, and scrubbed from every message this module
  makes. The URL carries no credentials (refused at load). ``trust_env`` is off: no proxy,
  ``.netrc`` or ``REQUESTS_CA_BUNDLE`` from the environment changes where images go, which
  credentials go with them, or which CA is trusted.
- https verifies the certificate chain (``ca`` or the system's CA bundle) and the host name
  (``requests`` does both); there is no switch to turn either off.
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from gateway.config import Config, DestinationConfig
from gateway.forward import SendError
from gateway.spool import sop_from_outbox_name

LOG = logging.getLogger("sentinel.forward")
CHUNK = 1 << 20
MAX_RESPONSE = 1 << 20  # a STOW-RS answer for one instance is a few hundred bytes

# DICOM JSON tags of the Store Instances Response Module (PS3.18 Table 10.5.3-2)
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
REFERENCED_SOP_INSTANCE_UID = "00081155"

# PS3.18 Tables 10.5.3-3 and -4 (and the C-STORE statuses of PS3.4 B.2.3 that servers also use)
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP Instance",
    0x0117: "invalid object instance",
    0x0122: "SOP Class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP Class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
WARNING_REASONS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP Class",
}
# HTTP answers that say nothing about the instance but about the destination: hold it all.
_DESTINATION_STATUSES = {401, 403, 404, 405, 407, 408, 421, 429}


_POOL_PREFIX = re.compile(r"^\w*Connection(Pool)?\(host=[^)]*\):\s*")


def _why(exc: requests.RequestException) -> str:
    """The cause of a ``requests`` error, without urllib3's wrapping ("Max retries exceeded",
    the pool's host and port: the message names the URL already)."""
    reason: Any = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", None) or reason  # urllib3's MaxRetryError
    inner = reason.args[0] if isinstance(reason, requests.exceptions.SSLError | OSError) \
        and reason.args and isinstance(reason.args[0], Exception) else reason
    return _POOL_PREFIX.sub("", str(inner)) or type(inner).__name__


def describe_code(code: int, table: dict[int, str]) -> str:
    """``0xC122 (transfer syntax not supported)``; the hex code alone when unknown."""
    name = table.get(code) or ("out of resources" if 0xA700 <= code <= 0xA7FF else
                               "cannot understand" if 0xC000 <= code <= 0xCFFF else "")
    return f"0x{code:04X}" + (f" ({name})" if name else "")


class _MultipartBody:
    """One ``multipart/related; type="application/dicom"`` body holding one file, streamed.

    ``__len__`` lets ``requests`` send a Content-Length (some servers refuse chunked uploads);
    ``__iter__`` makes it stream the parts instead of reading the file into memory."""

    def __init__(self, path: Path, boundary: str) -> None:
        self.path = path
        self.head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode("ascii")
        self.tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self.size = path.stat().st_size  # FileNotFoundError here: the entry was taken away

    def __len__(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        sent = 0
        with self.path.open("rb") as fh:
            while sent < self.size and (chunk := fh.read(min(CHUNK, self.size - sent))):
                sent += len(chunk)
                yield chunk
        if sent != self.size:  # never send fewer bytes than the Content-Length promised
            raise OSError(f"{self.path.name} shrank while being sent ({sent} of {self.size})")
        yield self.tail


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = doc.get(tag)
    items = value.get("Value") if isinstance(value, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    value = item.get(tag)
    vals = value.get("Value") if isinstance(value, dict) else None
    return vals[0] if isinstance(vals, list) and vals else None


def _codes(items: list[dict[str, Any]], tag: str) -> list[int]:
    out = []
    for item in items:
        code = _first(item, tag)
        if isinstance(code, int) and not isinstance(code, bool) and code not in out:
            out.append(code)
    return out


class DicomWebSender:
    """Posts instances to one STOW-RS server over a persistent HTTP session."""

    def __init__(self, dest: DestinationConfig,
                 config_provider: Callable[[], Config] | None = None) -> None:
        assert dest.kind == "dicomweb" and dest.url
        self.dest = dest
        self.stow_url = f"{dest.url}/studies"
        self._session: requests.Session | None = None
        self._secrets: tuple[str, ...] = ()

    # -- session -----------------------------------------------------------------------------

    def _read_secret(self, key: str, path: Path) -> str:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise SendError(f"{self.dest.name}: cannot read {key} {path} ({why}); fix the file "
                            "or its permissions", connection=True) from None
        if not value:
            raise SendError(f"{self.dest.name}: {key} {path} is empty", connection=True)
        return value

    def _open(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.dest.ca) if self.dest.ca is not None else True
        session.headers.update({"Accept": "application/dicom+json",
                                "User-Agent": "xray-sentinel"})
        found: list[str] = []
        if self.dest.token_file is not None:
            token = self._read_secret("token_file", self.dest.token_file)
            session.headers["Authorization"] = f"Bearer {token}"
            found.append(token)
        elif self.dest.password_file is not None:
            password = self._read_secret("password_file", self.dest.password_file)
            session.auth = (self.dest.username, password)
            found.append(password)
        self._secrets = tuple(found)
        self._session = session
        return session

    def _scrub(self, text: str) -> str:
        """No secret in any message: exceptions from lower layers are not ours to trust."""
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def _fail(self, message: str, connection: bool) -> SendError:
        return SendError(self._scrub(message), connection=connection)

    # -- sending -----------------------------------------------------------------------------

    def send(self, path: Path, meta: dict[str, Any]) -> str | None:
        """POST one instance. Returns None, or the server's warning about a stored instance
        (for the ``forwarded`` audit line); raises SendError when it was not stored."""
        sop = str(meta.get("sop_uid") or sop_from_outbox_name(path.name))
        boundary = secrets.token_hex(16)
        body = _MultipartBody(path, boundary)
        session = self._session or self._open()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}"}
        timeout = (self.dest.timeout_s, self.dest.timeout_s)
        # at_open stays False on every error: an HTTP server does not refuse a second
        # connection the way a PACS refuses an extra association, so a refused connect means
        # the server is down and the whole destination waits (gateway.forward.Forwarder).
        try:
            with session.post(self.stow_url, data=body, headers=headers, timeout=timeout,
                              allow_redirects=False, stream=True) as response:
                content = b""
                for chunk in response.iter_content(64 * 1024):
                    content += chunk
                    if len(content) > MAX_RESPONSE:
                        break
                status = response.status_code
                ctype = response.headers.get("Content-Type", "")
        except requests.exceptions.SSLError as exc:
            self.close()
            raise self._fail(f"TLS to {self.dest.url} failed (certificate not trusted or not "
                             f"for this host?): {_why(exc)}", connection=True) from None
        except requests.exceptions.Timeout as exc:
            self.close()
            raise self._fail(f"STOW-RS to {self.dest.url} timed out after "
                             f"{self.dest.timeout_s:g}s: {_why(exc)}", connection=True) from None
        except requests.exceptions.RequestException as exc:
            self.close()
            raise self._fail(f"STOW-RS to {self.dest.url} failed: {_why(exc)}",
                             connection=True) from None
        return self._outcome(status, ctype, content, sop)

    def _outcome(self, status: int, ctype: str, content: bytes, sop: str) -> str | None:
        """Read the Store Instances Response; see the module docstring for what holds what."""
        doc: dict[str, Any] = {}
        if content and len(content) <= MAX_RESPONSE and ("json" in ctype or not ctype):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                parsed = json.loads(content)
                if isinstance(parsed, dict):
                    doc = parsed
        failed = _items(doc, FAILED_SOP_SEQUENCE)
        referenced = _items(doc, REFERENCED_SOP_SEQUENCE)
        failures = _codes(failed, FAILURE_REASON)
        warnings = _codes(referenced, WARNING_REASON)
        top = _first(doc, WARNING_REASON)
        if isinstance(top, int) and not isinstance(top, bool) and top not in warnings:
            warnings.append(top)
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        what = f"HTTP {status}" + (f" {phrase}" if phrase else "")
        reasons = ""
        if failures:
            reasons = ", FailureReason " + ", ".join(
                describe_code(c, FAILURE_REASONS) for c in failures)
        if warnings:
            reasons += ", WarningReason " + ", ".join(
                describe_code(c, WARNING_REASONS) for c in warnings)
        if 200 <= status < 300:
            if failed:
                raise self._fail(f"{self.dest.name} did not store {sop} ({what}{reasons})",
                                 connection=False)
            uids = {str(_first(i, REFERENCED_SOP_INSTANCE_UID)) for i in referenced}
            if referenced and sop not in uids:
                raise self._fail(f"{self.dest.name} answered {what} without {sop} among the "
                                 "stored instances", connection=False)
            if warnings:
                return f"STOW-RS {what}{reasons}"
            if status == 202:
                return f"STOW-RS {what} (stored; no reason given)"
            return None
        if status in (401, 403, 407):
            self.close()  # read the secret again next time: an operator may have fixed it
            how = (f"the bearer token from {self.dest.token_file}"
                   if self.dest.token_file is not None else
                   f"user {self.dest.username!r} with the password from {self.dest.password_file}"
                   if self.dest.password_file is not None else "no credentials")
            raise self._fail(f"{self.dest.name} refused the credentials ({what}; sent {how}): "
                             "check the secret file and the account on the server",
                             connection=True)
        if 300 <= status < 400:
            raise self._fail(f"{self.dest.name} answered {what} (a redirect, not followed): "
                             "set url to the server's STOW-RS base", connection=True)
        if status in (404, 405):
            raise self._fail(f"{self.dest.name} has no STOW-RS at {self.stow_url} ({what}): "
                             "check url", connection=True)
        if status in _DESTINATION_STATUSES or status >= 500:
            raise self._fail(f"{self.dest.name} unavailable ({what}{reasons})", connection=True)
        raise self._fail(f"{self.dest.name} refused {sop} ({what}{reasons})", connection=False)

    def close(self, abort: bool = False) -> None:
        """Drop the session and its pooled connections (``abort`` changes nothing here: an
        in-flight POST is cut by closing its connection either way)."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None

    @property
    def is_open(self) -> bool:
        return self._session is not None
