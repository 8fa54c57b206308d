"""Small, valid model bundles for tests and benchmarks (fixture models, no real data).

Tests must not depend on the trained default bundle (it arrives with the training issue and
changes when retrained), so they score with a bundle built here in a few seconds:

* a tiny Keras CNN (5x5 stride-2 conv started as a high-pass, one more strided conv, global
  pooling, sigmoid), trained for a few steps on synthetic smooth images against the same
  images plus +-1 grey-level noise, converted to TFLite by TensorFlow;
* a Random Forest fitted by scikit-learn on the real feature vector of those synthetic
  images.

Neither model means anything clinically; they exist so that every code path (LiteRT,
forest arrays, stacking, manifest verification) runs on genuine artefacts. TensorFlow and
scikit-learn are imported inside the functions, only by tests and benchmarks.

``build_benchmark_forest`` fits the 200-tree full-depth forest on ~5000 synthetic samples
used to hold the forest to its 0.2 ms budget.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detector.bundle import write_bundle  # noqa: E402
from detector.features import FEATURE_NAMES, extract_batch  # noqa: E402
from detector.forest import ForestArrays  # noqa: E402

SIZE = 224


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n smooth random images (label 0) and, interleaved, copies with +-1/255 noise (label 1).

    Smooth = sums of a few low-frequency cosines plus a gradient, quantised to 8 bits like
    the real sources; the "perturbed" copy adds a random sign pattern of one grey level,
    the size of an eps = 0.003 PGD step on an 8-bit image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    imgs = np.empty((n, SIZE, SIZE), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        img = 0.5 + 0.2 * (xx - 0.5) * rng.normal() + 0.2 * (yy - 0.5) * rng.normal()
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 4.0, size=2)
            img += (
                0.08
                * rng.normal()
                * np.cos(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0.0, 6.3))
            )
        img = np.round(np.clip(img, 0.0, 1.0) * 255.0)
        if i % 2 == 1:
            img = np.clip(img + rng.choice([-1.0, 1.0], size=img.shape), 0.0, 255.0)
            labels[i] = 1
        imgs[i] = img / 255.0
    return imgs, labels


def _keras_cnn(seed: int) -> Any:
    """The shape recommended for the shipped CNN (5x5 stride-2 first layer, ~0.3 ms on LiteRT),
    smaller; its first layer starts as the 3x3 'KB' high-pass so a few steps suffice."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(seed)
    hp = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=np.float32) / 4.0
    rng = np.random.default_rng(seed)
    k0 = np.zeros((5, 5, 1, 8), dtype=np.float32)
    for c in range(8):
        k0[1:4, 1:4, 0, c] = hp * rng.choice([-1.0, 1.0]) * 255.0  # residual in grey levels
    inp = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(
        8,
        5,
        strides=2,
        padding="same",
        activation="relu",
        kernel_initializer=keras.initializers.Constant(k0),
    )(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def tflite_bytes(model: Any) -> bytes:
    """Convert a Keras model to a float32 TFLite flatbuffer with TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return bytes(converter.convert())


def build_fixture_bundle(out_dir: Path, seed: int = 0, n_images: int = 64) -> Path:
    """Train the two fixture models on synthetic images and write a bundle into ``out_dir``."""
    from sklearn.ensemble import RandomForestClassifier

    out_dir = Path(out_dir)
    imgs, labels = synthetic_images(n_images, seed=seed)
    feats = extract_batch(imgs)
    rf = RandomForestClassifier(n_estimators=25, random_state=seed).fit(feats, labels)
    forest = ForestArrays.from_sklearn(rf)

    model = _keras_cnn(seed)
    model.fit(imgs[..., None], labels, epochs=3, batch_size=16, verbose=0)
    keras_dir = Path(tempfile.mkdtemp(prefix="fixture-keras-"))
    keras_path = keras_dir / "cnn.keras"
    model.save(keras_path)
    train_acc = float(((model.predict(imgs[..., None], verbose=0)[:, 0] >= 0.5) == labels).mean())

    import keras
    import sklearn

    write_bundle(
        out_dir,
        cnn_tflite=tflite_bytes(model),
        forest=forest,
        feature_names=FEATURE_NAMES,
        w_cnn=0.4,
        threshold=0.5,
        thresholds={"paper_0.5": 0.5},
        training_data={
            "description": f"fixture: {n_images} synthetic smooth images, half with +-1/255 "
            "noise; not real radiographs, for tests only",
            "seed": seed,
        },
        metrics={"cnn_train_accuracy": train_acc, "forest_train_accuracy": rf.score(feats, labels)},
        extra_files={"cnn_keras": keras_path},
        bundle_id=f"fixture-{seed}",
        versions={"keras": keras.__version__, "scikit-learn": sklearn.__version__},
    )
    shutil.rmtree(keras_dir, ignore_errors=True)
    return out_dir


def build_benchmark_forest(
    n_trees: int = 200, n_samples: int = 5000, seed: int = 0
) -> tuple[Any, ForestArrays, np.ndarray]:
    """A full-depth sklearn forest on noisy synthetic features, its arrays, and test rows.

    The labels depend on a few features through a noisy rule, so the trees grow deep (about
    25-37 levels), like a forest trained to purity on real, overlapping classes.
    """
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    n_feat = len(FEATURE_NAMES)
    X = rng.normal(size=(n_samples, n_feat))
    y = X[:, 0] + 0.5 * X[:, 1] ** 2 - X[:, 2] * X[:, 3] + rng.normal(size=n_samples) > 0.5
    rf = RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=1)
    rf.fit(X, y.astype(np.int64))
    return rf, ForestArrays.from_sklearn(rf), rng.normal(size=(256, n_feat))


def each_file_with_a_flipped_byte(directory: Path) -> Iterator[Path]:
    """Yield each file of ``directory`` while its middle byte is flipped, restoring it after:
    the tamper check of a bundle, file by file."""
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
        try:
            yield path
        finally:
            path.write_bytes(original)
