"""The ``lrsafety`` command: ``run`` (notebooks through papermill), ``judge`` and ``report``."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrsafety", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    from lrsafety import runner

    runner.add_arguments(commands.add_parser("run", help="execute the numbered notebooks for one model"))

    try:
        from lrsafety.judges import cli as judges_cli
    except ImportError:
        judges_cli = None
    if judges_cli is not None:
        judges_cli.add_arguments(commands.add_parser("judge", help="label responses as refusals"))

    try:
        from lrsafety import report
    except ImportError:
        report = None
    if report is not None and hasattr(report, "add_arguments"):
        report.add_arguments(commands.add_parser("report", help="build the results site from run folders"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(arguments.handler(arguments) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished files are kept and the next run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
