"""A victim zoo: small diagnostic networks of several families, each reading the stored image
through its own preprocessing pipeline (issue 15).

Why: the shipped detector was tuned on attacks against one strided victim at 224 with an exact
area resize, and its stride-grid gate keys on that victim's fingerprint. A hospital's AI is
some other network reading the stored image at its native matrix through its own resize. To
measure (and later train against) that, every zoo member is a Keras model from the **native**
image in [0, 1] (any matrix) to a pneumonia logit; its pipeline (input size and resize method)
is the first layer of its graph, so a gradient attack at the native matrix goes through the
resize the way an attacker's does.

Families (``FAMILIES``): strided, maxpool (VGG-like), avgpool (DenseNet-like transitions),
residual (stride-2 shortcuts), blurpool (anti-aliased downsampling), depthwise (MobileNet-like),
patchify (ConvNeXt-like 4x4 stride-4 stem), vit (patch embedding + attention). Each is small
(tens of MFLOP) so a few epochs fit a CPU budget.

Members are seeded and cached on disk under ``<work>/members/<family>__<pipeline>__s<seed>__
<split digest>/`` (weights as HDF5 arrays plus ``meta.json`` with the test AUC and wall time),
so training resumes per family after an interruption::

    nice -n 15 python -m train.zoo --work runs/zoo train            # every family, default pipeline
    python -m train.zoo --work runs/zoo list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESIZE_METHODS = ("bilinear", "area", "bicubic")
INPUT_SIZES = (224, 256, 320, 512)
WEIGHTS_FILE = "model.weights.h5"
META_FILE = "meta.json"
# Keras' default 0.99 leaves a quarter of the initial statistics in the moving averages after
# the ~130 steps of one epoch here, and the first epochs' validation AUC measured that, not
# the network (0.56 after one epoch with 0.99)
BN_MOMENTUM = 0.9


# ----------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Pipeline:
    """How a victim reads a stored image: resize from the native matrix to ``size`` square.

    ``antialias`` widens the bilinear/bicubic kernel when downsampling (TensorFlow's
    ``tf.image.resize(antialias=True)``, like PIL); area averaging is anti-aliased by nature.
    """

    size: int
    method: str
    antialias: bool = False

    def __post_init__(self) -> None:
        if self.method not in RESIZE_METHODS:
            raise ValueError(f"resize method {self.method!r}: use one of {RESIZE_METHODS}")
        if not 16 <= self.size <= 2048:
            raise ValueError(f"input size {self.size}: use 16..2048 (e.g. {INPUT_SIZES})")

    @property
    def tag(self) -> str:
        return f"{self.size}-{self.method}{'-aa' if self.antialias else ''}"

    @classmethod
    def parse(cls, tag: str) -> Pipeline:
        """'224-bilinear', '256-bicubic-aa', '320-area' -> Pipeline."""
        parts = tag.split("-")
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "aa"):
                raise ValueError
            return cls(int(parts[0]), parts[1], len(parts) == 3)
        except ValueError as exc:
            raise ValueError(f"pipeline {tag!r}: write SIZE-METHOD[-aa], e.g. 224-bilinear, "
                             f"256-bicubic-aa (methods {RESIZE_METHODS})") from exc


def resize_tf(x: Any, pipeline: Pipeline) -> Any:
    """(n, rows, cols, c) float tensor -> (n, size, size, c): the pipeline's differentiable resize.

    Identity when the matrix already has the input size (no resampling, as a real pipeline).
    Bicubic may overshoot [0, 1] slightly; like most deployed pipelines it is not clipped.
    """
    import tensorflow as tf

    n = pipeline.size
    if x.shape[1] == n and x.shape[2] == n:
        return x
    if pipeline.method == "area":
        # tf.image.resize's ResizeArea has no gradient: the same exact box average as two
        # matrix products (also detector.preprocess's area-exact resize, to float rounding)
        rows = _area_weights(tf.shape(x)[1], n)
        cols = _area_weights(tf.shape(x)[2], n)
        x = tf.einsum("ih,nhwc->niwc", rows, x)
        return tf.einsum("jw,niwc->nijc", cols, x)
    return tf.image.resize(x, (n, n), method=pipeline.method, antialias=pipeline.antialias)


def _area_weights(n_in: Any, n_out: int) -> Any:
    """(n_out, n_in) weights of the exact area resize along one axis, for a dynamic n_in.

    Bin j covers [j n_in / n_out, (j + 1) n_in / n_out); each pixel contributes its overlap,
    scaled so a row sums to 1 (train.attacks._area_matrix, in TensorFlow).
    """
    import tensorflow as tf

    scale = tf.cast(n_in, tf.float64) / float(n_out)  # float64: bin edges exact to 1e-12
    edges = tf.range(n_out + 1, dtype=tf.float64) * scale
    px = tf.range(n_in, dtype=tf.float64)
    overlap = (tf.minimum(px[None, :] + 1.0, edges[1:, None])
               - tf.maximum(px[None, :], edges[:-1, None]))
    return tf.cast(tf.maximum(overlap, 0.0) / scale, tf.float32)


def _register_layer() -> dict[str, type]:
    import keras

    @keras.saving.register_keras_serializable(package="sentinel_zoo")
    class PipelineResize(keras.layers.Layer):
        """The victim's preprocessing as its first layer, so attacks differentiate through it."""

        def __init__(self, size: int, method: str, antialias: bool = False,
                     **kw: Any) -> None:
            super().__init__(**kw)
            self.pipeline = Pipeline(int(size), str(method), bool(antialias))

        def call(self, x: Any) -> Any:
            return resize_tf(x, self.pipeline)

        def compute_output_shape(self, shape: tuple) -> tuple:
            return (shape[0], self.pipeline.size, self.pipeline.size, shape[-1])

        def get_config(self) -> dict:
            return {**super().get_config(), "size": self.pipeline.size,
                    "method": self.pipeline.method, "antialias": self.pipeline.antialias}

    @keras.saving.register_keras_serializable(package="sentinel_zoo")
    class PositionEmbedding(keras.layers.Layer):
        """The tiny ViT's learned position embedding (registered, so an exported ViT loads)."""

        def build(self, shape: tuple) -> None:
            self.pos = self.add_weight(shape=(1, shape[1], shape[2]), initializer="zeros",
                                       name="pos")

        def call(self, x: Any) -> Any:
            return x + self.pos

    return {"resize": PipelineResize, "position": PositionEmbedding}


