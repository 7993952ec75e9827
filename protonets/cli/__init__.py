"""The `protonets` command: one sub-module per sub-command, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from protonets.encoders.errors import UserInputError

#: Sub-command modules inside protonets.cli; each has `add_parser(subparsers)` and `run(args)`.
COMMANDS = ["classify", "evaluate", "memory", "train", "verify"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protonets", description="Few-shot image classification with pretrained encoders."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    """Warnings from our packages go to stderr as 'protonets: warning: ...' lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("protonets: warning: %(message)s"))
    logger = logging.getLogger("protonets")  # protonets.encoders and protonets.eval are below it
    logger.handlers = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(quiet=getattr(args, "quiet", False))
    try:
        return int(args.run(args) or 0)
    except UserInputError as exc:
        print(f"protonets: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("protonets: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
