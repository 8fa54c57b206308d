"""A Random Forest stored as plain arrays and evaluated with numpy, without scikit-learn.

Why: scikit-learn's per-sample ``predict_proba`` on 200 full-depth trees costs 17-31 ms here
(its per-call overhead: input validation, a joblib dispatch, one Python call per tree), and
its models only persist through pickle, which executes code on load. Here the forest is the
trees' node arrays in one ``.npz`` read with ``allow_pickle=False`` (data only, nothing to
execute), and prediction walks *all trees at once*: one vector of current nodes, one per
(sample, tree), advanced one level per numpy step until every walk sits on a leaf. Leaves
point at themselves, so finished walks cost nothing extra and there is no per-tree Python
loop. For one sample the step count is the deepest path reached, about 20-30 for full-depth
trees; ``bench/detector_latency.py`` measures it.

Exactness: scikit-learn casts X to float32 before comparing with its float64 thresholds, and
averages per-tree class fractions; we do the same, so ``predict_proba`` equals scikit-learn's
to within float rounding of the mean (tested to 1e-9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "sentinel-forest-v1"
_CHUNK = 64
_ARRAYS = ("feature", "threshold", "left", "right", "value", "roots", "depths")


@dataclass(frozen=True, eq=False)
class ForestArrays:
    """All trees' nodes concatenated; node ``i`` of tree ``t`` is row ``roots[t] + i``.

    feature (int32): split feature, 0 at leaves; threshold (float64): go left when
    x[feature] <= threshold; left/right (int64): global child ids, a leaf's children are
    itself; value (float64): P(class 1) at each node (used at leaves); roots (int64): first
    node of each tree; depths (int64): each tree's depth.
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    roots: np.ndarray
    depths: np.ndarray
    n_features: int

    def __post_init__(self) -> None:
        n = self.feature.shape[0]
        for name in ("threshold", "left", "right", "value"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"forest array {name} has shape {getattr(self, name).shape}")
        if self.roots.ndim != 1 or self.roots.size == 0:
            raise ValueError("forest has no trees")
        if n and (
            self.left.min() < 0
            or self.left.max() >= n
            or self.right.min() < 0
            or self.right.max() >= n
        ):
            raise ValueError("forest child index out of range")
        if n and (self.feature.min() < 0 or self.feature.max() >= self.n_features):
            raise ValueError("forest split feature index out of range")
        # Interleaved children: child[2*i] is the right child, child[2*i + 1] the left one,
        # so the next node is child[2*node + (x <= threshold)] in one gather.
        child = np.empty(2 * n, dtype=np.int64)
        child[0::2] = self.right
        child[1::2] = self.left
        object.__setattr__(self, "_child", child)
        object.__setattr__(self, "_is_leaf", self.left == np.arange(n, dtype=np.int64))

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)

    @property
    def n_nodes(self) -> int:
        return int(self.feature.size)

    @classmethod
    def from_sklearn(cls, rf: Any, positive_class: Any = 1) -> ForestArrays:
        """Copy a fitted ``RandomForestClassifier`` (binary) into arrays.

        ``positive_class`` is the label whose probability ``predict_proba`` returns (the
        "perturbed" class, 1 by default).
        """
        classes = list(rf.classes_)
        if positive_class not in classes:
            raise ValueError(f"class {positive_class!r} not among the forest's classes {classes}")
        ci = classes.index(positive_class)
        feats, thrs, lefts, rights, vals, roots, depths = [], [], [], [], [], [], []
        offset = 0
        for est in rf.estimators_:
            t = est.tree_
            n = t.node_count
            is_leaf = t.children_left == -1
            idx = np.arange(n, dtype=np.int64)
            left = np.where(is_leaf, idx, t.children_left).astype(np.int64) + offset
            right = np.where(is_leaf, idx, t.children_right).astype(np.int64) + offset
            value = t.value[:, 0, :].astype(np.float64)
            sums = value.sum(axis=1)
            prob = np.divide(value[:, ci], sums, out=np.zeros(n), where=sums > 0)
            feats.append(np.where(is_leaf, 0, t.feature).astype(np.int32))
            thrs.append(np.where(is_leaf, 0.0, t.threshold).astype(np.float64))
            lefts.append(left)
            rights.append(right)
            vals.append(prob)
            roots.append(offset)
            depths.append(int(t.max_depth))
            offset += n
        return cls(
            feature=np.concatenate(feats),
            threshold=np.concatenate(thrs),
            left=np.concatenate(lefts),
            right=np.concatenate(rights),
            value=np.concatenate(vals),
            roots=np.asarray(roots, dtype=np.int64),
            depths=np.asarray(depths, dtype=np.int64),
            n_features=int(rf.n_features_in_),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the arrays to an uncompressed ``.npz`` (no object arrays, no pickle)."""
        path = Path(path)
        with open(path, "wb") as fh:
            np.savez(
                fh,
                format=np.array(FORMAT),
                n_features=np.array(self.n_features, dtype=np.int64),
                **{name: getattr(self, name) for name in _ARRAYS},
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ForestArrays:
        """Read arrays written by ``save``; ``allow_pickle=False`` so nothing can execute."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = str(z["format"])
                if fmt != FORMAT:
                    raise ValueError(f"format {fmt!r}, expected {FORMAT!r}")
                arrays = {name: np.array(z[name]) for name in _ARRAYS}
                n_features = int(z["n_features"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a forest file this runtime reads ({exc})") from exc
        return cls(
            feature=arrays["feature"].astype(np.int32),
            threshold=arrays["threshold"].astype(np.float64),
            left=arrays["left"].astype(np.int64),
            right=arrays["right"].astype(np.int64),
            value=arrays["value"].astype(np.float64),
            roots=arrays["roots"].astype(np.int64),
            depths=arrays["depths"].astype(np.int64),
            n_features=n_features,
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(positive class) for each row of X (n, n_features), as the mean over trees."""
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"forest expects (n, {self.n_features}) features, got {X.shape}")
        # scikit-learn compares float32(x) with the float64 threshold; so do we.
        xs = X.astype(np.float32).astype(np.float64)
        if xs.shape[0] > _CHUNK:
            # Walk a few rows at a time: ~13k concurrent walks keep the gathers in cache
            # (5000 rows x 200 deep trees: 1.08 s in one piece, 0.36 s in chunks of 64).
            return np.concatenate(
                [self._walk(xs[i : i + _CHUNK]) for i in range(0, xs.shape[0], _CHUNK)]
            )
        return self._walk(xs)

    def _walk(self, xs: np.ndarray) -> np.ndarray:
        """Mean leaf probability over all trees for float32-rounded rows ``xs``."""
        n, n_trees = xs.shape[0], self.n_trees
        feature, threshold = self.feature, self.threshold
        child, is_leaf = self._child, self._is_leaf  # type: ignore[attr-defined]
        # Flat feature lookups: row r's feature f sits at r * n_features + f.
        flat = xs.reshape(-1)
        node = np.tile(self.roots, n)
        base = np.repeat(np.arange(n, dtype=np.int64) * self.n_features, n_trees)
        pos = np.arange(n * n_trees, dtype=np.int64)  # where each active walk reports
        result = np.empty(n * n_trees, dtype=np.int64)
        steps = int(self.depths.max())
        for step in range(steps):
            fidx = feature[node]
            if n > 1:
                fidx += base
            go_left = flat[fidx] <= threshold[node]
            node *= 2
            node += go_left
            node = child[node]
            # Every 8 levels drop the walks that reached a leaf: deep trees are the minority.
            if step % 8 == 7 and step + 1 < steps:
                done = is_leaf[node]
                if done.any():
                    result[pos[done]] = node[done]
                    keep = ~done
                    node, pos, base = node[keep], pos[keep], base[keep]
                    if node.size == 0:
                        break
        result[pos] = node
        return self.value[result].reshape(n, n_trees).mean(axis=1)
