"""The picture behind ``sentinel quarantine show --png``: the image beside where its
high-frequency residual is strongest.

Why this map: the attacks the detector looks for add small pixel-level noise at the detector's
input scale (224x224, then upsampled into the stored matrix). Natural radiographs are smooth at
that scale except at edges, so the absolute 3x3 high-pass residual, averaged over a neighbourhood,
shows a reviewer where an image carries texture that anatomy does not explain (a uniform glow
over the lungs rather than bright edges only). It is a reading aid, not the detector's verdict.

Drawn with Pillow (a runtime dependency) so the daemon's install can render it; no matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import uniform_filter

DETECTOR_SIZE = 224  # the scale the detector (and the attacks) work at
HEADER_PX = 22
GAP_PX = 8
# The map's fixed log scale, in unit intensity (1/1000 to 3/100 of full scale): a smooth clean
# radiograph sits near the bottom; an L-inf perturbation of 0.003-0.006 lifts smooth areas into
# the middle; bone edges reach the top.
LOW, HIGH = 1e-3, 3e-2

# A perceptually ordered dark-to-bright palette (close to matplotlib's "inferno").
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def load_first_frame(path: Path) -> np.ndarray:
    """The instance's first frame as float32 (rows, cols) in [0, 1], decoded by the detector's
    own path (bit depth, rescale sign and MONOCHROME1 honoured; raises PreprocessError)."""
    from detector.preprocess import load_unit

    return np.asarray(load_unit(Path(path))[0], dtype=np.float32)


def _resize(img: np.ndarray, width: int, height: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize((width, height), resample),
        dtype=np.float32,
    )


def residual_strength(unit: np.ndarray, size: int = DETECTOR_SIZE, window: int = 9) -> np.ndarray:
    """Local mean of |3x3 high-pass residual| at the detector's scale, (size, size) in [0, 1].

    The image is area-averaged to ``size`` (as the detector sees it), the 3x3 box mean is
    subtracted, and the absolute residual is averaged over ``window`` pixels. It is shown on a
    fixed log scale (``LOW``..``HIGH`` in unit intensity, not scaled per image), so maps of
    different images compare and a faint uniform perturbation over smooth anatomy shows up.
    """
    from detector.preprocess import resize_frame  # exact area averaging, as the detector does

    small = resize_frame(unit, size).astype(np.float64)
    residual = np.abs(small - uniform_filter(small, size=3, mode="reflect"))
    strength = uniform_filter(residual, size=window, mode="reflect")
    scaled = (np.log10(np.maximum(strength, LOW)) - np.log10(LOW)) / np.log10(HIGH / LOW)
    return np.clip(scaled, 0.0, 1.0)


def _colourise(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to RGB uint8 through the palette."""
    rgb = np.stack([np.interp(values, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def panel_size(rows: int, cols: int, height: int) -> tuple[int, int]:
    """(width, height) of the PNG ``render`` writes for a ``rows`` x ``cols`` image."""
    width = max(1, round(cols * height / rows))
    return 2 * width + GAP_PX, height + HEADER_PX


def panels(unit: np.ndarray, height: int, display: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The two RGB panels of ``render`` at ``height`` (aspect kept): the image, and the heat
    map over it. ``display`` (same shape as ``unit``, in [0, 1]) is what the left panel and the
    heat map's background show, e.g. a windowed copy (the review console); the heat map itself
    is always computed from ``unit``, on its fixed scale."""
    rows, cols = unit.shape
    width = (panel_size(rows, cols, height)[0] - GAP_PX) // 2
    shown = unit if display is None else display
    grey = np.clip(_resize(shown, width, height, Image.Resampling.BOX), 0.0, 1.0)
    heat = np.clip(
        _resize(residual_strength(unit), width, height, Image.Resampling.BILINEAR), 0.0, 1.0
    )
    grey_rgb = np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    overlay = (0.3 * grey_rgb + 0.7 * _colourise(heat)).round().astype(np.uint8)
    return grey_rgb, overlay


def render(unit: np.ndarray, out: Path, *, height: int = 512, caption: str = "") -> tuple[int, int]:
    """Write a PNG: the image (left) and the residual-strength heat map over it (right).

    ``unit`` is one frame in [0, 1] at its native matrix; both panels keep its aspect ratio at
    ``height`` pixels. Returns the PNG's (width, height).
    """
    rows, cols = unit.shape
    total_w, total_h = panel_size(rows, cols, height)
    width = (total_w - GAP_PX) // 2
    grey_rgb, overlay = panels(unit, height)

    canvas = Image.new("RGB", (total_w, total_h), (0, 0, 0))
    canvas.paste(Image.fromarray(grey_rgb, "RGB"), (0, HEADER_PX))
    canvas.paste(Image.fromarray(overlay, "RGB"), (width + GAP_PX, HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 5), caption or "image", fill=(230, 230, 230))
    draw.text(
        (width + GAP_PX + 4, 5), "high-frequency residual (bright = strong)", fill=(230, 230, 230)
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return total_w, total_h


def render_instance(
    path: Path, out: Path, *, height: int = 512, caption: str = ""
) -> tuple[int, int]:
    """Decode a DICOM (or image) file's first frame and ``render`` it to ``out``."""
    return render(load_first_frame(path), out, height=height, caption=caption)
