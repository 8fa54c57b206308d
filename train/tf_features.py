"""Differentiable TensorFlow twins of ``detector.features`` (same names, same order, same values).

Why: an attacker who knows the detector can push the forest's inputs back to their clean values
while fooling the victim (statistics-preserving PGD) or descend a differentiable surrogate of the
forest. Both need the feature vector as a function TensorFlow can differentiate. The forward
values equal the numpy runtime's to about 1e-4 relative (tests/test_tf_features.py), so a
penalty computed here is a penalty on what the runtime actually sees.

``near_zero_diff_frac`` is a count (|neighbour difference| below half a grey level) and has no
useful gradient. It is computed exactly in the forward pass, with the gradient of a smooth
stand-in (a logistic step of width ``soft_width``) passed through (straight-through estimator),
so the attack still learns which pixels break flat regions.

Everything is batched: ``features_tf(x)`` takes (n, H, W) float32 in [0, 1], returns (n, 11).
"""

from __future__ import annotations

import math
from typing import Any

from detector.features import FEATURE_NAMES, spectrum_weights

_NEAR_ZERO = 0.5 / 255.0
_SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
_TINY = 1e-20

EXPECTED_NAMES: tuple[str, ...] = (
    "skewness", "kurtosis", "spectral_entropy", "laplacian_var", "intensity_std", "noise_sigma",
    "residual_kurtosis", "residual_std_ratio", "near_zero_diff_frac", "diff_lag1_corr",
    "hf_power_share",
)


def check_names() -> None:
    """Refuse to run when detector.features changed its vector under us (order or members)."""
    if tuple(FEATURE_NAMES) != EXPECTED_NAMES:
        raise RuntimeError(
            f"detector.features.FEATURE_NAMES is now {FEATURE_NAMES}; train/tf_features.py "
            f"implements {EXPECTED_NAMES}: add the new features here and rerun "
            "tests/test_tf_features.py"
        )


def _mean(a: Any) -> Any:
    import tensorflow as tf

    return tf.reduce_mean(a, axis=list(range(1, a.shape.rank)))


def _moments(a: Any) -> tuple[Any, Any, Any]:
    """Std, skewness, Pearson kurtosis per image (biased), 0 for a constant image."""
    import tensorflow as tf

    mu = _mean(a)
    d = a - tf.reshape(mu, [-1] + [1] * (a.shape.rank - 1))
    m2 = _mean(d * d)
    m3 = _mean(d * d * d)
    m4 = _mean(tf.square(d * d))
    const = m2 <= 1e-10 * mu * mu + 1e-20
    safe = tf.where(const, tf.ones_like(m2), m2)
    std = tf.where(const, tf.zeros_like(m2), tf.sqrt(safe))
    skew = tf.where(const, tf.zeros_like(m2), m3 / (safe * tf.sqrt(safe)))
    kurt = tf.where(const, tf.zeros_like(m2), m4 / (safe * safe))
    return std, skew, kurt


def _var(a: Any) -> Any:
    mu = _mean(a)
    import tensorflow as tf

    d = a - tf.reshape(mu, [-1] + [1] * (a.shape.rank - 1))
    return _mean(d * d)


