"""The detector CNN's initial weights and training follow the run's seed, not whatever used
Keras's random state before in the process (a trained or a cached victim): the same recipe,
secret and data train the same CNN."""

from __future__ import annotations

import numpy as np


def _weights(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([w.ravel() for w in model.get_weights()])


def test_same_seed_same_cnn_whatever_ran_before() -> None:
    import keras

    from train import detector_cnn

    rng = np.random.default_rng(0)
    x = rng.random((16, 224, 224), dtype=np.float32)
    y = np.r_[np.zeros(8), np.ones(8)]
    x[8:] += rng.choice([-0.006, 0.006], (8, 224, 224)).astype(np.float32)
    trained, built = [], []
    for other_work in (1, 3):
        keras.utils.set_random_seed(other_work)  # e.g. the victim trained in this process
        keras.random.normal((other_work,))
        model = detector_cnn.build_seeded("shipped", {"width": 8}, 7)
        built.append(_weights(model))
        cfg = detector_cnn.CnnTrainConfig(epochs=1, seed=7)
        trained.append(_weights(detector_cnn.train_binary(model, x, y, x[:8], y[:8], cfg,
                                                          verbose=False)))
    assert np.array_equal(built[0], built[1])
    assert np.allclose(trained[0], trained[1], atol=1e-6)
    assert not np.array_equal(built[0], _weights(detector_cnn.build_seeded(
        "shipped", {"width": 8}, 8)))  # another seed, another CNN
