"""One convention for every command-line tool (`spannorm-train`, `-finetune`, `-generate`, `-evaluate`, `-publish`
and their `scripts/*.py` wrappers):

- a tool's options are one dataclass (`TrainArguments`, `FinetuneArguments`, `GenerateArguments`,
  `EvaluateArguments`, `PublishArguments`), built into a parser by its module's `parser()` (hub's `publish_parser()`),
  `ArgumentParser(XArguments, description=...)`, and read with `parse_args_into_dataclasses(argv)` (transformers'
  `HfArgumentParser`). One field per option, `field(default=..., metadata={"help": ...})`: no default makes the
  option required, a `list[str]` field takes several values, and `metadata` may add argparse keywords (`choices`,
  `metavar`, `action="extend"` for an option that may be repeated) or `allow_empty`. The dataclass's
  `__post_init__` checks values and options that depend on each other, raising `InputError`. Every long option
  answers to both spellings (`--max-new-tokens` and `--max_new_tokens`), `--help` shows each field's help and
  default, and a float option must be a finite number (`--lr nan` is refused by name);
- bad input is an `InputError` (or a missing / misplaced path: `FileNotFoundError`, `NotADirectoryError`,
  `IsADirectoryError`, `FileExistsError`, `PermissionError`; a config field that fails its validation,
  `StrictDataclassError`, as transformers raises for every config; or a full disk, `DiskFullError`), reported by
  `command` as one line `error: <what, which value, how to fix>` on stderr, exit code 2, no traceback. Anything
  else is a bug and keeps its traceback.
"""

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser

from .files import DiskFullError

USAGE_ERROR = 2  # the exit code of bad input, as argparse uses it
# Exceptions about a path the user gave; our own code raises them with a message naming the path.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class InputError(ValueError):
    """Bad input from the user: a value, file or folder the command cannot use. The message says what is wrong,
    with which value, and how to fix it. A `ValueError`, so library callers that catch `ValueError` still do."""


def finite_float(text: str) -> float:
    """argparse `type` for float options: a finite number (`nan` and `inf` would pass every `<`/`>` check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


class ArgumentParser(HfArgumentParser):
    """The parser of every spannorm CLI, built from its dataclass of options (HfArgumentParser): finite floats, the
    hyphenated spelling first, and `InputError` instead of argparse's usage-and-exit on bad input."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        """HfArgumentParser's hook for each field (it gives a list field `nargs="+"`; `metadata={"allow_empty":
        True}` makes that `"*"`, so the option given alone is an empty list)."""
        if kwargs.get("type") is float:
            kwargs["type"] = finite_float
        if kwargs.pop("allow_empty", False):
            kwargs["nargs"] = "*"
        # `--max-length` before `--max_length`: argparse names an option by its first spelling (errors, usage).
        return super().add_argument(*sorted(names, key=lambda name: "_" in name), **kwargs)

    def parse_args_into_dataclasses(self, args: Sequence[str] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        """As HfArgumentParser's, but an unknown option is bad input (there: a `ValueError` with a traceback), and
        the options are the command line's alone (there: also a `<script>.args` file beside the script, if any)."""
        kwargs.setdefault("look_for_args_file", False)
        *outputs, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)

    def error(self, message: str) -> None:  # argparse's hook: it would print the usage and exit
        raise InputError(f"{message} (see --help)")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (library messages, e.g. PEFT's, may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI's `main(argv) -> exit code`: bad input becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (InputError, DiskFullError, StrictDataclassError, *PATH_ERRORS) as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return USAGE_ERROR

    return run
