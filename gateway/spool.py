"""The on-disk spool: every state an instance can be in is a file in a directory.

Why files and renames: an instance the modality got Success for must survive a crash (SIGKILL
included) and be picked up after restart, and nothing half-written may ever be forwarded. Every
state change is therefore "write under a temporary name, fsync, rename into place, fsync the
directory", and the directory an instance lies in *is* its state:

    <state>/spool/tmp/                 partial receives (pynetdicom's chunked files); wiped at start
    <state>/spool/incoming/<SOP>.dcm   acknowledged, not yet screened; caller, peer, receipt time
                                       in the file's ``user.sentinel`` xattr (committed by the same
                                       fsync as the data: one journal commit fewer per instance),
                                       or in <SOP>.json where the filesystem has no user xattrs
    <state>/spool/work/                claimed by a screening worker (recovered like incoming)
    <state>/spool/outbox/<dest>/<seq>-<SOP>.dcm (+ .json)   durable forwarding queue, FIFO by name
    <state>/spool/dead/<dest>/         dead-lettered after the maximum age
    <state>/spool/sent/<dest>.log      ledger of SOP UIDs delivered (idempotency across restarts)

Other processes (``sentinel quarantine release``) put instances into an outbox with
``enqueue_outbox``; the running daemon's forwarder rescans its outbox, so it notices them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# A destination name becomes a directory (outbox, dead letters) and a file name (sent ledger):
# the same rule as ``[destinations.NAME]`` in the config, and never "." or "..".
DESTINATION_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SEQ_LOCK = threading.Lock()
_SEQ_LAST = [0]  # monotonic sequence for outbox names within this process
_COUNTER = itertools.count()


def valid_uid(uid: str) -> bool:
    """A DICOM UID safe to use as a file name (digits and dots, at most 64 characters)."""
    return 0 < len(uid) <= 64 and UID_RE.fullmatch(uid) is not None


def check_destination_name(name: str) -> str:
    """Return ``name`` when it is a destination name safe as one path part, else ValueError.

    Why here and not only in the config: ``sentinel quarantine release --state-dir`` takes
    names from the command line and from sidecars, with no config to check them against; a
    name like ``../../x`` must never become a path."""
    if not isinstance(name, str) or not DESTINATION_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"destination {name!r} is not a destination name (letters, digits, _ . - only, at "
            "most 64 characters, not . or ..); refused as a path part"
        )
    return name


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, data: Mapping[str, Any], sync_dir: bool = True) -> None:
    """Write JSON to ``path`` atomically and durably (tmp, fsync, rename, optional dir fsync)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_COUNTER)}.tmp")
    payload = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


META_XATTR = "user.sentinel"


def set_meta_xattr(fd: int, meta: Mapping[str, Any]) -> bool:
    """Attach ``meta`` to an open file as an xattr; False where the filesystem refuses."""
    try:
        os.setxattr(fd, META_XATTR, json.dumps(meta, separators=(",", ":")).encode())
        return True
    except OSError:
        return False


def read_meta(path: Path) -> dict[str, Any]:
    """An incoming instance's receipt metadata: its xattr, else its ``.json`` sidecar."""
    try:
        value = json.loads(os.getxattr(path, META_XATTR))
        if isinstance(value, dict):
            return value
    except (OSError, ValueError):
        pass
    return read_json(path.with_suffix(".json"))


