"""Issue 20 ("Trust, round two"), items 1, 4 and 5, and their follow-ups: a hostile but realistic user against a
training run's output folder and its resume. Two runs into one folder (even while the first is starting), a
hand-edited and resealed checkpoint state or metrics.jsonl, and a start that fails after writing something (with or
without --overwrite) must neither lose what is there nor leave a folder that refuses the rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from spannorm_hf.files import (
    LOCK_FILE,
    LOCK_HOLDER_FILE,
    OUTPUT_MARKER,
    OutputBusyError,
    check_output_dir,
    locked_output_dir,
    remove_additions_on_failure,
)
from spannorm_hf.training.checkpointing import write_manifest
from spannorm_hf.training.corpus import read_default_corpus
from spannorm_hf.training.trainer import main, parse_args, train

from helpers import (
    ROOT,
    argv,
    assert_one_error_line,
    checkpoint_names,
    clean_accelerate_state,
    records,
    snapshot,
    subprocess_env,
)

# Runs train in this process: accelerate's singletons are reset around every test.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ------------------------------------------------------------------------------- item 1: one run per output folder


def test_an_output_folder_is_held_by_one_command_at_a_time(tmp_path):
    folder = tmp_path / "run"
    with locked_output_dir(folder, flag="--output"):
        assert json.loads((folder / LOCK_HOLDER_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputBusyError, match=rf"--output '.*run' is in use by pid {os.getpid()} on .* \(started "):
            with locked_output_dir(folder, flag="--output"):
                pass
        check_output_dir(folder, "hub-folder", flag="--output-dir")  # the lock is not content: still an empty folder
    assert sorted(os.listdir(folder)) == [LOCK_FILE]  # released: the record of who held it is gone
    with locked_output_dir(folder, flag="--output"):
        pass


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_runs_lock_is_not(files, tmp_path, capsys):
    """Run A (a real process) is training into `cc`. The issue's second run (`--seed 1`), the same with
    --overwrite, and a --resume latest into `cc` are each refused with one line naming A's pid, and nothing of A's
    changes. Once A is SIGKILLed its lock dies with it: --resume latest continues A's run."""
    out = tmp_path / "cc"
    options = dict(max_steps=40, save_every=1, eval_every=40, diag_every=0)
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *argv(files, out, **options)]
    first = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: (out / "checkpoints" / "step-00000001").is_dir(), first, "its first checkpoint")
        first.send_signal(signal.SIGSTOP)  # A holds the folder mid-run; its files stay as they are
        before = snapshot(out)
        for extra in (["--seed", "1"], ["--seed", "1", "--overwrite"], ["--resume", "latest"]):
            AcceleratorState._reset_state(True)
            assert main([*argv(files, out, **options), *extra]) == 2
            assert_one_error_line(capsys.readouterr().err, f"--output {str(out)!r} is in use by pid {first.pid} on ")
        assert snapshot(out) == before
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert json.loads((out / LOCK_HOLDER_FILE).read_text())["pid"] == first.pid  # a dead run's record stays behind

    latest = [name for name in checkpoint_names(out) if name.startswith("step-")][-1]
    resumed = dict(options, max_steps=int(latest.removeprefix("step-")) + 1)
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, **resumed), "--resume", "latest"]) == 0
    assert records(out)[-1]["step"] == resumed["max_steps"]
    assert [r["resumed_from"] for r in records(out) if r.get("event") == "setup"][-1].endswith(latest)
    assert not (out / LOCK_HOLDER_FILE).exists()


def test_a_run_into_a_folder_another_run_is_starting_in_is_told_it_is_in_use(files, tmp_path, capsys):
    """The moment in which a starting run holds the lock but its ownership marker is still the staging file that
    `atomic_write_json` renames into place: the folder looks like someone else's, but the true reason, "in use",
    is the one given (it was "not empty ... not created by this command"), and nothing changes."""
    out = tmp_path / "run"
    with locked_output_dir(out, flag="--output"):
        (out / f"{OUTPUT_MARKER}.tmp-1a2b3c4d").write_text('{"kind": "training-run"')
        before = snapshot(out)
        assert main(argv(files, out)) == 2
        assert_one_error_line(capsys.readouterr().err, f"--output {str(out)!r} is in use by pid {os.getpid()} on ")
        assert snapshot(out) == before


