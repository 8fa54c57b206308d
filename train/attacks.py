"""The perturbation suite of the paper's Table II, and the one mapping onto stored pixels.

Every perturbation is computed on the victim's input (224x224, [0, 1]) and expressed as a
delta. ``to_native`` then maps that delta onto the image's native matrix (identity for 224x224
sources; otherwise, by default, the smallest native delta whose exact area average -- the
runtime's own resize -- is the crafted delta), clips to [0, 1] and rounds to the source's own grid
(k/255 for 8-bit, k/(2**BitsStored - 1) for DICOM). Clean and perturbed images then go through
exactly the same runtime path (native unit array -> resize_to_input -> detector), so the
detector cannot learn the encode path instead of the perturbation (DESIGN, "Shortcut cues").
``sentinel attack`` uses the same function for DICOM files.

Note that eps 0.003 is 0.77 of one 8-bit grey level: after rounding most pixels of a PGD image
move by exactly one level or not at all. That is the signal the detector has to find.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

PGD_STEPS = 40


@dataclass(frozen=True)
class Perturbation:
    """One row of Table II. ``param`` is eps (fgsm/pgd), sigma, amount or contrast factor."""

    name: str
    method: str
    param: float

    @property
    def needs_victim(self) -> bool:
        return self.method in ("fgsm", "pgd")


SUITE: tuple[Perturbation, ...] = (
    Perturbation("pgd_0.003", "pgd", 0.003),
    Perturbation("pgd_0.006", "pgd", 0.006),
    Perturbation("fgsm_0.003", "fgsm", 0.003),
    Perturbation("fgsm_0.006", "fgsm", 0.006),
    Perturbation("gaussian_0.008", "gaussian", 0.008),
    Perturbation("saltpepper_0.008", "saltpepper", 0.008),
    Perturbation("contrast_1.1", "contrast", 1.1),
)
BY_NAME = {p.name: p for p in SUITE}
METHODS = ("pgd", "fgsm", "gaussian", "saltpepper", "contrast")
DEFAULT_PARAM = {"pgd": 0.006, "fgsm": 0.006, "gaussian": 0.008, "saltpepper": 0.008,
                 "contrast": 1.1}


def _loss_and_grad(model: Any, x: Any, y: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.reshape(model(x, training=False), [-1])
        loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
    return loss, tape.gradient(loss, x)


def make_gradient_attack(model: Any) -> Any:
    """A compiled PGD/FGSM for ``model``: f(x (n,224,224), y (n,), eps, steps, alpha) -> x_adv.

    Untargeted, L-inf, on the binary cross-entropy of the true (or predicted) label; no random
    start (the paper's setting); every step projected onto the eps-ball around x and [0, 1].
    FGSM is the special case steps=1, alpha=eps.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def attack(x: Any, y: Any, eps: Any, steps: Any, alpha: Any) -> Any:
        x0 = x[..., None]
        adv = tf.identity(x0)
        for _ in tf.range(steps):
            _, grad = _loss_and_grad(model, adv, y)
            adv = adv + alpha * tf.sign(grad)
            adv = tf.clip_by_value(adv, x0 - eps, x0 + eps)
            adv = tf.clip_by_value(adv, 0.0, 1.0)
        return adv[..., 0]

    return attack


def gradient_attack(attack: Any, x: np.ndarray, y: np.ndarray, method: str, eps: float,
                    batch_size: int = 64) -> np.ndarray:
    """Run a compiled attack over a batch array; returns perturbed inputs at 224 (unquantised)."""
    import tensorflow as tf

    steps, alpha = (PGD_STEPS, eps / 10.0) if method == "pgd" else (1, eps)
    out = np.empty_like(x, dtype=np.float32)
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i:i + batch_size], tf.float32)
        yb = tf.constant(y[i:i + batch_size], tf.float32)
        out[i:i + batch_size] = attack(xb, yb, tf.constant(eps, tf.float32),
                                       tf.constant(steps), tf.constant(alpha, tf.float32)).numpy()
    return out


def gaussian(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, sigma, x.shape).astype(np.float32), 0.0, 1.0)


