"""A differentiable surrogate of the detector's Random Forest, for transfer attacks.

A forest is piecewise constant: it has no gradient to follow. An attacker who has the bundle
(it ships inside the package) can still query the forest as often as they like, so they fit a
smooth model to its outputs and descend that instead (a transfer attack). Here the surrogate
is a small MLP (features standardised -> 32 -> 32 -> 1 logit) fitted to the forest's
probability on feature vectors of clean and perturbed images *and of points between each clean
image and its perturbed copy*: the attack walks exactly that path (from "perturbed" back
towards "clean"), so that is where the surrogate must agree with the forest.

The weights are plain arrays (.npz, no pickle); ``logit_tf`` evaluates them in TensorFlow on
the output of ``train.tf_features.features_tf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Surrogate:
    """MLP weights and the feature standardisation it was fitted with."""

    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]  # W1, b1, W2, b2, W3, b3
    fidelity: dict[str, float]

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, scale=self.scale, fidelity=np.array(
            [self.fidelity[k] for k in sorted(self.fidelity)]),
            fidelity_keys=np.array(sorted(self.fidelity)),
            **{f"w{i}": w for i, w in enumerate(self.weights)})

    @classmethod
    def load(cls, path: Path) -> Surrogate:
        with np.load(path, allow_pickle=False) as z:
            n = len([k for k in z.files if k.startswith("w")])
            return cls(mean=z["mean"], scale=z["scale"],
                       weights=tuple(z[f"w{i}"] for i in range(n)),
                       fidelity={str(k): float(v) for k, v in zip(z["fidelity_keys"],
                                                                   z["fidelity"], strict=True)})

    def logit_np(self, feats: np.ndarray) -> np.ndarray:
        h = (np.asarray(feats, np.float64) - self.mean) / self.scale
        w = self.weights
        for i in range(0, len(w) - 2, 2):
            h = np.maximum(h @ w[i] + w[i + 1], 0.0)
        return (h @ w[-2] + w[-1]).reshape(-1)

    def logit_tf(self, feats: Any) -> Any:
        """Logit of P(perturbed) for a (n, n_features) tensor (any float dtype)."""
        import tensorflow as tf

        dt = feats.dtype
        h = (feats - tf.constant(self.mean, dt)) / tf.constant(self.scale, dt)
        w = self.weights
        for i in range(0, len(w) - 2, 2):
            h = tf.nn.relu(h @ tf.constant(w[i], dt) + tf.constant(w[i + 1], dt))
        return tf.reshape(h @ tf.constant(w[-2], dt) + tf.constant(w[-1], dt), [-1])


def path_points(f_clean: np.ndarray, f_pert: np.ndarray, per_pair: int,
                rng: np.random.Generator) -> np.ndarray:
    """Feature vectors on the segments between each clean image and its perturbed copy."""
    t = rng.random((len(f_clean), per_pair, 1))
    pts = f_clean[:, None, :] + t * (f_pert - f_clean)[:, None, :]
    return pts.reshape(-1, f_clean.shape[1])


def fit_surrogate(forest: Any, f_clean: np.ndarray, f_pert: np.ndarray,
                  f_extra: np.ndarray | None = None, *, per_pair: int = 4, hidden: int = 32,
                  epochs: int = 60, seed: int = 0) -> Surrogate:
    """Fit the MLP to ``forest.predict_proba`` (soft targets, binary cross-entropy).

    ``f_clean[i]`` and ``f_pert[i]`` must be the same image clean and perturbed. 20% of the
    pairs are held out to measure fidelity (agreement of the 0.5 decisions, correlation).
    """
    import keras

    rng = np.random.default_rng([seed, 41])
    n = len(f_clean)
    order = rng.permutation(n)
    n_hold = max(1, n // 5)
    hold, fit = order[:n_hold], order[n_hold:]

    def points(idx: np.ndarray) -> np.ndarray:
        parts = [f_clean[idx], f_pert[idx], path_points(f_clean[idx], f_pert[idx], per_pair, rng)]
        return np.concatenate(parts)

    x_fit = points(fit)
    if f_extra is not None and len(f_extra):
        x_fit = np.concatenate([x_fit, f_extra])
    x_hold = points(hold)
    y_fit = np.asarray(forest.predict_proba(x_fit), np.float64)
    y_hold = np.asarray(forest.predict_proba(x_hold), np.float64)
    mean = x_fit.mean(axis=0)
    scale = x_fit.std(axis=0) + 1e-12

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((x_fit.shape[1],)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(((x_fit - mean) / scale).astype(np.float32), y_fit.astype(np.float32),
              epochs=epochs, batch_size=256, verbose=0)
    weights = tuple(np.asarray(w, np.float64) for w in model.get_weights())
    sur = Surrogate(mean=mean, scale=scale, weights=weights, fidelity={})
    p_hold = 1.0 / (1.0 + np.exp(-sur.logit_np(x_hold)))
    fidelity = {
        "holdout_points": float(len(x_hold)),
        "decision_agreement": float(np.mean((p_hold >= 0.5) == (y_hold >= 0.5))),
        "correlation": float(np.corrcoef(p_hold, y_hold)[0, 1]) if np.std(y_hold) > 0 else 0.0,
        "mean_abs_error": float(np.mean(np.abs(p_hold - y_hold))),
    }
    return Surrogate(mean=mean, scale=scale, weights=weights, fidelity=fidelity)
