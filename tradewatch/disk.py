"""The free disk where TradeWatch keeps its data (TRADEWATCH_HOME: Kafka's log, PostgreSQL's data
folder, the Parquet archive), and the one line below which it is low: under 10 % of the disk or
under 2 GiB, whichever is more. Used by `doctor`, `/health` (the dashboard's health strip), the
stages' metrics (`tradewatch_disk_free_bytes`, which the Prometheus rule TradeWatchDiskLow compares
with the same line) and `maintain`'s size bound (it archives and drops old days early below it)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

LOW_FREE_FRACTION = 0.10        # a share: a large disk warns while there is still time to act
LOW_FREE_BYTES = 2 * 1024**3    # PostgreSQL's WAL (max_wal_size: up to 2 GB, tradewatch/stack.py) and
                                # Kafka's next log segments must still fit


@dataclass(frozen=True)
class Disk:
    folder: Path     # the nearest existing folder of TRADEWATCH_HOME (the disk it will be on)
    free: int
    total: int

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0

    @property
    def low(self) -> bool:
        return self.free < max(LOW_FREE_FRACTION * self.total, LOW_FREE_BYTES)


def usage(home) -> Disk:
    folder = Path(home).absolute()
    while not folder.exists():
        folder = folder.parent
    found = shutil.disk_usage(folder)
    return Disk(folder, found.free, found.total)


def archive_bytes(home) -> int:
    """What the Parquet archive (TRADEWATCH_HOME/archive) takes."""
    archive = Path(home) / "archive"
    return sum(p.stat().st_size for p in archive.rglob("*.parquet")) if archive.exists() else 0
