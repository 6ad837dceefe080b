"""`python -m tradewatch doctor`: the project's own commands that are not a stage."""
from __future__ import annotations

import argparse
import sys

from tradewatch import doctor
from tradewatch.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tradewatch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check Java, jars, Kafka, PostgreSQL, the stages, ports and disk")
    parser.parse_args(argv)
    try:
        settings = Settings.load()
    except ValueError as error:
        print(f"✘ settings: {error}", file=sys.stderr)
        return 1
    return doctor.run(settings)


if __name__ == "__main__":
    sys.exit(main())