_LAYERS: dict[str, type] = {}


def ensure_registered() -> type:
    """Register the zoo's own layers with Keras (once), so a saved zoo member loads as a model;
    returns the pipeline layer."""
    if not _LAYERS:
        _LAYERS.update(_register_layer())
    return _LAYERS["resize"]


def pipeline_layer(pipeline: Pipeline) -> Any:
    return ensure_registered()(pipeline.size, pipeline.method, pipeline.antialias,
                               name="pipeline")


# ----------------------------------------------------------------------------- families


def _bn_relu(x: Any) -> Any:
    from keras import layers

    return layers.ReLU()(layers.BatchNormalization(momentum=BN_MOMENTUM)(x))


def _head(x: Any) -> Any:
    from keras import layers

    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return layers.Dense(1, name="logit")(x)


def _strided(x: Any) -> Any:
    """The shipped victim's shape (train/victim.py): four stride-2 convolutions."""
    from keras import layers

    for filters in (16, 32, 48, 64):
        x = _bn_relu(layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x))
    return layers.Conv2D(64, 3, padding="same", activation="relu")(x)


def _maxpool(x: Any) -> Any:
    """VGG-like: 3x3 convolutions at stride 1, each stage closed by 2x2 max pooling."""
    from keras import layers

    for filters in (8, 16, 32, 48, 64):
        x = _bn_relu(layers.Conv2D(filters, 3, padding="same", use_bias=False)(x))
        x = layers.MaxPooling2D(2)(x)
    return x


