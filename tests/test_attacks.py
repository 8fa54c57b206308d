"""Attacks: PGD/FGSM raise the loss within eps and fool a model; the native mapping quantises
to the source grid. TensorFlow tests share one small model per module to stay fast."""

from __future__ import annotations

import numpy as np
import pytest

from train import attacks


def test_quantise_and_identity_mapping_on_224() -> None:
    rng = np.random.default_rng(0)
    native = np.round(rng.random((3, 224, 224)) * 255).astype(np.float32) / 255
    delta = rng.uniform(-0.003, 0.003, native.shape).astype(np.float32)
    out = attacks.to_native(native, delta, 255)
    k = out * 255
    assert np.allclose(k, np.round(k), atol=1e-4)  # on the 8-bit grid
    assert out.min() >= 0 and out.max() <= 1
    # within eps plus half a grey level of rounding, and mostly +-1 level or 0 at eps 0.003
    assert np.abs(out - native).max() <= 0.003 + 0.5 / 255 + 1e-6
    assert set(np.unique(np.round((out - native) * 255))) <= {-1.0, 0.0, 1.0}


def test_upsampled_mapping_onto_larger_dicom_grid() -> None:
    rng = np.random.default_rng(1)
    levels = 2**10 - 1
    native = np.round(rng.random((512, 400)) * levels).astype(np.float32) / levels
    delta = np.full((224, 224), 0.006, np.float32)
    out = attacks.to_native(native, delta, levels)
    assert out.shape == native.shape
    k = out * levels
    assert np.allclose(k, np.round(k), atol=1e-3)
    inner = (native > 0.01) & (native < 0.99)
    d = (out - native)[inner]
    assert np.all(np.abs(d - 0.006) <= 0.5 / levels + 1e-6)
    # bilinear: a smooth delta is reproduced, not blocky
    up = attacks.upsample_delta(np.linspace(0, 1, 224, dtype=np.float32)[None].repeat(224, 0),
                                (300, 500))
    assert np.all(np.diff(up, axis=1) >= -1e-6)


def test_noise_perturbations_follow_their_settings() -> None:
    rng = np.random.default_rng(2)
    x = np.full((2, 224, 224), 0.5, np.float32)
    g = attacks.gaussian(x, 0.008, rng)
    assert abs(float(np.std(g - x)) - 0.008) < 0.0005
    sp = attacks.salt_pepper(x, 0.008, rng)
    changed = np.mean(sp != x)
    assert 0.006 < changed < 0.010
    assert set(np.unique(sp[sp != x])) <= {0.0, 1.0}
    img = rng.random((1, 224, 224)).astype(np.float32) * 0.5 + 0.25
    c = attacks.contrast(img, 1.1)
    assert np.isclose(c.std(), img.std() * 1.1, rtol=1e-3)
    with pytest.raises(ValueError, match="victim"):
        attacks.perturb224(attacks.BY_NAME["pgd_0.003"], img, rng=rng)


@pytest.fixture(scope="module")
def linear_victim():  # type: ignore[no-untyped-def]
    """A fixed linear 'classifier' (logit = 40 * mean(pattern * (x - 0.5))) with labels equal to
    its own clean predictions: accuracy 1.0 before the attack by construction."""
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(3)
    inp = keras.Input((224, 224, 1))
    out = keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Rescaling(1.0, -0.5)(inp)))
    model = keras.Model(inp, out)
    pattern = rng.choice([-1.0, 1.0], size=(224 * 224, 1)).astype(np.float32)
    model.layers[-1].set_weights([pattern * 40.0 / (224 * 224), np.zeros(1, np.float32)])
    x = rng.uniform(0.2, 0.8, (6, 224, 224)).astype(np.float32)
    x = np.round(x * 255) / 255
    logits = np.asarray(model(x[..., None])).reshape(-1)
    return model, x, (logits > 0).astype(np.float32)


