"""Isolation Forest over the engineered trade features, saved as versioned model files.

One pooled model for all symbols: every feature is scale-free (returns, z-scores, ratios, basis
points), so trades of a $3 and a $90,000 instrument are comparable, and rarely traded symbols
borrow strength from the busy ones. The flag threshold is the `flag_quantile` of the training
scores, so about that share of training-like trades is flagged. What drove a score: each feature
set alone to its training median, the score it would have had (`drivers`). Scores are computed
from the fitted trees directly (`Paths`): the same as scikit-learn's, without its per-call cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:      # scikit-learn and joblib load when a model is trained or read: a detector
    from sklearn.ensemble import IsolationForest      # without a model starts 2.5 s sooner

from tradewatch.detect import versions
from tradewatch.detect.features import FEATURE_NAMES

MIN_TRAIN_TRADES = 1000
DRIVERS = 3
# a model saved before the training medians were: a typical trade, every feature at rest
NEUTRAL = tuple(1.0 if name == "volume_ratio" else 0.0 for name in FEATURE_NAMES)


class NotEnoughData(ValueError):
    pass


@dataclass
class ForestModel:
    forest: IsolationForest
    threshold: float
    features: tuple[str, ...] = FEATURE_NAMES
    params: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    version: str = "unsaved"
    medians: tuple[float, ...] | None = None     # of each feature over the training trades

    _paths: Paths | None = field(default=None, init=False, repr=False, compare=False)

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly strength: > 1 means beyond the threshold (higher = more anomalous)."""
        if len(rows) == 0:
            return np.zeros(0)
        if self._paths is None:
            self._paths = Paths(self.forest)
        return self._paths.score(rows) / self.threshold

    def drivers(self, rows: np.ndarray, scores: np.ndarray) -> list[list[dict]]:
        """For each row (with its `scores`), the features that raised its score most: the score
        each would leave with that feature alone at its training median, largest drop first."""
        typical = np.array(self.medians if self.medians is not None else NEUTRAL)
        k = len(self.features)
        probes = np.repeat(rows, k, axis=0)
        for j in range(k):
            probes[j::k, j] = typical[j]
        without = self.score(probes).reshape(len(rows), k)
        found = []
        for row, score, alone in zip(rows, scores, without):
            order = [j for j in np.argsort(alone) if alone[j] < score][:DRIVERS]
            found.append([{"feature": self.features[j], "value": float(row[j]), "typical": float(typical[j]),
                           "score_without": float(alone[j])} for j in order])
        return found