def features_tf(x: Any, soft_width: float = 0.25 / 255.0, dtype: Any = None,
                grid: bool = False) -> Any:
    """(n, H, W) tensor in [0, 1] -> (n, 11) tensor of ``dtype``, ordered as FEATURE_NAMES
    (with ``grid``, (n, 12): feature set v3, stride_grid_peaks from the same FFT).

    Computed in float64 by default: float32 reductions over 50k pixels drift by ~1e-3 relative
    on dark, low-contrast images (the skewness of a nearly flat image), while numpy's pairwise
    float32 sums stay within 1e-5 of float64. The cost is small beside the victim's gradient.
    """
    import tensorflow as tf

    check_names()
    dtype = dtype or tf.float64
    x = tf.cast(tf.convert_to_tensor(x), dtype)
    h, w = int(x.shape[1]), int(x.shape[2])
    std, skew, kurt = _moments(x)

    # power spectrum over the rfft2 half plane, weighted to the full plane
    mult_np, hf_np = spectrum_weights((h, w))
    mult, hf = tf.constant(mult_np, dtype), tf.constant(hf_np, dtype)
    f = tf.signal.rfft2d(x)
    p = tf.square(tf.math.real(f)) + tf.square(tf.math.imag(f))
    total = tf.reduce_sum(p * mult, axis=[1, 2])
    dc = p[:, 0, 0]
    ac = total - dc
    ok_total = total > 0.0
    safe_total = tf.where(ok_total, total, tf.ones_like(total))
    safe_ac = tf.where(ac > 1e-12 * total, ac, tf.ones_like(ac))
    hf_share = tf.where((ac > 1e-12 * total) & ok_total,
                        tf.reduce_sum(p * hf, axis=[1, 2]) / safe_ac, tf.zeros_like(ac))
    q = p / safe_total[:, None, None]
    pos = q > 0.0
    logq = tf.where(pos, tf.math.log(tf.where(pos, q, tf.ones_like(q))), tf.zeros_like(q))
    entropy = -tf.reduce_sum(q * logq * mult, axis=[1, 2]) / math.log(2.0)
    entropy = tf.where(ok_total, entropy, tf.zeros_like(entropy))

    dx = x[:, :, 1:] - x[:, :, :-1]
    dy = x[:, 1:, :] - x[:, :-1, :]
    d2x = dx[:, :, 1:] - dx[:, :, :-1]
    d2y = dy[:, 1:, :] - dy[:, :-1, :]
    lap = d2x[:, 1:-1, :] + d2y[:, :, 1:-1]
    lap_var = _var(lap)

    t = d2x[:, 1:, :] - d2x[:, :-1, :]
    res = t[:, 1:, :] - t[:, :-1, :]
    noise_sigma = _SQRT_HALF_PI * _mean(tf.abs(res)) / 6.0
    res_std, _, res_kurt = _moments(res)

    hh, wh = h // 2, w // 2
    xs = x[:, : 2 * hh, : 2 * wh]
    half = (xs[:, 0::2, 0::2] + xs[:, 1::2, 0::2]) + xs[:, 0::2, 1::2] + xs[:, 1::2, 1::2]
    th = half[:, :, :-2] + half[:, :, 2:] - 2.0 * half[:, :, 1:-1]
    rh = th[:, :-2] + th[:, 2:] - 2.0 * th[:, 1:-1]
    std_half = 0.25 * tf.sqrt(tf.maximum(_var(rh), 0.0))
    ok_half = std_half > 1e-12
    ratio = tf.where(ok_half, res_std / tf.where(ok_half, std_half, tf.ones_like(std_half)),
                     tf.zeros_like(std_half))

    adx, ady = tf.abs(dx), tf.abs(dy)
    n_diff = float(adx.shape[1] * adx.shape[2] + ady.shape[1] * ady.shape[2])
    # the runtime compares float32 differences: do the same so ties fall the same way
    hard = (tf.reduce_sum(tf.cast(tf.cast(adx, tf.float32) < _NEAR_ZERO, dtype), axis=[1, 2])
            + tf.reduce_sum(tf.cast(tf.cast(ady, tf.float32) < _NEAR_ZERO, dtype), axis=[1, 2])
            ) / n_diff
    soft = (tf.reduce_sum(tf.sigmoid((_NEAR_ZERO - adx) / soft_width), axis=[1, 2])
            + tf.reduce_sum(tf.sigmoid((_NEAR_ZERO - ady) / soft_width), axis=[1, 2])) / n_diff
    near_zero = tf.stop_gradient(hard - soft) + soft

    a, b = dx[:, :, :-1], dx[:, :, 1:]
    ma, mb = _mean(a), _mean(b)
    va = _mean(a * a) - ma * ma
    vb = _mean(b * b) - mb * mb
    cov = _mean(a * b) - ma * mb
    okc = (va > _TINY) & (vb > _TINY)
    lag1 = tf.where(okc, cov / tf.sqrt(tf.where(okc, va * vb, tf.ones_like(va))),
                    tf.zeros_like(cov))

    out = [skew, kurt, entropy, lap_var, std, noise_sigma, res_kurt, ratio, near_zero, lag1,
           hf_share]
    if grid:
        out.append(_grid_from_power(p, (h, w)))
    return tf.stack(out, axis=1)


