"""Hand-crafted image statistics for the Random Forest half of the detector.

The paper's four features (skewness, kurtosis, spectral entropy, Laplacian variance) describe
an image's global intensity distribution and roughness. The perturbations the gateway must
catch are tiny (PGD at eps 0.003 is under one grey level of an 8-bit image), and those four
move very little under them. So we add steganalysis-style features that look at the
*pixel-level noise residual*, where such perturbations live: natural radiographs have smooth,
spatially correlated residuals, an additive L-inf perturbation adds a small, nearly white,
bounded component.

Everything is computed from one 224x224 float image in [0, 1] with vectorised numpy and one
real FFT (float32 where precision allows), so ``extract`` costs a fraction of a millisecond;
``bench/detector_latency.py`` measures it. The order of ``FEATURE_NAMES`` is the order of the
vector and is recorded in every bundle manifest.

Feature sets: "sentinel-features-v1" (FEATURE_NAMES, 11 features),
"sentinel-features-v2" (v1 plus 8 SPAM/residual-histogram shares on the 8-bit grid,
STEGO_REASONS) and "sentinel-features-v3" (v1 plus the stride-grid spectral peaks,
GRID_REASONS). A bundle records which set its forest was trained on and the Detector
computes that one, so older bundles keep working unchanged when a new set is adopted.

Degenerate images (constant, zero variance) get defined values instead of NaN: skewness and
kurtosis 0, correlation 0, ratios 0, so the forest always sees finite numbers.
"""

from __future__ import annotations

import threading

import numpy as np
import scipy.fft

# Each name with the one-line reason it is in the vector.
FEATURE_REASONS: dict[str, str] = {
    "skewness": "paper: asymmetry of the intensity histogram; contrast and noise change it",
    "kurtosis": "paper: tail weight of the intensity histogram (Pearson, normal = 3)",
    "spectral_entropy": "paper: spread of the 2-D power spectrum |F|^2 (bits); noise flattens it",
    "laplacian_var": "paper: variance of the 4-neighbour Laplacian, a roughness measure",
    "intensity_std": "global contrast; the contrast x1.1 perturbation scales it",
    "noise_sigma": "Immerkaer's noise estimate (3x3 second-order residual): additive noise "
    "raises it",
    "residual_kurtosis": "kurtosis of that residual: a bounded +-eps perturbation flattens its "
    "tails",
    "residual_std_ratio": "residual std at full vs half resolution: pixel noise averages out when "
    "binned, texture does not",
    "near_zero_diff_frac": "share of neighbour differences under half a grey level: flat regions "
    "stop being flat once perturbed",
    "diff_lag1_corr": "correlation of adjacent first-order differences: natural residuals are "
    "smooth (>0), white noise drives it towards -0.5",
    "hf_power_share": "share of non-DC spectral power above 1/4 cycle/pixel, where natural "
    "radiographs have almost none and noise has most",
}
# Steganalysis features added in v2, in grey levels of the 8-bit grid (x * 255, rounded):
# PGD at eps 0.003-0.006 on an 8-bit source is, after rounding, +-1 (sometimes +-2) level
# changes, i.e. LSB-matching embedding, which SPAM-style co-occurrences of truncated
# differences (Pevny, Bas, Fridrich 2010) and residual histograms detect. Proposed and
# measured by the adaptive-attack work (train/ablation.py: same definitions, tested equal).
STEGO_REASONS: dict[str, str] = {
    "spam_00": "share of adjacent first-difference pairs (truncated to +-1 grey level) both 0",
    "spam_0x": "share of pairs with exactly one zero: an isolated +-1 change creates them",
    "spam_same": "share of pairs (+1,+1) or (-1,-1): smooth ramps",
    "spam_opp": "share of pairs (+1,-1) or (-1,+1): a single-pixel bump, the +-1 embedding "
    "signature",
    "res2_0": "share of second-order residuals (1,-2,1) equal to 0 grey levels",
    "res2_1": "share equal to +-1",
    "res2_2": "share equal to +-2 (a +-1 change in a flat area makes +-2)",
    "res2_3plus": "share at least 3",
}
# Added in v3. A gradient attack's perturbation is the sign of the victim's input gradient,
# and a network that downsamples with stride-2 layers imprints a periodic pattern on that
# gradient (period 2, 4, 8 pixels: spectral peaks on the grid of multiples of 1/8 cycle per
# pixel). A natural radiograph's spectrum is smooth there; a periodogram bin over the median
# of its neighbours is then about Exp(1)/ln 2, whatever the source's noise level, which is why
# this feature holds across sources whose noise differs (Kermany, NIH, high-bit-depth CR).
GRID_REASONS: dict[str, str] = {
    "stride_grid_peaks": "log10 of the mean, over the off-axis frequencies (a/8, b/8) "
    "cycles/pixel, of the power over the median power around it: strided networks' gradients "
    "are periodic there, natural spectra are not",
}
# Off-axis only: the axes (a/8, 0) and (0, b/8) carry the 8x8 block edges of JPEG sources.
GRID_STEPS = 8  # grid of 1/8 cycle per pixel (periods 8, 4, 8/3, 2): >= 3 stride-2 stages
GRID_RING = 4  # neighbourhood: the (2*4+1)^2 window around each peak, minus its 3x3 centre
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_REASONS)
# Bump when any feature's definition or numerics change: bundles record it and the runtime
# refuses a bundle whose forest was trained on another definition under the same names.
FEATURE_SET = "sentinel-features-v1"
FEATURE_SET_V2 = "sentinel-features-v2"
FEATURE_SET_V3 = "sentinel-features-v3"
# Every set the runtime can compute; a bundle names one (manifest "feature_set").
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    FEATURE_SET: FEATURE_NAMES,
    FEATURE_SET_V2: FEATURE_NAMES + tuple(STEGO_REASONS),
    FEATURE_SET_V3: FEATURE_NAMES + tuple(GRID_REASONS),
}
N_FEATURES = len(FEATURE_NAMES)

