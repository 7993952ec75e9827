"""The `protonets` command: one sub-module per sub-command, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

import protonets
from protonets.encoders.errors import UserInputError, did_you_mean

#: Sub-commands: name -> (module inside protonets.cli with `add_parser(sub, summary)` and
#: `run(args)`, the one-line summary `protonets --help` lists).
COMMANDS = {
    "classify": ("classify", "classify query images against a support folder (one sub-folder per class)"),
    "embed": ("embed", "embed a dataset into a portable embedding set folder (also under torchrun)"),
    "eval": ("evaluate", "episodic benchmark: mean accuracy ± 95%% CI per method, ways and shots"),
    "memory": ("memory", "build, grow and query a saved support memory (FAISS; millions of images)"),
    "train": ("train", "train a few-shot model: ProtoNet (default), Siamese, MAML/FOMAML/ANIL"),
    "verify": ("verify", "same class or not? the Siamese head's similarity of two images"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `protonets CMD: error: ... (see 'protonets CMD --help')`."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        """argparse's check of `choices`, naming the closest choice to a mistyped value."""
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(repr(c) for c in action.choices)
            hint = did_you_mean(str(value), action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}){hint}")

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(command: str | None = None, names_only: bool = False) -> argparse.ArgumentParser:
    """The argument parser; with `command`, only that sub-command's module is imported (the
    others are listed by name and summary), so help and argument errors answer quickly; with
    `names_only`, no sub-command module is imported (`protonets --help`)."""
    parser = _Parser(prog="protonets", description="Few-shot image classification with pretrained encoders.")
    parser.add_argument("--version", action="version", version=f"protonets {protonets.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if (command is None and not names_only) or name == command:
            importlib.import_module(f"{__name__}.{module}").add_parser(sub, summary)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


@contextlib.contextmanager
def _command_logging(quiet: bool) -> Iterator[None]:
    """Warnings from our packages go to stderr as 'protonets: warning: ...' lines while the
    command runs; the logger is left as it was afterwards (`main` may be called as a function)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("protonets: warning: %(message)s"))
    logger = logging.getLogger("protonets")  # protonets.encoders and protonets.eval are below it
    saved = (logger.handlers, logger.level, logger.propagate)
    logger.handlers = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, logger.level, logger.propagate = saved


#: Library warnings a user may meet, reworded: (category name, start of the message) -> our words.
REWORDED = {
    ("UserWarning", "The number of unique classes is greater than 50%"): (
        "most classes have a single support image, so the probe fits one example per class "
        "(scikit-learn's 'unique classes > 50% of samples' warning); add images per class for "
        "steadier answers"
    ),
    ("ConvergenceWarning", "lbfgs failed to converge"): (
        "the logistic-regression probe did not converge within its iteration limit "
        "(scikit-learn's ConvergenceWarning); its answers may be less accurate"
    ),
}


def reword_warning(message: Warning | str, category: type[Warning]) -> str:
    """One line for a library warning: our own words for known ones, else its first line."""
    text = str(message).strip()
    for (name, start), words in REWORDED.items():
        if category.__name__ == name and text.startswith(start):
            return words
    first = text.splitlines()[0] if text else category.__name__
    return f"{first} ({category.__name__})"


class _WarningsOnce:
    """A `warnings.showwarning` that logs each distinct warning once, as one reworded line."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = reword_warning(message, category)
        if text not in self.seen:
            self.seen.add(text)
            logging.getLogger("protonets").warning("%s", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command, names_only=True) if command in COMMANDS else build_parser(names_only=True)
    args = parser.parse_args(argv)
    try:
        with _command_logging(getattr(args, "quiet", False)), warnings.catch_warnings():
            warnings.showwarning = _WarningsOnce()  # library warnings: one reworded line each, once
            status = int(args.run(args) or 0)
    except UserInputError as exc:
        if not getattr(exc, "quiet", False):  # under torchrun, rank 0 alone prints a shared error
            print(f"protonets: error: {exc}", file=sys.stderr, flush=True)
        from protonets.encoders.distributed import settle_shared_error

        settle_shared_error(exc)
        status = 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    except KeyboardInterrupt:
        print("protonets: interrupted", file=sys.stderr)
        status = 130
    finally:
        from protonets.encoders.distributed import leave_process_group

        leave_process_group()
    return status


def run_console() -> int:
    """The `protonets` console script and `python -m protonets`: `main()`, after which a torchrun
    rank ends at once, even after an unexpected error (see `end_rank_process` for why); `main`
    itself always returns, so it can be called as a function."""
    from protonets.encoders.distributed import end_rank_process, joined_process_group

    try:
        status = main()
    except SystemExit as exc:  # e.g. argparse's exit or the SIGTERM handler's
        if not joined_process_group():
            raise
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:  # a message, as sys.exit("...") gives
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        if not joined_process_group():
            raise
        traceback.print_exc()
        status = 1
    end_rank_process(status)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_console())
