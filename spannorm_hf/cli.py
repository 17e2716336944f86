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
  else is a bug and keeps its traceback. Ctrl-C is exit code 130 (as a shell reports it) with one line, no
  traceback; outputs are written atomically (`spannorm_hf.files`), so an interrupted command leaves none half
  written;
- numeric options have bounds (`check_range`), and a file the user names is read as text through `read_text` /
  `read_json_records`: in blocks, up to a size bound that the error names with the way around it, and a binary or
  non-UTF-8 file is one `error:` line naming the byte, never a traceback or a read without end (`/dev/zero`).
"""

import argparse
import codecs
import functools
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser

from .files import DiskFullError

USAGE_ERROR = 2  # the exit code of bad input, as argparse uses it
INTERRUPTED = 130  # the exit code of Ctrl-C: 128 + SIGINT, as a shell reports a command it stopped
READ_BLOCK = 1 << 20  # files are read (and checked) a MiB at a time
SETTINGS_LIMIT = 16 << 20  # the bound of a JSON settings file (a config.json, --training-details): a few KB in practice
MAX_SEED = 2**32 - 1  # the largest --seed: every RNG a command seeds takes it (NumPy's is the narrowest)
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
    """Wrap a CLI's `main(argv) -> exit code`: bad input becomes `error: ...` on stderr and exit code 2, Ctrl-C one
    line and exit code 130."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (InputError, DiskFullError, StrictDataclassError, *PATH_ERRORS) as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return USAGE_ERROR
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C); outputs are written whole or not at all", file=sys.stderr)
            return INTERRUPTED

    return run


def check_range(flag: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    """`InputError` unless `low <= value <= high` (a `None` value or bound is not checked): `--flag must be >= low,
    got value`, as spannorm-train words it."""
    if value is None:
        return
    if low is not None and value < low:
        raise InputError(f"{flag} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{flag} must be <= {high}, got {value}")


def _mib(size: int) -> str:
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size:,} bytes"


def read_text(path: str | os.PathLike, *, flag: str, limit: int, bigger: str) -> str:
    """The text of a UTF-8 file the user named with `flag`, read a block at a time (newlines made `\n`, as `open`
    does). `InputError` as soon as the file passes `limit` bytes (`bigger` says what to do instead; /dev/zero never
    ends), holds a NUL byte (a binary file) or is not UTF-8, naming the byte."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder: name a file")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {str(path)!r} not found")
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    parts, offset = [], 0  # offset: bytes read before the current block
    with open(path, "rb") as handle:
        while block := handle.read(min(READ_BLOCK, limit + 1 - offset)):
            if offset + len(block) > limit:
                raise InputError(f"{flag} {str(path)!r} is larger than {_mib(limit)}, the bound of {flag}: {bigger}")
            if b"\0" in block:
                raise InputError(
                    f"{flag} {str(path)!r} is not a text file (byte {offset + block.index(0)} is NUL): give a UTF-8 "
                    "text file"
                )
            try:
                parts.append(decoder.decode(block))
            except UnicodeDecodeError as error:
                pending = len(decoder.getstate()[0])  # bytes of a character the previous block cut in two
                raise InputError(
                    f"{flag} {str(path)!r} is not UTF-8 text (byte {offset - pending + error.start} is 0x"
                    f"{error.object[error.start]:02x}): save it as UTF-8"
                ) from None
            offset += len(block)
    try:
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise InputError(
            f"{flag} {str(path)!r} is not UTF-8 text (it ends inside a character): save it as UTF-8"
        ) from None
    return "".join(parts)


def read_json_records(path: str | os.PathLike, *, flag: str, limit: int, bigger: str) -> list[tuple[str, dict]]:
    """The records of a `.jsonl` file (one JSON object per line) or a `.json` file (a JSON array of objects, or JSON
    lines), read as `read_text` reads, each with where it is (`line 3`, `record 3`) for error messages. A line that
    is not JSON, or a record that is not an object, is an `InputError` naming it."""
    text = read_text(path, flag=flag, limit=limit, bigger=bigger)
    name = f"{flag} {str(path)!r}"
    if Path(path).suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{name} is not valid JSON ({error}): give a JSON array of objects") from None
        records = [(f"record {number}", item) for number, item in enumerate(items, start=1)]
    else:
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{name} line {number} is not valid JSON ({error.msg} at column {error.colno}): the file must "
                    "hold one JSON object per line"
                ) from None
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(f"{name} {where} is {_json_kind(record)}, not a JSON object ({{...}} with named fields)")
    return records


def read_json_object(path: str | os.PathLike, *, what: str, limit: int = SETTINGS_LIMIT) -> dict[str, Any]:
    """A JSON object from a settings file (`what` names it: `--training-details`), read as `read_text` reads;
    `InputError` naming the file when it is not valid JSON or not an object."""
    text = read_text(path, flag=what, limit=limit, bigger="a settings file is a few KB: is it the right file?")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {str(path)!r} is not a readable JSON file (not valid JSON: {error})") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} {str(path)!r} must hold a JSON object, not {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "true or false", type(None): "null", dict: "an object"}
    return next((kind for cls, kind in kinds.items() if isinstance(value, cls)), "a number")


def text_fields(records: Sequence[tuple[str, dict]], field: str, *, flag: str, path: str | os.PathLike) -> list[str]:
    """The `field` of every record of `read_json_records`, each of which must be a string: `InputError` naming the
    first record where it is missing or something else (a number, null, a list)."""
    values = []
    for where, record in records:
        value = record.get(field)
        if not isinstance(value, str):
            found = "has none" if field not in record else f"is {_json_kind(value)} ({json.dumps(value)[:40]})"
            raise InputError(f"{flag} {str(path)!r} {where}: {field!r} {found}; it must be a string")
        values.append(value)
    return values
