"""The resampling-line gate: a perturbation made through a victim's resize leaves a line.

Why it exists (issue 15): an attacker perturbs the stored image at its native matrix through
the target network's own resize to its input size N. The gradient pushed back through that
resize, and the ±1-2 grey-level pattern the attack rounds to, repeat with the resize's period
(native / N pixels): 512 -> 224 gives a line at 7/16 cycles per pixel, 512 -> 256 at 1/2,
512 -> 320 at 3/8 and 1/4. The CNN and the forest read the image at 224 and miss many of these
(README, "Victim zoo"); modality processing (CLAHE, unsharp masking, multi-scale contrast, LUTs,
denoising) raises noise statistics but makes no line. So this scores the line itself:

1. per column, the mean over rows of min(|horizontal neighbour difference|, 3 grey levels of 8
   bits), and per row the same vertically: two profiles across the image;
2. the power spectrum of each, divided by a running median over 17 bins (the spectrum is red);
3. the geometric mean of the two axes' log ratios (a resize acts on both);
4. the score: the largest log ratio at frequencies of 1/32 cycles per pixel or more. JPEG's
   8x8 blocks make lines at k/8: those bins are left out when the image carries a JPEG
   quantisation lattice (``jpeg_lattice``).

Measured on 100 NIH 512x512 images (never used in training) and the cached attacks of the
eight zoo families (train.zoo_lofo): AUC of fooled attacked images against clean and each of 14
processing settings at least 0.995 at eps 0.003 and 1.000 at eps 0.006, with no attack seen in
fitting; at 2.07 (2% of 1,600 clean and processed NIH images) 99.8% of them are caught at eps
0.003 and 100% at 0.006, and 800 further clean NIH images give 1.1%.

**Why it is off by default.** The same line is what any resampling leaves: clean images a
modality or PACS resized (bilinear, area or bicubic to another matrix, a display round trip)
score like attacks (up to 100% of them), and a stationary anti-scatter grid can make one too.
The bundle cannot know whether a site's images were resampled; the site can. ``sentinel
calibrate`` scores the site's own clean images and proposes ``[detector] line_gate`` only where
they carry no line (their maximum under ``CEILING``); it is never proposed below ``FLOOR``.
An attacker who knows the gate can randomise the resize phase or smooth the perturbation: this
catches attacks made for a network, not attacks made against this gate.
"""

from __future__ import annotations

import numpy as np

WINDOW = 17  # running-median bins of the background
LOW_CYCLES = 1.0 / 32  # below: anatomy, CLAHE tiles, windowing trends
TRUNCATE = 3.0  # grey levels of 8 bits: the attack moves pixels by 1-2
MIN_SIDE = 64  # a smaller image has too few bins for a line
MAX_SIDE = 1024  # a central square this large holds the line; a 2048x2500 CR costs 30 ms whole
FLOOR = 2.07  # 2% of 1,600 clean and processed NIH images score above it
CEILING = 2.71  # the highest of them; a site whose clean images exceed it carries lines
JPEG_LATTICE = 0.3  # jpeg_lattice above this: JPEG-compressed once (non-JPEG <= 0.12)

_DCT = np.array([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * i + 1) * u * np.pi / 16)
                  for i in range(8)] for u in range(8)], np.float32)
_STEPS = np.arange(2, 13, dtype=np.float32)[:, None]


def jpeg_lattice(img8: np.ndarray) -> float:
    """Evidence that an 8-bit-scaled image went through JPEG: how well four mid-frequency 8x8
    DCT coefficients sit on multiples of one quantisation step (2-12), averaged. Measured:
    never-compressed images at most 0.12, JPEG quality 95 at least 0.6, quality 85 0.87."""
    r, c = (img8.shape[0] // 8) * 8, (img8.shape[1] // 8) * 8
    if r < 64 or c < 64:
        return 0.0
    b = img8[:r, :c].astype(np.float32).reshape(r // 8, 8, c // 8, 8).transpose(0, 2, 1, 3)
    co = np.einsum("ui,abij,vj->uvab", _DCT[:5], b, _DCT[:5], optimize=True)
    best = []
    for u, v in ((2, 2), (0, 3), (4, 1), (2, 3)):
        vals = co[u, v].ravel()
        near = np.abs(vals)[None, :] >= 0.5 * _STEPS
        fit = np.cos((2 * np.pi / _STEPS) * vals[None, :])
        n = near.sum(1)
        s = np.where(n >= 30, (fit * near).sum(1) / np.maximum(n, 1), 0.0)
        best.append(float(s.max()))
    return float(np.mean(best))


def _log_ratio(profile: np.ndarray, n: int) -> np.ndarray:
    p = profile.astype(np.float64)
    if len(p) < n:  # n - 1 differences: pad with the mean, so bin k is exactly k / n
        p = np.concatenate([p, np.full(n - len(p), p.mean())])
    power = np.abs(np.fft.rfft(p - p.mean())) ** 2
    h = WINDOW // 2
    padded = np.concatenate([power[h:0:-1], power, power[-2:-h - 2:-1]])  # reflect
    background = np.median(np.lib.stride_tricks.sliding_window_view(padded, WINDOW), axis=1)
    return np.log(power / (background + 1e-12 * (power.mean() + 1e-30)) + 1e-12)


def line_peak(frame: np.ndarray, max_value: float) -> float:
    """The resampling-line score of one frame (stored values, 0..``max_value``).

    The central square, at most MAX_SIDE, is scored (a resize acts on both axes alike, and on
    every part of the image). Values are put on the 8-bit scale, so the truncation means the
    same at any bit depth."""
    rows, cols = frame.shape
    n = min(rows, cols, MAX_SIDE)
    if n < MIN_SIDE:
        return 0.0
    top, left = (rows - n) // 2, (cols - n) // 2
    x = frame[top:top + n, left:left + n].astype(np.float32) * np.float32(255.0 / max_value)
    along = np.minimum(np.abs(np.diff(x, axis=1)), TRUNCATE).mean(0)
    down = np.minimum(np.abs(np.diff(x, axis=0)), TRUNCATE).mean(1)
    both = 0.5 * (_log_ratio(along, n) + _log_ratio(down, n))
    f = np.fft.rfftfreq(n)
    band = f >= LOW_CYCLES - 1e-12
    full = float(both[band].max())
    jpeg_bins = np.zeros(len(f), bool)
    for k in range(5):
        jpeg_bins |= np.abs(f - k / 8) <= 1.5 / n
    generic = band & ~jpeg_bins
    rest = float(both[generic].max()) if generic.any() else full
    if full == rest:  # the peak is off the JPEG harmonics: no need to ask
        return full
    return rest if jpeg_lattice(np.rint(x)) > JPEG_LATTICE else full