def read_json(path: Path) -> dict[str, Any]:
    """Read a sidecar; a missing or damaged one reads as empty (the DICOM file is the truth)."""
    try:
        with path.open("rb") as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class SpoolLayout:
    """Paths of the spool under one state directory."""

    state_dir: Path

    @property
    def root(self) -> Path:
        return self.state_dir / "spool"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def outbox_root(self) -> Path:
        return self.root / "outbox"

    @property
    def dead_root(self) -> Path:
        return self.root / "dead"

    @property
    def sent_root(self) -> Path:
        return self.root / "sent"

    def outbox(self, destination: str) -> Path:
        return _inside(self.outbox_root, destination, "")

    def dead(self, destination: str) -> Path:
        return _inside(self.dead_root, destination, "")

    def sent_log(self, destination: str) -> Path:
        return _inside(self.sent_root, destination, ".log")

    def committed_log(self, destination: str) -> Path:
        """UIDs a destination with ``commitment = true`` committed (gateway.commitment_scu)."""
        return _inside(self.root / "committed", destination, ".log")

    def commit_refused_log(self, destination: str) -> Path:
        """UIDs such a destination reported it could not commit."""
        return _inside(self.root / "commit-refused", destination, ".log")

    def create(self, destinations: Iterator[str] | tuple[str, ...] = ()) -> None:
        for d in (self.tmp, self.incoming, self.work, self.outbox_root, self.dead_root,
                  self.sent_root):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        for name in destinations:
            self.outbox(name).mkdir(exist_ok=True, mode=0o750)
            self.dead(name).mkdir(exist_ok=True, mode=0o750)

    def clear_stale_tmp(self, older_than_s: float) -> int:
        """Remove partial receives not written to for ``older_than_s`` (aborted transfers).

        A receive in progress writes at least every network timeout, so a file idle for
        longer than that belongs to no live association.
        """
        n = 0
        cutoff = time.time() - older_than_s
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
        return n

    def clear_tmp(self) -> int:
        """Remove partial receives left by a crash; they were never acknowledged."""
        n = 0
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n


def _inside(parent: Path, destination: str, suffix: str) -> Path:
    """``parent/<destination><suffix>``, refused unless it is a plain entry of ``parent`` once
    symbolic links are resolved (defence in depth behind ``check_destination_name``)."""
    check_destination_name(destination)
    path = parent / f"{destination}{suffix}"
    if path.resolve().parent != parent.resolve():
        raise ValueError(
            f"destination {destination!r}: {path} resolves outside {parent}; refused (remove the "
            "symbolic link there)"
        )
    return path


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def next_seq() -> str:
    """A sortable, unique-in-process sequence: outbox names sort in arrival order."""
    with _SEQ_LOCK:
        now = time.time_ns()
        value = max(now, _SEQ_LAST[0] + 1)
        _SEQ_LAST[0] = value
    return f"{value:020d}"


def outbox_name(sop_uid: str, seq: str | None = None) -> str:
    """``<seq>-<uid>.dcm``: names sort in receipt order (the forwarder's FIFO)."""
    if not seq or not seq.isdigit():
        seq = next_seq()
    return f"{seq}-{sop_uid}.dcm"


def sop_from_outbox_name(name: str) -> str:
    """The SOP Instance UID part of an outbox file name ``<seq>-<uid>.dcm``."""
    stem = name[:-4] if name.endswith(".dcm") else name
    return stem.split("-", 1)[1] if "-" in stem else stem


def place_in_outboxes(
    layout: SpoolLayout,
    destinations: tuple[str, ...] | list[str],
    src: Path,
    meta: Mapping[str, Any],
    remove_src: bool = True,
    sync_src_dir: bool = True,
) -> list[Path]:
    """Durably put ``src`` into the outbox of every destination (hard links, one inode).

    Each entry is a sidecar JSON (written first) and the DICOM file linked in under the same
    sequence name; directories are fsynced before ``src`` is removed, so a crash at any point
    leaves the instance either still at ``src`` (processed again) or in the outbox.
    """
    sop_uid = str(meta.get("sop_uid") or "")
    if not valid_uid(sop_uid):
        raise ValueError(f"meta['sop_uid'] must be a valid UID, got {sop_uid!r}")
    outboxes = [(dest, layout.outbox(dest)) for dest in destinations]  # all checked first
    placed: list[Path] = []
    dirs: set[Path] = set()
    for dest, d in outboxes:
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        name = outbox_name(sop_uid, str(meta.get("seq") or ""))
        target = d / name
        entry = dict(meta)
        entry.setdefault("enqueued_at", time.time())
        entry["destination"] = dest
        write_json_durable(target.with_suffix(".json"), entry, sync_dir=False)
        tmp = d / f".{name}.{os.getpid()}.{next(_COUNTER)}.tmp"
        try:
            os.link(src, tmp)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _copy_durable(src, target)
        placed.append(target)
        dirs.add(d)
    # The link count changed: make the inode and each directory entry durable.
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for d in dirs:
        fsync_dir(d)
    if remove_src:
        os.unlink(src)
        side = src.with_suffix(".json")
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
        # The screening workers skip this fsync (sync_src_dir=False): if the unlink is lost in
        # a crash, the instance is routed again and lands under the same outbox name
        # (replacing itself), or the sent ledger drops it: never a second delivery.
        if sync_src_dir:
            fsync_dir(src.parent)
    return placed


