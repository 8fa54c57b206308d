"""train.tf_features equals detector.features (the runtime's numpy features) and differentiates.

Synthetic 224x224 images that look like what the detector sees: smooth "anatomy" on the 8-bit
grid, the same with a +-1 grey-level perturbation, a noisy one and a constant one.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from detector import features  # noqa: E402
from train import tf_features  # noqa: E402


def _images() -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    smooth = 0.45 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy) + 0.1 * xx
    q = np.round(smooth * 255) / 255
    pert = np.clip(np.round((q + rng.choice([-1, 0, 1], q.shape) / 255) * 255) / 255, 0, 1)
    noisy = np.clip(q + rng.normal(0, 0.02, q.shape), 0, 1)
    const = np.full((224, 224), 0.3)
    dark = np.clip(np.round((0.02 + 0.01 * rng.random((224, 224))) * 255) / 255, 0, 1)
    return np.stack([q, pert, noisy, const, dark]).astype(np.float32)


def test_forward_equals_numpy_features() -> None:
    x = _images()
    want = features.extract_batch(x)
    got = tf_features.features_tf(tf.constant(x)).numpy().astype(np.float64)
    assert got.shape == want.shape == (len(x), len(features.FEATURE_NAMES))
    assert np.all(np.isfinite(got))
    for j, name in enumerate(features.FEATURE_NAMES):
        if name == "hf_power_share":
            continue  # below: the runtime's float32 DC cancellation, not ours
        np.testing.assert_allclose(got[:, j], want[:, j], rtol=1e-4, atol=1e-6,
                                   err_msg=f"feature {name}")
    # hf_power_share = HF power / (total - DC): in float32 the subtraction loses ~3e-4
    # relative on noisy images; ours (float64) equals a float64 numpy reference to 1e-9 and
    # the runtime's value to 5e-4
    j = features.FEATURE_NAMES.index("hf_power_share")
    np.testing.assert_allclose(got[:, j], want[:, j], rtol=5e-4, atol=1e-6)
    p = np.abs(np.fft.fft2(x.astype(np.float64))) ** 2
    fy = np.abs(np.fft.fftfreq(224))[:, None]
    hf = np.sqrt(fy**2 + fy.T**2) > 0.25
    ac = p.sum(axis=(1, 2)) - p[:, 0, 0]
    ref = np.where(ac > 0, (p * hf).sum(axis=(1, 2)) / np.where(ac > 0, ac, 1), 0.0)
    np.testing.assert_allclose(got[:, j], ref, rtol=1e-9, atol=1e-12)


def test_gradients_are_finite_and_point_the_right_way() -> None:
    x = tf.Variable(_images()[:3])
    with tf.GradientTape() as tape:
        f = tf_features.features_tf(x)
        # noise_sigma (5) and near_zero_diff_frac (8) of the smooth image
        target = f[0, 5] - f[0, 8]
    g = tape.gradient(target, x).numpy()
    assert np.all(np.isfinite(g))
    assert np.abs(g[0]).sum() > 0
    # a small step along the gradient raises the target as the numpy features measure it
    step = np.sign(g[0]) * 0.3 / 255
    before = features.extract(x.numpy()[0])
    after = features.extract(np.clip(x.numpy()[0] + step, 0, 1).astype(np.float32))
    assert (after[5] - after[8]) > (before[5] - before[8])


def test_quantise_ste_rounds_forward_and_passes_gradient() -> None:
    x = tf.Variable(np.array([[0.1004, 0.5, 0.9990]], np.float32))
    with tf.GradientTape() as tape:
        q = tf_features.quantise_ste(x, 255)
        s = tf.reduce_sum(q * tf.constant([[1.0, 2.0, 3.0]]))
    k = q.numpy() * 255
    assert np.allclose(k, np.round(k), atol=1e-4)
    np.testing.assert_allclose(tape.gradient(s, x).numpy(), [[1.0, 2.0, 3.0]])


def test_candidates_equal_the_numpy_candidates_and_differentiate() -> None:
    from train import ablation

    x = _images()
    want = ablation.candidate_batch(x)
    xt = tf.Variable(x)
    with tf.GradientTape() as tape:
        got = tf_features.candidates_tf(xt)
        target = tf.reduce_sum(got[:, 3])  # spam_opp
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    g = tape.gradient(target, xt).numpy()
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_v3_grid_peaks_equal_the_runtime_and_descend() -> None:
    """The TF twin of stride_grid_peaks (feature set v3) equals the runtime's value, and a
    sign step against its gradient lowers the runtime's value: what an attacker who holds the
    feature uses."""
    yy, xx = np.mgrid[0:224, 0:224]
    tile = np.random.default_rng(8).choice([-1.0, 1.0], (8, 8))
    base = _images()
    stride = np.clip(base[0] + 0.004 * tile[yy % 8, xx % 8], 0, 1).astype(np.float32)
    x = np.concatenate([base, stride[None]])
    want = features.extract_batch(x, features.FEATURE_SET_V3)
    got = tf_features.features_set_tf(tf.constant(x), features.FEATURE_SET_V3).numpy()
    assert got.shape == want.shape == (len(x), 12)
    # the runtime's float32 FFT: ~3e-5 on the smooth image, against a clean spread of ~0.1
    np.testing.assert_allclose(got[:, -1], want[:, -1], rtol=1e-4, atol=1e-4)
    assert want[-1, -1] > 1.0  # the periodic pattern stands out
    v = tf.Variable(x[-1:])
    with tf.GradientTape() as tape:
        g_val = tf_features.grid_peaks_tf(v)[0]
    g = tape.gradient(g_val, v).numpy()[0]
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    lowered = np.clip(x[-1] - np.sign(g) * 0.002, 0, 1).astype(np.float32)
    assert features.extract(lowered, features.FEATURE_SET_V3)[-1] < want[-1, -1]
    with pytest.raises(ValueError, match="no differentiable twin"):
        tf_features.features_set_tf(tf.constant(x), features.FEATURE_SET_V2)
