"""The `protonets` command: one sub-module per sub-command, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from protonets.encoders.errors import UserInputError

#: Sub-commands: name -> (module inside protonets.cli with `add_parser(sub, summary)` and
#: `run(args)`, the one-line summary `protonets --help` lists).
COMMANDS = {
    "classify": ("classify", "classify query images against a support folder (one sub-folder per class)"),
    "eval": ("evaluate", "episodic benchmark: mean accuracy ± 95%% CI per method, ways and shots"),
    "memory": ("memory", "build, grow and query a saved support memory (FAISS; millions of images)"),
    "train": ("train", "train a few-shot model: ProtoNet (default), Siamese, MAML/FOMAML/ANIL"),
    "verify": ("verify", "same class or not? the Siamese head's similarity of two images"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `command`, only that sub-command's module is imported (the
    others are listed by name and summary), so help and argument errors answer quickly."""
    parser = argparse.ArgumentParser(
        prog="protonets", description="Few-shot image classification with pretrained encoders."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"{__name__}.{module}").add_parser(sub, summary)
        else:
            sub.add_parser(name, help=summary, add_help=False)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
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
