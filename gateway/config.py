"""The gateway's one TOML configuration file, validated at load into frozen dataclasses.

Why validate everything up front: the daemon swaps its configuration atomically on SIGHUP or when
the file changes, and an invalid new file must be refused whole while the old one keeps running.
So every check happens here, before anything uses the values, and every error names the file,
the key and the fix (``ConfigError``). ``sentinel check`` runs exactly this loader.

Layout of the file (see ``systemd/sentinel.example.toml`` for a commented example)::

    [listener]     ae_title, host, port, [listener.tls] cert/key/ca/require_client_cert/
                   require_cert_matches_ae
    [[callers]]    ae_title, addresses (IPs or CIDRs), commitment, port, host (where storage
                   commitment reports go: gateway.commitment)
    [timeouts]     acse_s, dimse_s, network_s, connect_s
    [limits]       max_associations, max_associations_per_caller, max_instance_mb, max_pdu_kb,
                   max_connections, max_connections_per_address
    [state]        dir, min_free_mb (the spool's disk watermark)
    [retention]    quarantine_days, sent_ledger_days
    [metrics]      host (loopback only), port
    [detector]     bundle, workers, threads, isolation, timeout_s, nice, on_error, shadow,
                   line_gate, cnn_gate, line_ramp, [detector.thresholds] per modality
    [forwarding]   backoff_initial_s, backoff_max_s, max_age_s, idle_release_s
    [commitment]   quarantine_hold_s, max_instances, pacs_report_timeout_s (Storage Commitment:
                   gateway.commitment, and gateway.commitment_scu for a destination's)
    [destinations.NAME]  kind = "dicom" (host, port, ae_title, tls, present_caller_ae,
                         associations, extra_association_backlog_mb, commitment;
                         tls: cert/key/ca/verify_hostname)
                         or "directory" (path)
                         or "dicomweb" (url, token_file | username + password_file, ca,
                         timeout_s, connections, allow_plain_http: STOW-RS, gateway.dicomweb)
                         or "orthanc-rest" (the same keys: an Orthanc's REST API, POST
                         /instances; where the plugin form releases to, gateway.orthanc_plugin)
    [alerts]       url, secret_file, ca, timeout_s, allow_plain_http (signed webhook),
                   syslog ("udp://host:port" or a unix socket path), syslog_facility,
                   verify_interval_s, flag_rate_window, flag_rate_jump (gateway.alerts)
    [console]      host, port, tls_cert, tls_key, session_timeout_min, users_file,
                   second_reviewer, proxy_user_header, proxy_addresses
                   (the web review console: gateway.console.settings)
    [[rules]]      name, action, destinations, threshold, shadow, allow_unscreened_pixels,
                   [rules.match]
    [default]      action, destinations, threshold, shadow
                   (what a rule may decide from headers the sender writes: gateway.rules)
    [orthanc_plugin]  python, refused_status, error_status (screening inside Orthanc:
                   gateway.orthanc_plugin; [listener] is then optional)
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from detector.bundle import BUILTIN_BUNDLES
from gateway.console.settings import ConsoleConfig, parse_console

ACTIONS = ("screen", "pass", "reject")
ON_ERROR = ("quarantine", "forward")
ISOLATION = ("process", "thread")
# Match keys that are not DICOM attributes: facts about the association.
ASSOCIATION_KEYS = ("calling_ae", "called_ae", "peer")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names file, key and fix."""

    def __init__(self, path: Path | str, key: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {key}: {problem}; fix: {fix}")


@dataclass(frozen=True)
class TLSConfig:
    """Certificate paths for DICOM TLS, inbound (listener) or outbound (destination)."""

    cert: Path | None
    key: Path | None
    ca: Path | None
    require_client_cert: bool = True
    # Listener only: the client certificate's subject CN or a SAN DNS name must equal the
    # calling AE title, so a certificate vouches for one AE title, not for any on the list.
    require_cert_matches_ae: bool = False
    # Destination only: check that the PACS's certificate names ``host`` (hostname or IP in its
    # SAN), as HTTPS does. Off only by ``verify_hostname = false``: the CA alone would accept
    # any certificate it ever signed (a modality's, another server's) as the PACS.
    verify_hostname: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str
    host: str
    port: int
    tls: TLSConfig | None = None


@dataclass(frozen=True)
class CallerConfig:
    """One allowed sender: its AE title and the networks it may connect from."""

    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # Storage Commitment: whether this caller may ask for it, and where its reports go (a new
    # association to host:port; host empty: the address the request came from).
    commitment: bool = False
    port: int = 0
    host: str = ""

    def allows(self, address: str) -> bool:
        ip = host_ip(address)
        return ip is not None and any(ip in net for net in self.networks)


def host_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a peer address (an IPv4-mapped IPv6 address as IPv4); None if it is none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class TimeoutsConfig:
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0  # association idle: abort when nothing arrives for this long
    connect_s: float = 10.0  # outbound TCP connect to a destination


# The maximum PDU length the listener advertises and enforces when max_pdu_kb is absent or 0.
# "Unlimited" let any peer make the gateway buffer a PDU of any declared length (issue 20);
# bench/pdu_size.py measured the receive rate per size (bench/RESULTS.md).
DEFAULT_MAX_PDU_KB = 256
# Above this a PDU is no faster to receive, and each connection may hold a few copies of one.
MAX_PDU_KB = 16 * 1024


@dataclass(frozen=True)
class LimitsConfig:
    max_associations: int = 16
    max_associations_per_caller: int = 4
    max_instance_bytes: int = 1024 * 1024 * 1024
    # advertised and enforced maximum P-DATA-TF length; always bounded (gateway.scp._PduReader)
    max_pdu_bytes: int = DEFAULT_MAX_PDU_KB * 1024
    # open TCP connections, counted at accept (before any read or TLS handshake)
    max_connections: int = 32
    max_connections_per_address: int = 24


@dataclass(frozen=True)
class StateConfig:
    dir: Path
    min_free_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class RetentionConfig:
    quarantine_days: float = 90.0
    sent_ledger_days: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9464  # 0 disables the HTTP endpoint


@dataclass(frozen=True)
class DetectorConfig:
    bundle: Path | None  # None: the shipped default bundle
    workers: int = 2
    threads: int = 1
    isolation: str = "process"  # "process": each worker scores in its own child; "thread"
    timeout_s: float = 60.0  # per instance, process isolation only: a hung decoder is killed
    # Niceness of the scoring processes (process isolation): receiving and acknowledging, the
    # modality's wait, come first; screening works off the spool when the CPUs are shared.
    nice: int = 10
    on_error: str = "quarantine"
    shadow: bool = False
    thresholds: Mapping[str, float] = field(default_factory=dict)
    # the resampling-line gate (detector.resample_lines): off unless the site's own clean
    # images allow it; `sentinel calibrate` proposes the value
    line_gate: float | None = None
    # the CNN gate (detector.scoring.apply_cnn_gate): also flag when the detector CNN alone
    # reaches it; for a site's own (secret) bundle, calibrated on the site's clean images
    cnn_gate: float | None = None
    # the line ramp (detector.scoring.apply_line_ramp): below the line gate, a line that
    # raises the score to the threshold flags; needs line_gate, lies under it
    line_ramp: float | None = None


@dataclass(frozen=True)
class ForwardingConfig:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_age_s: float = 24 * 3600.0
    idle_release_s: float = 30.0


@dataclass(frozen=True)
class CommitmentConfig:
    """Storage Commitment SCP settings (gateway.commitment).

    ``quarantine_hold_s``: how long a request waits for a quarantined instance to be released
    before it reports that instance as failed (a reviewer's release within the hold turns it
    into Success). ``max_instances``: the most instances one N-ACTION may list."""

    quarantine_hold_s: float = 3600.0
    max_instances: int = 5000
    # a destination with commitment = true that has not reported within this is asked again
    pacs_report_timeout_s: float = 600.0


SYSLOG_FACILITIES: Mapping[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts] (gateway.alerts): a signed webhook and/or RFC 5424 syslog, and when to alert.

    Like the DICOMweb destination, the webhook secret is never held here, only the file that
    holds it. ``syslog_host``/``syslog_port`` (UDP) or ``syslog_path`` (a unix datagram socket
    such as /dev/log) come from the one ``syslog`` key. ``verify_interval_s = 0`` turns the
    periodic audit check off.
    """

    url: str = ""
    secret_file: Path | None = None
    ca: Path | None = None
    timeout_s: float = 10.0
    allow_plain_http: bool = False
    syslog_host: str = ""
    syslog_port: int = 0
    syslog_path: Path | None = None
    syslog_facility: str = "local0"
    verify_interval_s: float = 300.0
    flag_rate_window: int = 50
    flag_rate_jump: float = 0.2

    @property
    def syslog_enabled(self) -> bool:
        return bool(self.syslog_host) or self.syslog_path is not None


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    kind: str  # "dicom" | "directory" | "dicomweb" | "orthanc-rest"
    host: str = ""
    port: int = 0
    ae_title: str = ""
    tls: TLSConfig | None = None
    present_caller_ae: bool = False
    path: Path | None = None
    # sender threads: concurrent associations to a DICOM destination (``associations``) or
    # concurrent HTTP requests to a DICOMweb one (``connections``)
    # (a DICOM destination's default is 2, set where it is parsed; other kinds keep 1)
    associations: int = 1
    # An association beyond the first sends only while at least this many MB per extra
    # association wait to be sent (0: always, the only value for other kinds). A DICOM
    # destination's default is 16: two C-STOREs at once overlap the PACS's storing of one with
    # the transfer of the next, which pays for large instances and costs for small ones (the
    # receiving side's CPU): bench/RESULTS.md, "Streaming the forwarded C-STORE, and a second
    # association for a backlog".
    extra_association_backlog_mb: float = 0.0
    # DICOMweb (STOW-RS) only. Secrets are never held here, only the files that hold them: the
    # sender reads them when it opens a session, so a config printed or logged shows no secret.
    url: str = ""  # the DICOMweb base, without credentials; instances are POSTed to {url}/studies
    token_file: Path | None = None  # bearer token
    username: str = ""  # basic auth, with password_file
    password_file: Path | None = None
    ca: Path | None = None  # https: the CA bundle the server's certificate must chain to
    timeout_s: float = 60.0  # connect and read, per request
    allow_plain_http: bool = False  # http:// to a host that is not loopback
    # DICOM only: ask this PACS for Storage Commitment; a modality's commitment then waits for
    # the PACS's (gateway.commitment_scu)
    commitment: bool = False


# C-STORE failure statuses a plugin may answer (PS3.4 B.2.3, PS3.7 C): the 0x01xx refusals
# except the two warnings (0x0107 attribute list error, 0x0116 attribute value out of range),
# 0xA7xx out of resources, 0xA9xx data set does not match SOP class, 0xCxxx cannot understand.
def is_failure_status(code: int) -> bool:
    return (0x0100 <= code <= 0x01FF and code not in (0x0107, 0x0116)) or \
        0xA700 <= code <= 0xA7FF or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF


@dataclass(frozen=True)
class OrthancPluginConfig:
    """[orthanc_plugin] (gateway.orthanc_plugin): screening inside Orthanc's C-STORE receive.

    ``python``: the interpreter that runs the scoring processes (the sentinel virtual
    environment's), since inside Orthanc ``sys.executable`` is Orthanc itself. The statuses are
    what the modality gets for an instance that is held: ``refused_status`` when the detector
    flagged it or a ``reject`` rule took it (0x0124 Refused: Not Authorized, as ``sentinel
    serve`` answers a reject rule), ``error_status`` when it could not be screened and the error
    policy holds it (0xC000 Cannot Understand)."""

    python: Path
    refused_status: int = 0x0124
    error_status: int = 0xC000


@dataclass(frozen=True)
class Matcher:
    """One condition of a rule: an attribute (or association fact) against values or a regex."""

    key: str
    values: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None

    def test(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value in self.values

    def describe(self) -> str:
        if self.regex is not None:
            return f"{self.key}~/{self.regex.pattern}/"
        if len(self.values) == 1:
            return f"{self.key}={self.values[0]!r}"
        return f"{self.key} in {list(self.values)!r}"


@dataclass(frozen=True)
class Rule:
    """One routing rule (or the default, which has no matchers).

    ``allow_unscreened_pixels`` is the one way to forward an instance with pixel data unscreened;
    it is refused at load unless the rule is a ``pass`` keyed only on association facts
    (``calling_ae``, ``called_ae``, ``peer``), which the gateway checks itself, never on a
    header the sender writes (see gateway.rules).
    """

    name: str
    action: str
    destinations: tuple[str, ...]
    matchers: tuple[Matcher, ...] = ()
    threshold: float | None = None
    shadow: bool = False
    allow_unscreened_pixels: bool = False

    @property
    def header_keys(self) -> tuple[str, ...]:
        """The dataset attributes this rule tests: values the sender writes, so they may make
        screening stricter but never weaker (gateway.rules)."""
        return tuple(m.key for m in self.matchers if m.key not in ASSOCIATION_KEYS)


@dataclass(frozen=True)
class Config:
    path: Path
    listener: ListenerConfig
    callers: tuple[CallerConfig, ...]
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    state: StateConfig
    retention: RetentionConfig
    metrics: MetricsConfig
    detector: DetectorConfig
    forwarding: ForwardingConfig
    destinations: Mapping[str, DestinationConfig]
    rules: tuple[Rule, ...]
    default: Rule
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    alerts: AlertsConfig | None = None
    orthanc_plugin: OrthancPluginConfig | None = None
    console: ConsoleConfig | None = None  # [console] absent: the console's defaults

    @property
    def state_dir(self) -> Path:
        return self.state.dir

    @property
    def spool_dir(self) -> Path:
        return self.state.dir / "spool"

    @property
    def audit_path(self) -> Path:
        return self.state.dir / "audit" / "audit.jsonl"

    @property
    def quarantine_dir(self) -> Path:
        return self.state.dir / "quarantine"

    @property
    def retention_days(self) -> float:
        return self.retention.quarantine_days

    def find_caller(self, ae_title: str) -> tuple[CallerConfig, ...]:
        return tuple(c for c in self.callers if c.ae_title == ae_title)


# ---------------------------------------------------------------------------------------------
# Parsing helpers: each takes the dotted key so that the error can name it.


class _Reader:
    """Typed access into one TOML table, with errors that name the key and the fix."""

    def __init__(self, path: Path, table: Mapping[str, Any], prefix: str) -> None:
        self.path = path
        self.table = table
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem, fix)

    def check_known(self, allowed: tuple[str, ...]) -> None:
        for k in self.table:
            if k not in allowed:
                raise self.fail(
                    k, "unknown key", f"remove it or use one of: {', '.join(allowed)}"
                )

    def sub(self, name: str, required: bool = False) -> _Reader:
        value = self.table.get(name)
        if value is None:
            if required:
                raise self.fail(name, "missing table", f"add a [{self.key(name)}] table")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table", f"write it as [{self.key(name)}]")
        return _Reader(self.path, value, self.key(name))

    def subs(self, name: str) -> list[_Reader]:
        """An optional array of tables ([[name]] sections), one reader per table."""
        value = self.table.get(name, [])
        if not isinstance(value, list):
            raise self.fail(name, "must be an array of tables", f"write [[{name}]] sections")
        readers = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{i}]", "must be a table", f"write [[{name}]] sections")
            readers.append(_Reader(self.path, item, self.key(f"{name}[{i}]")))
        return readers

    def str_(self, name: str, default: str | None = None) -> str:
        value = self.table.get(name, default)
        if value is None:
            raise self.fail(name, "missing", f'add {name} = "..."')
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, f"must be a non-empty string, got {value!r}", f'{name} = "..."')
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}", f"{name} = true")
        return value

    def num(
        self, name: str, default: float | None, lo: float, hi: float, integer: bool = False
    ) -> float:
        value = self.table.get(name, default)
        if value is None:
            raise self.fail(name, "missing", f"add {name} = <number between {lo} and {hi}>")
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            raise self.fail(name, f"must be {kind}, got {value!r}", f"{name} = {default}")
        if not lo <= value <= hi:
            raise self.fail(
                name, f"{value} is out of range", f"use a value between {lo} and {hi}"
            )
        return value

    def int_(self, name: str, default: int | None, lo: int, hi: int) -> int:
        return int(self.num(name, default, lo, hi, integer=True))

    def ae(self, name: str, default: str | None = None) -> str:
        value = self.str_(name, default).strip()
        if not _AE_RE.fullmatch(value):
            raise self.fail(
                name,
                f"{value!r} is not a valid AE title",
                "use 1-16 printable ASCII characters without backslash",
            )
        return value

    def path_(self, name: str, base: Path, default: str | None = None) -> Path:
        p = Path(self.str_(name, default)).expanduser()
        return p if p.is_absolute() else (base / p)


def _parse_tls(r: _Reader, base: Path, inbound: bool) -> TLSConfig | None:
    if "tls" not in r.table:
        return None
    t = r.sub("tls")
    listener_only = ("require_cert_matches_ae",) if inbound else ()
    destination_only = () if inbound else ("verify_hostname",)
    t.check_known(("cert", "key", "ca", "require_client_cert", *listener_only, *destination_only))
    cert = t.path_("cert", base) if "cert" in t.table else None
    key = t.path_("key", base) if "key" in t.table else None
    ca = t.path_("ca", base) if "ca" in t.table else None
    if inbound and (cert is None or key is None):
        raise t.fail("cert", "a TLS listener needs cert and key", "set cert and key paths")
    if (cert is None) != (key is None):
        raise t.fail("key", "cert and key go together", "set both cert and key, or neither")
    for name, p in (("cert", cert), ("key", key), ("ca", ca)):
        if p is not None and not p.is_file():
            raise t.fail(name, f"file {p} does not exist", "point it at a readable PEM file")
    require = t.bool_("require_client_cert", True)
    if inbound and require and ca is None:
        raise t.fail("ca", "require_client_cert needs a CA", "set ca or require_client_cert=false")
    if not inbound and ca is None:
        raise t.fail("ca", "outbound TLS needs the CA that signed the peer", "set ca = \"...\"")
    matches_ae = inbound and t.bool_("require_cert_matches_ae", False)
    if matches_ae and not require:
        raise t.fail("require_cert_matches_ae", "there is no client certificate to compare "
                     "with the calling AE title", "set require_client_cert = true (and ca), "
                     "or require_cert_matches_ae = false")
    # Destination only: the PACS's certificate must name the host we dial (SAN DNS or IP).
    verify_hostname = inbound or t.bool_("verify_hostname", True)
    return TLSConfig(cert=cert, key=key, ca=ca, require_client_cert=require,
                     require_cert_matches_ae=matches_ae, verify_hostname=verify_hostname)


def _parse_limits(mr: _Reader) -> LimitsConfig:
    """[limits]: what one peer, and all of them together, may make the listener hold.

    ``max_pdu_kb = 0`` used to mean unlimited; it now means the bounded default, so files
    written for older versions keep loading with a safe meaning.
    """
    mr.check_known(("max_associations", "max_associations_per_caller", "max_instance_mb",
                    "max_pdu_kb", "max_connections", "max_connections_per_address"))
    max_associations = mr.int_("max_associations", 16, 1, 1000)
    pdu_kb = mr.int_("max_pdu_kb", DEFAULT_MAX_PDU_KB, 0, 1024 * 1024)
    if 0 < pdu_kb < 4:
        raise mr.fail("max_pdu_kb", "below the DICOM minimum of 4 KiB",
                      f"use at least 4, or {DEFAULT_MAX_PDU_KB} (the default)")
    if pdu_kb > MAX_PDU_KB:
        raise mr.fail("max_pdu_kb", f"{pdu_kb} KiB would let every connection make the gateway "
                      f"buffer that much", f"use at most {MAX_PDU_KB}, or {DEFAULT_MAX_PDU_KB} "
                      "(the default; DCMTK senders never send PDUs over 128 KiB)")
    connections = mr.int_("max_connections", 2 * max_associations, 1, 100_000)
    if connections < max_associations:
        raise mr.fail("max_connections", f"{connections} is below max_associations "
                      f"({max_associations}), which could then never be reached",
                      f"use at least {max_associations} (default: twice max_associations)")
    # One host may not take every slot, yet one that fills the association limit (a router,
    # a PACS) must still get an A-ASSOCIATE-RJ with its reason rather than a closed socket.
    per_address = mr.int_("max_connections_per_address",
                          max(connections * 3 // 4, min(connections, max_associations + 1)),
                          1, 100_000)
    return LimitsConfig(
        max_associations=max_associations,
        max_associations_per_caller=mr.int_("max_associations_per_caller", 4, 1, 1000),
        max_instance_bytes=int(mr.num("max_instance_mb", 1024, 0.001, 65536) * 1024 * 1024),
        max_pdu_bytes=(pdu_kb or DEFAULT_MAX_PDU_KB) * 1024,
        max_connections=connections,
        max_connections_per_address=per_address,
    )


def _parse_network(
    r: _Reader, name: str, text: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        problem = f"{text!r} is not an IP address or CIDR ({exc})"
        raise r.fail(name, problem, "e.g. 10.1.2.0/24") from exc


def _parse_matchers(r: _Reader) -> tuple[Matcher, ...]:
    matchers: list[Matcher] = []
    for key, spec in r.table.items():
        if key not in ASSOCIATION_KEYS and key not in keyword_dict:
            raise r.fail(
                key,
                "not a DICOM keyword nor one of " + ", ".join(ASSOCIATION_KEYS),
                "use an attribute keyword such as Modality, SOPClassUID, BodyPartExamined",
            )
        if isinstance(spec, str):
            matchers.append(Matcher(key=key, values=(spec,)))
        elif isinstance(spec, list) and spec and all(isinstance(v, str) for v in spec):
            matchers.append(Matcher(key=key, values=tuple(spec)))
        elif isinstance(spec, dict) and set(spec) == {"regex"} and isinstance(spec["regex"], str):
            try:
                rx = re.compile(spec["regex"])
            except re.error as exc:
                raise r.fail(key, f"bad regex ({exc})", "fix the regular expression") from exc
            matchers.append(Matcher(key=key, regex=rx))
        else:
            raise r.fail(
                key,
                f"unsupported match value {spec!r}",
                f'use {key} = "VALUE", {key} = ["A", "B"] or {key} = {{ regex = "..." }}',
            )
    return tuple(matchers)


def _parse_rule(
    r: _Reader, name: str, destinations: Mapping[str, DestinationConfig], is_default: bool
) -> Rule:
    allowed = ("action", "destinations", "threshold", "shadow")
    r.check_known(allowed if is_default else ("name", *allowed, "match", "allow_unscreened_pixels"))
    action = r.str_("action", "screen")
    if action not in ACTIONS:
        raise r.fail("action", f"unknown action {action!r}", f"use one of {', '.join(ACTIONS)}")
    dests_raw = r.table.get("destinations", list(destinations) if is_default else None)
    if dests_raw is None:
        dests_raw = list(destinations)
    if not isinstance(dests_raw, list) or not all(isinstance(d, str) for d in dests_raw):
        raise r.fail("destinations", "must be a list of destination names", 'e.g. ["pacs"]')
    for d in dests_raw:
        if d not in destinations:
            raise r.fail(
                "destinations",
                f"unknown destination {d!r}",
                f"define [destinations.{d}] or use one of: {', '.join(destinations) or '(none)'}",
            )
    if action != "reject" and not dests_raw:
        raise r.fail("destinations", "empty for a forwarding action", "name at least one")
    threshold = r.num("threshold", None, 0.0, 1.0) if "threshold" in r.table else None
    matchers = _parse_matchers(r.sub("match")) if not is_default else ()
    unscreened = False if is_default else r.bool_("allow_unscreened_pixels", False)
    if unscreened:
        _check_unscreened(r, action, matchers)
    return Rule(
        name=name,
        action=action,
        destinations=tuple(dests_raw),
        matchers=matchers,
        threshold=threshold,
        shadow=r.bool_("shadow", False),
        allow_unscreened_pixels=unscreened,
    )


def _check_unscreened(r: _Reader, action: str, matchers: tuple[Matcher, ...]) -> None:
    """``allow_unscreened_pixels`` only where it cannot be reached by editing a header.

    Why refused otherwise: a rule that tests Modality, BodyPartExamined or any other attribute is
    matched by whoever writes that attribute, which is exactly who tampers with the pixels.
    Association facts are checked by the gateway (allowed callers, addresses, TLS), so a rule
    keyed on them names a sender, not a label.
    """
    key = "allow_unscreened_pixels"
    if action != "pass":
        raise r.fail(key, f"only meaningful with action = \"pass\", not {action!r}",
                     "remove allow_unscreened_pixels or make the rule a pass")
    header = [m.key for m in matchers if m.key not in ASSOCIATION_KEYS]
    if header:
        raise r.fail(
            key,
            f"the rule also matches on {', '.join(header)}, which the sender writes: anyone "
            "able to tamper with the pixels could relabel an image to skip screening",
            "match only on " + ", ".join(ASSOCIATION_KEYS) + " (a trusted sender), or remove "
            "allow_unscreened_pixels so that instances with pixel data are screened",
        )
    if not matchers:
        raise r.fail(key, "the rule has no [rules.match]: it would turn screening off for "
                     "every sender", "name the sender with calling_ae and peer")


# Keys a site might write to put a secret into the config itself: refused with the fix.
_INLINE_SECRETS = ("token", "password", "bearer", "secret", "api_key")


def _secret_file(r: _Reader, name: str, base: Path) -> Path:
    """A file holding one secret: it must exist, be readable and not be empty (checked now, so
    a typo fails at load rather than as a 401 hours later); its content is not kept."""
    p = r.path_(name, base)
    try:
        with p.open("rb") as fh:
            empty = not fh.read(4096).strip()
    except FileNotFoundError as exc:
        raise r.fail(name, f"file {p} does not exist",
                     "create it (mode 0640, group xray-sentinel) holding the secret") from exc
    except OSError as exc:
        raise r.fail(name, f"file {p} is not readable ({exc.strerror})",
                     "make it readable by the service user (e.g. chgrp xray-sentinel, "
                     "chmod 0640)") from exc
    if empty:
        raise r.fail(name, f"file {p} is empty", "write the secret into it (one line)")
    return p


def _http_url(r: _Reader, url: str, fix_url: str, credentials_fix: str
              ) -> urllib.parse.SplitResult:
    """``url`` split, when it is http(s) with a host, a port that is not 0 and no credentials
    (they would show in logs); else ConfigError on the reader's ``url`` key."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise r.fail("url", f"{url!r} is not a valid URL ({exc})", fix_url) from exc
    if parts.scheme not in ("http", "https"):
        raise r.fail("url", f"scheme {parts.scheme or '(none)'!r} is not http or https", fix_url)
    if not parts.hostname:
        raise r.fail("url", f"{url!r} has no host", fix_url)
    if port == 0:
        raise r.fail("url", "port 0", fix_url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise r.fail("url", "credentials in the URL are refused (they would show in logs)",
                     credentials_fix)
    return parts


def _https_ca(r: _Reader, parts: urllib.parse.SplitResult, base: Path, peer: str
              ) -> Path | None:
    """The optional ``ca`` file of an https URL (None when absent); refused with http or when
    the file cannot be read. ``peer`` names what the CA signed, for the fix."""
    if "ca" not in r.table:
        return None
    if parts.scheme != "https":
        raise r.fail("ca", "only used with an https url", "remove ca or use https")
    ca = r.path_("ca", base)
    if not ca.is_file() or not os.access(ca, os.R_OK):
        raise r.fail("ca", f"file {ca} does not exist or is not readable",
                     f"point it at the PEM file of the CA that signed the {peer}")
    return ca


def _is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_dicomweb(d: _Reader, name: str, base: Path, kind: str = "dicomweb"
                    ) -> DestinationConfig:
    """``kind = "dicomweb"``: a STOW-RS server (gateway.dicomweb); ``kind = "orthanc-rest"``:
    an Orthanc's REST API (gateway.orthanc_plugin), with the same keys and refusals.

    Why these refusals: credentials written into the TOML (a ``password`` key, or
    ``user:pass@`` in the URL) end up in backups, tickets and ``sentinel check`` output, so only
    files may hold them. Plain http to another host would send images and the credentials
    in clear over the hospital network: refused unless ``allow_plain_http = true`` says so on
    purpose (refusing is the safer of refusing and warning, since a warning on a running
    service is rarely read). Loopback (a PACS on the same host) is allowed.
    """
    for k in d.table:
        if k.lower() in _INLINE_SECRETS:
            what, key = ("password", "password_file") if k.lower() == "password" \
                else ("token", "token_file")
            raise d.fail(k, "secrets are not written into the config",
                         f"put the {what} in a file readable only by the service user and set "
                         f'{key} = "/etc/xray-sentinel/{name}.{what}"')
    d.check_known(("kind", "url", "token_file", "username", "password_file", "ca", "timeout_s",
                   "connections", "allow_plain_http"))
    url = d.str_("url").strip()
    fix_url = ('url = "https://pacs.example.org/dicom-web" (the base; /studies is added)'
               if kind == "dicomweb" else
               'url = "http://127.0.0.1:8042" (Orthanc\'s REST base; /instances is added)')
    parts = _http_url(d, url, fix_url, "remove user:password@ from url; set username and "
                      "password_file, or token_file")
    if parts.query or parts.fragment:
        raise d.fail("url", "the URL has a query or fragment", fix_url)
    allow_plain = d.bool_("allow_plain_http", False)
    if parts.scheme == "http" and not allow_plain and not _is_loopback_host(parts.hostname):
        raise d.fail("url", f"plain http to {parts.hostname} would send images and credentials "
                     "unencrypted over the network",
                     "use https (with ca if the server's certificate is from a private CA), "
                     "or set allow_plain_http = true if the link is protected otherwise")
    token_file = _secret_file(d, "token_file", base) if "token_file" in d.table else None
    password_file = None
    if "password_file" in d.table:
        password_file = _secret_file(d, "password_file", base)
    username = d.str_("username") if "username" in d.table else ""
    if token_file is not None and (username or password_file is not None):
        raise d.fail("token_file", "both bearer token and basic auth are set",
                     "keep token_file, or username and password_file, not both")
    if password_file is not None and not username:
        raise d.fail("username", "missing: password_file needs a user name",
                     'add username = "..."')
    if username and password_file is None:
        raise d.fail("password_file", "missing: username needs a password file",
                     'add password_file = "/etc/xray-sentinel/NAME.password"')
    if ":" in username:
        raise d.fail("username", "contains ':', which basic authentication cannot carry",
                     "use the account name without ':'")
    ca = _https_ca(d, parts, base, "server")
    return DestinationConfig(
        name=name,
        kind=kind,
        url=url.rstrip("/"),
        token_file=token_file,
        username=username,
        password_file=password_file,
        ca=ca,
        timeout_s=d.num("timeout_s", 60.0, 1.0, 3600.0),
        associations=d.int_("connections", 1, 1, 8),
        allow_plain_http=allow_plain,
    )


def _parse_syslog_target(r: _Reader) -> tuple[str, int, Path | None]:
    """``syslog = "udp://host:port"`` or an absolute unix datagram socket path (/dev/log)."""
    target = r.str_("syslog").strip()
    fix = 'syslog = "udp://127.0.0.1:514" or syslog = "/dev/log"'
    if target.startswith("/"):
        return "", 0, Path(target)
    try:
        parts = urllib.parse.urlsplit(target)
        port = parts.port
    except ValueError as exc:
        raise r.fail("syslog", f"{target!r} is not a valid target ({exc})", fix) from exc
    if parts.scheme != "udp":
        raise r.fail("syslog", f"{target!r} is neither udp://host:port nor an absolute path "
                     "(only UDP and unix datagram sockets are supported)", fix)
    if not parts.hostname or not port or parts.path not in ("", "/") or parts.query:
        raise r.fail("syslog", f"{target!r} needs a host and a port and nothing else", fix)
    return parts.hostname, port, None


def _parse_alerts(r: _Reader, base: Path) -> AlertsConfig:
    """[alerts] (gateway.alerts). Refused as for DICOMweb: an inline secret (it would end up in
    backups and ``sentinel check`` output), a URL with credentials, plain http to a host that is
    not loopback without ``allow_plain_http = true``, a secret file that is missing or empty."""
    for k in r.table:
        if k.lower() in _INLINE_SECRETS:
            raise r.fail(k, "secrets are not written into the config",
                         "put the webhook secret in a file readable only by the service user "
                         'and set secret_file = "/etc/xray-sentinel/alerts.secret"')
    r.check_known(("url", "secret_file", "ca", "timeout_s", "allow_plain_http", "syslog",
                   "syslog_facility", "verify_interval_s", "flag_rate_window",
                   "flag_rate_jump"))
    url = r.str_("url").strip() if "url" in r.table else ""
    allow_plain = r.bool_("allow_plain_http", False)
    secret_file = ca = None
    if url:
        parts = _http_url(r, url, 'url = "https://alerts.example.org/hooks/sentinel"',
                          "remove user:password@ from url; the body is signed with secret_file")
        if parts.scheme == "http" and not allow_plain and not _is_loopback_host(parts.hostname):
            raise r.fail("url", f"plain http to {parts.hostname} would send alerts unencrypted "
                         "over the network", "use https (with ca for a private CA), or set "
                         "allow_plain_http = true if the link is protected otherwise")
        if "secret_file" not in r.table:
            raise r.fail("secret_file", "missing: webhook alerts are signed (HMAC-SHA256)",
                         'add secret_file = "/etc/xray-sentinel/alerts.secret"')
        secret_file = _secret_file(r, "secret_file", base)
        ca = _https_ca(r, parts, base, "receiver")
    else:
        for k in ("secret_file", "ca"):
            if k in r.table:
                raise r.fail(k, "only used with a webhook url", f"add url = \"...\" or remove {k}")
    host, port, sock_path = _parse_syslog_target(r) if "syslog" in r.table else ("", 0, None)
    if not url and not host and sock_path is None:
        raise r.fail("url", "[alerts] has neither a webhook url nor a syslog target",
                     'add url = "https://..." (with secret_file) and/or syslog = "/dev/log"')
    facility = r.str_("syslog_facility", "local0")
    if facility not in SYSLOG_FACILITIES:
        raise r.fail("syslog_facility", f"unknown facility {facility!r}",
                     f"use one of {', '.join(SYSLOG_FACILITIES)}")
    return AlertsConfig(
        url=url,
        secret_file=secret_file,
        ca=ca,
        timeout_s=r.num("timeout_s", 10.0, 0.1, 600.0),
        allow_plain_http=allow_plain,
        syslog_host=host,
        syslog_port=port,
        syslog_path=sock_path,
        syslog_facility=facility,
        verify_interval_s=r.num("verify_interval_s", 300.0, 0.0, 7 * 86400),
        flag_rate_window=r.int_("flag_rate_window", 50, 5, 100_000),
        flag_rate_jump=r.num("flag_rate_jump", 0.2, 0.0, 1.0),
    )


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document; raise ConfigError naming the key and fix."""
    base = path.parent
    top = _Reader(path, data, "")
    top.check_known(
        (
            "listener", "callers", "timeouts", "limits", "state", "retention", "metrics",
            "detector", "forwarding", "destinations", "rules", "default", "commitment",
            "alerts", "orthanc_plugin", "console",
        )
    )

    # the plugin form receives through Orthanc: a TOML only for it needs no [listener]
    lr = top.sub("listener", required="orthanc_plugin" not in top.table)
    lr.check_known(("ae_title", "host", "port", "tls"))
    listener = ListenerConfig(
        ae_title=lr.ae("ae_title", "SENTINEL"),
        host=lr.str_("host", "127.0.0.1"),
        port=lr.int_("port", 11112, 1, 65535),
        tls=_parse_tls(lr, base, inbound=True),
    )
    try:
        ipaddress.ip_address(listener.host)
    except ValueError as exc:
        raise lr.fail("host", f"{listener.host!r} is not an IP address", "e.g. 127.0.0.1") from exc

    callers: list[CallerConfig] = []
    for cr in top.subs("callers"):
        cr.check_known(("ae_title", "addresses", "commitment", "port", "host"))
        addrs = cr.table.get("addresses", ["127.0.0.1", "::1"])
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
            raise cr.fail("addresses", "must be a non-empty list of IPs/CIDRs", '["10.0.0.0/8"]')
        commitment = cr.bool_("commitment", False)
        port = cr.int_("port", 0, 0, 65535)
        host = cr.str_("host") if "host" in cr.table else ""
        if commitment and not port:
            raise cr.fail("port", "commitment = true needs the port the modality's Storage "
                          "Commitment reports go to", "add port = 104 (the modality's own "
                          "DICOM port)")
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise cr.fail("host", f"{host!r} is not an IP address",
                              "e.g. host = \"10.1.2.3\", or leave it out to answer the "
                              "address the request came from") from exc
        callers.append(
            CallerConfig(
                ae_title=cr.ae("ae_title"),
                networks=tuple(_parse_network(cr, "addresses", a) for a in addrs),
                commitment=commitment,
                port=port,
                host=host,
            )
        )

    tr = top.sub("timeouts")
    tr.check_known(("acse_s", "dimse_s", "network_s", "connect_s"))
    timeouts = TimeoutsConfig(
        acse_s=tr.num("acse_s", 30.0, 0.1, 3600),
        dimse_s=tr.num("dimse_s", 60.0, 0.1, 3600),
        network_s=tr.num("network_s", 60.0, 0.1, 86400),
        connect_s=tr.num("connect_s", 10.0, 0.1, 600),
    )

    mr = top.sub("limits")
    limits = _parse_limits(mr)

    sr = top.sub("state", required=True)
    sr.check_known(("dir", "min_free_mb"))
    state = StateConfig(
        dir=sr.path_("dir", base),
        min_free_bytes=int(sr.num("min_free_mb", 512, 0, 10**7) * 1024 * 1024),
    )

    rr = top.sub("retention")
    rr.check_known(("quarantine_days", "sent_ledger_days"))
    retention = RetentionConfig(
        quarantine_days=rr.num("quarantine_days", 90.0, 0.0, 36500),
        sent_ledger_days=rr.num("sent_ledger_days", 30.0, 0.0, 36500),
    )

    xr = top.sub("metrics")
    xr.check_known(("host", "port"))
    metrics = MetricsConfig(host=xr.str_("host", "127.0.0.1"), port=xr.int_("port", 9464, 0, 65535))
    try:
        metrics_ip = ipaddress.ip_address(metrics.host)
    except ValueError as exc:
        raise xr.fail("host", f"{metrics.host!r} is not an IP address", "127.0.0.1") from exc
    if not metrics_ip.is_loopback:
        raise xr.fail("host", "metrics must stay on loopback", 'host = "127.0.0.1"')

    dr = top.sub("detector")
    dr.check_known(("bundle", "workers", "threads", "isolation", "timeout_s", "nice",
                    "on_error", "shadow", "thresholds", "line_gate", "cnn_gate", "line_ramp"))
    bundle_raw = dr.str_("bundle", "default")
    bundle = None if bundle_raw == "default" else dr.path_("bundle", base)
    if bundle is not None and bundle_raw in BUILTIN_BUNDLES and not bundle.exists():
        bundle = BUILTIN_BUNDLES[bundle_raw]  # a shipped bundle by name ("zoo")
    if bundle is not None and not (bundle / "manifest.json").is_file():
        raise dr.fail(
            "bundle", f"{bundle} has no manifest.json",
            f"point it at a model bundle or name a shipped one ({', '.join(BUILTIN_BUNDLES)})"
        )
    thr = dr.sub("thresholds")
    thresholds = {k: thr.num(k, None, 0.0, 1.0) for k in thr.table}
    on_error = dr.str_("on_error", "quarantine")
    if on_error not in ON_ERROR:
        raise dr.fail("on_error", f"unknown policy {on_error!r}", f"use one of {ON_ERROR}")
    isolation = dr.str_("isolation", "process")
    if isolation not in ISOLATION:
        raise dr.fail("isolation", f"unknown mode {isolation!r}", f"use one of {ISOLATION}")
    line_gate = dr.num("line_gate", None, 0.0, 50.0) if "line_gate" in dr.table else None
    line_ramp = dr.num("line_ramp", None, 1.0, 50.0) if "line_ramp" in dr.table else None
    if line_ramp is not None and (line_gate is None or line_ramp >= line_gate):
        raise dr.fail("line_ramp", "works below the line gate, which measures the line",
                      "set line_gate above it (`sentinel calibrate` proposes both) or remove "
                      "line_ramp")
    detector = DetectorConfig(
        bundle=bundle,
        workers=dr.int_("workers", 2, 1, 64),
        threads=dr.int_("threads", 1, 1, 64),
        isolation=isolation,
        timeout_s=dr.num("timeout_s", 60.0, 1.0, 3600.0),
        nice=dr.int_("nice", 10, 0, 19),
        on_error=on_error,
        shadow=dr.bool_("shadow", False),
        thresholds=thresholds,
        line_gate=line_gate,
        cnn_gate=dr.num("cnn_gate", None, 0.01, 1.0) if "cnn_gate" in dr.table else None,
        line_ramp=line_ramp,
    )

    fr = top.sub("forwarding")
    fr.check_known(("backoff_initial_s", "backoff_max_s", "max_age_s", "idle_release_s"))
    forwarding = ForwardingConfig(
        backoff_initial_s=fr.num("backoff_initial_s", 1.0, 0.01, 3600),
        backoff_max_s=fr.num("backoff_max_s", 300.0, 0.01, 86400),
        max_age_s=fr.num("max_age_s", 86400.0, 0.1, 365 * 86400),
        idle_release_s=fr.num("idle_release_s", 30.0, 0.1, 86400),
    )
    if forwarding.backoff_max_s < forwarding.backoff_initial_s:
        raise fr.fail("backoff_max_s", "smaller than backoff_initial_s", "raise backoff_max_s")

    cmr = top.sub("commitment")
    cmr.check_known(("quarantine_hold_s", "max_instances", "pacs_report_timeout_s"))
    commitment_cfg = CommitmentConfig(
        quarantine_hold_s=cmr.num("quarantine_hold_s", 3600.0, 0.0, 30 * 86400),
        max_instances=cmr.int_("max_instances", 5000, 1, 100_000),
        pacs_report_timeout_s=cmr.num("pacs_report_timeout_s", 600.0, 1.0, 7 * 86400),
    )

    alerts = _parse_alerts(top.sub("alerts"), base) if "alerts" in top.table else None
    console = parse_console(top.sub("console"), base) if "console" in top.table else None

    dest_table = top.sub("destinations")
    if not dest_table.table:
        raise top.fail(
            "destinations", "no destination defined", 'add [destinations.NAME] kind = "directory"'
        )
    destinations: dict[str, DestinationConfig] = {}
    for name in dest_table.table:
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):  # it names spool directories
            raise dest_table.fail(name, "bad destination name",
                                  "use letters, digits, _ . - (not . or ..)")
        d = dest_table.sub(name)
        kind = d.str_("kind")
        if kind == "directory":
            d.check_known(("kind", "path"))
            destinations[name] = DestinationConfig(name=name, kind=kind, path=d.path_("path", base))
        elif kind == "dicom":
            d.check_known(("kind", "host", "port", "ae_title", "tls", "present_caller_ae",
                           "associations", "extra_association_backlog_mb", "commitment"))
            destinations[name] = DestinationConfig(
                name=name,
                kind=kind,
                host=d.str_("host"),
                port=d.int_("port", None, 1, 65535),
                ae_title=d.ae("ae_title"),
                tls=_parse_tls(d, base, inbound=False),
                present_caller_ae=d.bool_("present_caller_ae", False),
                associations=d.int_("associations", 2, 1, 16),
                extra_association_backlog_mb=d.num("extra_association_backlog_mb", 16.0, 0.0,
                                                   1e6),
                commitment=d.bool_("commitment", False),
            )
        elif kind in ("dicomweb", "orthanc-rest"):
            destinations[name] = _parse_dicomweb(d, name, base, kind)
        else:
            raise d.fail("kind", f"unknown kind {kind!r}",
                         'use "dicom", "directory", "dicomweb" or "orthanc-rest"')

    rules: list[Rule] = []
    for rr_ in top.subs("rules"):
        name = rr_.str_("name")
        if any(r.name == name for r in rules) or name == "default":
            raise rr_.fail("name", f"duplicate rule name {name!r}", "give each rule its own name")
        rules.append(_parse_rule(rr_, name, destinations, is_default=False))
    default = _parse_rule(top.sub("default"), "default", destinations, is_default=True)

    return Config(
        path=path,
        listener=listener,
        callers=tuple(callers),
        timeouts=timeouts,
        limits=limits,
        state=state,
        retention=retention,
        metrics=metrics,
        detector=detector,
        forwarding=forwarding,
        destinations=destinations,
        rules=tuple(rules),
        default=default,
        commitment=commitment_cfg,
        alerts=alerts,
        orthanc_plugin=(_parse_orthanc_plugin(top.sub("orthanc_plugin"), base)
                        if "orthanc_plugin" in top.table else None),
        console=console,
    )


def _parse_orthanc_plugin(r: _Reader, base: Path) -> OrthancPluginConfig:
    """[orthanc_plugin]: the interpreter must exist now (a typo would otherwise surface as a
    scoring process that cannot start, at Orthanc's start); statuses must be failures (a
    Success or Warning would tell the modality a refused instance was stored)."""
    r.check_known(("python", "refused_status", "error_status"))
    python = r.path_("python", base)
    if not python.is_file() or not os.access(python, os.X_OK):
        raise r.fail("python", f"{python} is not an executable file",
                     'python = "/opt/xray-sentinel/venv/bin/python" (the interpreter that has '
                     "xray-sentinel installed)")
    statuses = {}
    for key, default in (("refused_status", 0x0124), ("error_status", 0xC000)):
        code = r.int_(key, default, 0, 0xFFFF)
        if not is_failure_status(code):
            raise r.fail(key, f"0x{code:04X} is not a C-STORE failure status",
                         f"{key} = 0x{default:04X} (0x01xx refusals, 0xA7xx, 0xA9xx or 0xCxxx)")
        statuses[key] = code
    return OrthancPluginConfig(python=python, **statuses)


def load_config(path: Path | str) -> Config:
    """Read and validate the TOML file at ``path``; raise ConfigError on any problem."""
    p = Path(path).expanduser().resolve()
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(p, "(file)", "not found", "pass --config with an existing file") from exc
    except PermissionError as exc:
        raise ConfigError(p, "(file)", "not readable", "fix its permissions") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(p, "(syntax)", f"invalid TOML: {exc}", "correct the TOML syntax") from exc
    return parse_config(data, p)
