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

The wire format cannot run code, in either direction: length-prefixed JSON frames over a
socketpair, nothing pickled. Why: the child is where hostile pixel data meets C decoders; a
decoder exploit there must not become code execution in the daemon, which holds the spool, the
audit log and the network listener. ``multiprocessing.connection``'s ``send``/``recv``
pickle, and unpickling runs whatever the sender names. So the daemon reads each reply as
bounded JSON (``MAX_REPLY_BYTES``, no NaN or infinity), checks it field by field against
``Score`` (known keys, types, finite numbers, the request's id, threshold and bundle), and
treats anything else as a broken child: the instance gets ``detector-protocol-error``
(quarantined like ``detector-crashed``) and a fresh child takes the next. A dataset with no file
behind it (built in memory) travels as DICOM bytes written by pydicom, not as a pickle.

Children run at a lower CPU priority (``[detector] nice``, default 10): where the CPUs are
shared, the receiver acknowledges first and the modality's send ends sooner, and screening works
off the durable spool behind it. On 2 cores, 300 x 512x512 were all acknowledged after 3.1-3.3 s
instead of 4.4-4.9 s and reached Orthanc no later (bench/RESULTS.md, session 4). Lowering the
priority is best effort: where ``setpriority`` is denied (a systemd unit with
``SystemCallFilter=~@resources`` and ``SystemCallErrorNumber=EPERM``) the child scores at the
daemon's priority, and the daemon logs one warning naming ``[detector] nice`` and the filter.
Why not refuse to start: screening at normal priority is correct, only the ordering preference
is lost; a daemon that does not start screens nothing.

A child that cannot start raises ``BundleError`` only when the bundle itself was refused
(``Detector.load`` raised it in the child); any other cause (killed by a signal, a denied system
call, an import failure, a missing ready message) raises ``ScoringStartError`` naming it, so the
operator is not sent to restore bundle files that are fine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from detector.errors import BundleError

LOG = logging.getLogger("sentinel.detector")

START_TIMEOUT_S = 120.0  # loading and verifying a bundle, first LiteRT invoke
# The largest reply the daemon reads from a child. A Score is a few hundred bytes plus ~20 per
# frame score; 16 MiB is room for ~800,000 frames (no instance is scored that far within any
# timeout), and bounds what a subverted child can make the daemon hold.
MAX_REPLY_BYTES = 16 << 20
_HEADER = struct.Struct("!I")  # frame length, big-endian (the same prefix multiprocessing uses)
_REASON = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # audit reasons and metric labels
_TEXT_MAX = 4096  # error texts from a child are cut here before they reach a log
# glibc malloc settings for the scoring children. Decoding a large image allocates a few
# 10-20 MB arrays per instance; by default glibc serves each from a fresh mmap and unmaps it
# on free, so every instance pays page faults and zeroing for ~40 MB again. Serving blocks up
# to 32 MiB (glibc's ceiling) from the heap and not trimming it keeps those pages: scoring a
# 2048x2500 instance took 16.7 ms instead of 25.7 (median of 40, one core; 512x512 unchanged
# at 5.2). An administrator's own MALLOC_* settings in the service environment win.
CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}

_nice_warned: set[int] = set()  # nice values already warned about (once per daemon, not per child)
_nice_lock = threading.Lock()


class ScoringProcessError(RuntimeError):
    """The scoring child failed an instance; ``reason`` is the machine-readable cause."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ScoringStartError(ScoringProcessError):
    """The scoring child could not start for a reason other than a refused bundle (see the
    module docstring); the message names the cause."""

    def __init__(self, message: str) -> None:
        super().__init__("detector-unavailable", message)


class _Gone(Exception):
    """The child's end of the socket closed or reset (it exited or was killed)."""


class _Late(Exception):
    """The child did not answer within the deadline."""


class _Garbled(Exception):
    """The child sent something that is not a reply of this protocol."""


# -- framing (both sides) -----------------------------------------------------------------------

# One encoder, made once (json.dumps with options builds one per call: twice the cost). NaN and
# infinity raise ValueError: the reader refuses them, so the writer must never produce them.
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _write(sock: socket.socket, header: dict[str, Any], payload: bytes | None = None) -> None:
    """Send one JSON frame, then ``payload`` as a raw frame if given."""
    data = _encode(header).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)
    if payload is not None:
        sock.sendall(_HEADER.pack(len(payload)))
        sock.sendall(payload)


