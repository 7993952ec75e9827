"""The `protonets` command: one sub-module per sub-command, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import importlib

from encoders.errors import UserInputError

#: Sub-command modules inside protonets.cli; each has `add_parser(subparsers)` and `run(args)`.
COMMANDS = ["classify"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protonets", description="Few-shot image classification with pretrained encoders."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
        format="protonets: warning: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except UserInputError as exc:
        print(f"protonets: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protonets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