def salt_pepper(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """``amount`` of the pixels replaced, half by 0 (pepper) and half by 1 (salt)."""
    out = x.copy()
    u = rng.random(x.shape)
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Stretch about each image's mean intensity, clipped to [0, 1]."""
    mean = x.reshape(len(x), -1).mean(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.clip((x - mean) * factor + mean, 0.0, 1.0).astype(np.float32)


def perturb224(p: Perturbation, x: np.ndarray, *, labels: np.ndarray | None = None,
               attack: Any = None, rng: np.random.Generator) -> np.ndarray:
    """Apply ``p`` to (n, 224, 224) inputs in [0, 1]; returns unquantised (n, 224, 224)."""
    if p.needs_victim:
        if attack is None or labels is None:
            raise ValueError(f"{p.name} needs the victim's compiled attack and labels")
        return gradient_attack(attack, x, labels, p.method, p.param)
    if p.method == "gaussian":
        return gaussian(x, p.param, rng)
    if p.method == "saltpepper":
        return salt_pepper(x, p.param, rng)
    if p.method == "contrast":
        return contrast(x, p.param)
    raise ValueError(f"unknown perturbation method {p.method!r}: use one of {METHODS}")


def quantise(x: np.ndarray, levels: int) -> np.ndarray:
    """Clip to [0, 1] and round to the grid k / levels (the source's stored values)."""
    return (np.round(np.clip(x, 0.0, 1.0) * levels) / levels).astype(np.float32)


def lift_bit_depth(x8: np.ndarray, levels: int, seed: int) -> np.ndarray:
    """8-bit images (k/255) as a modality storing ``levels`` + 1 grey levels would have recorded
    them: each value drawn uniformly within its 8-bit rounding cell (the detail that rounding
    to 8 bits removed), then rounded to k / ``levels``.

    Why: clinical CR/DX is stored at 10-16 bits, where an attack's change is many levels, not
    the one or two 8-bit levels every other measurement here rounds to; and an 8-bit image
    merely rescaled to 12 bits would keep every 16th level only, which no modality stores.
    Seeded (per call), so every evaluation lifts the same sample alike."""
    rng = np.random.default_rng([seed, 61])
    x = np.asarray(x8, np.float64)
    return quantise(x + rng.uniform(-0.5, 0.5, x.shape) / 255.0, levels)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel-centred bilinear interpolation (align_corners=False)."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), lo] += 1.0 - w
    m[np.arange(n_out), hi] += w
    return m


UPSAMPLING = ("exact", "bilinear", "nearest")
DEFAULT_UPSAMPLING = "exact"


def _area_matrix(n_native: int, n_in: int) -> np.ndarray:
    """(n_in, n_native) weights of the runtime's exact area resize along one axis.

    Bin j covers native interval [j * n / out, (j + 1) * n / out); each native pixel [i, i+1)
    contributes its overlap with the bin, scaled so that a row sums to 1
    (detector.preprocess._area_rows_t computes the same map without building the matrix).
    """
    edges = np.arange(n_in + 1, dtype=np.float64) * (n_native / n_in)
    px = np.arange(n_native, dtype=np.float64)
    overlap = (np.minimum(px[None, :] + 1, edges[1:, None])
               - np.maximum(px[None, :], edges[:-1, None]))
    return np.clip(overlap, 0.0, None) * (n_in / n_native)


@functools.lru_cache(maxsize=16)
def _area_right_inverse(n_native: int, n_in: int) -> np.ndarray:
    """(n_native, n_in) Moore-Penrose inverse of the area resize along one axis (read-only)."""
    inv = np.linalg.pinv(_area_matrix(n_native, n_in))
    inv.setflags(write=False)
    return inv


def upsample_delta(delta224: np.ndarray, shape: tuple[int, int],
                   method: str = DEFAULT_UPSAMPLING) -> np.ndarray:
    """Map a (224, 224) delta onto a (rows, cols) native matrix.

    "exact" (the default) is the minimum-norm native delta whose area average is the crafted
    delta: read back through the runtime's resize, the victim and the detector see exactly the
    image the attack made (to rounding). The L-inf bound holds where the threat model puts it,
    at the victim's 224x224 input; on the native grid single pixels move by up to about 2.5 eps
    at 512x512 and 1.3 eps at 2000x2000, because no delta inside the native eps ball averages
    to an arbitrary sign pattern when bins share boundary pixels.
    "bilinear" is smooth but, read back, keeps only about half of a high-frequency delta
    (weakening the attack on the victim too); "nearest" copies each value onto its block of
    native pixels and stays inside the native eps ball (close to the best that can).
    """
    if delta224.shape == tuple(shape):
        return delta224.astype(np.float32)
    if method == "exact":
        rows = _area_right_inverse(int(shape[0]), delta224.shape[0])
        cols = _area_right_inverse(int(shape[1]), delta224.shape[1])
        return (rows @ delta224.astype(np.float64) @ cols.T).astype(np.float32)
    if method == "nearest":
        r = np.minimum(((np.arange(shape[0]) + 0.5) * delta224.shape[0] / shape[0]).astype(int),
                       delta224.shape[0] - 1)
        c = np.minimum(((np.arange(shape[1]) + 0.5) * delta224.shape[1] / shape[1]).astype(int),
                       delta224.shape[1] - 1)
        return delta224[np.ix_(r, c)].astype(np.float32)
    if method != "bilinear":
        raise ValueError(f"unknown upsampling {method!r}: use one of {UPSAMPLING}")
    mr = _bilinear_matrix(delta224.shape[0], shape[0])
    mc = _bilinear_matrix(delta224.shape[1], shape[1])
    return (mr @ delta224.astype(np.float64) @ mc.T).astype(np.float32)


def to_native(native: np.ndarray, delta224: np.ndarray, levels: int,
              upsample: str = DEFAULT_UPSAMPLING) -> np.ndarray:
    """The single mapping from a 224x224 delta to stored pixel values on the native grid.

    ``native`` is (rows, cols) or a batch (n, 224, 224) of 224x224 natives; returns the
    perturbed native image(s) in [0, 1], exactly on the grid k / levels.
    """
    if native.ndim == 3:
        if native.shape[1:] != delta224.shape[1:]:
            raise ValueError("batched to_native needs natives of the delta's own size")
        return quantise(native + delta224, levels)
    return quantise(native + upsample_delta(delta224, native.shape, upsample), levels)


# --------------------------------------------------------------------------- native attacks
# Issue 15: attacks the way an attacker makes them. The image is perturbed at its NATIVE matrix
# (what is stored), the gradient flows through the victim's own preprocessing (its resize to its
# input size, part of the victim callable), and the result is quantised to the storage grid.
# A victim here is any callable from a (n, rows, cols, 1) float tensor in [0, 1] to logits:
# (n,) or (n, 1) for a binary classifier (the pneumonia logit), (n, K) for K classes. Labels
# are the class the attack moves away from (untargeted), usually the victim's own prediction.

NATIVE_ATTACKS = ("pgd", "fgsm", "mi_fgsm", "di_fgsm", "pgd_l2")
MI_STEPS = 10  # MI-FGSM and DI-FGSM: 10 iterations of eps/10 (Dong et al. 2018, Xie et al. 2019)
L2_STEPS = 40


@dataclass(frozen=True)
class NativeAttack:
    """One attacker setting. ``eps`` is L-inf in [0, 1] units; for ``pgd_l2`` the L2 budget is
    ``eps * sqrt(rows * cols)``, the energy of an L-inf pattern that moves every pixel by eps."""

    method: str
    eps: float
    steps: int | None = None
    random_start: bool = True  # PGD L-inf only (Madry et al.)
    momentum: float = 1.0  # MI-FGSM and DI-FGSM (decay factor mu)
    diversity_prob: float = 0.5  # DI-FGSM: chance of the random resize-and-pad per step
    diversity_scale: float = 1.1  # DI-FGSM: largest resize factor (and the padded size)

    def __post_init__(self) -> None:
        if self.method not in NATIVE_ATTACKS:
            raise ValueError(f"unknown attack {self.method!r}: use one of {NATIVE_ATTACKS}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps {self.eps} must lie in (0, 1) (units of the full range)")

    @property
    def n_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return {"pgd": PGD_STEPS, "fgsm": 1, "mi_fgsm": MI_STEPS, "di_fgsm": MI_STEPS,
                "pgd_l2": L2_STEPS}[self.method]

    @property
    def name(self) -> str:
        return f"{self.method}_{self.eps:g}"


def attack_loss(logits: Any, labels: Any) -> Any:
    """Per-image loss the untargeted attack ascends: cross-entropy of ``labels``."""
    import tensorflow as tf

    if len(logits.shape) == 2 and logits.shape[-1] not in (None, 1):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits)
    z = tf.reshape(logits, [-1])
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=z)


