"""Rules + Isolation Forest over a batch of trades: the one path `run`, `analyze` and `evaluate` share."""
from __future__ import annotations

import numpy as np

from tradewatch.detect.evidence import Evidence, trades_named
from tradewatch.detect.features import FEATURE_NAMES
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
                rows = np.array([d.features.vector() for d in warm])
                scores = self.model.score(rows)
                flagged = np.flatnonzero(scores > 1.0)
                if len(flagged):
                    drivers = self.model.drivers(rows[flagged], scores[flagged])
                    for i, found in zip(flagged, drivers):
                        d, score = warm[i], float(scores[i])
                        d.flag("ISOLATION_FOREST", score, self._forest_evidence(d, score, found),
                               forest_score=round(score, 3))
        return detections

    def _forest_evidence(self, d: Detection, score: float, drivers: list[dict]) -> Evidence:
        m = self.model
        quantile = m.params.get("flag_quantile")
        line = f"the score of the top {quantile * 100:g} % of its training trades" if quantile else "its threshold"
        typical = "training median" if m.medians is not None else "a trade at rest"
        driven = "; ".join(f"{x['feature']} {x['value']:.4g} (typical {x['typical']:.4g}; {x['score_without']:.2f} "
                           "without it)" for x in drivers)
        sentence = (f"the Isolation Forest (model {m.version}) scores this trade {score:.2f}× {line}"
                    f"{'; most from ' + driven if driven else ''}")
        return Evidence("ISOLATION_FOREST", {"model": m.version, "flag_quantile": quantile}, "features", score, None,
                        line, score, 1.0, f"1 = {line}", "score", sentence,
                        trades_named(d.trade.trade_id, [], None, d.trade.timestamp_ms, 0),
                        extra={"drivers": drivers, "typical": typical,
                               "features": dict(zip(FEATURE_NAMES, d.features.vector()))})