def average_path(n: np.ndarray) -> np.ndarray:
    """The average path length of an unsuccessful search in a binary tree of `n` points: what a
    leaf holding n training points adds to the depth at which a point was isolated."""
    n = np.asarray(n, dtype=float)
    grown = 2.0 * (np.log(np.maximum(n, 3.0) - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / np.maximum(n, 1.0)
    return np.where(n <= 1, 0.0, np.where(n == 2, 1.0, grown))


class Paths:
    """A fitted IsolationForest compiled for scoring: `score` gives what its `score_samples` gives,
    negated (larger = more anomalous), the same to the last bit. scikit-learn's own call dispatches
    each tree through joblib, ~40 µs a tree (8 ms for 200, whatever the batch), where the detector
    scores what one poll brought, often a handful of trades. Here a batch of up to `WALK_ALL_ROWS`
    walks every tree at once in numpy (~0.06 ms for one row, 0.5 for 20); a larger one goes tree by
    tree through each tree's own Cython `apply` (~0.5 ms a call, 6 µs a row at 2,000)."""

    WALK_ALL_ROWS = 32

    def __init__(self, forest: IsolationForest):
        self.trees, flat, offset = [], [], 0
        for estimator in forest.estimators_:
            tree = estimator.tree_
            # the path a point ends with in each leaf: the leaf's depth (the root is 1), plus the
            # average path of the training points it holds, - 1
            depth, level, nodes = np.zeros(tree.node_count), 1.0, np.array([0])
            while len(nodes):
                depth[nodes] = level
                children = np.concatenate((tree.children_left[nodes], tree.children_right[nodes]))
                nodes, level = children[children >= 0], level + 1.0
            path = depth + average_path(tree.n_node_samples) - 1.0
            self.trees.append((tree, path))
            leaf, here = tree.children_left < 0, np.arange(tree.node_count) + offset
            # a leaf leads to itself whatever the point: a walk of the deepest tree's depth ends in a leaf
            flat.append((np.where(leaf, 0, tree.feature), np.where(leaf, np.inf, tree.threshold),
                         np.where(leaf, here, tree.children_left + offset),
                         np.where(leaf, here, tree.children_right + offset), path))
            offset += tree.node_count
        self.feature, self.threshold, left, right, self.path = (np.concatenate(c) for c in zip(*flat))
        self.left, self.right = left.astype(np.intp), right.astype(np.intp)
        self.feature = self.feature.astype(np.intp)
        self.roots = np.cumsum([0] + [t.node_count for t, _ in self.trees[:-1]]).astype(np.intp)
        self.depth = max(t.max_depth for t, _ in self.trees)
        self.denominator = len(self.trees) * float(average_path(np.array([forest.max_samples_]))[0])

    def score(self, rows: np.ndarray) -> np.ndarray:
        points = np.ascontiguousarray(rows, dtype=np.float32)    # what the trees were split on
        if len(points) <= self.WALK_ALL_ROWS and not np.isnan(points).any():   # (a tree sends NaN its own way)
            nodes, row = np.repeat(self.roots[None, :], len(points), axis=0), np.arange(len(points))[:, None]
            for _ in range(self.depth):
                nodes = np.where(points[row, self.feature[nodes]] <= self.threshold[nodes], self.left[nodes],
                                 self.right[nodes])
            depths = np.cumsum(self.path[nodes], axis=1)[:, -1]    # summed tree by tree, in order, as scikit-learn
        else:
            depths = np.zeros(len(points))
            for tree, path in self.trees:
                depths += path[tree.apply(points)]
        return 2.0 ** (-depths / self.denominator)


def train(rows: np.ndarray, training: dict, n_estimators: int = 200, flag_quantile: float = 0.0002,
          seed: int = 0) -> ForestModel:
    if len(rows) < MIN_TRAIN_TRADES:
        raise NotEnoughData(f"have {len(rows)} trades with features, need at least {MIN_TRAIN_TRADES}")
    params = {"n_estimators": n_estimators, "max_samples": min(1024, len(rows)), "random_state": seed,
              "flag_quantile": flag_quantile}
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=n_estimators, max_samples=params["max_samples"], random_state=seed)
    forest.fit(rows)
    raw = -forest.score_samples(rows)
    threshold = float(np.quantile(raw, 1 - flag_quantile))
    medians = tuple(float(m) for m in np.median(rows, axis=0))
    return ForestModel(forest, threshold, FEATURE_NAMES, params, training, medians=medians)


def save(model: ForestModel, directory: Path) -> Path:
    """Write model-vN.joblib (+ model-vN.json metadata) with N one above the highest present."""
    meta = {"features": list(model.features), "params": model.params, "threshold": model.threshold,
            "training": model.training, "medians": model.medians}
    path, model.version = versions.save(directory, "model", {"forest": model.forest}, meta)
    return path


def load(path: Path) -> ForestModel:
    data = versions.load(path)
    meta = data["meta"]
    if tuple(meta["features"]) != FEATURE_NAMES:
        raise ValueError(f"{path} was trained on features {meta['features']}, this code computes "
                         f"{list(FEATURE_NAMES)}; train a new model")
    medians = meta.get("medians")        # absent in a model saved before drivers were explained
    return ForestModel(data["forest"], meta["threshold"], tuple(meta["features"]), meta["params"],
                       meta["training"], meta["version"], tuple(medians) if medians else None)


def latest(directory: Path) -> Path | None:
    return versions.latest(directory, "model")