def _avgpool(x: Any) -> Any:
    """DenseNet-like: dense blocks (concatenated growth) joined by 1x1 conv + 2x2 average pool."""
    from keras import layers

    x = _bn_relu(layers.Conv2D(12, 3, padding="same", use_bias=False)(x))
    x = layers.AveragePooling2D(2)(x)
    for block, growth in enumerate((8, 12, 16, 16)):
        for _ in range(2):
            y = _bn_relu(layers.Conv2D(growth, 3, padding="same", use_bias=False)(x))
            x = layers.Concatenate()([x, y])
        if block < 3:
            x = _bn_relu(layers.Conv2D(int(x.shape[-1]) // 2 + 8, 1, use_bias=False)(x))
            x = layers.AveragePooling2D(2)(x)
    return layers.AveragePooling2D(2)(x)


def _residual(x: Any) -> Any:
    """ResNet-like: a stride-2 stem, then blocks whose shortcut is a stride-2 1x1 projection."""
    from keras import layers

    x = _bn_relu(layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x))
    for filters in (24, 32, 48, 64):
        y = _bn_relu(layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x))
        y = layers.BatchNormalization(momentum=BN_MOMENTUM)(
            layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        s = layers.BatchNormalization(momentum=BN_MOMENTUM)(
            layers.Conv2D(filters, 1, strides=2, use_bias=False)(x))
        x = layers.ReLU()(layers.Add()([y, s]))
    return x


def _blur_down(x: Any) -> Any:
    """Anti-aliased downsampling (Zhang 2019): a 3x3 binomial blur, then keep every second pixel."""
    import tensorflow as tf
    from keras import layers

    k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])
    k = (k / k.sum()).astype(np.float32)
    c = int(x.shape[-1])
    init = np.repeat(k[:, :, None, None], c, axis=2)
    layer = layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False,
                                   depthwise_initializer=tf.constant_initializer(init),
                                   trainable=False)
    return layer(x)


def _blurpool(x: Any) -> Any:
    from keras import layers

    x = _bn_relu(layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
    x = _blur_down(x)
    for filters in (16, 32, 48, 64):
        x = _bn_relu(layers.Conv2D(filters, 3, padding="same", use_bias=False)(x))
        x = _blur_down(x)
    return x


def _depthwise(x: Any) -> Any:
    """MobileNet-like: a stride-2 stem, then depthwise 3x3 (stride 2 at each stage) + pointwise."""
    from keras import layers

    x = _bn_relu(layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x))
    for filters, stride in ((32, 2), (48, 2), (48, 1), (64, 2), (96, 2), (96, 1)):
        x = _bn_relu(layers.DepthwiseConv2D(3, strides=stride, padding="same",
                                            use_bias=False)(x))
        x = _bn_relu(layers.Conv2D(filters, 1, use_bias=False)(x))
    return x


def _patchify(x: Any) -> Any:
    """ConvNeXt-like: a 4x4 stride-4 patchify stem, depthwise 7x7 + inverted-bottleneck blocks."""
    from keras import layers

    x = layers.LayerNormalization(epsilon=1e-6)(layers.Conv2D(32, 4, strides=4)(x))
    for stage, dim in enumerate((32, 48, 64)):
        if stage:
            x = layers.LayerNormalization(epsilon=1e-6)(x)
            x = layers.Conv2D(dim, 2, strides=2)(x)
        y = layers.DepthwiseConv2D(7, padding="same")(x)
        y = layers.LayerNormalization(epsilon=1e-6)(y)
        y = layers.Dense(dim * 3, activation="gelu")(y)
        y = layers.Dense(dim)(y)
        x = layers.Add()([x, y])
    return layers.LayerNormalization(epsilon=1e-6)(x)


