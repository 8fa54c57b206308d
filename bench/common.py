"""Shared pieces of the gateway benchmarks: data sets, servers, timing, statistics, machine info.

Why every benchmark goes through here: the machine is shared and noisy, so a figure only means
something as a ratio against a baseline measured side by side in the same run, on the same
files, with the same server settings (``TCP_NODELAY=1`` for every DCMTK program and Orthanc,
loopback only, fresh Orthanc storage per send, free ports). Keeping the servers, the data sets
and the statistics in one module makes the scripts differ only in what they compare.

The servers are the test helpers (tests/orthanc.py, tests/dcmtk.py, tests/gateway_harness.py,
tests/dicom_factory.py), imported, not copied: the benchmarks start exactly what the
integration tests start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.dcmtk import STORESCU, dcmtk_env, free_port  # noqa: E402
from tests.dicom_factory import make_cr  # noqa: E402
from tests.gateway_harness import GatewayProcess, wait_until, write_config  # noqa: E402
from tests.orthanc import ORTHANC, OrthancServer  # noqa: E402

MODALITY_AE = "MODALITY"
GATEWAY_AE = "SENTINEL"
ORTHANC_AE = "ORTHANC"
# Screening on for every instance; shadow mode forwards even a flagged one, so each send ends
# with all instances in Orthanc (the fixture models flag arbitrary images) at full scoring cost.
SCREEN_ALL = 'action = "screen"\nshadow = true'
BITS_STORED = 12  # CR: 16 bits allocated, 12 stored


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Median and spread (min..max, and the values) of repeated measurements."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(statistics.median(self.values)) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    def fmt(self, digits: int = 1) -> str:
        if not self.values:
            return "n/a"
        return (f"{self.median:.{digits}f} [{self.lo:.{digits}f}-{self.hi:.{digits}f}]"
                f" n={len(self.values)}")


def summarize(values: Sequence[float]) -> Summary:
    return Summary(tuple(float(v) for v in values))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def ratio_line(label: str, ratios: Sequence[float], target: float | None = None) -> str:
    """The line every script prints for a ratio (the smoke test looks for ``ratio``)."""
    s = summarize(ratios)
    verdict = ""
    if target is not None:
        verdict = f"  target >= {target:.2f}: {'met' if s.median >= target else 'MISSED'}"
    return f"ratio {label}: {s.fmt(3)}{verdict}"


# -- data sets -------------------------------------------------------------------------------


def _field(rows: int, cols: int, seed: int) -> np.ndarray:
    """A smooth radiograph-like field with noise, 12-bit values in uint16 (cheap to make)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, np.pi, rows, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 2 * np.pi, cols, dtype=np.float32)[None, :]
    field = 0.5 + 0.3 * np.sin(x) * np.cos(y)
    field = field + 0.05 * rng.standard_normal((rows, cols), dtype=np.float32)
    top = (1 << BITS_STORED) - 1
    return (np.clip(field, 0.0, 1.0) * top).astype(np.uint16)


def make_set(directory: Path, n: int, rows: int, cols: int, seed: int = 0) -> list[Path]:
    """``n`` distinct 16-bit CR instances (own SOP UIDs, one study) of ``rows`` x ``cols``.

    Reused when ``directory`` already holds the same set (generation is not what we measure).
    Each instance gets its own pixel bytes (a per-instance shift of one base field), so no
    layer can short-cut identical payloads.
    """
    stamp = directory / "set.json"
    want = {"n": n, "rows": rows, "cols": cols, "seed": seed, "bits": BITS_STORED}
    files = [directory / f"i{i:05d}.dcm" for i in range(n)]
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(f.exists() for f in files):
        return files
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    from pydicom.uid import generate_uid

    base = _field(rows, cols, seed)
    study, series = generate_uid(), generate_uid()
    for i, f in enumerate(files):
        pixels = np.roll(base, i * 7, axis=1)
        make_cr(f, pixels, BITS_STORED, study_uid=study, series_uid=series,
                instance_number=i + 1)
    stamp.write_text(json.dumps(want))
    return files


