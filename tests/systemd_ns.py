"""Real systemd for tests: systemd 252 as PID 1 of a private PID and mount namespace.

PID 1 on the test machines is not systemd, so ``systemctl`` does nothing there and the shipped
unit would otherwise only ever be checked by ``systemd-analyze``. systemd does boot as PID 1 of
a new PID namespace (``unshare --pid --fork --mount``) with ``container=other`` set, and the
namespace's services reach the host's loopback (the network is shared), so DCMTK on the host
talks to a service that systemd runs.

What the namespace gets before systemd is exec'd, and why (``BOOT_SCRIPT``):

- its own tmpfs on /tmp, /var/tmp and /run. A hard safety rule: ``systemd-tmpfiles --boot``
  empties /tmp (Debian's ``D /tmp``), where a CI clone and pytest's own temporary directories
  live. The script checks that each is a fresh, empty tmpfs on another device than the host's
  and exits without starting systemd otherwise; ``SystemdNamespace.start`` checks it again from
  outside and the test keeps a marker file in the host's /tmp to prove it survived.
- copy-on-write overlays on /etc, /var and /opt (upper layers in the private /run): what the
  test installs there (unit, sysusers and tmpfiles snippets, config, the service account that
  ``systemd-sysusers`` adds to /etc/passwd, the state directory under /var/lib, the journal)
  is the namespace's own and vanishes with it; the host's /etc and /var are never written.
- its own tmpfs on /sys/fs/cgroup with the host's cgroup hierarchies bound back in: systemd
  remounts that tmpfs read-only and adds mount points to it, which would otherwise change the
  host's (a tmpfs superblock is shared between namespaces). The per-unit cgroups systemd makes
  inside the hierarchies are removed after teardown (``_remove_new_cgroups``).
- ``binds``: directories bound in at given paths, e.g. a test venv at /opt/xray-sentinel so
  that the shipped unit runs unmodified.

systemd boots to ``sysinit.target`` only: the host's enabled services (this image enables
Orthanc and PostgreSQL) and timers (apt-daily, man-db) are not started inside; a unit the test
starts pulls in what it needs.

Teardown SIGKILLs the namespace's PID 1, which makes the kernel kill every process in it, and
then checks that none is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

SYSTEMD = Path("/lib/systemd/systemd")
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/run")
OVERLAID = ("/etc", "/var", "/opt")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIT_SUFFIXES = (".slice", ".scope", ".service", ".mount", ".socket", ".swap", ".automount")

# Runs as PID 1 of the new namespace until it execs systemd; any failed step exits (set -e) and
# systemd is never started. Arguments: host device numbers of /tmp, /var/tmp, /run; then
# "target=source" binds.
BOOT_SCRIPT = r"""
set -eu
host_tmp=$1 host_vartmp=$2 host_run=$3
shift 3
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
for d in etc var opt; do
  mkdir -p /run/ns-overlay/$d/upper /run/ns-overlay/$d/work
  mount -t overlay overlay \
    -o lowerdir=/$d,upperdir=/run/ns-overlay/$d/upper,workdir=/run/ns-overlay/$d/work /$d
done
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
# a private /sys/fs/cgroup tmpfs with the host's hierarchies bound back in
mkdir /run/ns-cgroup-host
mount --rbind /sys/fs/cgroup /run/ns-cgroup-host
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
for h in /run/ns-cgroup-host/*; do
  name=${h##*/}
  if mountpoint -q "$h"; then
    mkdir "/sys/fs/cgroup/$name"
    mount --bind "$h" "/sys/fs/cgroup/$name"
  fi