def _vit(x: Any, patch: int = 16, dim: int = 64, depth: int = 3, heads: int = 4) -> Any:
    """A tiny ViT: 16x16 patch embedding, learned position embedding, pre-norm attention."""
    from keras import layers

    x = layers.Conv2D(dim, patch, strides=patch)(x)
    grid = int(x.shape[1]) * int(x.shape[2])
    x = layers.Reshape((grid, dim))(x)
    x = _position_embedding()(x)
    for _ in range(depth):
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        y = layers.MultiHeadAttention(heads, dim // heads)(y, y)
        x = layers.Add()([x, y])
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        y = layers.Dense(dim * 2, activation="gelu")(y)
        x = layers.Add()([x, layers.Dense(dim)(y)])
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    return layers.Reshape((1, grid, dim))(x)  # the common head pools over the tokens


def _position_embedding() -> Any:
    ensure_registered()
    return _LAYERS["position"]()


@dataclass(frozen=True)
class Family:
    """One architecture family: its body, the pipeline it is measured with, its training pace."""

    name: str
    body: Callable[[Any], Any]
    pipeline: Pipeline
    learning_rate: float = 1e-3
    # 2 epochs: validation AUC 0.94-0.96 after them on this data; a 2-epoch member costs
    # 2-7 minutes on 2 shared cores under nice (the zoo ~40 minutes of wall time in all)
    epochs: int = 2
    what: str = ""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("strided", _strided, Pipeline(224, "area"), what="four stride-2 convolutions "
           "(the shipped victim's shape)"),
    Family("maxpool", _maxpool, Pipeline(224, "bilinear"), what="VGG-like, 2x2 max pooling"),
    Family("avgpool", _avgpool, Pipeline(256, "bilinear", True),
           what="DenseNet-like dense blocks, average-pool transitions"),
    Family("residual", _residual, Pipeline(224, "bicubic"),
           what="ResNet-like, stride-2 1x1 shortcuts"),
    Family("blurpool", _blurpool, Pipeline(256, "area"),
           what="anti-aliased downsampling (binomial blur, then stride 2)"),
    Family("depthwise", _depthwise, Pipeline(224, "bilinear", True),
           what="MobileNet-like depthwise separable"),
    Family("patchify", _patchify, Pipeline(320, "bilinear"), learning_rate=2e-3,
           what="ConvNeXt-like 4x4 stride-4 stem, depthwise 7x7 blocks"),
    Family("vit", _vit, Pipeline(224, "bicubic", True), learning_rate=5e-4, epochs=3,
           what="tiny ViT: 16x16 patches, 3 attention blocks of width 64"),
)}


