"""The simulated past a demo opens on. `producer.py --history SECONDS` sends it (event time from
SECONDS ago up to now, as fast as the pipeline takes it) and records its span here, in the data
folder, so the dashboard can mark it as simulated at start; the live trades follow it."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from tradewatch.config import Settings

MARK_FILE = "simulated-history.json"


def _path(settings: Settings) -> Path:
    return settings.home / MARK_FILE


def mark(settings: Settings, from_ms: int, until_ms: int) -> None:
    path = _path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"from_ms": from_ms, "until_ms": until_ms}))
    os.replace(partial, path)          # a reader sees the old span or the new one, never half of one


def span(settings: Settings) -> tuple[datetime, datetime] | None:
    """(start, end) in UTC of the last simulated history sent into this data folder, if any."""
    try:
        found = json.loads(_path(settings).read_text())
        return tuple(datetime.fromtimestamp(found[k] / 1000, timezone.utc) for k in ("from_ms", "until_ms"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
