"""The detail page's pictures: the held image windowed for display, and its residual heat map.

Rendered on the server (Pillow, a runtime dependency) through gateway.residual_map, the code
behind ``sentinel quarantine show --png``, so the console and the CLI show the same map. PHI:
these bytes are the only PHI the console serves; the routes audit every response.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from gateway.residual_map import load_first_frame, panels

HEIGHT = 768  # pixels of each picture
CACHE = 16  # rendered instances kept (decoding a 10 MB CR costs about a second)
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


class Renderer:
    """(image PNG, heat-map PNG) per held file, cached by path and modification time."""

    def __init__(self, height: int = HEIGHT) -> None:
        self.height = height
        self._cache: OrderedDict[tuple[str, int], tuple[bytes, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def pictures(self, path: Path) -> tuple[bytes, bytes]:
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        unit = load_first_frame(path)
        grey, heat = panels(unit, self.height, display=window(unit))
        result = (_png(grey), _png(heat))
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return result
