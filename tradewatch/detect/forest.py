"""Isolation Forest over the engineered trade features, saved as versioned model files.

One pooled model for all symbols: every feature is scale-free (returns, z-scores, ratios, basis
points), so trades of a $3 and a $90,000 instrument are comparable, and rarely traded symbols
borrow strength from the busy ones. The flag threshold is the `flag_quantile` of the training
scores, so about that share of training-like trades is flagged.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:      # scikit-learn and joblib load when a model is trained or read: a detector
    from sklearn.ensemble import IsolationForest      # without a model starts 2.5 s sooner

from tradewatch.detect.features import FEATURE_NAMES

MIN_TRAIN_TRADES = 1000


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

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly strength: > 1 means beyond the threshold (higher = more anomalous)."""
        if len(rows) == 0:
            return np.zeros(0)
        raw = -self.forest.score_samples(rows)           # larger = more anomalous
        return raw / self.threshold


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
    return ForestModel(forest, threshold, FEATURE_NAMES, params, training)


def save(model: ForestModel, directory: Path) -> Path:
    """Write model-vN.joblib (+ model-vN.json metadata) with N one above the highest present."""
    directory.mkdir(parents=True, exist_ok=True)
    versions = [int(m.group(1)) for p in directory.glob("model-v*.joblib")
                if (m := re.match(r"model-v(\d+)\.joblib$", p.name))]
    model.version = f"v{max(versions, default=0) + 1}"
    path = directory / f"model-{model.version}.joblib"
    meta = {"version": model.version, "features": list(model.features), "params": model.params,
            "threshold": model.threshold, "training": model.training,
            "saved_at": datetime.now(timezone.utc).isoformat()}
    import joblib

    joblib.dump({"forest": model.forest, "meta": meta}, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def load(path: Path) -> ForestModel:
    import joblib

    data = joblib.load(path)
    meta = data["meta"]
    if tuple(meta["features"]) != FEATURE_NAMES:
        raise ValueError(f"{path} was trained on features {meta['features']}, this code computes "
                         f"{list(FEATURE_NAMES)}; train a new model")
    return ForestModel(data["forest"], meta["threshold"], tuple(meta["features"]), meta["params"],
                       meta["training"], meta["version"])


def latest(directory: Path) -> Path | None:
    found = sorted(directory.glob("model-v*.joblib"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    return found[-1] if found else None