def victim_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How sure the victim is of ``labels`` (positive = still that class, negative = fooled):
    the signed binary logit, or the label's logit minus the best other one."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(int)
    if logits.ndim == 2 and logits.shape[1] > 1:
        own = logits[np.arange(len(labels)), labels]
        other = np.where(np.arange(logits.shape[1])[None] == labels[:, None], -np.inf, logits)
        return own - other.max(axis=1)
    z = logits.reshape(-1)
    return np.where(labels == 1, z, -z)


def predicted_class(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim == 2 and logits.shape[1] > 1:
        return logits.argmax(axis=1)
    return (logits.reshape(-1) > 0).astype(np.int64)


def _input_diversity(x: Any, prob: float, scale: float, rng: Any) -> Any:
    """DI (Xie et al. 2019) at the native matrix: with probability ``prob`` resize to a random
    size in [rows, scale * rows) (nearest, as the paper) and pad at random to scale * rows;
    the victim then reads the result through its own preprocessing."""
    import tensorflow as tf

    if float(rng.uniform()) >= prob:
        return x
    rows, cols = int(x.shape[1]), int(x.shape[2])
    out_r, out_c = int(rows * scale), int(cols * scale)
    k = float(rng.uniform(1.0, scale))
    rr, cc = min(out_r, max(rows, int(rows * k))), min(out_c, max(cols, int(cols * k)))
    y = tf.image.resize(x, (rr, cc), method="nearest")
    top, left = int(rng.integers(0, out_r - rr + 1)), int(rng.integers(0, out_c - cc + 1))
    return tf.pad(y, [[0, 0], [top, out_r - rr - top], [left, out_c - cc - left], [0, 0]])


_COMPILED: dict[int, tuple[Any, Any]] = {}


def _compiled_gradient(victim: Any) -> Any:
    """d loss / d input of ``victim`` as one traced graph (kept per victim object)."""
    import tensorflow as tf

    hit = _COMPILED.get(id(victim))
    if hit is not None and hit[0] is victim:
        return hit[1]

    @tf.function(reduce_retracing=True)
    def grad(adv: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = tf.reduce_sum(attack_loss(victim(adv), y))
        return tape.gradient(loss, adv)

    if len(_COMPILED) > 32:
        _COMPILED.clear()
    _COMPILED[id(victim)] = (victim, grad)
    return grad


def native_attack(victim: Any, x: np.ndarray, labels: np.ndarray, attack: NativeAttack, *,
                  levels: int, seed: int = 0, batch_size: int = 8) -> np.ndarray:
    """Attack (n, rows, cols) native images in [0, 1]; returns the stored result on k / levels.

    Every iterate stays in [0, 1] and (L-inf attacks) in the eps-ball around ``x``; the last
    one is rounded to the storage grid, so the change in stored values is at most
    ``round(eps * levels)`` levels. The victim reads the native tensor through its own
    preprocessing (its first layer, or the wrapper of ``site_victim``).
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"native_attack expects (n, rows, cols) images, got shape {x.shape}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for i in range(0, len(x), batch_size):
        out[i:i + batch_size] = _attack_batch(victim, x[i:i + batch_size],
                                              labels[i:i + batch_size], attack, rng)
    return quantise(out, levels)


def _attack_batch(victim: Any, x: np.ndarray, labels: np.ndarray, a: NativeAttack,
                  rng: np.random.Generator) -> np.ndarray:
    import tensorflow as tf

    x0 = tf.constant(x[..., None])
    y = tf.constant(labels)
    eps = float(a.eps)
    steps = a.n_steps
    axes = [1, 2, 3]

    plain = _compiled_gradient(victim)

    def grad_of(adv: Any) -> Any:
        if a.method != "di_fgsm":
            return plain(adv, y)
        with tf.GradientTape() as tape:
            tape.watch(adv)
            # the diversity transform is inside the tape: the gradient flows back through it
            seen = _input_diversity(adv, a.diversity_prob, a.diversity_scale, rng)
            loss = tf.reduce_sum(attack_loss(victim(seen), y))
        return tape.gradient(loss, adv)

    if a.method == "pgd_l2":
        budget = eps * float(np.sqrt(x.shape[1] * x.shape[2]))
        alpha = 2.5 * budget / steps
        adv = tf.identity(x0)
        for _ in range(steps):
            g = grad_of(adv)
            g = g / (tf.sqrt(tf.reduce_sum(g * g, axis=axes, keepdims=True)) + 1e-12)
            adv = adv + alpha * g
            d = adv - x0
            norm = tf.sqrt(tf.reduce_sum(d * d, axis=axes, keepdims=True))
            d = d * tf.minimum(1.0, budget / (norm + 1e-12))
            adv = tf.clip_by_value(x0 + d, 0.0, 1.0)
        return adv.numpy()[..., 0]

    if a.method == "fgsm":
        alpha, start = eps, x0
    elif a.method == "pgd":
        alpha = eps / 10.0
        start = x0
        if a.random_start:
            noise = rng.uniform(-eps, eps, x0.shape).astype(np.float32)
            start = tf.clip_by_value(x0 + noise, 0.0, 1.0)
    else:  # mi_fgsm, di_fgsm: eps / steps per step, momentum on L1-normalised gradients
        alpha, start = eps / steps, x0
    adv = tf.identity(start)
    velocity = tf.zeros_like(x0)
    for _ in range(steps):
        g = grad_of(adv)
        if a.method in ("mi_fgsm", "di_fgsm") and a.momentum > 0:
            g = g / (tf.reduce_mean(tf.abs(g), axis=axes, keepdims=True) + 1e-12)
            velocity = a.momentum * velocity + g
            g = velocity
        adv = adv + alpha * tf.sign(g)
        adv = tf.clip_by_value(adv, x0 - eps, x0 + eps)
        adv = tf.clip_by_value(adv, 0.0, 1.0)
    return adv.numpy()[..., 0]
