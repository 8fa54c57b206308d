"""The detail page's pictures: the held image windowed for display, and its residual heat map.

Rendered on the server (Pillow, a runtime dependency) through gateway.residual_map, the code
behind ``sentinel quarantine show --png``, so the console and the CLI show the same map. PHI:
these bytes are the only PHI the console serves; the routes audit every response.

Why in a child process: a held instance is suspect by definition (it may be held *because* it
is malformed), and a decoder that crashes or hangs on it must cost that picture, not the console
and every reviewer's session. As in the gateway's screening, the decode runs in a separate
process (one, reused); a crash or a timeout replaces it.
"""

from __future__ import annotations

import io
import multiprocessing
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HEIGHT = 768  # pixels of each picture
CACHE = 16  # rendered instances kept (decoding a 10 MB CR costs about a second)
TIMEOUT_S = 60.0
WINDOW_PERCENTILES = (0.5, 99.5)


def window(unit: np.ndarray) -> np.ndarray:
    """A display window from the image's own intensity range (the central 99%), so a
    radiograph stored in a narrow part of its bit depth is not shown as a grey plate."""
    lo, hi = np.percentile(unit, WINDOW_PERCENTILES)
    if hi <= lo:
        return np.clip(unit, 0.0, 1.0)
    return np.clip((unit - lo) / (hi - lo), 0.0, 1.0)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def render_pictures(path: str, height: int) -> tuple[bytes, bytes]:
    """(image PNG, heat-map PNG) of a file's first frame; runs in the child process."""
    from gateway.residual_map import load_first_frame, panels

    unit = load_first_frame(Path(path))
    grey, heat = panels(unit, height, display=window(unit))
    return _png(grey), _png(heat)


class Renderer:
    """Pictures per held file, rendered in a child process and cached by path and mtime."""

    def __init__(self, height: int = HEIGHT, timeout_s: float = TIMEOUT_S) -> None:
        self.height = height
        self.timeout_s = timeout_s
        self._cache: OrderedDict[tuple[str, int], tuple[bytes, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # forkserver: never fork the threaded server itself
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
            return self._pool

    def _reset(self) -> None:
        """Kill the child (hung or dead) and start afresh on the next call."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the child; ValueError when it crashed or ran past the timeout."""
        future = self._executor().submit(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except BrokenProcessPool as exc:
            self._reset()
            raise ValueError("the decoder crashed on this instance") from exc
        except FutureTimeout as exc:
            self._reset()
            raise ValueError(f"decoding took longer than {self.timeout_s:g} s") from exc

    def pictures(self, path: Path) -> tuple[bytes, bytes]:
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        result: tuple[bytes, bytes] = self.run(render_pictures, str(path), self.height)
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return result

    def close(self) -> None:
        self._reset()
