"""Isolation Forest over the engineered trade features, saved as versioned model files.

One pooled model for all symbols: every feature is scale-free (returns, z-scores, ratios, basis
points), so trades of a $3 and a $90,000 instrument are comparable, and rarely traded symbols
borrow strength from the busy ones. The flag threshold is the `flag_quantile` of the training
scores, so about that share of training-like trades is flagged. What drove a score: each feature
set alone to its training median, the score it would have had (`drivers`).
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

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly strength: > 1 means beyond the threshold (higher = more anomalous)."""
        if len(rows) == 0:
            return np.zeros(0)
        raw = -self.forest.score_samples(rows)           # larger = more anomalous
        return raw / self.threshold

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
