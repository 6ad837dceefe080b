#!/usr/bin/env python3
"""The read API: trades, candles, indicators, alerts and health over HTTP (see tradewatch/api_app.py)."""
from __future__ import annotations

import argparse
import sys

import uvicorn

from tradewatch.access import LOOPBACK
from tradewatch.api_app import create_app
from tradewatch.cli import load_settings, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the read API (OpenAPI page at /docs).")
    parser.add_argument("--host", help="address to listen on (default: API_ADDRESS, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="default: API_PORT (8000)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings()
    host = args.host or settings.api_address
    if host not in LOOPBACK and not settings.api_key:
        print(f"error: the API would listen on {host}, beyond this machine, without API_KEY: set API_KEY (and"
              " API_ALLOWED_HOSTS to the names clients use), or listen on 127.0.0.1", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=host, port=args.port or settings.api_port,
                log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