def _loss(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    z = np.asarray(model(x[..., None])).reshape(-1)
    return np.log1p(np.exp(-z)) * y + np.log1p(np.exp(z)) * (1 - y)


def test_pgd_raises_loss_within_eps_and_fools(linear_victim) -> None:  # type: ignore[no-untyped-def]
    model, x, y = linear_victim
    fn = attacks.make_gradient_attack(model)
    for method, eps in [("pgd", 0.006), ("fgsm", 0.006), ("pgd", 0.003)]:
        adv = attacks.gradient_attack(fn, x, y, method, eps)
        assert np.abs(adv - x).max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert np.all(_loss(model, adv, y) > _loss(model, x, y))
        stored = attacks.to_native(x, adv - x, 255)
        assert np.abs(stored - x).max() <= eps + 0.5 / 255 + 1e-6
        acc = np.mean((np.asarray(model(stored[..., None])).reshape(-1) > 0) == (y == 1))
        assert acc == 0.0, f"{method} {eps}: stored attacked images still classified right"


def test_pgd_on_victim_architecture_raises_loss(linear_victim) -> None:  # type: ignore[no-untyped-def]
    from train.victim import build_victim

    _, x, _ = linear_victim
    model = build_victim()  # random weights: the gradient path is what is under test
    z = np.asarray(model(x[..., None], training=False)).reshape(-1)
    y = (z > 0).astype(np.float32)  # its own prediction as the label, as for unlabelled data
    adv = attacks.gradient_attack(attacks.make_gradient_attack(model), x, y, "pgd", 0.006)
    assert np.abs(adv - x).max() <= 0.006 + 1e-6
    assert np.all(_loss(model, adv, y) > _loss(model, x, y))


def test_upsamplings_compared_through_the_area_resize() -> None:
    from detector.preprocess import resize_to_input

    rng = np.random.default_rng(5)
    delta = rng.choice([-0.006, 0.006], size=(224, 224)).astype(np.float32)
    kept = {}
    for method in attacks.UPSAMPLING:
        up = attacks.upsample_delta(delta, (700, 700), method)
        if method != "exact":
            assert np.abs(up).max() <= 0.006 + 1e-7  # still inside the native eps ball
        back = resize_to_input(up[None] + 0.5)[0] - 0.5
        kept[method] = float(np.mean(back * delta) / 0.006**2)
    assert kept["exact"] == pytest.approx(1.0, abs=1e-4)
    assert kept["nearest"] > kept["bilinear"] + 0.1
    with pytest.raises(ValueError, match="upsampling"):
        attacks.upsample_delta(delta, (300, 300), "cubic")


@pytest.mark.parametrize("shape", [(512, 512), (1955, 1841), (300, 230), (180, 200)])
def test_exact_mapping_reads_back_as_the_crafted_delta(shape: tuple[int, int]) -> None:
    """The default mapping: the runtime's area resize of the native delta is the 224 delta
    (for sources smaller than 224 too, where it is the least-squares best)."""
    from detector.preprocess import resize_to_input

    rng = np.random.default_rng(6)
    delta = rng.choice([-0.006, 0.006], size=(224, 224)).astype(np.float32)
    up = attacks.upsample_delta(delta, shape)
    assert up.shape == shape
    back = resize_to_input(up[None].astype(np.float64) + 0.5)[0] - 0.5
    if min(shape) >= 224:
        assert np.abs(back - delta).max() < 1e-6
    else:  # fewer native pixels than 224: the read-back is as close as any native delta gets
        assert np.mean(back * delta) > 0.3 * 0.006**2


def test_exact_mapping_onto_an_8_bit_native_grid_keeps_the_attack() -> None:
    """Rounded to 8 bits at 512x512 (NIH's grid) the read-back still carries the delta."""
    from detector.preprocess import resize_to_input

    rng = np.random.default_rng(7)
    native = np.round((0.3 + 0.4 * rng.random((512, 512))) * 255).astype(np.float32) / 255
    delta = rng.choice([-0.006, 0.006], size=(224, 224)).astype(np.float32)
    clean = resize_to_input(native[None])[0]
    for method, floor in (("exact", 0.9), ("bilinear", 0.0)):
        out = attacks.to_native(native, delta, 255, method)
        got = resize_to_input(out[None])[0] - clean
        kept = float(np.mean(got * delta) / 0.006**2)
        assert kept > floor, (method, kept)
    assert kept < 0.7  # bilinear loses much of it (why "exact" is the default)
