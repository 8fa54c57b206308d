"""Two references for detector.preprocess.resize_frame (the exact area resize).

* ``area_reference``: slow and obviously correct. For each output bin it lists the input
  pixels it overlaps, with the overlap computed from exact fractions (no float edge can be
  off by one ulp), and averages them with those weights: rows first, then columns, one Python
  iteration per bin. About 50 ms for a 3000x3000 frame.
* ``resize_frame_v1``: the implementation used until December 2026 (reduceat along the
  contiguous axis first), verbatim, kept to show that the faster one gives the same numbers
  and to time the two side by side (bench/resize.py). It has one known fault: where
  ``224 * (n / 224)`` rounds above ``n`` in float64 (n = 225, 450, 900, 2010, 3600, 4020, ...:
  142 of the sizes 225-4096) the last output row or column loses almost a whole input pixel.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _bin_weights(n: int, out: int) -> list[tuple[int, np.ndarray]]:
    """For each output bin j: (first input pixel, weights of the pixels it overlaps).

    Bin j covers [j * n / out, (j + 1) * n / out) exactly; pixel p covers [p, p + 1); its
    weight is the overlap length divided by the bin length n / out, so the weights sum to 1.
    """
    bins = []
    for j in range(out):
        lo, hi = Fraction(j * n, out), Fraction((j + 1) * n, out)
        first, last = int(lo), min(n - 1, math.ceil(hi) - 1)
        w = [(min(hi, p + 1) - max(lo, p)) * Fraction(out, n) for p in range(first, last + 1)]
        bins.append((first, np.array([float(x) for x in w])))
    return bins


def area_reference(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """(rows, cols) to float64 (size, size): each output pixel the exact mean of its area."""
    a = np.asarray(frame, dtype=np.float64)
    rows = np.stack([w @ a[p : p + len(w)] for p, w in _bin_weights(a.shape[0], size)])
    return np.stack([rows[:, p : p + len(w)] @ w for p, w in _bin_weights(a.shape[1], size)], 1)


# ------------------------------------------------------------- the implementation until v2


def _area_axis_v1(a: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Exact area average of ``a`` along ``axis`` to ``out`` samples (float64).

    Output bin j covers input interval [e_j, e_j+1) with e_j = j * n / out. Downsampling
    sums whole pixels with one ``np.add.reduceat`` pass over the data, then moves the share
    of each boundary pixel that lies in the next bin across (two small gathers). Upsampling
    (n < out) interpolates the cumulative sum instead, which handles bins inside one pixel.
    """
    n = a.shape[axis]
    if n == out:
        return a.astype(np.float64, copy=False)
    if n % out == 0:
        k = n // out
        shape = list(a.shape)
        shape[axis : axis + 1] = [out, k]
        if _exact_sums_v1(a, k + 1):
            return a.reshape(shape).sum(axis=axis + 1).astype(np.float64) * (1.0 / k)
        return a.reshape(shape).mean(axis=axis + 1, dtype=np.float64)
    edges = np.arange(out + 1, dtype=np.float64) * (n / out)
    floor = np.floor(edges).astype(np.intp)
    bshape = [1] * a.ndim
    bshape[axis] = out + 1
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(0, out), slice(1, out + 1)
    if n > out:
        ceil = np.ceil(edges).astype(np.intp)  # strictly increasing when n / out > 1
        if _exact_sums_v1(a, int(ceil[1] - ceil[0]) + 2):
            # float32 sums of small integers are exact: no casting loop inside reduceat
            sums = np.add.reduceat(a, ceil[:-1], axis=axis).astype(np.float64)
        else:
            sums = np.add.reduceat(a, ceil[:-1], axis=axis, dtype=np.float64)
        # share of pixel floor_j that belongs to bin j (0 when e_j is an integer)
        share = np.where(ceil != floor, ceil - edges, 0.0)
        at = np.take(a, np.minimum(floor, n - 1), axis=axis).astype(np.float64)
        moved = share.reshape(bshape) * at
        sums += moved[tuple(lo)]
        sums -= moved[tuple(hi)]
        sums *= out / n
        return sums
    # Upsampling: C(e) = C[i] + frac * a[i] on the cumulative sum with a leading zero.
    csum = np.cumsum(a, axis=axis, dtype=np.float64)
    zero_shape = list(a.shape)
    zero_shape[axis] = 1
    csum = np.concatenate([np.zeros(zero_shape), csum], axis=axis)
    idx = np.minimum(floor, n - 1)
    frac = edges - idx
    c_at = np.take(csum, idx, axis=axis)
    c_at += frac.reshape(bshape) * np.take(a, idx, axis=axis).astype(np.float64)
    diff = c_at[tuple(hi)] - c_at[tuple(lo)]
    diff *= out / n
    return diff


def _exact_sums_v1(a: np.ndarray, terms: int) -> bool:
    """True when ``a`` is float32 holding integers of at most 16 bits (see resize_frame) and
    sums of ``terms`` of them stay below 2^24, so float32 addition is exact."""
    return a.dtype == np.float32 and a.flags.c_contiguous and terms * 65536 < (1 << 24)


def resize_frame_v1(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """One 2-D image to (size, size) float64 by exact area averaging (contiguous axis first).

    Integer frames of up to 16 bits (stored pixel values) are summed as float32, which is
    exact for them and avoids numpy's slow casting inside ``reduceat``; the fractional
    boundary shares and everything after the first pass are float64.
    """
    if frame.ndim != 2:
        raise ValueError(f"resize_frame expects a 2-D image, got shape {frame.shape}")
    if frame.dtype.kind in "iu" and frame.dtype.itemsize <= 2:
        first = _area_axis_v1(frame.astype(np.float32), size, axis=1)
    else:
        first = _area_axis_v1(np.asarray(frame, dtype=np.float64), size, axis=1)
    return _area_axis_v1(first, size, axis=0)
