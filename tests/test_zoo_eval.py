"""The victim-zoo evaluation's sources and attack cache (issue 15): the 12-bit source.

Clinical CR/DX is stored at 10-16 bits. The evaluation's ``nih512-12bit`` source is the NIH
sample as a 12-bit modality would store it, attacked and cached at 12 bits, so a bundle is
judged on attacks that change many levels instead of one or two 8-bit ones. No data: synthetic
8-bit images and a tiny victim with a zoo resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train import attacks, zoo_eval


def eight_bit(n: int = 3, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = 0.5 + 0.3 * np.sin(5 * xx)[None] * np.cos(3 * yy)[None] + 0.03 * rng.standard_normal(
        (n, size, size))
    return (np.round(np.clip(x, 0, 1) * 255) / 255).astype(np.float32)


def test_lifted_images_stay_in_their_8bit_cell_on_the_12bit_grid() -> None:
    x8 = eight_bit()
    x12 = attacks.lift_bit_depth(x8, 4095, seed=0)
    assert x12.shape == x8.shape and x12.dtype == np.float32
    k = x12.astype(np.float64) * 4095
    assert np.allclose(k, np.round(k), atol=1e-3)  # on the 12-bit grid
    # within the 8-bit rounding cell (half an 8-bit level, plus half a 12-bit level of rounding)
    assert np.abs(x12.astype(np.float64) - x8).max() <= (0.5 / 255 + 0.5 / 4095) + 1e-6
    # a 12-bit image, not an 8-bit one rescaled: it uses levels between the 8-bit ones
    assert len(np.unique(np.round(k).astype(int) % 16)) == 16
    # rounded back to 8 bits it is the image it came from (but where the 12-bit rounding of a
    # value at the cell's edge crossed it)
    assert np.mean(np.round(x12 * 255.0) == np.round(x8 * 255.0)) > 0.95


def test_lifting_is_seeded() -> None:
    x8 = eight_bit()
    a, b = attacks.lift_bit_depth(x8, 4095, 0), attacks.lift_bit_depth(x8, 4095, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, attacks.lift_bit_depth(x8, 4095, 1))


def test_the_12bit_source_is_opt_in_and_named_in_the_choices() -> None:
    assert "nih512-12bit" in zoo_eval.SOURCES
    assert "nih512-12bit" not in zoo_eval.DEFAULT_SOURCES


def test_a_12bit_cell_is_attacked_and_cached_at_12_bits(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from train import zoo

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 1))
    h = zoo.pipeline_layer(zoo.Pipeline(32, "bilinear", False))(inp)
    h = keras.layers.Reshape((32, 32, 1))(h)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    victim = keras.Model(inp, keras.layers.Dense(1)(h))

    x12 = attacks.lift_bit_depth(eight_bit(), 4095, seed=0)
    src = zoo_eval.Source("nih512-12bit", x12, ("a", "b", "c"), 0, 4095)
    meta = {"family": "tiny", "pipeline_tag": "32-bilinear"}
    eps = 0.006
    first = zoo_eval.attacked_images(victim, meta, src, "pgd", eps, tmp_path, 0, 3)
    [cache] = list((tmp_path / "advs").glob("*.npz"))
    assert "nih512-12bit" in cache.name
    with np.load(cache) as z:
        assert z["adv"].dtype == np.uint16
    change = np.abs(np.round(first.adv.astype(np.float64) * 4095) - np.round(x12 * 4095.0))
    # the attack moves values by many 12-bit levels, never beyond round(eps * 4095)
    assert change.max() <= round(eps * 4095) and change.max() >= 10
    k = first.adv.astype(np.float64) * 4095
    assert np.allclose(k, np.round(k), atol=1e-3)
    again = zoo_eval.attacked_images(None, meta, src, "pgd", eps, tmp_path, 0, 3)  # cached
    assert np.array_equal(again.adv, first.adv)
    assert np.array_equal(again.fooled, first.fooled)


def test_upsampled_source_is_a_larger_matrix_of_the_same_content_on_its_grid() -> None:
    """``nih1536-12bit``: the 12-bit sample at a CR-sized matrix. Its stored values stay on the
    12-bit grid, and read back at the small size (area) it is the image it came from, so only
    the matrix an attack is made at changes, not what the detector's 224 view holds."""
    small = zoo_eval.Source("s", attacks.lift_bit_depth(eight_bit(2, 40), 4095, 0), ("a", "b"),
                            levels=4095)
    big = zoo_eval.upsampled(small, "big", 120)
    assert big.x.shape == (2, 120, 120) and big.name == "big" and big.ids == ("a", "b")
    assert big.levels == 4095 and np.allclose(big.x * 4095, np.round(big.x * 4095), atol=1e-3)
    back = big.x.reshape(2, 40, 3, 40, 3).mean(axis=(2, 4))
    assert np.abs(back - small.x).mean() < 0.01
    assert zoo_eval.SOURCE_LEVELS["nih1536-12bit"] == 4095
    assert zoo_eval.UPSAMPLED["nih1536-12bit"] == ("nih512-12bit", 1536)