done
umount -R /run/ns-cgroup-host
rmdir /run/ns-cgroup-host
for bind in "$@"; do
  target=${bind%%=*} source=${bind#*=}
  mkdir -p "$target"
  mount --bind "$source" "$target"
done
# the safety rule, checked before systemd (and its tmpfiles --boot) can run
check() {  # path, host device number
  [ "$(stat -f -c %T "$1")" = tmpfs ] || { echo "$1 is not a tmpfs" >&2; exit 90; }
  [ "$(stat -c %d "$1")" != "$2" ] || { echo "$1 is the host's" >&2; exit 91; }
}
check /tmp "$host_tmp"; check /var/tmp "$host_vartmp"; check /run "$host_run"
[ -z "$(ls -A /tmp)" ] && [ -z "$(ls -A /var/tmp)" ] || { echo "/tmp not fresh" >&2; exit 92; }
echo "private /tmp /var/tmp /run: ok"
export container=other
exec /lib/systemd/systemd --system --unit=sysinit.target
"""


def skip_unless_possible() -> None:
    """Skip (with the reason) where systemd cannot be booted in a namespace here."""
    if os.geteuid() != 0:
        pytest.skip("real-systemd test: needs root (it boots systemd in a PID+mount namespace)")
    for tool in ("unshare", "nsenter", "mountpoint"):
        if shutil.which(tool) is None:
            pytest.skip(f"real-systemd test: {tool} not found (Debian package util-linux)")
    if not os.access(SYSTEMD, os.X_OK):
        pytest.skip(f"real-systemd test: {SYSTEMD} not found (Debian package systemd)")
    if _comm(1) == "systemd":
        pytest.skip("real-systemd test: PID 1 here is systemd already; a second one in a "
                    "namespace would manage the same cgroup tree (test the unit with the host's)")
    filesystems = Path("/proc/filesystems").read_text()
    if "\toverlay\n" not in filesystems:
        pytest.skip("real-systemd test: no overlayfs in this kernel (the namespace writes /etc "
                    "and /var through overlays so that the host's are never touched)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"real-systemd test: cannot create PID+mount namespaces here "
                    f"({probe.stderr.strip()})")


def _die_with_parent() -> None:
    """In the forked child before exec: SIGKILL it when the thread that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pid_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in_ns(ns: str) -> list[int]:
    """Host PIDs of the processes whose PID namespace is ``ns`` (``pid:[inode]``)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _pid_ns(p) == ns]


def _cgroup_dirs() -> set[Path]:
    """Every cgroup directory in the host's hierarchies (the mount points under
    /sys/fs/cgroup)."""
    found: set[Path] = set()
    for top in CGROUP_ROOT.iterdir():
        if top.is_symlink() or not top.is_dir() or not os.path.ismount(top):
            continue
        for dirpath, _dirs, _files in os.walk(top):
            found.add(Path(dirpath))
    return found


def _remove_new_cgroups(before: set[Path], timeout: float = 10.0) -> list[Path]:
    """rmdir the cgroups systemd made in the host's hierarchies (named after units, new since
    ``before``), deepest first; returns those that could not be removed."""
    def ours(p: Path) -> bool:
        rel = p.relative_to(CGROUP_ROOT).parts
        return len(rel) >= 2 and rel[1].endswith(UNIT_SUFFIXES)

    deadline = time.monotonic() + timeout
    while True:
        left = sorted((p for p in _cgroup_dirs() - before if ours(p)),
                      key=lambda p: len(p.parts), reverse=True)
        for p in left:
            with contextlib.suppress(OSError):  # still busy: the kernel frees it shortly
                p.rmdir()
        left = [p for p in left if p.exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class SystemdNamespace:
    """systemd as PID 1 of a private PID and mount namespace; a context manager.

    ``root`` is the namespace's file system as the host sees it (``/proc/<pid>/root``): write
    files the namespace should see through it. ``run`` runs a command inside with nsenter.
    """

    def __init__(self, log: Path, binds: Mapping[str, str | os.PathLike[str]] | None = None,
                 boot_timeout: float = 60.0) -> None:
        self.log_path = log
        self.binds = {t: str(s) for t, s in (binds or {}).items()}
        for target in self.binds:
            if not any(target.startswith(d + "/") for d in (*OVERLAID, "/run")):
                raise ValueError(f"bind target {target} is not under {OVERLAID} or /run: "
                                 "making its mount point would write to the host")
        self.boot_timeout = boot_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self.pid = 0
        self.ns = ""
        self._cgroups_before: set[Path] = set()
        self._lock: BinaryIO | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> SystemdNamespace:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Boot systemd and wait until ``systemctl is-system-running`` says it is up."""
        # One namespace at a time on a host: two systemds would manage the same cgroup paths
        # (system.slice/...) in the shared hierarchies. The lock is flock on systemd's binary,
        # so no lock file is left behind; the kernel drops it if this process dies.
        self._lock = SYSTEMD.open("rb")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        devs = [str(os.stat(p).st_dev) for p in PRIVATE_TMPFS]
        # a namespace that died without close() (its owner SIGKILLed) left its cgroups: PID 1
        # here is not systemd (skip_unless_possible), so unit-named ones are such leftovers
        _remove_new_cgroups(set(), timeout=0)
        self._cgroups_before = _cgroup_dirs()
        self._log = self.log_path.open("wb")
        # --kill-child and _die_with_parent: should this process die without close() (SIGKILL,
        # a CI timeout), unshare dies with it and takes the namespace's PID 1, and so the
        # whole namespace, along
        cmd = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--mount-proc",
               "sh", "-c", BOOT_SCRIPT, "boot", *devs,
               *(f"{t}={s}" for t, s in self.binds.items())]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.boot_timeout
        while not self.pid:  # unshare's child: sh, then (after exec) systemd
            if self._proc.poll() is not None:
                raise RuntimeError(f"the namespace's boot script exited "
                                   f"{self._proc.returncode}: {self.boot_log()}")
            kids = _children(self._proc.pid)
            if kids and _comm(kids[0]) == "systemd":
                self.pid = kids[0]
            elif time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not start: {self.boot_log()}")
            else:
                time.sleep(0.05)
        self.ns = _pid_ns(self.pid) or ""
        if not self.ns or self.ns == _pid_ns("self"):
            raise RuntimeError("systemd is not in a PID namespace of its own")
        self.assert_private_tmp()
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not finish booting (state {state!r}): "
                                   f"{self.boot_log()}")
            time.sleep(0.2)

    def assert_private_tmp(self) -> None:
        """The namespace's /tmp, /var/tmp and /run are not the host's (seen from outside)."""
        for p in PRIVATE_TMPFS:
            inner = os.stat(self.root / p.lstrip("/")).st_dev
            assert inner != os.stat(p).st_dev, f"{p} in the namespace is the host's"

    def close(self) -> None:
        """Kill the namespace (SIGKILL to its PID 1 kills everything in it), reap unshare,
        check that no process of it is left, and remove the cgroups it made."""
        try:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # --kill-child takes its child along
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            if self._log is not None:
                self._log.close()
                self._log = None
            if self.ns:
                deadline = time.monotonic() + 10
                while (left := processes_in_ns(self.ns)) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not left, f"processes of the namespace survived its PID 1: {left}"
                self.ns = ""
            if self._cgroups_before:
                stuck = _remove_new_cgroups(self._cgroups_before)
                self._cgroups_before = set()
                assert not stuck, f"cgroups of the namespace could not be removed: {stuck}"
        finally:
            self.pid = 0
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    # -- use -------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The namespace's root directory as the host sees it."""
        assert self.pid, "namespace not started"
        return Path(f"/proc/{self.pid}/root")

    def path(self, inside: str) -> Path:
        """A path inside the namespace, reachable from the host."""
        return self.root / inside.lstrip("/")

    def run(self, cmd: Sequence[str] | str, *, check: bool = True, cwd: str = "/",
            timeout: float = 120, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string for ``bash -c``) in the namespace as root."""
        argv = ["bash", "-euo", "pipefail", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "SYSTEMD_PAGER": "", "PAGER": "cat", "LANG": "C.UTF-8", "TERM": "dumb",
                    **(env or {})}
        # env -C, not nsenter --wd: nsenter resolves --wd before it enters the mount namespace
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-p", "-m", "env", "-C", cwd, *argv],
                           capture_output=True, text=True, timeout=timeout, env=full_env)
        if check and r.returncode != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(argv)
            raise AssertionError(f"in the namespace, `{shown}` exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p`` values of ``unit``."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since_epoch: float) -> str:
        """The unit's journal since a host time (the journal may hold earlier runs' lines)."""
        return self.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit,
                         f"--since=@{int(since_epoch)}"]).stdout

    def boot_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""