def build_member(family: str, pipeline: Pipeline | None = None, *,
                 with_resize: bool = True) -> Any:
    """Keras model: (n, rows, cols, 1) native image in [0, 1] -> (n, 1) pneumonia logit.

    Any native matrix goes in; the first layer is the member's pipeline (resize to its input
    size), then the family's body at that size. ``with_resize=False``: the network alone, on
    (n, size, size, 1) inputs, as a site holds its diagnostic model apart from its resize (the
    weights are the same list in the same order: the resize layer has none).
    """
    import keras
    from keras import layers

    fam = _family(family)
    pipeline = pipeline or fam.pipeline
    if with_resize:
        inp = keras.Input((None, None, 1), name="native")
        x = pipeline_layer(pipeline)(inp)
    else:
        inp = keras.Input((pipeline.size, pipeline.size, 1), name="resized")
        x = inp
    x = layers.Rescaling(4.0, offset=-2.0)(x)
    # the body needs a static size (ViT's token count); the resize output has it
    x = layers.Reshape((pipeline.size, pipeline.size, 1))(x)
    out = _head(fam.body(x))
    return keras.Model(inp, out, name=f"zoo_{family}")


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown zoo family {name!r}: use one of {tuple(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class KermanyArrays:
    """Native 224x224 8-bit images of the bundle's split (uint8) and their labels."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    digest: str


def default_data_root() -> Path:
    """$SENTINEL_DATA, else ../shared/data beside the repository (the README's layout)."""
    env = os.environ.get("SENTINEL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def bundle_split_path() -> Path:
    """split.json of the shipped bundle (in its training bundle, train/models/default)."""
    from train import training_bundle

    return training_bundle.load_training(None, ("split",)).path_of("split")


def load_kermany(work: Path, data: Path | None = None, split_path: Path | None = None,
                 parts: tuple[str, ...] = ("train", "val", "test")) -> KermanyArrays:
    """The bundle's split (split.json) of Kermany as uint8 arrays, cached by split digest.

    Image paths are read relative to ``data`` (default ``$SENTINEL_DATA/kermany224``), not the
    absolute root recorded on the build machine.
    """
    from tqdm import tqdm

    from train import datasets

    split = datasets.Split.from_json(split_path or bundle_split_path())
    root = Path(data) if data else default_data_root() / "kermany224"
    cache = Path(work) / "data" / f"kermany-{split.digest}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return KermanyArrays({p: z[f"x_{p}"] for p in parts},
                                 {p: z[f"y_{p}"] for p in parts}, split.digest)
    xs, ys = {}, {}
    for p in ("train", "val", "test"):
        recs = split.part(p)
        x = np.empty((len(recs), 224, 224), np.uint8)
        for i, r in enumerate(tqdm(recs, desc=f"load kermany {p}", leave=False)):
            img = datasets.load_native(root / r.rel)
            if img.native.shape != (224, 224) or img.levels != 255:
                raise ValueError(f"{root / r.rel}: expected a 224x224 8-bit image (kermany224)")
            x[i] = np.round(img.native * 255.0).astype(np.uint8)
        xs[p] = x
        ys[p] = np.array([-1 if r.label is None else r.label for r in recs], np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **{f"x_{p}": xs[p] for p in xs}, **{f"y_{p}": ys[p] for p in ys})
    os.replace(tmp, cache)
    return KermanyArrays({p: xs[p] for p in parts}, {p: ys[p] for p in parts}, split.digest)


# ----------------------------------------------------------------------------- train and cache


def member_dir(work: Path, family: str, pipeline: Pipeline, seed: int, digest: str) -> Path:
    return Path(work) / "members" / f"{family}__{pipeline.tag}__s{seed}__{digest}"


def predict_logits(model: Any, x_native: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of (n, rows, cols) native images in [0, 1] (uint8 is read as k/255)."""
    out = []
    for i in range(0, len(x_native), batch_size):
        xb = x_native[i:i + batch_size]
        xb = xb.astype(np.float32) / 255.0 if xb.dtype == np.uint8 else xb.astype(np.float32)
        out.append(np.asarray(model(xb[..., None], training=False)).reshape(-1))
    return np.concatenate(out) if out else np.empty(0, np.float32)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC, NaN where a split holds one class only (a tiny --quick split can)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y[y >= 0])) < 2:
        return float("nan")
    return float(roc_auc_score(y[y >= 0], s[y >= 0]))


def train_member(family: str, data: KermanyArrays, *, pipeline: Pipeline | None = None,
                 seed: int = 0, epochs: int | None = None, batch_size: int = 32,
                 log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """Fit one member on the training split (class-weighted, flips); keep the best val AUC."""
    import keras
    import tensorflow as tf

    fam = _family(family)
    pipeline = pipeline or fam.pipeline
    epochs = epochs or fam.epochs
    keras.utils.set_random_seed(seed)
    model = build_member(family, pipeline)
    model.compile(optimizer=keras.optimizers.Adam(fam.learning_rate),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    y_tr = data.y["train"].astype(np.float32)
    pos = float(np.mean(y_tr))
    class_weight = {0: 0.5 / max(1e-6, 1 - pos), 1: 0.5 / max(1e-6, pos)}

    def to_unit(a: Any, b: Any) -> tuple[Any, Any]:
        a = tf.cast(a, tf.float32)[..., None] / 255.0
        return tf.image.random_flip_left_right(a, seed=seed), b

    ds = (tf.data.Dataset.from_tensor_slices((data.x["train"], y_tr))
          .shuffle(len(y_tr), seed=seed).batch(batch_size).map(to_unit).prefetch(2))
    t0 = time.perf_counter()
    best, best_w, history = -1.0, None, []
    for epoch in range(epochs):
        model.fit(ds, epochs=1, class_weight=class_weight, verbose=0)
        val_auc = _auc(data.y["val"], predict_logits(model, data.x["val"]))
        history.append(val_auc)
        log(f"  {family} [{pipeline.tag}] epoch {epoch + 1}/{epochs}: val AUC {val_auc:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
        if val_auc > best:
            best, best_w = val_auc, model.get_weights()
    if best_w is not None:
        model.set_weights(best_w)
    wall = time.perf_counter() - t0
    test_logits = predict_logits(model, data.x["test"])
    meta = {
        "family": family, "what": fam.what, "pipeline": asdict(pipeline),
        "pipeline_tag": pipeline.tag, "seed": seed, "split_digest": data.digest,
        "epochs": epochs, "batch_size": batch_size, "learning_rate": fam.learning_rate,
        "val_auc_per_epoch": history, "val_auc": best,
        "test_auc": _auc(data.y["test"], test_logits),
        "test_accuracy": float(np.mean((test_logits > 0) == (data.y["test"] == 1))),
        "params": int(model.count_params()), "train_wall_s": wall,
        "keras": keras.__version__, "tensorflow": tf.__version__,
    }
    return model, meta


def load_member(work: Path, family: str, pipeline: Pipeline | None = None, seed: int = 0,
                digest: str | None = None) -> tuple[Any, dict]:
    """A cached member (architecture rebuilt from code, weights as HDF5 arrays) and its meta."""
    fam = _family(family)
    pipeline = pipeline or fam.pipeline
    if digest is None:
        from train import datasets

        digest = datasets.Split.from_json(bundle_split_path()).digest
    d = member_dir(work, family, pipeline, seed, digest)
    if not (d / META_FILE).is_file():
        raise FileNotFoundError(
            f"zoo member {family} [{pipeline.tag}] seed {seed} is not trained under {work}: "
            f"run `python -m train.zoo --work {work} train --families {family}`")
    model = build_member(family, pipeline)
    model.load_weights(str(d / WEIGHTS_FILE))
    return model, json.loads((d / META_FILE).read_text())


def ensure_member(work: Path, family: str, data: KermanyArrays, *,
                  pipeline: Pipeline | None = None, seed: int = 0, epochs: int | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Train and cache one member unless it is cached; returns its meta."""
    pipeline = pipeline or _family(family).pipeline
    d = member_dir(work, family, pipeline, seed, data.digest)
    if (d / META_FILE).is_file():
        return json.loads((d / META_FILE).read_text())
    model, meta = train_member(family, data, pipeline=pipeline, seed=seed, epochs=epochs,
                               log=log)
    d.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(d / WEIGHTS_FILE))
    tmp = d / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / META_FILE)  # meta last: its presence means the member is complete
    return meta


def export_member(work: Path, family: str, out: Path, *, pipeline: Pipeline | None = None,
                  seed: int = 0, digest: str | None = None) -> Pipeline:
    """Write a cached member as a plain Keras model file without its resize layer, so it can
    stand in for a site's own diagnostic network: ``sentinel attack --victim OUT --input-size
    N --resize METHOD [--antialias]`` then attacks through the same resize the zoo evaluation
    uses. Returns that pipeline."""
    pipeline = pipeline or _family(family).pipeline
    if Path(out).suffix.lower() != ".keras":
        raise ValueError(f"{out}: name the export FILE.keras (Keras' own model format)")
    model, _ = load_member(work, family, pipeline, seed, digest)
    bare = build_member(family, pipeline, with_resize=False)
    bare.set_weights(model.get_weights())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".part.keras")
    bare.save(str(tmp))
    os.replace(tmp, out)
    return pipeline


# families whose body takes any input size (convolutions, then global pooling): the ViT's token
# count is fixed by its input
AS_IS_FAMILIES = ("strided", "maxpool", "avgpool", "residual", "blurpool", "depthwise",
                  "patchify")


def load_member_as_is(work: Path, family: str, size: int, seed: int = 0,
                      digest: str | None = None,
                      trained: Pipeline | None = None) -> tuple[Any, dict]:
    """A cached member that reads a ``size`` x ``size`` stored image as it is: its weights,
    trained at its own input, run at ``size`` (a bilinear "resize" to the same size is the
    identity). Meta as the member's, with ``pipeline_tag`` ``as-is-SIZE`` so its attacks are
    cached apart.

    Why: a site may run its diagnostic network at the stored matrix, with no resize in front of
    it; an attack on it then carries no resize period, which the line gate reads (README,
    "Networks that read the stored matrix as is"). A fully convolutional body with global
    pooling is such a network at any size; its accuracy there is not what it was trained for,
    but the attack is made against whatever decision it gives. ``trained``: the pipeline the
    cached member was trained with (default: its family's)."""
    if family not in AS_IS_FAMILIES:
        raise ValueError(f"zoo family {family!r} cannot read another input size as is (its "
                         f"body is fixed to its own); use one of {AS_IS_FAMILIES}")
    member, meta = load_member(work, family, trained, seed=seed, digest=digest)
    model = build_member(family, Pipeline(int(size), "bilinear"))
    model.set_weights(member.get_weights())
    return model, as_is_meta(meta, size)


def as_is_meta(meta: dict, size: int) -> dict:
    """A member's meta for its as-is form at ``size`` (``load_member_as_is``): tagged apart."""
    return {**meta, "pipeline_tag": f"as-is-{int(size)}", "as_is": True}


def attack_flags(pipeline: Pipeline) -> str:
    """The ``sentinel attack`` options that reproduce ``pipeline`` in front of an exported
    member."""
    return (f"--input-size {pipeline.size} --resize {pipeline.method}"
            + (" --antialias" if pipeline.antialias else ""))


def list_members(work: Path) -> list[dict]:
    root = Path(work) / "members"
    return [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{META_FILE}"))]


# ----------------------------------------------------------------------------- CLI


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ap = argparse.ArgumentParser(prog="python -m train.zoo", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/zoo"))
    ap.add_argument("--data", type=Path, default=None,
                    help="kermany224 folder (default $SENTINEL_DATA/kermany224)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train (or skip, when cached) the zoo members")
    tr.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    tr.add_argument("--pipeline", default=None,
                    help="one pipeline for every family (default: each family's own)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--epochs", type=int, default=None)
    tr.add_argument("--threads", type=int, default=2)
    sub.add_parser("list", help="the cached members and their test AUC")
    ex = sub.add_parser("export", help="write a cached member as FILE.keras without its resize, "
                        "a victim for `sentinel attack --victim`")
    ex.add_argument("family", choices=list(FAMILIES))
    ex.add_argument("out", type=Path, metavar="FILE.keras")
    ex.add_argument("--pipeline", default=None,
                    help="the member trained with this pipeline (default: the family's own)")
    ex.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "export":
        try:
            pipe = export_member(args.work, args.family, args.out, seed=args.seed,
                                 pipeline=Pipeline.parse(args.pipeline) if args.pipeline
                                 else None)
        except (FileNotFoundError, ValueError) as exc:
            print(f"python -m train.zoo export: {exc}", file=sys.stderr)
            return 2
        print(f"{args.out}: zoo member {args.family} [{pipe.tag}] without its resize; attack "
              f"through it with: sentinel attack IN OUT --victim {args.out} "
              f"{attack_flags(pipe)}")
        return 0
    if args.cmd == "list":
        for m in list_members(args.work):
            print(f"{m['family']:10s} {m['pipeline_tag']:16s} seed {m['seed']} test AUC "
                  f"{m['test_auc']:.4f} acc {m['test_accuracy']:.3f} "
                  f"{m['train_wall_s']:.0f} s {m['params']} params")
        return 0
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _log("loading the bundle's Kermany split")
    data = load_kermany(args.work, args.data)
    pipeline = Pipeline.parse(args.pipeline) if args.pipeline else None
    for fam in args.families:
        _log(f"member {fam}")
        meta = ensure_member(args.work, fam, data, pipeline=pipeline, seed=args.seed,
                             epochs=args.epochs, log=_log)
        _log(f"member {fam} [{meta['pipeline_tag']}]: test AUC {meta['test_auc']:.4f}, "
             f"{meta['train_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
