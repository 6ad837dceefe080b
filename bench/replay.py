#!/usr/bin/env python3
"""Replay benchmark: what `producer.py --replay` holds in memory and how fast it reads, before Kafka.

A day of a busy pair as Binance serves it (a spot `trades` zip, no header; `--rows`, 2,000,000 by
default, about a BTCUSDT day) is read three ways, each in its own process, its peak memory (RSS)
measured by the kernel (VmHWM):
- `stream`: a `Replay` as the producer takes it (REORDER_ROWS held), every trade with its side;
- `whole`: the same file read whole into lists (`load_files`, what the producer did before);
- `csv_ceiling`: the zip's rows split by the csv module and nothing else — the machine's ceiling for
  reading that file in Python;
and, beside them, the memory of a process that only imported the replay (what any of them starts from).
Then, on a private stack (bench/common.py), what a user waits for: `producer.py --replay FILE --speed
max` into a fresh topic, timed from its start until it exits (every trade acknowledged by Kafka),
beside `producer.py --rate max` sending as many simulated trades (the same producer without a file)
and the ceiling: the Kafka client alone sending 500,000 of the file's trades already encoded.
`--no-kafka` leaves that out. Prints JSON.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tradewatch.market import replay  # noqa: E402


def write_day(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    price, ms = 60_000.0, 1_740_787_200_000
    lines = []
    for n in range(rows):
        price = max(1.0, price + rng.choice((-0.01, 0.0, 0.01)) * rng.randint(0, 50))
        ms += rng.randint(0, 86)
        quantity = 0.00001 + rng.expovariate(20)
        lines.append(f"{n + 1},{price:.2f},{quantity:.5f},{price * quantity:.8f},{ms * 1000},"
                     f"{'true' if rng.random() < 0.5 else 'false'},true\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(path.with_suffix(".csv").name, "".join(lines))


def measure(how: str, path: Path) -> dict:
    started = time.perf_counter()
    rows = 0
    if how == "stream":
        for _ in replay.Replay([path]):
            rows += 1
    elif how == "whole":
        rows = len(replay.load_files([path]).trades)
    elif how == "csv_ceiling":
        with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as raw:
            for _ in csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
                rows += 1
    elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": round(elapsed, 2), "rows_per_s": round(rows / elapsed) if rows else 0,
            "peak_rss_mb": peak_rss_mb()}


def producers(path: Path, rows: int) -> dict:
    """Trades per second from a producer's start to its exit, each into a fresh topic (every trade
    checked to be there), and this machine's ceiling: the Kafka client sending the file's trades
    already encoded."""
    from common import bench_settings, start_stage

    from tradewatch import bus
    settings = bench_settings()

    def fresh() -> str:
        topic = f"replay-bench-{uuid.uuid4().hex[:6]}"
        bus.ensure_topic(settings, topic, settings.trades_partitions)
        return topic
    result = {}
    for how, args in (("producer_replay", ("--replay", str(path), "--speed", "max")),
                      ("producer_simulated", ("--rate", "max", "--count", str(rows)))):
        run = settings.with_overrides(trades_topic=fresh())
        started = time.perf_counter()
        code = start_stage(run, "producer.py", *args).wait()
        elapsed = time.perf_counter() - started
        sent = sum(bus.end_offsets(run, run.trades_topic).values())
        if code != 0 or sent != rows:
            raise SystemExit(f"{how}: exit {code}, {sent} of {rows} trades in the topic")
        result[how] = {"trades": sent, "seconds": round(elapsed, 1), "trades_per_s": round(sent / elapsed)}
    encoded = [(t.symbol.encode(), t.to_json_bytes()) for t in itertools.islice(replay.Replay([path]), 500_000)]
    topic, publisher = fresh(), bus.publisher(settings)
    started = time.perf_counter()
    for key, value in encoded:
        publisher.send(topic, key, value)
    publisher.flush()
    result["ceiling_kafka_publish_per_s"] = round(len(encoded) / (time.perf_counter() - started))
    publisher.close()
    return result


def peak_rss_mb() -> int:
    """This process's peak resident memory (VmHWM: ru_maxrss would keep the parent's, from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--no-kafka", action="store_true", help="only the reading, no producer through Kafka")
    parser.add_argument("--measure", nargs=2, metavar=("HOW", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        how, path = args.measure
        print(json.dumps({"peak_rss_mb": peak_rss_mb()} if how == "imports" else measure(how, Path(path))))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "BTCUSDT-trades-2025-03-01.zip"
        write_day(path, args.rows)
        result: dict = {"file": {"rows": args.rows, "zip_mb": round(path.stat().st_size / 2**20, 1)},
                        "reorder_rows": replay.REORDER_ROWS}
        for how in ("imports", "stream", "whole", "csv_ceiling"):
            out = subprocess.run([sys.executable, __file__, "--measure", how, str(path)], capture_output=True,
                                 text=True, check=True).stdout
            result[how] = json.loads(out)
        if not args.no_kafka:
            result.update(producers(path, args.rows))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