def _grid_from_power(p: Any, shape: tuple[int, int]) -> Any:
    """stride_grid_peaks from the rfft2 half-plane power (n, H, W//2 + 1): the same bins as the
    runtime (``detector.features.grid_indices``); the median of each ring is the mean of its
    two middle values after a sort (numpy's median of an even count), whose gradient flows to
    those two bins."""
    import tensorflow as tf

    from detector.features import grid_indices

    peaks_np, rings_np = grid_indices(shape)
    p = tf.reshape(p, [tf.shape(p)[0], -1])
    peak = tf.gather(p, peaks_np, axis=1)  # (n, k)
    ring = tf.sort(tf.gather(p, rings_np, axis=1), axis=-1)  # (n, k, m)
    m = rings_np.shape[1]
    med = (ring[..., (m - 1) // 2] + ring[..., m // 2]) / 2.0
    ok = med > 0.0
    ratio = tf.where(ok, peak / tf.where(ok, med, tf.ones_like(med)), tf.zeros_like(med))
    count = tf.reduce_sum(tf.cast(ok, p.dtype), axis=1)
    mean = tf.reduce_sum(ratio, axis=1) / tf.maximum(count, 1.0)
    good = mean > 0.0
    return tf.where(good, tf.math.log(tf.where(good, mean, tf.ones_like(mean))) / math.log(10.0),
                    tf.zeros_like(mean))


def grid_peaks_tf(x: Any, dtype: Any = None) -> Any:
    """(n, H, W) in [0, 1] -> (n,): ``stride_grid_peaks`` of feature set v3, differentiable."""
    import tensorflow as tf

    x = tf.cast(tf.convert_to_tensor(x), dtype or tf.float64)
    f = tf.signal.rfft2d(x)
    p = tf.square(tf.math.real(f)) + tf.square(tf.math.imag(f))
    return _grid_from_power(p, (int(x.shape[1]), int(x.shape[2])))


def features_set_tf(x: Any, feature_set: str, dtype: Any = None) -> Any:
    """``features_tf`` for the forest's feature set: v1 (11) or v3 (v1 and the grid peaks,
    from the same FFT)."""
    from detector.features import FEATURE_SET, FEATURE_SET_V3

    if feature_set not in (FEATURE_SET, FEATURE_SET_V3):
        raise ValueError(f"no differentiable twin of feature set {feature_set!r} "
                         f"(v1 and v3 have one)")
    return features_tf(x, dtype=dtype, grid=feature_set == FEATURE_SET_V3)


def quantise_ste(x: Any, levels: int) -> Any:
    """Round to the grid k/levels in the forward pass, identity gradient (BPDA / straight-through):
    the detector sees stored (quantised) pixels, so the attack must optimise those."""
    import tensorflow as tf

    q = tf.round(tf.clip_by_value(x, 0.0, 1.0) * float(levels)) / float(levels)
    return x + tf.stop_gradient(q - x)


def _ste(hard: Any, soft: Any) -> Any:
    """Forward value ``hard``, gradient of ``soft``."""
    import tensorflow as tf

    return tf.stop_gradient(hard - soft) + soft


def candidates_tf(x: Any, tau: float = 0.15) -> Any:
    """Differentiable twin of ``train.ablation.candidate_features`` (the 8 SPAM / residual-
    histogram candidates), batched: (n, H, W) in [0, 1] -> (n, 8) float32.

    Forward values are the exact shares of the rounded grey-level differences; gradients come
    from soft bin memberships (logistic edges of width ``tau`` grey levels), so an attacker
    can hold these features at their clean values too (the re-adapted attack on the stronger
    detector).
    """
    import tensorflow as tf

    x = tf.cast(tf.convert_to_tensor(x), tf.float32) * 255.0
    g = tf.round(x)
    gx = _ste(g, x)  # rounded in the forward pass, identity gradient

    def mem3(d: Any) -> tuple[Any, Any, Any]:
        """Soft memberships of -1 / 0 / +1 after truncation, exact (one-hot) forward."""
        lo = tf.sigmoid((-0.5 - d) / tau)
        hi = tf.sigmoid((d - 0.5) / tau)
        mid = 1.0 - lo - hi
        hard_lo = tf.cast(d <= -0.5, tf.float32)
        hard_hi = tf.cast(d >= 0.5, tf.float32)
        return (_ste(hard_lo, lo), _ste(1.0 - hard_lo - hard_hi, mid), _ste(hard_hi, hi))

    spam = []
    for d in (gx[:, :, 1:] - gx[:, :, :-1], tf.transpose(gx[:, 1:, :] - gx[:, :-1, :],
                                                         [0, 2, 1])):
        lo, mid, hi = mem3(d)
        a = (lo[:, :, :-1], mid[:, :, :-1], hi[:, :, :-1])
        b = (lo[:, :, 1:], mid[:, :, 1:], hi[:, :, 1:])

        def share(u: Any, v: Any) -> Any:
            return tf.reduce_mean(u * v, axis=[1, 2])

        spam.append(tf.stack([
            share(a[1], b[1]),
            share(a[1], b[0]) + share(a[1], b[2]) + share(a[0], b[1]) + share(a[2], b[1]),
            share(a[0], b[0]) + share(a[2], b[2]),
            share(a[0], b[2]) + share(a[2], b[0]),
        ], axis=1))
    res = []
    for r in (gx[:, :, 2:] - 2.0 * gx[:, :, 1:-1] + gx[:, :, :-2],
              gx[:, 2:, :] - 2.0 * gx[:, 1:-1, :] + gx[:, :-2, :]):
        ar = tf.abs(r)
        edges = [tf.sigmoid((ar - e) / tau) for e in (0.5, 1.5, 2.5)]
        soft = [1.0 - edges[0], edges[0] - edges[1], edges[1] - edges[2], edges[2]]
        hard = [tf.cast((ar >= lo) & (ar < hi), tf.float32)
                for lo, hi in ((-1.0, 0.5), (0.5, 1.5), (1.5, 2.5), (2.5, 1e9))]
        res.append(tf.stack([tf.reduce_mean(_ste(h, s), axis=[1, 2])
                             for h, s in zip(hard, soft, strict=True)], axis=1))
    # both directions hold the same number of pairs / residuals: the pooled share is the mean
    return tf.concat([(spam[0] + spam[1]) / 2.0, (res[0] + res[1]) / 2.0], axis=1)