def _read_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Late
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise _Late from None
        except OSError as exc:  # ECONNRESET and friends: the peer is gone
            raise _Gone from exc
        if k == 0:
            raise _Gone
        got += k
    return buf


def _read_frame(sock: socket.socket, limit: int, deadline: float | None = None) -> bytearray:
    """One frame's bytes; a length over ``limit`` is refused before anything is read."""
    (n,) = _HEADER.unpack(_read_exact(sock, _HEADER.size, deadline))
    if n > limit:
        raise _Garbled(f"a {n}-byte frame, more than the {limit} allowed")
    return _read_exact(sock, n, deadline)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this protocol carries")


def _parse(data: bytes | bytearray) -> dict[str, Any]:
    """Strict JSON object (no NaN/Infinity), or _Garbled."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Garbled(f"not a JSON reply ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise _Garbled(f"a JSON {type(obj).__name__} where an object was expected")
    return obj


# -- validation of what a child says (parent side) --------------------------------------------

def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Garbled(f"{key} is not a number")
    try:
        value = float(value)  # a JSON integer of 400 digits overflows here
    except OverflowError:
        raise _Garbled(f"{key} is out of range") from None
    if not math.isfinite(value):  # 1e999 parses as infinity without passing parse_constant
        raise _Garbled(f"{key} is not finite")
    return value


def _integer(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Garbled(f"{key} is not an integer")
    return value


def _text(obj: dict[str, Any], key: str, limit: int = _TEXT_MAX) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Garbled(f"{key} is not a string")
    return value[:limit]


def _only(obj: dict[str, Any], keys: frozenset[str], what: str) -> None:
    if set(obj) != keys:
        extra, missing = sorted(set(obj) - keys), sorted(keys - set(obj))
        raise _Garbled(f"{what} with unknown keys {extra[:5]} / missing keys {missing[:5]}")


_READY_KEYS = frozenset({"kind", "bundle_id", "threshold", "nice_error"})
_SCORE_REPLY_KEYS = frozenset({"kind", "id", "score"})
_ERROR_REPLY_KEYS = frozenset({"kind", "id", "reason", "message"})
_START_FAILED_KEYS = frozenset({"kind", "type", "message"})
_SCORE_KEYS = frozenset({"score", "p_cnn", "p_rf", "threshold", "flagged", "frames",
                         "worst_frame", "bundle_id", "timings_ms", "frame_scores", "grid_peaks",
                         "line_peak", "line_gate", "cnn_peak", "cnn_gate", "line_ramp"})
_STAGE = re.compile(r"[a-z_]{1,32}")  # timings_ms keys (decode, features, cnn, forest, total)


def _score_from(obj: Any, bundle_id: str, threshold: float,
                line_gate: float | None = None) -> Any:
    """Rebuild a Score from the child's plain-JSON form, checking every field (``Score.as_dict``
    is the form), or raise _Garbled."""
    from detector.scoring import Score

    if not isinstance(obj, dict):
        raise _Garbled("score is not an object")
    _only(obj, _SCORE_KEYS, "score")
    value, p_cnn, p_rf, thr = (_number(obj, k) for k in ("score", "p_cnn", "p_rf", "threshold"))
    frames, worst = _integer(obj, "frames"), _integer(obj, "worst_frame")
    flagged = obj["flagged"]
    timings, per_frame, grid = obj["timings_ms"], obj["frame_scores"], obj["grid_peaks"]
    if not isinstance(flagged, bool):
        raise _Garbled("flagged is not a boolean")
    if frames < 1 or not 0 <= worst < frames:
        raise _Garbled(f"worst_frame {worst} of {frames} frames")
    if not isinstance(timings, dict) or len(timings) > 16 or not all(
            isinstance(k, str) and _STAGE.fullmatch(k) for k in timings):
        raise _Garbled("timings_ms is not an object of stage names")
    if not isinstance(per_frame, list) or len(per_frame) != frames:
        raise _Garbled("frame_scores is not one number per frame")
    frame_scores = tuple(_number({"frame_scores": v}, "frame_scores") for v in per_frame)
    if grid is not None:
        grid = _number(obj, "grid_peaks")
    line = None if obj.get("line_peak") is None else _number(obj, "line_peak")
    gate = None if obj.get("line_gate") is None else _number(obj, "line_gate")
    if gate != line_gate or (gate is None) != (line is None):
        raise _Garbled(f"a line gate of {gate}, asked for {line_gate}")
    by_line = line is not None and gate is not None and line >= gate
    cnn_peak = _number(obj, "cnn_peak")
    if obj["cnn_gate"] is not None:  # applied by the parent (apply_cnn_gate), never the child
        raise _Garbled("a CNN gate in the scoring process's reply")
    if obj["line_ramp"] is not None:  # applied by the parent (apply_line_ramp), likewise
        raise _Garbled("a line ramp in the scoring process's reply")
    if not p_cnn <= cnn_peak <= 1.0:
        raise _Garbled(f"a CNN peak of {cnn_peak} beside the worst frame's {p_cnn}")
    # consistent with the request and with itself: catches a reply to another request too
    if obj["bundle_id"] != bundle_id:
        raise _Garbled("a score from another bundle than the one this process loaded")
    if thr != threshold:
        raise _Garbled(f"a score at threshold {thr}, asked at {threshold}")
    if flagged != (value >= thr or by_line) or frame_scores[worst] != value:
        raise _Garbled("a score whose verdict or worst frame does not match its numbers")
    return Score(score=value, p_cnn=p_cnn, p_rf=p_rf, threshold=thr, flagged=flagged,
                 frames=frames, worst_frame=worst, bundle_id=bundle_id,
                 timings_ms={k: _number(timings, k) for k in timings},
                 frame_scores=frame_scores, grid_peaks=grid, line_peak=line, line_gate=gate,
                 cnn_peak=cnn_peak)


def _warn_nice_once(nice: int, error: str) -> None:
    with _nice_lock:
        if nice in _nice_warned:
            return
        _nice_warned.add(nice)
    LOG.warning(
        "[detector] nice = %d: the scoring process could not lower its CPU priority (%s) and "
        "scores at the daemon's priority, so receiving no longer comes first where the CPUs "
        "are shared. Under systemd this is the unit's SystemCallFilter= denying setpriority "
        "(~@resources): allow it with SystemCallFilter=setpriority, or set [detector] nice = 0 "
        "to silence this warning", nice, error)


def _describe_exit(code: int | None) -> str:
    """How a child ended, in words an operator can act on."""
    if code is None:
        return "closed its socket"
    if code >= 0:
        return f"exited with code {code} (its error, if any, is in the service log just above)"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {
        "SIGSYS": "a seccomp filter (a systemd unit's SystemCallFilter=) refused one of its "
                  "system calls; the kernel's audit log (journalctl -k) names it",
        "SIGKILL": "killed from outside, often the out-of-memory killer (journalctl -k)",
        "SIGSEGV": "a crash in native code",
    }.get(name)
    return f"was killed by {name}" + (f": {hint}" if hint else "")


class ProcessDetector:
    """One scoring child process, started at construction (raises BundleError if the bundle is
    refused, ScoringStartError if the child cannot start for another reason) and restarted
    after a crash, a timeout or a reply it cannot read."""

    def __init__(self, bundle: Path | None, threads: int = 1, timeout_s: float = 60.0,
                 nice: int = 0, python: str | os.PathLike[str] | None = None) -> None:
        # ``python``: the interpreter for the child; inside Orthanc (gateway.orthanc_plugin)
        # sys.executable is Orthanc itself, so the plugin names the virtual environment's
        self._python = sys.executable if python is None else os.fspath(python)
        self._bundle = None if bundle is None else str(bundle)
        self._threads = threads
        self._nice = nice
        self.timeout_s = timeout_s
        self._proc: Any = None
        self._sock: socket.socket | None = None
        self._next_id = 0
        self.bundle_id = ""
        self.threshold = 0.0
        self.nice_error = ""  # why the child could not lower its priority ("" when it could)
        self.restarts = 0
        self._start()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        argv = [self._python, "-m", "gateway.detector_process", str(child_sock.fileno()),
                str(self._threads), str(self._nice)] + ([self._bundle] if self._bundle else [])
        env = {**CHILD_MALLOC_ENV, **os.environ}
        try:
            proc = subprocess.Popen(argv, pass_fds=(child_sock.fileno(),),
                                    stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            parent_sock.close()
            raise ScoringStartError(f"the scoring process could not start: "
                                    f"{type(exc).__name__}: {exc}") from exc
        finally:
            child_sock.close()
        self._proc, self._sock = proc, parent_sock
        try:
            message = _parse(_read_frame(parent_sock, MAX_REPLY_BYTES,
                                         time.monotonic() + START_TIMEOUT_S))
            kind = message.get("kind")
            if kind == "start-failed":
                _only(message, _START_FAILED_KEYS, "start-failed")
                failed, text = _text(message, "type", 200), _text(message, "message")
            elif kind == "ready":
                _only(message, _READY_KEYS, "ready")
                bundle_id, threshold = _text(message, "bundle_id", 256), _number(message,
                                                                                 "threshold")
                nice_error = _text(message, "nice_error")
            else:
                raise _Garbled(f"a {str(kind)[:40]!r} message where ready was expected")
        except _Gone:
            code = self._kill(wait_first=True)
            raise ScoringStartError(f"the scoring process could not start: it "
                                    f"{_describe_exit(code)}") from None
        except _Late:
            self._kill()
            raise ScoringStartError(f"the scoring process could not start: not ready after "
                                    f"{START_TIMEOUT_S:.0f} s") from None
        except _Garbled as exc:
            self._kill()
            raise ScoringStartError(f"the scoring process could not start: it sent {exc}"
                                    ) from None
        if kind == "start-failed":
            self._kill()
            if failed == "BundleError":  # Detector.load refused the bundle: it names the file
                raise BundleError(text)
            raise ScoringStartError(f"the scoring process could not start: {failed}: {text}")
        self.bundle_id, self.threshold, self.nice_error = bundle_id, threshold, nice_error
        if nice_error:
            _warn_nice_once(self._nice, nice_error)

    def _kill(self, wait_first: bool = False) -> int | None:
        """End the child and reap it; its exit status (negative: the signal), if known.
        ``wait_first``: it is exiting on its own, give it a moment so its own status is seen."""
        if self._sock is not None:
            self._sock.close()
        code = None
        if self._proc is not None:
            with contextlib.suppress(Exception):
                if wait_first:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(2)
                if self._proc.poll() is None:
                    self._proc.kill()
                self._proc.wait(5)
            code = self._proc.returncode
        self._proc, self._sock = None, None
        return code

    def score_dataset(self, ds: Any, threshold: float | None = None,
                      line_gate: float | None = None) -> Any:
        """Score the file the dataset was read from (``ds.filename``) in the child; a dataset
        with no file behind it travels as DICOM bytes."""
        path = getattr(ds, "filename", None)
        if isinstance(path, str | os.PathLike):
            return self._score({"path": os.fspath(path)}, None, threshold, line_gate)
        import pydicom

        buf = io.BytesIO()
        try:
            pydicom.dcmwrite(buf, ds)
        except Exception as exc:
            raise ScoringProcessError("unreadable", f"the dataset could not be written for the "
                                      f"scoring process: {type(exc).__name__}: {exc}") from exc
        return self._score({"path": None}, buf.getvalue(), threshold, line_gate)

    def score_path(self, path: str | os.PathLike[str], threshold: float | None = None,
                   line_gate: float | None = None) -> Any:
        """Score a DICOM or PNG/JPEG file in the child."""
        return self._score({"path": os.fspath(path)}, None, threshold, line_gate)

    def _score(self, request: dict[str, Any], payload: bytes | None,
               threshold: float | None, line_gate: float | None = None) -> Any:
        self._next_id += 1
        rid = self._next_id
        thr = None if threshold is None else float(threshold)
        gate = None if line_gate is None else float(line_gate)
        header = {"kind": "score", "id": rid, "threshold": thr, "line_gate": gate, **request,
                  "dicom_bytes": payload is not None}
        deadline = time.monotonic() + self.timeout_s
        try:
            self._send(header, payload, deadline)
        except _Gone:  # the child died between instances (killed from outside): one retry
            self._kill()
            try:
                self._send(header, payload, deadline)
            except _Gone:
                return self._crashed()
            except _Late:
                return self._timed_out()
        except _Late:
            return self._timed_out()
        assert self._sock is not None
        try:
            reply = _parse(_read_frame(self._sock, MAX_REPLY_BYTES, deadline))
            if reply.get("id") != rid:
                raise _Garbled(f"a reply to request {str(reply.get('id'))[:20]}, not {rid}")
            if reply.get("kind") == "score":
                _only(reply, _SCORE_REPLY_KEYS, "score reply")
                return _score_from(reply["score"], self.bundle_id,
                                   self.threshold if thr is None else thr, gate)
            if reply.get("kind") == "error":
                _only(reply, _ERROR_REPLY_KEYS, "error reply")
                reason = _text(reply, "reason", 64)
                if not _REASON.fullmatch(reason):
                    raise _Garbled("an error reason that is not a plain word")
                raise ScoringProcessError(reason, _text(reply, "message"))
            raise _Garbled(f"a {str(reply.get('kind'))[:40]!r} message")
        except _Gone:
            return self._crashed()
        except _Late:
            return self._timed_out()
        except _Garbled as exc:
            self._kill()
            raise ScoringProcessError(
                "detector-protocol-error", f"the scoring process sent {exc}; it was killed and a "
                "fresh one takes the next") from None

    def _crashed(self) -> Any:
        code = self._kill(wait_first=True)
        raise ScoringProcessError(
            "detector-crashed", f"the scoring process died on this instance (it "
            f"{_describe_exit(code)}); a fresh one takes the next")

    def _timed_out(self) -> Any:
        self._kill()
        raise ScoringProcessError(
            "detector-timeout", f"scoring took longer than {self.timeout_s:g} s; the "
            "scoring process was killed and a fresh one takes the next")

    def _send(self, header: dict[str, Any], payload: bytes | None, deadline: float) -> None:
        if self._sock is None:
            self.restarts += 1
            self._start()
        assert self._sock is not None
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            _write(self._sock, header, payload)
        except TimeoutError:
            raise _Late from None
        except OSError as exc:  # EPIPE, ECONNRESET
            raise _Gone from exc

    def close(self) -> None:
        """Ask the child to finish, then make sure it has."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.settimeout(5)
                _write(self._sock, {"kind": "close"})
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._kill()