# ------------------------------------------------------------------- item 4: train_state.json is validated on resume


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with clean_accelerate_state():
        train(parse_args(argv(files, out, max_steps=4, save_every=2, eval_every=2)))
    return out


@pytest.mark.parametrize(
    "original, edited, message",
    [
        ('"step": 4', '"step": -5', "Validation error for field 'step': ValueError: must be >= 1, got -5"),
        ('"step": 4', '"step": "abc"', "field 'step': TypeError: Field 'step' expected int, got str (value: 'abc')"),
        ('"step": 4', '"step": 1e400', "field 'step': TypeError: Field 'step' expected int, got float (value: inf)"),
        # a valid-looking step that is not the checkpoint's: resuming would drop the step-4 records
        ('"step": 4', '"step": 3', "field 'step' is 3, but the checkpoint is step-00000004"),
        ('"tokens": 512', '"tokens": -1', "Validation error for field 'tokens': ValueError: must be >= 0, got -1"),
        ('"last_epoch": 4', '"last_epoch": "4"', "field 'scheduler.last_epoch' must be an integer >= 0, got '4'"),
        # the learning rate a resume without --lr trains at
        ('"lr": 0.003', '"lr": -1', "field 'args.lr' must be a finite number > 0, got -1"),
    ],
)
def test_resume_refuses_a_resealed_train_state_naming_the_field(
    files, finished_run, tmp_path, capsys, original, edited, message
):
    """train_state.json edited and the manifest resealed to match: resuming is refused with one line naming the
    file and the field, and nothing in the run folder changes (every metrics record is kept)."""
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    checkpoint = out / "checkpoints" / "step-00000004"
    state = checkpoint / "train_state.json"
    text = state.read_text()
    assert text.count(original) == 1
    state.write_text(text.replace(original, edited))
    write_manifest(checkpoint)
    before = snapshot(out)
    assert main([*argv(files, out, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{state} is not a valid training state: ", message)
    assert snapshot(out) == before


# ------------------------------------------------------------------------ item 5: a failed start does not stick


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr_scheduler", "bogus", "--lr-scheduler must be one of linear, cosine, cosine_with_restarts,"),
        # a transformers schedule, but one that needs settings this command does not pass
        ("lr_scheduler", "cosine_with_min_lr", "got 'cosine_with_min_lr'"),
        ("attn_implementation", "bogus", "--attn-implementation 'bogus': Specified `attn_implementation=\"bogus\"`"),
        ("adam_beta1", 1.5, "--adam-beta1 must be in [0, 1), got 1.5"),
        ("weight_decay", -0.1, "--weight-decay must be >= 0, got -0.1"),
    ],
)
def test_a_bad_argument_is_refused_before_anything_is_written(files, tmp_path, capsys, option, value, message):
    """No --tokenizer: the run would train one and write it into --output first."""
    out = tmp_path / "run"
    assert main(argv(files, out, tokenizer=None, **{option: value})) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def test_a_start_that_fails_after_writing_leaves_a_folder_that_takes_the_rerun(files, tmp_path, capsys):
    """The run trains its tokenizer and writes it into --output before it packs the data; a validation split too
    short for one row then fails the start. What it wrote goes, so the corrected rerun needs no --overwrite."""
    (tmp_path / "small.txt").write_text(read_default_corpus()[:3000])
    options = dict(data=tmp_path / "small.txt", tokenizer=None, val_size=1, max_steps=2, eval_every=2, save_every=2)
    out = tmp_path / "run"
    assert main(argv(files, out, seq_len=64, **options)) == 2
    assert_one_error_line(capsys.readouterr().err, "the validation split packs into 0 rows of 64 tokens")
    assert sorted(os.listdir(out)) == sorted([LOCK_FILE, OUTPUT_MARKER])
    AcceleratorState._reset_state(True)
    assert main(argv(files, out, seq_len=16, **options)) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]


