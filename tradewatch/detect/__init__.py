"""Anomaly detection: per-trade features (features.py), rules (rules.py), Isolation Forest
(forest.py), series detectors for plain time series (series.py), scoring (evaluate.py).
Pure code: no Kafka, no SQL. Detectors never read a trade's `injected_anomaly` label."""
