"""`anomaly_detector.py analyze --csv` on real-world series shapes: repeated and unsorted timestamps
(two NAB files repeat timestamps) give one point per time instead of a pandas crash."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd

from tradewatch.config import PROJECT_ROOT


def test_repeated_and_unsorted_timestamps_are_one_point_each(tmp_path):
    times = pd.date_range("2015-01-01", periods=5000, freq="5min")
    values = 100 + np.random.default_rng(1).normal(0, 1, len(times))
    values[4000] = 400                                   # one clear spike
    frame = pd.DataFrame({"timestamp": times, "value": values})
    repeated = frame.iloc[[10, 20, 4000]].assign(value=lambda f: f.value + 2)   # same times, other values
    shuffled = pd.concat([frame, repeated]).sample(frac=1.0, random_state=3)
    path = tmp_path / "series.csv"
    shuffled.to_csv(path, index=False)

    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "analyze", "--csv", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["points"] == 5000 and report["repeated_timestamps_averaged"] == 3
    assert "3 repeated timestamps" in result.stderr
    flagged = {p["timestamp"] for flags in report["detectors"].values() for p in flags}
    assert times[4000].isoformat() in flagged, "the spike is still found"
