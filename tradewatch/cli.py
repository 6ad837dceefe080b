"""What every stage's command line shares: logging and a graceful stop on SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import time
from datetime import datetime, timezone

import orjson


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line for log shippers — timestamp, level, stage (the
    logger's last part), logger, message, and any `extra=` fields (partition, offset, …)."""
    _PLAIN = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"timestamp": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "stage": record.name.rsplit(".", 1)[-1], "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._PLAIN and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(verbose: bool = False) -> None:
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck stage is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    handler = logging.StreamHandler(sys.stderr)
    if log_format() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def load_settings(**overrides: object):
    """Settings.load(**overrides); a bad setting prints one line naming it and exits with status 2
    (every entry point loads its settings through here)."""
    from tradewatch.config import Settings
    try:
        return Settings.load(**overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def log_format() -> str:
    """LOG_FORMAT from the environment or .env: text (default) or json."""
    from tradewatch.config import Settings
    try:
        return Settings.load().log_format.strip().lower()
    except ValueError:
        return "text"


class StopFlag:
    """Set by SIGINT/SIGTERM; stages check it between batches and finish cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._first_signal_at = 0.0
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            # A second Ctrl-C a while after the first: the user means it. (Some launchers deliver
            # the same signal twice at once, which must not turn a clean stop into a crash.)
            if time.monotonic() - self._first_signal_at > 2.0:
                raise KeyboardInterrupt
            return
        self._first_signal_at = time.monotonic()
        logging.getLogger("tradewatch").info("%s received, finishing the current batch", signal.Signals(signum).name)
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def iso_time(text: str) -> datetime:
    """argparse type: ISO-8601 time, UTC when it has no offset (e.g. 2013-10-07T13:30:00Z)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r} (e.g. 2013-10-07T13:30:00Z)")
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def positive_int(text: str) -> int:
    """A whole number above 0, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return value


def cores() -> int:
    """The cores this process may run on (all of the machine's where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
