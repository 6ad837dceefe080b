"""Versioned model files: `<kind>-vN.joblib` with `<kind>-vN.json` beside it (what was trained, on
what, and how it scored, readable without Python). N is one above the highest present, so a new
training never overwrites the model a running detector loaded."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path


def _numbered(directory: Path, kind: str) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in directory.glob(f"{kind}-v*.joblib")
                  if (m := re.match(rf"{re.escape(kind)}-v(\d+)\.joblib$", p.name)))


def save(directory: Path, kind: str, payload: dict, meta: dict) -> tuple[Path, str]:
    """Write `payload` (with `meta`, which gains its version and time) as the next version of `kind`."""
    import joblib       # loaded only when a model is written or read

    directory.mkdir(parents=True, exist_ok=True)
    found = _numbered(directory, kind)
    version = f"v{found[-1][0] + 1 if found else 1}"
    meta.update(version=version, saved_at=datetime.now(timezone.utc).isoformat())
    path = directory / f"{kind}-{version}.joblib"
    joblib.dump({**payload, "meta": meta}, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    return path, version


def load(path: Path) -> dict:
    import joblib

    return joblib.load(path)


def latest(directory: Path, kind: str) -> Path | None:
    found = _numbered(directory, kind)
    return found[-1][1] if found else None