def test_a_failed_block_removes_only_what_it_added(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), remove_additions_on_failure(tmp_path):
        (tmp_path / "tokenizer.json").write_text("{}")
        (tmp_path / "tensorboard").mkdir()
        (tmp_path / "tensorboard" / "events").write_text("")
        raise RuntimeError("failed while setting up")
    assert os.listdir(tmp_path) == ["notes.txt"]
    with remove_additions_on_failure(tmp_path):  # a block that succeeds keeps what it wrote
        (tmp_path / "tokenizer.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "tokenizer.json"]


def test_a_failed_start_with_overwrite_loses_nothing(files, finished_run, tmp_path, capsys):
    """--overwrite over a finished run, with data too short for one validation row: the start fails after the new
    tokenizer is trained (no --tokenizer), and the earlier run's metrics, TensorBoard events, checkpoints and
    exported model with its tokenizer are all still there, byte for byte. Its corrected rerun replaces them."""
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (tmp_path / "small.txt").write_text(read_default_corpus()[:3000])
    options = dict(data=tmp_path / "small.txt", tokenizer=None, val_size=1, max_steps=2, eval_every=2, save_every=2)
    before = snapshot(out)
    assert main([*argv(files, out, seq_len=64, **options), "--overwrite"]) == 2
    assert_one_error_line(capsys.readouterr().err, "the validation split packs into 0 rows of 64 tokens")
    assert snapshot(out) == before
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, seq_len=16, **options), "--overwrite"]) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]
    assert checkpoint_names(out) == ["step-00000002"]
    assert (out / "tokenizer.json").read_bytes() != before["tokenizer.json"]  # the new run's, exported with its model


# ---------------------------------------------- item 4, follow-up: resume never deletes a record it cannot place


