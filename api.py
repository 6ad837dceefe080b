#!/usr/bin/env python3
"""The read API: trades, candles, indicators, alerts and health over HTTP (see tradewatch/api.py)."""
from __future__ import annotations

import argparse
import sys

import uvicorn

from tradewatch.api import create_app
from tradewatch.cli import setup_logging
from tradewatch.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the read API (OpenAPI page at /docs).")
    parser.add_argument("--host", help="address to listen on (default: API_ADDRESS, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="default: API_PORT (8000)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = Settings.load()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=args.host or settings.api_address, port=args.port or settings.api_port,
                log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
