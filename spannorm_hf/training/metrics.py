"""Where a run's metrics go: `metrics.jsonl` (one JSON object per record, appended and flushed as it happens) and
TensorBoard, both as accelerate trackers.

metrics.jsonl is torn-write tolerant: a record is one line written in one call, a full disk is named
(`DiskFullError`), and on resume `truncate_metrics` drops a torn last line with a warning, together with the
records a killed run logged past the checkpoint it is resumed from; it never deletes any other line.
"""

import json
import time
import warnings
from pathlib import Path

from accelerate.tracking import GeneralTracker
from accelerate.utils import is_tensorboard_available

from ..cli import InputError
from ..files import atomic_write_text, naming_disk_full

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsError(InputError):
    """metrics.jsonl holds a line that is not a record of it, before its last line (a torn last line is repaired,
    anything else is not)."""


def trackers(output: str) -> list:
    """The run's accelerate trackers: JSONL always, TensorBoard when installed."""
    return [JSONLTracker(output), *(["tensorboard"] if is_tensorboard_available() else [])]


class JSONLTracker(GeneralTracker):
    """An accelerate tracker writing one JSON object per `log` call to `<output>/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, output: str):
        super().__init__()
        self.path = Path(output) / METRICS_FILE
        self.file = None

    @property
    def tracker(self):
        return self.file

    def start(self):
        self.file = open(self.path, "a", encoding="utf-8")

    def store_init_configuration(self, values: dict):
        self._write({"event": "config", **values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, **values})

    def _write(self, record: dict) -> None:
        with naming_disk_full(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def finish(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def truncate_metrics(output: Path, step: int) -> None:
    """Drop the records past `step` (a killed run may have logged beyond the checkpoint it is resumed from) and keep
    every other line as it is. A torn last line (the disk filled up or the machine died mid-append) is dropped with
    a warning. Any other line that is not one of this tracker's records (not a JSON object, or a `"step"` that is
    not a whole number >= 0, such as `"abc"`, `3.5` or `NaN`) is an error naming the line, and the file is left as
    it is: such a line cannot be placed before or after `step`, so deleting it might lose a record of the resumed
    run and keeping it might keep one of the dead run past `step` (and the model card, which reads this file when
    the run ends, could not order it either). Refusing to guess, before the first step, lets the user who edited
    the file repair it."""
    path = output / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as err:
            if number < len(lines):
                raise MetricsError(f"{path} line {number} is not JSON ({err}); repair or delete that line") from err
            warnings.warn(f"{path}: dropping the torn last line {number} ({line[:60]!r})", stacklevel=2)
            continue
        if not isinstance(record, dict):
            raise MetricsError(f"{path} line {number} is not a JSON object ({line[:60]!r}); repair or delete that line")
        at = record.get("step")  # None: a record of no step (the run's config)
        if at is not None and (type(at) is not int or at < 0):
            raise MetricsError(
                f'{path} line {number} has "step": {json.dumps(at)}, not a whole number >= 0, so it cannot be '
                f"placed before or after the checkpoint's step {step}; repair or delete that line"
            )
        if (at or 0) <= step:
            kept.append(line)
    with naming_disk_full(path):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class Throughput:
    """Tokens per second since the last logged step."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        """The rate over the window so far; starts a new window."""
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.start, self.tokens = time.perf_counter(), 0
        return rate