# -- the child ----------------------------------------------------------------------------------

def _renice(nice: int) -> str:
    """Lower this process's priority by ``nice``; why not, if it could not ("" if it did)."""
    if not nice:
        return ""
    try:
        os.nice(nice)
    except OSError as exc:  # EPERM where setpriority is filtered (systemd SystemCallFilter=)
        return f"{type(exc).__name__}: {exc}"
    return ""


def _child_main(sock: socket.socket, bundle: str | None, threads: int, nice: int = 0) -> None:
    """Load the bundle, say so, then score one request at a time until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    nice_error = _renice(nice)
    import warnings

    warnings.simplefilter("ignore")  # as `sentinel serve`: hostile input must not grow memory
    try:
        from detector.preprocess import skip_value_checks
        from detector.scoring import Detector

        skip_value_checks()  # they only warn, and the warnings are dropped above

        detector = Detector.load(bundle, num_threads=threads)
        detector.warm_up()
    except Exception as exc:  # BundleError names the file; the parent tells it from the rest
        _write(sock, {"kind": "start-failed", "type": type(exc).__name__,
                      "message": str(exc)[:_TEXT_MAX]})
        return
    _write(sock, {"kind": "ready", "bundle_id": detector.bundle_id,
                  "threshold": float(detector.threshold), "nice_error": nice_error})
    while True:
        try:
            request = json.loads(_read_frame(sock, 1 << 30))  # the daemon, trusted
            if request.get("kind") != "score":
                return
            data = _read_frame(sock, 1 << 62) if request["dicom_bytes"] else None
        except (_Gone, _Garbled, ValueError):
            return
        rid, threshold, gate = request["id"], request["threshold"], request.get("line_gate")
        try:
            if data is not None:
                import pydicom

                score = detector.score_dataset(pydicom.dcmread(io.BytesIO(data)),
                                               threshold=threshold, line_gate=gate)
            else:
                score = detector.score_path(request["path"], threshold=threshold,
                                            line_gate=gate)
            # a NaN or infinite number raises here: an error reply, never a verdict
            reply = _encode({"kind": "score", "id": rid, "score": score.as_dict()}).encode()
        except Exception as exc:
            reply = _encode(_error_reply(rid, exc)).encode()
        try:
            sock.sendall(_HEADER.pack(len(reply)) + reply)
        except OSError:  # the daemon is gone or killed us mid-answer
            return


def _error_reply(rid: int, exc: BaseException) -> dict[str, Any]:
    reason = str(getattr(exc, "reason", "") or "detector-error")
    if not _REASON.fullmatch(reason):
        reason = "detector-error"
    return {"kind": "error", "id": rid, "reason": reason,
            "message": f"{type(exc).__name__}: {exc}"[:_TEXT_MAX]}


def main(argv: list[str]) -> int:
    """``python -m gateway.detector_process FD THREADS NICE [BUNDLE]``: the child's entry point
    (a fresh interpreter, never a fork of the threaded daemon)."""
    sock = socket.socket(fileno=int(argv[0]))
    _child_main(sock, argv[3] if len(argv) > 3 else None, int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
