"""The detector's CNN half: a tiny residual (steganalysis-style) network, and the paper's CNN.

Why residuals: the perturbations to catch move pixels by one or two grey levels. A plain CNN
on intensities has to learn to ignore anatomy first; a first layer of high-pass filters
(initialised to SRM-like kernels, trainable) removes the anatomy and leaves the noise, and the
network after it only has to read the noise statistics. Scaling the input by 255 makes one
grey level worth 1.0, and the truncation (clip at +-T) keeps edges from dominating.

``build_shipped`` is the network trained for the runtime; ``build_fused`` turns one or more
trained ones into what the runtime runs (LiteRT, one thread, within the latency budget);
``build_paper`` is the paper's three-block CNN (32/64/128 filters, batch norm, dropout 0.25,
Adam), trained as the reference row and, on PGD examples only, as the adversarial-training
baseline.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CnnTrainConfig:
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0


def _highpass_kernels(n: int) -> np.ndarray:
    """(3, 3, 1, n) SRM-like high-pass kernels (each sums to zero); extra ones random zero-mean."""
    base = [
        [[0, 0, 0], [1, -2, 1], [0, 0, 0]],  # horizontal second difference
        [[0, 1, 0], [0, -2, 0], [0, 1, 0]],  # vertical second difference
        [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]],  # KB (3x3 "square") kernel / 4 below
        [[0, 0, 0], [0, -1, 1], [0, 0, 0]],  # first difference
        [[0, 0, 0], [0, -1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, -2, 0], [0, 0, 1]],  # diagonal second difference
    ]
    ks = [np.array(k, np.float32) for k in base]
    ks[2] = ks[2] / 4.0
    rng = np.random.default_rng(0)
    while len(ks) < n:
        k = rng.normal(size=(3, 3)).astype(np.float32)
        ks.append(k - k.mean())
    return np.stack(ks[:n], axis=-1)[:, :, None, :]


def random_highpass_kernels(n: int, seed: int) -> np.ndarray:
    """(3, 3, 1, n) random high-pass kernels drawn from ``seed``: each sums to zero (a flat
    region gives nothing) and has the L2 norm 2 (about the SRM kernels'). The second stem of a
    CNN with ``sentinel train --cnn-stems 2``: kept frozen, so its networks read the noise
    through projections an attacker holding the public bundle never optimised against."""
    rng = np.random.default_rng([seed, 7])
    ks = []
    for _ in range(n):
        k = rng.normal(size=(3, 3)).astype(np.float32)
        k -= k.mean()
        ks.append(k / np.linalg.norm(k) * 2.0)
    return np.stack(ks, axis=-1)[:, :, None, :]


# The family a site bundle's CNN is drawn from (train.secret): every member is the residual
# network below, so it exports to LiteRT like the shipped one. Shapes are (high-pass filters,
# width of the two convolutions after pooling, their kernel size). CNN_SHAPES_V1 is the list
# the first draw scheme indexed; the 8-filter and 5x5 shapes have left the draw because the
# CNN is most of the runtime's 2.0 ms (session 16, one thread, quiet machine: a site bundle
# with 8/16 took 1.97 / 2.11 ms against the shipped bundle's 1.68 / 1.75 ms). train.secret.draw
# redraws from the first list until it lands in CNN_SHAPES, so a secret that drew an allowed
# shape keeps it. tests/test_secret.py times the largest member.
CNN_SHAPES_V1: tuple[tuple[int, int, int], ...] = (
    *((f, w, 3) for f in (4, 6, 8) for w in (8, 12, 16)),
    (4, 8, 5), (6, 8, 5),
)
CNN_SHAPES: tuple[tuple[int, int, int], ...] = tuple(
    s for s in CNN_SHAPES_V1 if s[0] <= 6 and s[2] == 3)
CNN_TRUNCS: tuple[float, ...] = (2.0, 3.0)  # truncation of the residual, in grey levels
# How the detector CNN turns its last feature maps into a score (build_shipped's ``pool``);
# "global" is the shipped bundle's, "tile-min" a site's option (`sentinel train --cnn-pool`).
CNN_POOLS: tuple[str, ...] = ("global", "tile-min")
TILES = 3  # tile-min: the image as TILES x TILES tiles


def build_shipped(filters: int = 4, width: int = 12, trunc: float = 3.0,
                  kernel: int = 3, pool: str = "global", strided: bool = False) -> Any:
    """Residual CNN: (n, 224, 224, 1) in [0,1] -> (n, 1) P(perturbed). About 10 MFLOP with
    the defaults; ``CNN_SHAPES`` and ``CNN_TRUNCS`` list what a secret site bundle draws.

    ``pool``: how the last feature maps become one score (``CNN_POOLS``). "global" pools the
    whole image (average and max) into one head. "tile-min" applies the same head to each of
    ``TILES`` x ``TILES`` tiles and scores the image by its least suspicious tile: an L-inf
    perturbation covers every tile, while what makes a clean image from another source look
    perturbed (burned-in text, markers, a collimator edge, one noisy region) is local.
    Measured on the disjoint-patient site bundles over several training runs (README,
    "Tile-min pooling"): the run-to-run spread of either pooling is larger than the difference
    between them, so "global" stays the default.

    ``strided``: the cheaper shape of a second stem's networks (``sentinel train --cnn-stems
    2``): the high-pass residual at every second pixel, pooled 2x2 to the same 55x55 maps, and
    the first convolution after it at stride 2 instead of a convolution and a 2x2 max-pool."""
    if pool not in CNN_POOLS:
        raise ValueError(f"CNN pooling {pool!r}: use one of {CNN_POOLS}")
    import keras
    from keras import layers

    inp = keras.Input((224, 224, 1), name="image")
    x = layers.Rescaling(255.0)(inp)
    hp = layers.Conv2D(filters, 3, strides=2 if strided else 1, padding="valid",
                       use_bias=False, name="highpass")
    h = hp(x)
    # truncated positive and negative halves (a sign-aware |residual| clipped at trunc);
    # plain Keras layers only, so the .keras file loads in safe mode
    pos = layers.ReLU(max_value=trunc, name="tlu_pos")(h)
    neg = layers.ReLU(max_value=trunc, name="tlu_neg")(layers.Rescaling(-1.0)(h))
    x = layers.Concatenate()([pos, neg])
    # 55x55 local noise-energy maps
    x = layers.AveragePooling2D(2 if strided else 4, name="noise_energy")(x)
    out = _head(x, width, kernel, pool, "", strided)
    model = keras.Model(inp, out, name="residual_cnn" + ("_tile_min" if pool == "tile-min"
                                                          else ""))
    hp.set_weights([_highpass_kernels(filters)])
    return model


def _head(x: Any, width: int, kernel: int, pool: str, suffix: str, strided: bool = False,
          made: list[Any] | None = None) -> Any:
    """build_shipped after the noise-energy maps: two convolutions, the pooling, P(perturbed).
    ``suffix`` names an ensemble member's layers apart; ``made`` collects the layers with
    weights, in order."""
    from keras import layers

    made = [] if made is None else made
    if strided:
        made.append(layers.Conv2D(width, kernel, strides=2, padding="same", activation="relu"))
        x = made[-1](x)  # 28x28
    else:
        made.append(layers.Conv2D(width, kernel, padding="same", activation="relu"))
        x = layers.MaxPooling2D(2)(made[-1](x))
    made.append(layers.Conv2D(width, kernel, padding="same", activation="relu"))
    x = made[-1](x)  # 27x27 (28x28 strided)
    if pool == "tile-min":
        side = x.shape[1] // TILES  # 9: the 27x27 maps as 3x3 tiles
        x = layers.Concatenate()([layers.AveragePooling2D(side)(x),
                                  layers.MaxPooling2D(side)(x)])
        made.append(layers.Conv2D(1, 1, name="tile_logit" + suffix))  # one for every tile
        x = made[-1](x)
        # the lowest tile's logit: min = -max(-x), in plain layers (safe-mode loadable)
        x = layers.Rescaling(-1.0)(layers.GlobalMaxPooling2D()(layers.Rescaling(-1.0)(x)))
        return layers.Activation("sigmoid", name="p_perturbed" + suffix)(x)
    avg = layers.GlobalAveragePooling2D()(x)
    mx = layers.GlobalMaxPooling2D()(x)
    x = layers.Concatenate()([avg, mx])
    made.append(layers.Dense(1, activation="sigmoid", name="p_perturbed" + suffix))
    return made[-1](x)


def build_fused(members: list[Any], arch: dict[str, Any]) -> Any:
    """The runtime's detector CNN from trained build_shipped ``members`` (one or more with the
    same ``arch``, full-resolution or ``strided``): one stem per distinct set of high-pass
    kernels and stride among them, each member's head on its own stem, the mean of their
    probabilities. The same function as the mean of the members, computed faster.

    Why fused: the stem as trained (scale by 255, one convolution, negate, two clipped ReLUs,
    concatenate, pool) runs over the full 222x222 maps and took 0.82 of the CNN's 0.93 ms
    (LiteRT, one thread); folding the scale and the negation into one convolution with kernels
    255K and -255K and one clipped ReLU computes the same maps in 0.46 ms. Why members: the
    mean of several training runs of a site bundle's CNN detected more of the strongest
    public-bundle attack than single runs (README, "Averaging CNNs"); members sharing a stem
    cost about 0.11 ms each (``sentinel train --cnn-members``), a second full-resolution stem
    about 0.25 ms (``--cnn-stems 2``); a strided second stem with two networks about a third of
    what the full one with two costs (``--cnn-random-stem strided``: 0.63 against 0.92 ms for
    the whole 2 + 2 CNN, bench/RESULTS.md session 20)."""
    import keras
    from keras import layers

    arch = {**_SHIPPED_DEFAULTS, **arch}
    stems: list[tuple[np.ndarray, bool]] = []  # distinct (kernels, strided), members' order
    on_stem: list[int] = []  # each member's index into stems
    for m in members:
        hp = m.get_layer("highpass")
        k, strided = hp.get_weights()[0], tuple(hp.strides) == (2, 2)
        same = [j for j, (s, st) in enumerate(stems) if st == strided and np.array_equal(k, s)]
        if not same:
            stems.append((k, strided))
        on_stem.append(same[0] if same else len(stems) - 1)
    inp = keras.Input((224, 224, 1), name="image")
    maps, convs = [], []
    for j, (_, strided) in enumerate(stems):
        suffix = "" if j == 0 else f"_{j + 1}"
        convs.append(layers.Conv2D(2 * arch["filters"], 3, strides=2 if strided else 1,
                                   padding="valid", use_bias=False, name="highpass_pm" + suffix))
        x = layers.ReLU(max_value=arch["trunc"], name="tlu" + suffix)(convs[-1](inp))
        maps.append(layers.AveragePooling2D(2 if strided else 4,
                                            name="noise_energy" + suffix)(x))
    made: list[list[Any]] = [[] for _ in members]
    outs = [_head(maps[on_stem[i]], arch["width"], arch["kernel"], arch["pool"], f"_m{i + 1}",
                  stems[on_stem[i]][1], made[i]) for i in range(len(members))]
    out = outs[0] if len(outs) == 1 else layers.Average(name="p_perturbed")(outs)
    model = keras.Model(inp, out, name=f"residual_cnn_fused_x{len(members)}")
    for conv, (k, _) in zip(convs, stems, strict=True):
        conv.set_weights([255.0 * np.concatenate([k, -k], axis=-1)])
    for i, (member, mine) in enumerate(zip(members, made, strict=True)):
        theirs = _weighted_layers_after_stem(member)
        if [a.weights[0].shape for a in mine] != [b.weights[0].shape for b in theirs]:
            raise ValueError(f"ensemble member {i + 1} is not a build_shipped({arch}) network")
        for a, b in zip(mine, theirs, strict=True):
            a.set_weights(b.get_weights())
    return model


# build_shipped's defaults, for build_fused to read an ``arch`` the same way
_SHIPPED_DEFAULTS: dict[str, Any] = {
    k: v.default for k, v in inspect.signature(build_shipped).parameters.items()}


def _weighted_layers_after_stem(model: Any) -> list[Any]:
    """A single build_shipped network's layers with weights after its high-pass stem, in order
    (its two convolutions and its head)."""
    return [la for la in model.layers if la.weights and la.name != "highpass"]


def build_seeded(builder: str, arch: dict[str, Any], seed: int) -> Any:
    """A detector CNN ("shipped" with ``arch``, or "paper") whose initial weights follow
    ``seed``. Why: Keras draws initial weights from its global random state, so without this
    they depended on whatever ran before in the process (a cached victim or a trained one),
    and two runs of the same recipe, secret and data trained different CNNs: measured on the
    disjoint-patient site bundles, the CNN gate's detection of the strongest public-bundle
    attack moved by up to 42 points between such runs (README, "Tile-min pooling")."""
    import keras

    keras.utils.set_random_seed(seed)
    return build(builder, arch)


def build(builder: str, arch: dict[str, Any]) -> Any:
    """The "shipped" CNN with ``arch`` (build_shipped's arguments) or the "paper" one, with
    whatever initial weights Keras draws: for a copy whose weights are set from a trained
    model (train through ``build_seeded``)."""
    return build_shipped(**arch) if builder == "shipped" else build_paper()


def build_paper() -> Any:
    """The paper's CNN: 3 blocks (32, 64, 128 filters), each conv+ReLU, BN, max-pool, dropout."""
    import keras
    from keras import layers

    inp = keras.Input((224, 224, 1), name="image")
    x = inp
    for f in (32, 64, 128):
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(0.25)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.25)(x)
    out = layers.Dense(1, activation="sigmoid", name="p_perturbed")(x)
    return keras.Model(inp, out, name="paper_cnn")