def issue_sets(cache: Path, n512: int, nlarge: int, min_n: int = 1
               ) -> Iterator[tuple[str, int, int, list[Path]]]:
    """The issue's two sets, (label, rows, cols, files): n512 of 512x512 and nlarge of
    2048x2500 16-bit CR, made once under ``cache``; a set with fewer than ``min_n`` is skipped."""
    for label, n, rows, cols in (("512x512", n512, 512, 512), ("2048x2500", nlarge, 2500, 2048)):
        if n >= min_n:
            yield label, rows, cols, make_set(cache / f"set-{rows}x{cols}-{n}", n, rows, cols)


def warm_set(cache: Path, rows: int, cols: int, n: int = 2) -> list[Path]:
    """A few instances of the same size, sent before each measured send (see send_direct)."""
    return make_set(cache / f"warm-{rows}x{cols}-{n}", n, rows, cols, seed=1)


def megabytes(files: Sequence[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


# -- machine and versions ---------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info() -> dict[str, str]:
    """What RESULTS.md records beside each figure."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import pydicom
    import pynetdicom

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": f"{cpu} x{os.cpu_count()}",
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": first_line([STORESCU, "--version"]),
        "orthanc": first_line([ORTHANC, "--version"]),
    }


def print_header(title: str, argv: Sequence[str]) -> None:
    print(f"# {title}")
    print("command: .venv/bin/python -m " + " ".join(argv))
    for k, v in machine_info().items():
        print(f"{k}: {v}")
    sys.stdout.flush()


# -- bundle ----------------------------------------------------------------------------------


def bundle_dir(cache: Path, explicit: Path | None = None) -> tuple[Path, str]:
    """The model bundle to screen with, and a word on which one it is.

    The shipped default when present (detector/models/default), otherwise the fixture bundle
    (same runtime code paths and model shapes as the tests; built once into ``cache``).
    """
    if explicit is not None:
        return explicit, f"given ({explicit})"
    default = REPO_ROOT / "detector" / "models" / "default"
    if (default / "manifest.json").exists():
        return default, "shipped default bundle"
    target = cache / "fixture-bundle"
    if not (target / "manifest.json").exists():
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from fixture_bundle import build_fixture_bundle

        if target.exists():
            shutil.rmtree(target)
        build_fixture_bundle(target)
    return target, "fixture bundle (tests/fixture_bundle.py; default bundle not shipped yet)"


# -- processes -------------------------------------------------------------------------------


def status_mb(pid: int, key: str) -> float:
    """A memory line of /proc/PID/status (VmHWM: peak resident set, VmRSS: resident now), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a running process (VmHWM), in MB."""
    return status_mb(pid, "VmHWM")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (the gateway's scoring processes)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (int(c) for c in (task / "children").read_text().split()):
                out += [child, *descendants(child)]
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the daemon plus its scorers)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += cpu_s(p)
    return total


def tree_hwm_mb(pid: int) -> tuple[float, float]:
    """(sum of peak RSS over the process and its descendants, the process's own peak), MB.
    The sum is an upper bound of the tree's peak: each part's peak need not coincide."""
    own = vm_hwm_mb(pid)
    total = own
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            total += vm_hwm_mb(p)
    return total, own


def storescu_cmd(port: int, files: Sequence[Path], called: str) -> list[str]:
    return [STORESCU, "-aet", MODALITY_AE, "-aec", called, "-to", "30", "-ta", "30",
            "-td", "120", "127.0.0.1", str(port), *map(str, files)]


def send_parallel(port: int, shares: Sequence[Sequence[Path]], called: str,
                  timeout: float = 900) -> float:
    """Run one storescu per share at once (one association each); wall seconds until all exit.

    Raises RuntimeError naming the failing share when a storescu does not exit 0.
    """
    env = dcmtk_env()
    t0 = time.time()
    procs = [subprocess.Popen(storescu_cmd(port, s, called), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env) for s in shares if s]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    wall = time.time() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to port {port} failed ({p.returncode}): "
                               f"{out.decode(errors='replace')[-800:]}")
    return wall


def send_studies(port: int, shares: Sequence[Sequence[Path]], called: str,
                 per_association: int | None = None, timeout: float = 900) -> float:
    """Each share sent by its own sender, all at once; wall seconds until all are done.

    ``per_association`` None: one association per share (``send_parallel``). A number: each
    sender sends its share in consecutive associations of that many instances (a modality
    opens one per study: a chest PA and lateral is 2), one storescu each, one after another.
    """
    if per_association is None:
        return send_parallel(port, shares, called, timeout)
    if per_association < 1:
        raise ValueError(f"per_association must be >= 1, got {per_association}")

    def one_sender(share: Sequence[Path]) -> None:
        for i in range(0, len(share), per_association):
            send_parallel(port, [share[i:i + per_association]], called, timeout)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max(1, len(shares))) as pool:
        for done in [pool.submit(one_sender, s) for s in shares if s]:
            done.result()
    return time.time() - t0


def split(files: Sequence[Path], k: int) -> list[list[Path]]:
    """``k`` contiguous shares (each association sends whole runs of the series in order)."""
    n = len(files)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [list(files[bounds[i]:bounds[i + 1]]) for i in range(k)]


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def orthanc(root: Path, gateway_port: int = 0, *, aet: str = ORTHANC_AE,
            modalities: dict[str, tuple[str, int]] | None = None,
            lua: str | None = None) -> Iterator[OrthancServer]:
    """A fresh Orthanc on its own storage under ``root`` that accepts MODALITY and SENTINEL
    (and knows ``modalities`` besides; ``lua``: a script of its own, e.g. ROUTER_LUA)."""
    if root.exists():
        shutil.rmtree(root)
    mods = {"modality": (MODALITY_AE, 104), **(modalities or {})}
    if gateway_port:
        mods["sentinel"] = (GATEWAY_AE, gateway_port)
    server = OrthancServer(root, mods, aet=aet, lua=lua)
    server.start()
    try:
        yield server
    finally:
        # Its storage is thrown away, so no orderly shutdown is needed: a SIGTERM'd Orthanc
        # 1.10 takes ~3 s to stop its DICOM server, which would dominate the smoke runs.
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
        server.stop()
        shutil.rmtree(root / "db", ignore_errors=True)


class AuditTail:
    """Times of chosen audit events per SOP UID, read incrementally from the gateway's log.

    Why incremental: the benchmark polls while the gateway works on the same two cores;
    re-parsing the whole growing audit.jsonl every 50 ms cost tens of ms of CPU per poll on a
    500-instance send and slowed the very gateway being measured. Only new complete lines are
    read, and only lines of the wanted events are parsed.
    """

    def __init__(self, path: Path, events: tuple[str, ...] = ("forwarded", "scored")) -> None:
        self.path = path
        self._offset = 0
        self._needles = {e: f'"event":"{e}"'.encode() for e in events}
        self.times: dict[str, dict[str, float]] = {e: {} for e in events}

    def poll(self) -> AuditTail:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return self
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            for event, needle in self._needles.items():
                if needle in line:
                    with contextlib.suppress(ValueError, KeyError):
                        rec = json.loads(line)
                        if rec.get("event") == event and rec.get("sop_uid"):
                            when = datetime.fromisoformat(
                                str(rec["time"]).replace("Z", "+00:00"))
                            self.times[event][str(rec["sop_uid"])] = when.timestamp()
        return self


@dataclass
class GatewayRun:
    """A running gateway (subprocess) forwarding to one Orthanc, and where its audit log is."""

    proc: GatewayProcess
    state: Path
    port: int
    audit: AuditTail

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return int(self.proc.proc.pid)

    def forwarded_times(self) -> dict[str, float]:
        """SOP UID -> unix time of its 'forwarded' audit line (written after Orthanc's reply)."""
        return self.audit.poll().times["forwarded"]

    def scored_times(self) -> dict[str, float]:
        return self.audit.poll().times["scored"]


@contextlib.contextmanager
def gateway(root: Path, orthanc_port: int, port: int, bundle: Path, workers: int = 2,
            max_assoc: int = 16, env: dict[str, str] | None = None,
            default_rule: str = SCREEN_ALL, isolation: str = "process",
            associations: int = 2, nice: int | None = None,
            backlog_mb: float | None = None) -> Iterator[GatewayRun]:
    """``sentinel serve`` on fresh state: screening every instance, forwarding to Orthanc over
    ``associations`` concurrent associations (``backlog_mb``: the destination's
    extra_association_backlog_mb, None: the product default); ``nice``: the scorers' niceness
    (None: default).

    ``default_rule`` 'action = "pass"' isolates the receive + forward cost (profiling only;
    every reported figure screens).
    """
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    state = root / "state"
    dest = (f'[destinations.pacs]\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {orthanc_port}\nae_title = "{ORTHANC_AE}"\nassociations = {associations}\n'
            + (f"extra_association_backlog_mb = {backlog_mb}\n" if backlog_mb is not None else ""))
    cfg = write_config(
        root / "gateway.toml", state=state, port=port, destinations=dest, default=default_rule,
        bundle=bundle, limits=(f"max_associations = {max_assoc}\n"
                               f"max_associations_per_caller = {max_assoc}\n"
                               "max_instance_mb = 200"),
    )
    text = cfg.read_text()
    if "workers = 1\n" in text:  # the harness writes one worker; the product default is 2
        text = text.replace("workers = 1\n", f"workers = {workers}\n", 1)
    settings = f'isolation = "{isolation}"\n' + ("" if nice is None else f"nice = {nice}\n")
    cfg.write_text(text.replace("[detector]\n", f"[detector]\n{settings}", 1))
    full_env = {"TCP_NODELAY": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    proc = GatewayProcess(cfg, root / "gateway.log", port)
    proc.start(timeout=120, env=full_env)
    try:
        yield GatewayRun(proc, state, port, AuditTail(state / "audit" / "audit.jsonl"))
    finally:
        proc.stop()


@dataclass
class Send:
    """One measured send of a set."""

    n: int
    megabytes: float
    ack_s: float  # until every storescu exited (all acknowledged by the receiver)
    done_s: float  # until the last instance was stored in Orthanc (== ack_s for direct sends)
    rss_mb: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ack_rate(self) -> float:
        return self.n / self.ack_s

    @property
    def rate(self) -> float:
        return self.n / self.done_s

    @property
    def mb_rate(self) -> float:
        return self.megabytes / self.done_s


def send_direct(root: Path, files: Sequence[Path], k: int = 1,
                warm: Sequence[Path] = (), per_association: int | None = None) -> Send:
    """storescu (k associations) straight into a fresh Orthanc.

    ``warm`` instances go first, untimed, on both paths alike: the figures are those of a
    running service (the gateway's detectors and forwarding association warm), not of a start.
    """
    with orthanc(root / "orthanc") as pacs:
        assert pacs.proc is not None
        if warm:
            send_parallel(pacs.dicom_port, [warm], ORTHANC_AE)
        c0 = cpu_s(pacs.proc.pid)
        wall = send_studies(pacs.dicom_port, split(files, k), ORTHANC_AE, per_association)
        orthanc_cpu = cpu_s(pacs.proc.pid) - c0
        got = pacs.wait_for_count(len(files) + len(warm), timeout=60) - len(warm)
        if got != len(files):
            raise RuntimeError(f"Orthanc holds {got} of {len(files)} instances after a direct send")
    return Send(len(files), megabytes(files), wall, wall,
                extra={"orthanc_cpu_ms": 1000.0 * orthanc_cpu / len(files)})


# Orthanc as the router a site would otherwise run: it stores, forwards and deletes every
# instance from its Lua OnStoredInstance hook (Orthanc's own auto-routing sample), screening
# nothing. The hook runs on Orthanc's Lua thread, after the C-STORE has been answered.
ROUTER_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] ~= 'Lua' then
    SendToModality(instanceId, 'pacs')
    Delete(instanceId)
  end
end
"""


def send_via_orthanc_router(root: Path, files: Sequence[Path], k: int = 1,
                            warm: Sequence[Path] = (), timeout: float = 900,
                            per_association: int | None = None) -> Send:
    """storescu (k associations) into an Orthanc that routes every instance to a fresh Orthanc
    (``ROUTER_LUA``): the peer a site would otherwise deploy between modality and PACS.

    ``done_s`` ends when the PACS holds every instance (polled every 0.1 s), as for the gateway.
    The router presents the gateway's AE title, so the PACS accepts it as it accepts the gateway.
    """
    # the PACS admits a caller by AE title and host; the port it registers is not used
    with orthanc(root / "pacs", gateway_port=104) as pacs, \
            orthanc(root / "router", aet=GATEWAY_AE, lua=ROUTER_LUA,
                    modalities={"pacs": (ORTHANC_AE, pacs.dicom_port)}) as router:
        assert pacs.proc is not None and router.proc is not None
        w = len(warm)
        if warm:
            send_parallel(router.dicom_port, [warm], GATEWAY_AE, timeout=timeout)
            if not wait_until(lambda: int(pacs.statistics()["CountInstances"]) >= w,
                              timeout=timeout, interval=0.05):
                raise RuntimeError("warm-up not routed by Orthanc")
        c_router, c_pacs = cpu_s(router.proc.pid), cpu_s(pacs.proc.pid)
        t0 = time.time()
        ack = send_studies(router.dicom_port, split(files, k), GATEWAY_AE, per_association,
                           timeout)
        n = len(files)
        if not wait_until(lambda: int(pacs.statistics()["CountInstances"]) >= n + w,
                          timeout=timeout, interval=0.1):
            raise RuntimeError(f"the Orthanc router delivered "
                               f"{int(pacs.statistics()['CountInstances']) - w} of {n}")
        done = time.time() - t0
        extra = {"router_cpu_ms": 1000.0 * (cpu_s(router.proc.pid) - c_router) / n,
                 "orthanc_cpu_ms": 1000.0 * (cpu_s(pacs.proc.pid) - c_pacs) / n}
    return Send(n, megabytes(files), ack, max(done, ack), extra=extra)


def send_via_gateway(root: Path, files: Sequence[Path], bundle: Path, k: int = 1,
                     workers: int = 2, timeout: float = 900,
                     default_rule: str = SCREEN_ALL, warm: Sequence[Path] = (),
                     isolation: str = "process", associations: int = 2,
                     nice: int | None = None, backlog_mb: float | None = None,
                     per_association: int | None = None) -> Send:
    """storescu (k associations) into the gateway, which screens and forwards to a fresh Orthanc.

    ``done_s`` ends when Orthanc holds every instance (polled every 0.1 s).
    """
    port = free_port()
    with orthanc(root / "orthanc", gateway_port=port) as pacs, \
            gateway(root / "gw", pacs.dicom_port, port, bundle, workers=workers,
                    default_rule=default_rule, isolation=isolation,
                    associations=associations, nice=nice, backlog_mb=backlog_mb) as gw:
        assert pacs.proc is not None
        w = len(warm)
        if warm:
            send_parallel(port, [warm], GATEWAY_AE, timeout=timeout)
            if not wait_until(lambda: len(gw.forwarded_times()) >= w, timeout=timeout,
                              interval=0.05):
                raise RuntimeError(f"warm-up not forwarded; log: {gw.proc.log()[-1500:]}")
        c_gw, c_pacs = tree_cpu_s(gw.pid), cpu_s(pacs.proc.pid)
        t0 = time.time()
        ack = send_studies(port, split(files, k), GATEWAY_AE, per_association, timeout)
        n = len(files)
        # Delivered = stored in Orthanc (it answers a C-STORE after storing): its instance
        # count, polled every 0.1 s, is the primary end time. The gateway's own 'forwarded'
        # audit lines come from a completer thread (ledger fsync, unlink, audit) that can lag
        # behind the sends; their last time is kept apart as audit_done_s.
        deadline = time.monotonic() + timeout
        while int(pacs.statistics()["CountInstances"]) < n + w:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not receive all {n}; "
                                   f"log: {gw.proc.log()[-1500:]}")
            time.sleep(0.1)
        done = time.time() - t0
        if not wait_until(lambda: len(gw.forwarded_times()) >= n + w, timeout=timeout,
                          interval=0.05):
            raise RuntimeError(f"gateway forwarded {len(gw.forwarded_times()) - w} of {n}; "
                               f"log: {gw.proc.log()[-1500:]}")
        audit_done = max(gw.forwarded_times().values()) - t0
        scored = gw.scored_times()
        rss, daemon_rss = tree_hwm_mb(gw.pid)
        cpu = {"gateway_cpu_ms": 1000.0 * (tree_cpu_s(gw.pid) - c_gw) / n,
               "daemon_rss_mb": daemon_rss,
               "orthanc_cpu_ms": 1000.0 * (cpu_s(pacs.proc.pid) - c_pacs) / n,
               # when screening finished the last instance: tells which stage trails
               "last_scored_s": (max(scored.values()) - t0) if scored else float("nan"),
               "audit_done_s": audit_done}
        got = pacs.wait_for_count(n + w, timeout=60) - w
        if got != n:
            raise RuntimeError(f"Orthanc holds {got} of {n} instances after the gateway send")
    return Send(n, megabytes(files), ack, max(done, ack), rss, cpu)


def send_receive_only(root: Path, files: Sequence[Path], bundle: Path, k: int = 1,
                      warm: Sequence[Path] = ()) -> Send:
    """storescu into a gateway that only receives: every instance routed ``pass`` (no
    screening) to a destination with nothing listening, so the forwarder only backs off.

    Why: the acknowledgement rate of the receive path alone (stream to spool, xattr, fsync,
    rename, directory fsync, routing, outbox link) with nothing competing for the cores, the
    ceiling of the full gateway's ingest rate. ``done_s`` equals ``ack_s``.
    """
    port = free_port()
    with gateway(root / "gw", free_port(), port, bundle, default_rule='action = "pass"') as gw:
        if warm:
            send_parallel(port, [warm], GATEWAY_AE)
        c0 = tree_cpu_s(gw.pid)
        ack = send_parallel(port, split(files, k), GATEWAY_AE)
        cpu = 1000.0 * (tree_cpu_s(gw.pid) - c0) / len(files)
        rss, _ = tree_hwm_mb(gw.pid)
    return Send(len(files), megabytes(files), ack, ack, rss, {"gateway_cpu_ms": cpu})


@contextlib.contextmanager
def discard_scp(port: int) -> Iterator[int]:
    """bench/discard_scp.py as a child process on ``port``; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.discard_scp", "--port", str(port), "--ae-title",
         GATEWAY_AE], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"discard SCP did not start: {line} {proc.stdout.read()[-800:]!r}")
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def send_discard(files: Sequence[Path], k: int = 1) -> Send:
    """storescu (k associations) into the discard-only pynetdicom SCP."""
    port = free_port()
    with discard_scp(port) as pid:
        c0 = cpu_s(pid)
        wall = send_parallel(port, split(files, k), GATEWAY_AE)
        rss = vm_hwm_mb(pid)
        cpu = 1000.0 * (cpu_s(pid) - c0) / len(files)
    return Send(len(files), megabytes(files), wall, wall, rss, {"discard_cpu_ms": cpu})
