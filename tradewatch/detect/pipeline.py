"""Rules + Isolation Forest over a batch of trades: the one path `run`, `analyze` and `evaluate` share."""
from __future__ import annotations

import numpy as np

from tradewatch.detect.forest import ForestModel
from tradewatch.detect.rules import DETECTOR_VERSION, Detection, RuleDetector
from tradewatch.events import Trade


class DetectionPipeline:
    def __init__(self, rules: RuleDetector | None = None, model: ForestModel | None = None):
        self.rules = rules or RuleDetector()
        self.model = model

    @property
    def version(self) -> str:
        return f"{DETECTOR_VERSION}+forest-{self.model.version}" if self.model else DETECTOR_VERSION

    def process(self, trades: list[Trade]) -> list[Detection]:
        detections = [self.rules.process(t) for t in trades]
        if self.model is not None:
            warm = [d for d in detections if d.features.history >= self.rules.config.min_history]
            if warm:
                scores = self.model.score(np.array([d.features.vector() for d in warm]))
                for d, score in zip(warm, scores):
                    if score > 1.0:
                        d.flag("ISOLATION_FOREST", float(score), forest_score=round(float(score), 3))
        return detections