def train_binary(model: Any, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 config: CnnTrainConfig, label: str = "cnn", verbose: bool = True) -> Any:
    """Adam + binary cross-entropy; keeps the epoch with the best validation AUC."""
    import keras

    keras.utils.set_random_seed(config.seed)
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, max(1, steps))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    # numpy batches (Keras slices them): no multi-GB TF constant or shuffle buffer
    xin, yin = x[..., None], y.astype(np.float32)
    best_auc, best_w = -1.0, None
    for epoch in range(config.epochs):
        model.fit(xin, yin, batch_size=config.batch_size, epochs=1, shuffle=True, verbose=0)
        _, auc = model.evaluate(x_val[..., None], y_val.astype(np.float32), batch_size=128,
                                verbose=0)
        if verbose:
            print(f"{label} epoch {epoch + 1}/{config.epochs}: val auc {auc:.5f}", flush=True)
        if auc > best_auc:
            best_auc, best_w = auc, model.get_weights()
    if best_w is not None:
        model.set_weights(best_w)
    return model


def predict(model: Any, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    out = [np.asarray(model(x[i:i + batch_size, ..., None], training=False)).reshape(-1)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64) if out else np.empty(0)


def export_tflite(model: Any, path: Path) -> Path:
    """Float32 TFLite with a fixed (1, 224, 224, 1) input, as detector.cnn.LiteRTModel expects."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    data = converter.convert()
    check_tflite_matches(model, data)
    path = Path(path)
    path.write_bytes(data)
    return path


def check_tflite_matches(model: Any, tflite: bytes, tol: float = 1e-4) -> None:
    """Refuse an export whose TFLite output differs from Keras (a broken export once gave NaN)."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)
    x = (np.round(rng.random((2, 224, 224)) * 255) / 255).astype(np.float32)
    want = predict(model, x)
    interp = Interpreter(model_content=tflite, num_threads=1)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    got = []
    for img in x:
        interp.set_tensor(inp["index"], img[None, :, :, None])
        interp.invoke()
        got.append(float(interp.get_tensor(outp["index"]).reshape(-1)[0]))
    if not np.all(np.isfinite(got)) or np.max(np.abs(np.asarray(got) - want)) > tol:
        raise RuntimeError(f"TFLite export disagrees with Keras: {got} vs {want.tolist()}")
