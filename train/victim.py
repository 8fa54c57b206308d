"""The victim: a small diagnostic CNN (normal vs pneumonia) that an attacker wants to fool.

It is deliberately small and strided (about 25 MFLOP a forward pass) because PGD runs 40
gradient steps through it for thousands of images on a 2-core CPU. It outputs a logit (not a
probability) so the attack's loss is numerically clean. The architecture lives here and the
weights travel in the bundle as ``victim.weights.h5`` (HDF5 arrays, no pickle), so
``sentinel attack`` can craft PGD from the shipped bundle alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VICTIM_FILE = "victim.weights.h5"


@dataclass(frozen=True)
class VictimConfig:
    """Training settings: small on purpose (see module docstring)."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0


def build_victim() -> Any:
    """Keras model: (n, 224, 224, 1) in [0, 1] -> (n, 1) logit of pneumonia."""
    import keras
    from keras import layers

    inp = keras.Input((224, 224, 1), name="image")
    x = layers.Rescaling(4.0, offset=-2.0)(inp)
    for filters in (16, 32, 48, 64):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    out = layers.Dense(1, name="logit")(x)
    return keras.Model(inp, out, name="victim")


def train_victim(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    config: VictimConfig = VictimConfig(), verbose: int = 2,
) -> Any:
    """Fit on the training split (class-weighted: Kermany is ~73% pneumonia); keep best val AUC."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    model = build_victim()
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc"),
                 keras.metrics.BinaryAccuracy(threshold=0.0, name="acc")],
    )
    pos = float(np.mean(y_train))
    class_weight = {0: 0.5 / max(1e-6, 1 - pos), 1: 0.5 / max(1e-6, pos)}
    # light augmentation (flips, small shifts) keeps a small model from memorising
    ds = (
        tf.data.Dataset.from_tensor_slices((x_train[..., None], y_train.astype(np.float32)))
        .shuffle(len(x_train), seed=config.seed)
        .batch(config.batch_size)
        .map(lambda a, b: (tf.image.random_flip_left_right(a, seed=config.seed), b))
        .prefetch(2)
    )
    best_auc, best_weights = -1.0, None
    for epoch in range(config.epochs):
        model.fit(ds, epochs=1, class_weight=class_weight, verbose=0)
        _, auc, acc = model.evaluate(x_val[..., None], y_val.astype(np.float32),
                                     batch_size=128, verbose=0)
        if verbose:
            print(f"victim epoch {epoch + 1}/{config.epochs}: val auc {auc:.4f} acc {acc:.4f}",
                  flush=True)
        if auc > best_auc:
            best_auc, best_weights = auc, model.get_weights()
    if best_weights is not None:
        model.set_weights(best_weights)
    return model


def save_victim(model: Any, path: Path) -> None:
    model.save_weights(str(path))


def load_victim(path: Path) -> Any:
    """Rebuild the architecture and load weights (HDF5 arrays only, nothing executable)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"victim weights {path} not found: train a bundle with `sentinel train` "
            f"(it carries {VICTIM_FILE}) or pass --bundle pointing at one"
        )
    model = build_victim()
    model.load_weights(str(path))
    return model


def predict_logits(model: Any, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits for (n, 224, 224) inputs, batched, inference mode."""
    out = [
        np.asarray(model(x[i:i + batch_size, ..., None], training=False)).reshape(-1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.empty(0, np.float32)