def _copy_durable(src: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with src.open("rb") as fi, tmp.open("wb") as fo:
        while chunk := fi.read(1 << 20):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, target)


def enqueue_outbox(state_dir: Path, destination: str, src: Path, meta: dict[str, Any]) -> Path:
    """Durably move ``src`` into ``<state>/spool/outbox/<destination>/`` for forwarding.

    For other processes and modules (quarantine release): the running daemon's forwarder picks
    the file up on its next rescan (at most about a second). ``meta`` must hold ``sop_uid`` and
    should hold ``study_uid`` (ordering within a study) and ``calling_ae`` (for destinations that
    present the original caller's AE title). ``src``'s sidecar ``.json`` is removed with it.
    """
    layout = SpoolLayout(Path(state_dir))
    placed = place_in_outboxes(layout, (destination,), Path(src), meta, remove_src=True)
    return placed[0]


def read_ledger(path: Path, cutoff: float) -> Iterator[tuple[str, float]]:
    """(uid, unix time) of every well-formed line of a sent ledger at or after ``cutoff``, in
    file order; nothing when the file does not exist. Reads only: the daemon owns the file."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for raw in fh:
            uid, _, ts = raw.decode(errors="replace").rstrip("\n").partition("\t")
            try:
                t = float(ts)
            except ValueError:
                continue
            if t >= cutoff and valid_uid(uid):
                yield uid, t


def delivered_at(layout: SpoolLayout, destination: str, sop_uid: str,
                 retention_s: float) -> float | None:
    """When the daemon's sent ledger says ``sop_uid`` went to ``destination`` (the latest time
    within the retention), or None: the forwarder drops a UID it finds there. For other
    processes (``sentinel quarantine release``), which must know before they queue."""
    found = None
    for uid, t in read_ledger(layout.sent_log(destination), time.time() - retention_s):
        if uid == sop_uid:
            found = t if found is None else max(found, t)
    return found


def waiting_in_outbox(layout: SpoolLayout, destination: str, sop_uid: str) -> list[Path]:
    """Outbox entries of ``sop_uid`` still queued for ``destination``, oldest first: a second
    copy queued behind one of them is dropped when the first is delivered."""
    d = layout.outbox(destination)
    return [d / n for n in list_outbox(d) if sop_from_outbox_name(n) == sop_uid]


class _Bloom:
    """A Bloom filter of UIDs: membership with no false negatives, about 1.8 bytes per UID at a
    0.1% false-positive rate (a Python set or dict costs about 200 bytes per UID)."""

    def __init__(self, capacity: int, fp_rate: float = 0.001) -> None:
        self.capacity = max(1024, capacity)
        self._bits = max(8192, math.ceil(-self.capacity * math.log(fp_rate) / math.log(2) ** 2))
        self._k = max(1, round(self._bits / self.capacity * math.log(2)))
        self._array = bytearray((self._bits + 7) // 8)

    def _positions(self, uid: str) -> Iterator[int]:
        digest = hashlib.blake2b(uid.encode(), digest_size=16).digest()
        h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1
        return ((h1 + i * h2) % self._bits for i in range(self._k))

    def add(self, uid: str) -> None:
        for pos in self._positions(uid):
            self._array[pos >> 3] |= 1 << (pos & 7)

    def __contains__(self, uid: str) -> bool:
        return all(self._array[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(uid))


MAX_CACHED = 100_000  # UIDs per destination kept in memory (about 20 MB); the rest on disk


class SentLedger:
    """SOP Instance UIDs already delivered to one destination: never send the same UID twice
    within the retention window.

    An append-only text file (``uid<TAB>unix-time`` per line), fsynced after each append. Why it
    is bounded, in memory and on disk, for a process that runs for months: entries older than
    the retention leave memory as time passes and leave the file when it is compacted (at start
    and whenever expired lines outnumber the live ones); at most ``max_cached`` of the newest
    UIDs stay in memory, and older ones still inside the window are kept in a Bloom filter
    (a couple of bytes each) so that a lookup that misses memory reads the file only when the
    filter says the UID may be there: a new UID (the common case) costs no disk read, and no UID
    of the window is ever forgotten.
    """

    COMPACT_MIN_LINES = 1024  # never rewrite the file for fewer expired lines than this

    def __init__(self, path: Path, retention_s: float, max_cached: int = MAX_CACHED,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.retention_s = float(retention_s)
        self.max_cached = max(1, int(max_cached))
        self._clock = clock
        self._lock = threading.Lock()
        self._uids: OrderedDict[str, float] = OrderedDict()  # newest last
        self._spilled = _Bloom(self.max_cached)  # in the window, on disk, not in memory
        self._n_spilled = 0  # an upper bound: spilled entries expire unseen until compaction
        self._disk_lines = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("ab")
        with self._lock:
            self._compact()

    def _cutoff(self) -> float:
        return self._clock() - self.retention_s

    def _read(self, cutoff: float) -> Iterator[tuple[str, float]]:
        return read_ledger(self.path, cutoff)

    def _compact(self) -> None:
        """Rewrite the file with the window's entries only; rebuild memory and the filter from it
        (caller holds the lock)."""
        cutoff = self._cutoff()
        latest: dict[str, float] = {}
        for uid, t in self._read(cutoff):
            latest[uid] = t  # a UID sent twice (a deliberate resend) keeps its latest time
        entries = sorted(latest.items(), key=lambda item: item[1])
        write_text_durable(self.path, "".join(f"{u}\t{t:.3f}\n" for u, t in entries))
        self._fh.close()
        self._fh = self.path.open("ab")
        self._disk_lines = len(entries)
        keep = entries[-self.max_cached:]
        spilled = entries[: len(entries) - len(keep)]
        self._uids = OrderedDict(keep)
        self._spilled = _Bloom(max(self.max_cached, 2 * len(spilled)))
        for uid, _ in spilled:
            self._spilled.add(uid)
        self._n_spilled = len(spilled)

    def _expire(self) -> None:
        """Drop expired entries from memory; compact the file when it is mostly expired lines
        (caller holds the lock)."""
        cutoff = self._cutoff()
        while self._uids:
            uid, t = next(iter(self._uids.items()))
            if t >= cutoff:
                break
            del self._uids[uid]
        live = len(self._uids) + self._n_spilled
        if self._disk_lines > 2 * live + self.COMPACT_MIN_LINES:
            self._compact()

    def sent_at(self, uid: str) -> float | None:
        """When ``uid`` was delivered (unix time), or None when not within the retention."""
        with self._lock:
            self._expire()
            t = self._uids.get(uid)
            if t is not None:
                return t
            if self._n_spilled == 0 or uid not in self._spilled:
                return None
            found = None
            for u, t in self._read(self._cutoff()):  # the filter may be wrong: the file is not
                if u == uid:
                    found = t
            return found

    def __contains__(self, uid: str) -> bool:
        return self.sent_at(uid) is not None

    def __len__(self) -> int:
        """UIDs known within the window (entries moved out of memory counted until the next
        compaction shows whether they expired)."""
        with self._lock:
            self._expire()
            return len(self._uids) + self._n_spilled

    def add(self, uid: str) -> None:
        """Record a delivery durably (fsync); a UID already in memory is not written again."""
        with self._lock:
            self._expire()
            now = self._clock()
            if uid in self._uids:
                return
            self._fh.write(f"{uid}\t{now:.3f}\n".encode())
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._disk_lines += 1
            self._uids.pop(uid, None)
            self._uids[uid] = now
            while len(self._uids) > self.max_cached:
                old, _ = self._uids.popitem(last=False)
                if self._n_spilled >= self._spilled.capacity:
                    self._compact()  # a larger filter, built from the file
                    break
                self._spilled.add(old)
                self._n_spilled += 1

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def write_text_durable(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_outbox(directory: Path) -> list[str]:
    """Names of complete outbox entries (``.dcm``), oldest first."""
    try:
        names = [e.name for e in os.scandir(directory) if e.name.endswith(".dcm")
                 and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    names.sort()
    return names
