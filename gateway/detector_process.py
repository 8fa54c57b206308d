"""A Detector in its own process, so screening does not share the daemon's interpreter.

Why a process per screening worker rather than a thread:
- The GIL. Decoding and scoring an instance is ~9 ms of CPU per 512x512 image and ~27 ms per
  2048x2500 one, much of it Python and numpy glue that holds the interpreter lock. In threads it
  slowed the C-STORE receiver and the forwarder (both pynetdicom, both pure Python) to the pace
  of screening; in a child process the three run on different cores (bench/RESULTS.md).
- Containment. A pixel decoder (JPEG 2000, JPEG-LS, RLE: C libraries fed by whoever can open an
  association) that crashes or hangs takes down only its child. The instance in hand gets the
  typed reason ``detector-crashed`` or ``detector-timeout`` (quarantined by the default error
  policy, never silently forwarded) and the next instance starts a fresh child.

The child re-reads the spooled file itself (the parent has already parsed the header for the
rules; the pixels are read only here) and answers with the same ``Score`` a thread-local
Detector returns. ``ProcessDetector`` has the interface ``gateway.screening`` expects of a
detector (``score_dataset``, ``bundle_id``, ``close``) and, like Detector, serves one thread.
Children ignore SIGINT/SIGTERM (the daemon drains first, then closes them) and exit when their
socket to the daemon closes, which the kernel does however the daemon ends, so none outlives it.
(Not PR_SET_PDEATHSIG: Linux sends that when the *thread* that started the child exits.)

Children run at a lower CPU priority (``[detector] nice``, default 10): where the CPUs are
shared, the receiver acknowledges first and the modality's send ends sooner, and screening works
off the durable spool behind it. On 2 cores, 300 x 512x512 were all acknowledged after 3.1-3.3 s
instead of 4.4-4.9 s and reached Orthanc no later (bench/RESULTS.md, session 4).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from detector.errors import BundleError

START_TIMEOUT_S = 120.0  # loading and verifying a bundle, first LiteRT invoke
# glibc malloc settings for the scoring children. Decoding a large image allocates a few
# 10-20 MB arrays per instance; by default glibc serves each from a fresh mmap and unmaps it
# on free, so every instance pays page faults and zeroing for ~40 MB again. Serving blocks up
# to 32 MiB (glibc's ceiling) from the heap and not trimming it keeps those pages: scoring a
# 2048x2500 instance took 16.7 ms instead of 25.7 (median of 40, one core; 512x512 unchanged
# at 5.2). An administrator's own MALLOC_* settings in the service environment win.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}


class ScoringProcessError(RuntimeError):
    """The scoring child failed an instance; ``reason`` is the machine-readable cause."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _child_main(conn: multiprocessing.connection.Connection, bundle: str | None,
                threads: int, nice: int = 0) -> None:
    """Load the bundle, say so, then score one path per request until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    import warnings

    warnings.simplefilter("ignore")  # as `sentinel serve`: hostile input must not grow memory
    from detector.scoring import Detector

    try:
        detector = Detector.load(bundle, num_threads=threads)
        detector.warm_up()
    except Exception as exc:  # BundleError names the file; anything else is as bad
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    conn.send(("ready", detector.bundle_id, float(detector.threshold)))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        source, threshold = request
        try:
            score = (detector.score_path(source, threshold=threshold) if isinstance(source, str)
                     else detector.score_dataset(source, threshold=threshold))
            conn.send(("ok", score))
        except Exception as exc:
            reason = str(getattr(exc, "reason", "") or "detector-error")
            conn.send(("error", reason, f"{type(exc).__name__}: {exc}"))


class ProcessDetector:
    """One scoring child process, started at construction (raises BundleError if it cannot
    load the bundle) and restarted after a crash or a timeout."""

    def __init__(self, bundle: Path | None, threads: int = 1, timeout_s: float = 60.0,
                 nice: int = 0) -> None:
        self._bundle = None if bundle is None else str(bundle)
        self._threads = threads
        self._nice = nice
        self.timeout_s = timeout_s
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.bundle_id = ""
        self.threshold = 0.0
        self.restarts = 0
        self._start()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        argv = [sys.executable, "-m", "gateway.detector_process", str(child_sock.fileno()),
                str(self._threads), str(self._nice)] + ([self._bundle] if self._bundle else [])
        env = {**CHILD_MALLOC_ENV, **os.environ}
        proc = subprocess.Popen(argv, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                                env=env)
        child_sock.close()
        parent = multiprocessing.connection.Connection(parent_sock.detach())
        self._proc, self._conn = proc, parent
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise BundleError(f"the scoring process did not load the model bundle in "
                                  f"{START_TIMEOUT_S:.0f} s")
            message = parent.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise BundleError(f"the scoring process died while loading the model bundle "
                              f"(exit code {proc.poll()}); run `sentinel score` on a file "
                              "to see why") from exc
        except BundleError:
            self._kill()
            raise
        if message[0] != "ready":
            self._kill()
            raise BundleError(message[2])
        _, self.bundle_id, self.threshold = message

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.kill()
                self._proc.wait(5)
        self._proc, self._conn = None, None

    def score_dataset(self, ds: Any, threshold: float | None = None) -> Any:
        """Score the file the dataset was read from (``ds.filename``) in the child; a dataset
        without one (inflated from a deflated file) travels whole, pickled."""
        path = getattr(ds, "filename", None)
        return self._score(str(path) if isinstance(path, str | os.PathLike) else ds, threshold)

    def score_path(self, path: str | os.PathLike[str], threshold: float | None = None) -> Any:
        """Score a DICOM or PNG/JPEG file in the child."""
        return self._score(str(path), threshold)

    def _score(self, source: Any, threshold: float | None) -> Any:
        try:
            self._send((source, threshold))
        except OSError:  # the child died between instances (killed from outside): one retry
            self._kill()
            self._send((source, threshold))
        assert self._conn is not None
        try:
            answered = self._conn.poll(self.timeout_s)
            message = self._conn.recv() if answered else None
        except (EOFError, OSError):
            code = None if self._proc is None else self._proc.poll()
            self._kill()
            raise ScoringProcessError(
                "detector-crashed", f"the scoring process died on this instance (exit code "
                f"{code}); a fresh one takes the next") from None
        if message is None:
            self._kill()
            raise ScoringProcessError(
                "detector-timeout", f"scoring took longer than {self.timeout_s:g} s; the "
                "scoring process was killed and a fresh one takes the next")
        if message[0] == "ok":
            return message[1]
        raise ScoringProcessError(message[1], message[2])

    def _send(self, request: tuple[Any, float | None]) -> None:
        if self._conn is None:
            self.restarts += 1
            self._start()
        assert self._conn is not None
        self._conn.send(request)

    def close(self) -> None:
        """Ask the child to finish, then make sure it has."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._kill()


def main(argv: list[str]) -> int:
    """``python -m gateway.detector_process FD THREADS NICE [BUNDLE]``: the child's entry point
    (a fresh interpreter, never a fork of the threaded daemon)."""
    conn = multiprocessing.connection.Connection(int(argv[0]))
    _child_main(conn, argv[3] if len(argv) > 3 else None, int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