@pytest.mark.parametrize(
    "edited, message",
    [
        ('{"step": "abc", "loss": 5.7}', 'has "step": "abc", not a whole number >= 0'),
        ('{"step": NaN, "loss": 5.7}', 'has "step": NaN, not a whole number >= 0'),  # was deleted: NaN <= 4 is False
        ('{"step": 2.5, "loss": 5.7}', 'has "step": 2.5, not a whole number >= 0'),
        ("[2, 5.7]", "is not a JSON object ('[2, 5.7]')"),
    ],
)
def test_resume_refuses_a_metrics_line_it_cannot_place_and_deletes_nothing(
    files, finished_run, tmp_path, capsys, edited, message
):
    """A step-2 record (at or below the checkpoint's step 4) edited into one whose step is not a whole number: its
    place before or after the checkpoint is unknown, so resuming is one error line naming the line, and every
    record stays."""
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    number = next(n for n, line in enumerate(lines, 1) if line.startswith('{"step": 2, "loss"'))
    lines[number - 1] = edited
    metrics.write_text("".join(line + "\n" for line in lines))
    before = snapshot(out)
    assert main([*argv(files, out, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{metrics} line {number} ", message, "repair or delete that line")
    assert snapshot(out) == before


# ------------------------------------- item 4, follow-up: every JSON state a resume restores is validated first


@pytest.fixture(scope="module")
def streaming_run(files, tmp_path_factory) -> Path:
    """A finished 4-step streaming run with checkpoints at steps 2 and 4, on its own copy of the data: datasets
    builds a stream with another stage (so another state) once a non-streaming run has cached the same file."""
    root = tmp_path_factory.mktemp("streaming")
    shutil.copy(files / "data.txt", root / "data.txt")
    with clean_accelerate_state():
        train(parse_args(argv(files, root / "run", data=root / "data.txt", **STREAMING)))
    return root


STREAMING = dict(streaming=True, val_size=20, max_steps=4, save_every=2, eval_every=2)
SHARD = ("rows", "examples_iterable", "examples_iterable", "examples_iterable")  # the position in the data file


def _set(keys: tuple, value):
    def edit(state: dict) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("stream_state_0.json", _set(("epoch",), "1"), "stream state: field 'epoch' must be an integer >= 0, got"),
        (  # accepted before, and datasets read the shard from wherever that led
            "stream_state_0.json",
            _set((*SHARD, "shard_example_idx"), -3),
            f"stream state: field '{'.'.join(SHARD)}.shard_example_idx' must be an integer >= 0, got -3",
        ),
        (
            "stream_state_0.json",
            _set(("rows", "examples_iterable", "type"), "FilteredExamplesIterable"),
            "field 'rows.examples_iterable.type' must be 'MappedExamplesIterable', as in this run",
        ),
        (  # an unknown key became an attribute of the scheduler, replacing its optimizer (AttributeError)
            "train_state.json",
            _set(("scheduler", "optimizer"), None),
            "training state: field 'scheduler.optimizer' is not part of this run's state (expected: base_lrs,",
        ),
        (  # one peak learning rate for two parameter groups (a ValueError at the first step)
            "train_state.json",
            _set(("scheduler", "base_lrs"), [0.003]),
            "training state: field 'scheduler.base_lrs' must be a list of 2 values, got [0.003]",
        ),
        (  # the learning rate the first resumed step uses
            "train_state.json",
            _set(("scheduler", "_last_lr"), [-1.0, 0.0]),
            "training state: field 'scheduler._last_lr[0]' must be a finite number >= 0, got -1.0",
        ),
        (
            "optimizer.json",
            _set(("param_groups", 0, "lr"), "abc"),
            "optimizer state: field 'param_groups[0].lr' must be a finite number >= 0, got \"abc\"",
        ),
        (
            "optimizer.json",
            _set(("param_groups", 1, "betas"), [2.0]),
            "optimizer state: field 'param_groups[1].betas' must be a list of 2 values, got [2.0]",
        ),
        (  # the parameter names, which torch maps onto the model itself (a TypeError there)
            "optimizer.json",
            _set(("param_groups", 0, "params"), None),
            "with optimizer.safetensors does not fit the optimizer: ",
        ),
        ("rng_state_0.json", _set(("python", 1, 0), 2**70), "does not hold a valid RNG state: Python int too large"),
    ],
)
def test_resume_refuses_a_resealed_state_naming_the_file_and_field(
    files, streaming_run, tmp_path, capsys, name, edit, message
):
    """A JSON state of the checkpoint edited and the manifest resealed: resuming is refused with one line naming the
    file and the field before anything is restored or written (it used to be restored as it was: a traceback, or
    a silently different run), and nothing in the run folder changes."""
    out = Path(shutil.copytree(streaming_run / "run", tmp_path / "run"))
    checkpoint = out / "checkpoints" / "step-00000004"
    state = json.loads((checkpoint / name).read_text())
    edit(state)
    (checkpoint / name).write_text(json.dumps(state))
    write_manifest(checkpoint)
    before = snapshot(out)
    assert main([*argv(files, out, data=streaming_run / "data.txt", **STREAMING), "--resume", "latest"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"error: {checkpoint / name} ", message)
    assert snapshot(out) == before


def test_resume_takes_a_scheduler_state_written_with_another_lr_scheduler(files, streaming_run, tmp_path):
    """--lr-scheduler may change on resume (with a warning): the constant schedule's state holds a null for each of
    its lambdas, where the default cosine one holds an object, and torch skips a null."""
    out = Path(shutil.copytree(streaming_run / "run", tmp_path / "run"))
    checkpoint = out / "checkpoints" / "step-00000004"
    state = json.loads((checkpoint / "train_state.json").read_text())
    state["scheduler"]["lr_lambdas"] = [None, None]
    state["args"]["lr_scheduler"] = "constant"
    (checkpoint / "train_state.json").write_text(json.dumps(state))
    write_manifest(checkpoint)
    with pytest.warns(UserWarning, match=r"\{'lr_scheduler': \('constant', 'cosine'\)\}"):
        assert main([*argv(files, out, data=streaming_run / "data.txt", **STREAMING), "--resume", "latest"]) == 0