# Half of one 8-bit grey level on the [0, 1] scale: "no change" between neighbours.
_NEAR_ZERO = 0.5 / 255.0
_SQRT_HALF_PI = float(np.sqrt(np.pi / 2.0))


def spectrum_weights(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicity of each rfft2 bin in the full spectrum, and the high-frequency mask.

    rfft2 keeps columns 0..W/2; the interior columns stand for two conjugate bins each, so
    the entropy over the full spectrum is a weighted sum over the half spectrum.
    """
    h, w = shape
    n_cols = w // 2 + 1
    mult = np.full((h, n_cols), 2.0, dtype=np.float32)
    mult[:, 0] = 1.0
    if w % 2 == 0:
        mult[:, -1] = 1.0
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.abs(np.fft.rfftfreq(w))[None, :]
    hf = ((np.sqrt(fy**2 + fx**2) > 0.25) * mult).astype(np.float32)
    return mult, hf


def grid_indices(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into the rfft2 half plane (h, w//2 + 1) of the off-axis grid peaks and
    of each peak's neighbourhood ring, (k,) and (k, m).

    Each distinct full-plane frequency appears once (the half plane holds one of every
    conjugate pair; on the last column of an even width both are stored, and one is kept).
    A neighbour outside the half plane is read from its conjugate, which has the same power.
    """
    h, w = shape
    nc = w // 2 + 1

    def half_plane(u: int, v: int) -> int:
        u, v = u % h, v % w
        if v >= nc:  # conjugate: (-u, -v)
            u, v = (-u) % h, (-v) % w
        return u * nc + v

    peaks: list[int] = []
    rings: list[list[int]] = []
    seen: set[int] = set()
    for a in range(1, GRID_STEPS):
        for b in range(1, GRID_STEPS):
            u, v = round(a * h / GRID_STEPS), round(b * w / GRID_STEPS)
            i = half_plane(u, v)
            conj = half_plane(-u, -v)
            if i in seen or conj in seen:
                continue
            seen.add(i)
            peaks.append(i)
            rings.append([half_plane(u + du, v + dv)
                          for du in range(-GRID_RING, GRID_RING + 1)
                          for dv in range(-GRID_RING, GRID_RING + 1)
                          if max(abs(du), abs(dv)) > 1])
    return np.array(peaks, np.intp), np.array(rings, np.intp)


def grid_peaks(power_half: np.ndarray, peaks: np.ndarray, rings: np.ndarray) -> float:
    """The stride_grid_peaks feature from the half-plane power spectrum (any scale: a ratio).

    0.0 for a spectrum with no power around the peaks (a constant image), as for the other
    degenerate cases of this module.
    """
    flat = power_half.reshape(-1)
    med = np.median(flat[rings], axis=1)
    ok = med > 0.0
    if not ok.any():
        return 0.0
    ratio = float(np.mean(flat[peaks][ok] / med[ok]))
    return float(np.log10(ratio)) if ratio > 0.0 else 0.0


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of a*b over two contiguous arrays, without BLAS.

    numpy's dot hands vectors this long to OpenBLAS, which wakes its thread pool for each
    call; on a busy 2-core machine that cost 100-400 us per call against ~14 us for einsum's
    single-threaded SIMD loop (measured). einsum's float32 accumulation is pairwise-blocked
    and stays within ~1e-7 relative of the float64 result on 224x224 images.
    """
    return float(np.einsum("i,i->", a.reshape(-1), b.reshape(-1)))


def _moments(x: np.ndarray, d: np.ndarray, d2: np.ndarray) -> tuple[float, float, float]:
    """Std, skewness and Pearson kurtosis (biased, as scipy.stats with bias=True).

    ``d`` and ``d2`` are scratch buffers of x's shape and dtype (no allocation per call).
    """
    n = x.size
    mu = float(x.sum()) / n
    np.subtract(x, mu, out=d)
    m2 = _dot(d, d) / n
    # float32 rounding leaves a variance of ~(6e-8 mu)^2 on a constant image: treat any
    # relative spread below 1e-5 as constant rather than return moments of rounding noise.
    if m2 <= 1e-10 * mu * mu + 1e-20:
        return 0.0, 0.0, 0.0
    np.multiply(d, d, out=d2)
    m3 = _dot(d2, d) / n
    m4 = _dot(d2, d2) / n
    return m2**0.5, m3 / m2**1.5, m4 / (m2 * m2)


def _var(a: np.ndarray) -> float:
    """Population variance of a contiguous float32 array (numpy pairwise sum, einsum dot)."""
    n = a.size
    s = float(a.sum())
    return max(_dot(a, a) / n - (s / n) ** 2, 0.0)


class FeatureExtractor:
    """Computes the feature vector of images of one shape, reusing its scratch buffers.

    Why a class: a dozen 200-400 kB temporaries per image cost more in page faults (glibc
    serves blocks that large with fresh mmaps) than the arithmetic itself; writing into
    buffers allocated once makes ``extract`` about 3x faster. Not thread-safe (the buffers
    are shared between calls): use one extractor per thread, as ``Detector`` does.
    """

    def __init__(self, shape: tuple[int, int] = (224, 224), feature_set: str = FEATURE_SET) -> None:
        h, w = shape
        if h < 8 or w < 8:
            raise ValueError(f"images must be at least 8x8, got {shape}")
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"unknown feature set {feature_set!r}; known: {list(FEATURE_SETS)}")
        self.shape = (h, w)
        self.feature_set = feature_set
        self.names = FEATURE_SETS[feature_set]
        self._stego = feature_set == FEATURE_SET_V2
        self._grid = grid_indices((h, w)) if feature_set == FEATURE_SET_V3 else None
        f32 = np.float32
        self._x = np.empty((h, w), f32)
        # Two scratch areas shared by temporaries whose lifetimes do not overlap (moments of
        # x, then of the residual, then |differences|, then difference products): fewer
        # buffers keep the working set in cache when features, CNN and forest alternate.
        sa, sb = np.empty(h * w, f32), np.empty(h * w, f32)
        self._d = sa.reshape(h, w)
        self._d2 = sb.reshape(h, w)
        self._mult, self._hf = spectrum_weights((h, w))
        nc = w // 2 + 1
        self._p = np.empty((h, nc), f32)
        self._tmp_p = np.empty((h, nc), f32)
        self._mask_p = np.empty((h, nc), np.bool_)
        self._dx = np.empty((h, w - 1), f32)
        self._dy = np.empty((h - 1, w), f32)
        self._adx = sa[: h * (w - 1)].reshape(h, w - 1)
        self._ady = sb[: (h - 1) * w].reshape(h - 1, w)
        self._d2x = np.empty((h, w - 2), f32)
        self._d2y = np.empty((h - 2, w), f32)
        self._lap = np.empty((h - 2, w - 2), f32)
        self._t = np.empty((h - 1, w - 2), f32)
        self._res = np.empty((h - 2, w - 2), f32)
        self._rd = sa[: (h - 2) * (w - 2)].reshape(h - 2, w - 2)
        self._rd2 = sb[: (h - 2) * (w - 2)].reshape(h - 2, w - 2)
        self._pair = sa[: h * (w - 2)].reshape(h, w - 2)
        hh, wh = h // 2, w // 2
        self._half = np.empty((hh, wh), f32)
        self._th = np.empty((hh, wh - 2), f32)
        self._th2 = np.empty((hh, wh - 2), f32)
        self._resh = np.empty((hh - 2, wh - 2), f32)
        self._resh2 = np.empty((hh - 2, wh - 2), f32)
        if self._stego:
            i16 = np.int16
            self._g = np.empty((h, w), i16)
            self._gdx = np.empty((h, w - 1), i16)
            self._gdy = np.empty((h - 1, w), i16)
            self._gf = np.empty((h, w), f32)
            self._r2x = np.empty((h, w - 2), i16)
            self._r2y = np.empty((h - 2, w), i16)
            self._tx = np.empty((h, w - 1), np.int8)
            self._ty = np.empty((h - 1, w), np.int8)
            self._zx = np.empty((h, w - 1), np.bool_)
            self._zy = np.empty((h - 1, w), np.bool_)
            self._px = np.empty((h, w - 2), np.int8)
            self._py = np.empty((h - 2, w), np.int8)

    def extract(self, img: np.ndarray) -> np.ndarray:
        """Feature vector (float64, ordered as FEATURE_NAMES) of one 2-D image in [0, 1].

        Everything runs in float32 (numpy's pairwise sums, einsum dots), which halves memory
        traffic against float64 and stays within ~1e-5 relative of scipy's float64 reference
        (tests/test_features.py), far below the spread between images. Measured ~0.6 ms on a
        224x224 image on this 2-core machine; the FFT is ~0.13 ms of it.
        """
        if img.shape != self.shape:
            raise ValueError(f"this extractor takes {self.shape} images, got {img.shape}")
        x = self._x
        np.copyto(x, img, casting="unsafe")
        h, w = self.shape

        std, skew, kurt = _moments(x, self._d, self._d2)

        # Power spectrum of the half plane; entropy over the full plane via multiplicities.
        f = scipy.fft.rfft2(x, workers=1)
        p, tmp = self._p, self._tmp_p
        np.multiply(f.real, f.real, out=p)
        np.multiply(f.imag, f.imag, out=tmp)
        p += tmp
        grid = grid_peaks(p, *self._grid) if self._grid is not None else 0.0
        mult = self._mult
        total = _dot(mult, p)
        if total > 0.0:
            ac = total - float(p[0, 0])
            hf_share = _dot(self._hf, p) / ac if (ac > 1e-12 * total) else 0.0
            np.multiply(p, np.float32(1.0 / total), out=p)  # p is now the distribution q
            np.greater(p, 0.0, out=self._mask_p)
            tmp.fill(0.0)
            np.log2(p, where=self._mask_p, out=tmp)
            tmp *= p
            tmp *= mult
            entropy = -float(tmp.sum())
        else:
            entropy = 0.0
            hf_share = 0.0

        # First and second differences; every residual below is built from these.
        dx, dy, d2x, d2y = self._dx, self._dy, self._d2x, self._d2y
        np.subtract(x[:, 1:], x[:, :-1], out=dx)
        np.subtract(x[1:, :], x[:-1, :], out=dy)
        np.subtract(dx[:, 1:], dx[:, :-1], out=d2x)
        np.subtract(dy[1:, :], dy[:-1, :], out=d2y)

        # 4-neighbour Laplacian on the interior (no invented border values).
        lap = self._lap
        np.add(d2x[1:-1, :], d2y[:, 1:-1], out=lap)
        lap_var = _var(lap)

        # Immerkaer's residual: M = [[1,-2,1],[-2,4,-2],[1,-2,1]], the vertical second
        # difference of the horizontal second difference.
        t, res = self._t, self._res
        np.subtract(d2x[1:, :], d2x[:-1, :], out=t)
        np.subtract(t[1:, :], t[:-1, :], out=res)
        np.abs(res, out=self._rd)
        noise_sigma = _SQRT_HALF_PI * float(self._rd.sum()) / (6.0 * res.size)
        res_std, _, res_kurt = _moments(res, self._rd, self._rd2)

        # Same residual after 2x2 binning (sum of four, hence the 1/4): std ratio full/half.
        hh, wh = h // 2, w // 2
        half = self._half
        np.add(x[0 : 2 * hh : 2, 0 : 2 * wh : 2], x[1 : 2 * hh : 2, 0 : 2 * wh : 2], out=half)
        half += x[0 : 2 * hh : 2, 1 : 2 * wh : 2]
        half += x[1 : 2 * hh : 2, 1 : 2 * wh : 2]
        th, th2 = self._th, self._th2
        np.add(half[:, :-2], half[:, 2:], out=th)
        np.multiply(half[:, 1:-1], 2.0, out=th2)
        th -= th2
        rh, rh2 = self._resh, self._resh2
        np.add(th[:-2], th[2:], out=rh)
        np.multiply(th[1:-1], 2.0, out=rh2)
        rh -= rh2
        std_half = 0.25 * _var(rh) ** 0.5
        ratio = res_std / std_half if std_half > 1e-12 else 0.0

        adx, ady = self._adx, self._ady
        np.abs(dx, out=adx)
        np.abs(dy, out=ady)
        near_zero = (np.count_nonzero(adx < _NEAR_ZERO) + np.count_nonzero(ady < _NEAR_ZERO)) / (
            dx.size + dy.size
        )

        # Lag-1 correlation of horizontal differences: pairs (dx[:, j], dx[:, j+1]).
        fdx = dx.reshape(-1)
        s_all = float(fdx.sum())
        ss_all = _dot(fdx, fdx)
        first, last = dx[:, 0].astype(np.float64), dx[:, -1].astype(np.float64)
        n_pairs = h * (w - 2)
        ma = (s_all - float(last.sum())) / n_pairs
        mb = (s_all - float(first.sum())) / n_pairs
        va = (ss_all - float(last @ last)) / n_pairs - ma * ma
        vb = (ss_all - float(first @ first)) / n_pairs - mb * mb
        pair = self._pair
        np.multiply(dx[:, :-1], dx[:, 1:], out=pair)
        cov = float(pair.sum()) / n_pairs - ma * mb
        lag1 = cov / (va * vb) ** 0.5 if va > 1e-20 and vb > 1e-20 else 0.0

        base = np.array(
            [
                skew,
                kurt,
                entropy,
                lap_var,
                std,
                noise_sigma,
                res_kurt,
                ratio,
                near_zero,
                lag1,
                hf_share,
            ],
            dtype=np.float64,
        )
        if self._grid is not None:
            return np.append(base, grid)
        if not self._stego:
            return base
        return np.concatenate([base, self._stego_features(x)])

    def _stego_features(self, x: np.ndarray) -> np.ndarray:
        """SPAM pair shares and second-order residual histogram in 8-bit grey levels.

        Counted with comparisons on int8/int16 buffers instead of bincount codes (bincount
        casts to int64 first): pairs (a, b) of truncated differences are "both zero",
        "exactly one zero", a*b = +1 (same sign) or a*b = -1 (opposite signs).
        """
        g, dx, dy, tmp = self._g, self._gdx, self._gdy, self._gf
        np.multiply(x, np.float32(255.0), out=tmp)
        np.rint(tmp, out=tmp)
        np.copyto(g, tmp, casting="unsafe")
        np.subtract(g[:, 1:], g[:, :-1], out=dx)
        np.subtract(g[1:, :], g[:-1, :], out=dy)
        # second-order residuals from the unclipped differences: shares of |r| = 0, 1, 2, >= 3
        n0 = n1 = n2 = n_res = 0
        for r, d, axis in ((self._r2x, dx, 1), (self._r2y, dy, 0)):
            if axis == 1:
                np.subtract(d[:, 1:], d[:, :-1], out=r)
            else:
                np.subtract(d[1:, :], d[:-1, :], out=r)
            np.abs(r, out=r)
            n0 += np.count_nonzero(r == 0)
            n1 += np.count_nonzero(r == 1)
            n2 += np.count_nonzero(r == 2)
            n_res += r.size
        # truncated first differences in {-1, 0, +1} and their adjacent pairs
        n00 = n0x = n_same = n_opp = n_pairs = 0
        for d, t, z, prod, axis in (
            (dx, self._tx, self._zx, self._px, 1),
            (dy, self._ty, self._zy, self._py, 0),
        ):
            np.clip(d, -1, 1, out=t, casting="unsafe")
            np.equal(t, 0, out=z)
            if axis == 1:
                za, zb, ta, tb = z[:, :-1], z[:, 1:], t[:, :-1], t[:, 1:]
            else:
                za, zb, ta, tb = z[:-1, :], z[1:, :], t[:-1, :], t[1:, :]
            n00 += np.count_nonzero(za & zb)
            n0x += np.count_nonzero(za ^ zb)
            np.multiply(ta, tb, out=prod)
            n_same += np.count_nonzero(prod == 1)
            n_opp += np.count_nonzero(prod == -1)
            n_pairs += prod.size
        return np.array(
            [
                n00 / n_pairs,
                n0x / n_pairs,
                n_same / n_pairs,
                n_opp / n_pairs,
                n0 / n_res,
                n1 / n_res,
                n2 / n_res,
                (n_res - n0 - n1 - n2) / n_res,
            ],
            dtype=np.float64,
        )


_local = threading.local()


def _extractor(shape: tuple[int, int], feature_set: str = FEATURE_SET) -> FeatureExtractor:
    """This thread's extractor for ``shape``: a cache of scratch buffers, not of results."""
    cache: dict[tuple[int, int, str], FeatureExtractor] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (shape[0], shape[1], feature_set)
    ex = cache.get(key)
    if ex is None:
        if len(cache) >= 4:  # odd sizes from ad-hoc calls: do not hoard buffers
            cache.clear()
        ex = cache[key] = FeatureExtractor(shape, feature_set)
    return ex


def extract(img: np.ndarray, feature_set: str = FEATURE_SET) -> np.ndarray:
    """Feature vector (float64, ordered as FEATURE_SETS[feature_set]) of one 2-D image in [0, 1].

    Reuses a per-thread ``FeatureExtractor`` for the image's shape, so repeated calls cost
    the same as holding one (allocating the buffers each time would triple the cost). The
    cached buffers never influence results: every call overwrites them completely.
    """
    if img.ndim != 2:
        raise ValueError(f"extract expects one 2-D image, got shape {img.shape}")
    return _extractor((int(img.shape[0]), int(img.shape[1])), feature_set).extract(img)


def extract_batch(imgs: np.ndarray, feature_set: str = FEATURE_SET) -> np.ndarray:
    """Feature matrix (n, len(FEATURE_SETS[feature_set])) of images (n, H, W) in [0, 1]."""
    if imgs.ndim != 3:
        raise ValueError(f"extract_batch expects (n, H, W), got shape {imgs.shape}")
    ex = _extractor((int(imgs.shape[1]), int(imgs.shape[2])), feature_set)
    out = np.empty((imgs.shape[0], len(ex.names)), dtype=np.float64)
    for i in range(imgs.shape[0]):
        out[i] = ex.extract(imgs[i])
    return out
