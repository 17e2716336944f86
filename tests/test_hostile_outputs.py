"""Issue 20 ("Trust, round two"), the last gaps outside training: two commands writing one output folder at once,
files of an adapter or output folder read without a bound, and numeric options bounded only from below."""

import json
import os
import threading
from pathlib import Path

import pytest
from peft import PeftModel

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.cli import SETTINGS_LIMIT
from spannorm_hf.files import LOCK_FILE, LOCK_HOLDER_FILE, OUTPUT_MARKER, atomic_output_dir, claim_output_dir
from spannorm_hf.integrations import adapters, evaluation, finetune, generation, hub
from spannorm_hf.integrations.adapters import ADAPTER_BASE_FILE, ADAPTER_CONFIG_FILE
from spannorm_hf.integrations.finetune import finetune_lora, lora_config

from helpers import assert_one_error_line, snapshot, tiny_config

TINY_RUN = ["--max-steps", "1", "--rank", "2", "--max-length", "64", "--batch-size", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    return path


@pytest.fixture(scope="module")
def adapter(checkpoint, data, tmp_path_factory) -> Path:
    """An adapter of the tiny checkpoint, as `spannorm-finetune` writes it (read-only: tests copy it)."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    return finetune_lora(checkpoint, data, folder, max_steps=1, rank=2, max_length=64, batch_size=2).adapter_dir


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what these tests refuse must be refused before any model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for module in (adapters, generation, finetune, hub):
        monkeypatch.setattr(module, "load_checkpoint", refuse)


def leftovers(folder: Path) -> list[str]:
    """Staging folders and lock files a command left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or LOCK_FILE in p.name)


# ------------------------------------------------------------------------------- two commands, one output folder


class Pause:
    """The first call of `owner.name` does its work, then waits until `resume` is set: the command that made it is
    paused there. For a `save_pretrained` (into a staging folder), `staged` is what the folder then held."""

    def __init__(self, monkeypatch, owner, name: str):
        self.inside, self.resume, self.calls, self.staged = threading.Event(), threading.Event(), 0, {}
        real = getattr(owner, name)

        def paused(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls += 1
            if self.calls == 1:
                if name == "save_pretrained":
                    self.staged = snapshot(Path(args[1]))
                self.inside.set()
                assert self.resume.wait(300), "never resumed"
            return result

        monkeypatch.setattr(owner, name, paused)


def run_paused(main, args: list[str], pause: Pause) -> tuple[threading.Thread, list[int]]:
    """`main(args)` in a thread, returned once it is paused."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)), daemon=True)
    thread.start()
    while not pause.inside.wait(0.05):
        assert thread.is_alive(), f"the first command ended (exit {codes}) before it reached its staging folder"
    return thread, codes


@pytest.mark.parametrize("case", ["finetune --output", "finetune --merge", "merge", "publish --output-dir"])
def test_a_second_command_into_a_folder_being_written_is_refused_naming_the_first(
    case, checkpoint, adapter, data, tmp_path, monkeypatch, capsys, no_token
):
    """Command A is paused inside its staging folder (its output not yet moved in); command B, into the same
    folder, is refused with one line naming A's process, before any work, and writes nothing; A then finishes and
    its output is whole, with no staging folder or lock left anywhere. Before the lock B wrote its own output and
    A, resumed, moved its files over B's (same kind of output: the folder looked like A's own earlier output)."""
    target = tmp_path / "out"
    main, first, second, owner, flag = {
        "finetune --output": (
            finetune.main,
            ["--model", str(checkpoint), "--data", str(data), "--output", str(target), *TINY_RUN],
            ["--model", str(checkpoint), "--data", str(data), "--output", str(target), *TINY_RUN, "--seed", "1"],
            PeftModel,
            "--output",
        ),
        "finetune --merge": (
            finetune.main,
            ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a1"), "--merge", str(target)]
            + TINY_RUN,
            ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a2"), "--merge", str(target)]
            + TINY_RUN,
            SpanNormForCausalLM,
            "--merge",
        ),
        "merge": (
            finetune.main,
            ["--model", str(adapter), "--merge", str(target)],
            ["--model", str(adapter), "--merge", str(target)],
            SpanNormForCausalLM,
            "--merge",
        ),
        "publish --output-dir": (
            hub.publish_main,
            ["--model", str(checkpoint), "--repo-id", "alice/x", "--dry-run", "--output-dir", str(target)],
            ["--model", str(checkpoint), "--repo-id", "alice/x", "--dry-run", "--output-dir", str(target)],
            SpanNormForCausalLM,
            "--output-dir",
        ),
    }[case]
    pause = Pause(monkeypatch, owner, "save_pretrained")
    thread, codes = run_paused(main, first, pause)
    try:
        capsys.readouterr()  # what A printed so far
        assert main(second) == 2
        assert_one_error_line(capsys.readouterr().err, f"{flag} {str(target)!r} is in use by pid {os.getpid()} on ")
        assert not (tmp_path / "a2").exists()  # B's other output was not started either
    finally:
        pause.resume.set()
        thread.join(300)
    assert codes == [0] and pause.calls == 1  # A finished; B never reached its save
    for name, data_ in pause.staged.items():  # A's output, as A wrote it
        assert (target / name).read_bytes() == data_, name
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert not [name for name in hub.hub_files(target) if LOCK_FILE in name]


def test_a_second_evaluation_into_a_results_file_being_written_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    """As for folders: evaluation A, paused after scoring, holds its --output file; evaluation B into the same file
    is refused naming A before it loads a model, and A's results are written. Before, both ran, and the one that
    ended last replaced the other's results without a word (each checked that the file did not exist yet)."""
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n" * 20)
    results = tmp_path / "results.json"
    args = ["--model", str(checkpoint), "--text", str(tmp_path / "text.txt"), "--device", "cpu", "--output"]
    pause = Pause(monkeypatch, evaluation, "perplexity")
    thread, codes = run_paused(evaluation.main, [*args, str(results)], pause)
    try:
        capsys.readouterr()
        assert evaluation.main([*args, str(results), "--max-length", "64"]) == 2
        assert_one_error_line(capsys.readouterr().err, f"--output {str(results)!r} is in use by pid {os.getpid()} on ")
    finally:
        pause.resume.set()
        thread.join(300)
    assert codes == [0] and pause.calls == 1
    assert json.loads(results.read_text())["perplexity"]["max_length"] == 128  # A's (B asked for 64)
    assert not leftovers(tmp_path)


def test_fine_tuning_refuses_one_folder_for_both_outputs(checkpoint, data, tmp_path, capsys, no_model):
    """The adapter and the merged model cannot share a folder (before: refused only after training, when the merge
    found the adapter there)."""
    args = ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a")]
    assert finetune.main([*args, "--merge", str(tmp_path / "x" / ".." / "a")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--output and --merge are the same folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_commands_lock_file_neither_blocks_nor_stays(checkpoint, tmp_path, capsys, no_token):
    """A command killed while it held its output's lock leaves the lock file beside the folder (its OS lock died
    with it): the next command goes ahead, and takes that file away when it is done."""
    target = tmp_path / "hub"
    stale = [tmp_path / f".hub{LOCK_FILE}", tmp_path / f".hub{LOCK_HOLDER_FILE}"]
    stale[0].write_text("")
    stale[1].write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday", "command": "publish"}))
    args = ["--model", str(checkpoint), "--repo-id", "alice/x", "--dry-run", "--output-dir", str(target)]
    assert hub.publish_main(args) == 0
    assert (target / "config.json").is_file() and not leftovers(tmp_path)


def test_a_failed_command_leaves_no_folder_it_made_for_its_lock(checkpoint, tmp_path, capsys, no_model):
    """The lock of `--output new/deep/adapter` needs `new/deep`: a command refused after taking it (here: for its
    data, read once the outputs are held) removes those folders again."""
    (tmp_path / "data.jsonl").write_text('{"prompt": "q", "response": 5}\n')
    target = tmp_path / "new" / "deep" / "adapter"
    args = ["--model", str(checkpoint), "--data", str(tmp_path / "data.jsonl"), "--output", str(target)]
    assert finetune.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, "'response' is a number")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_an_output_marker_cannot_delete_files_outside_its_folder(tmp_path):
    """The marker of an earlier output lists the files it wrote, which a new output of the same kind removes when it
    does not write them again. A marker naming a path outside the folder (absolute, `..`, through a link) is a
    handed folder's trap: only files inside the folder are ever removed."""
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine too")
    folder = claim_output_dir(tmp_path / "adapter", "lora-adapter", flag="--output")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    (folder / "old.bin").write_text("an earlier output's file")
    listed = [str(outside), "../precious.txt", "linked/notes.txt", "old.bin"]
    (folder / OUTPUT_MARKER).write_text(json.dumps({"kind": "lora-adapter", "files": listed}))
    with atomic_output_dir(folder, "lora-adapter", flag="--output") as staging:
        (staging / "adapter_config.json").write_text("{}")
    assert outside.read_text() == "mine" and (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine too"
    assert not (folder / "old.bin").exists() and (folder / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------- files read bounded


def padded_json(value: dict) -> str:
    """`value` as JSON, padded with spaces to one byte over the bound of a settings file: valid, and too big."""
    text = json.dumps(value)
    return text + " " * (SETTINGS_LIMIT + 1 - len(text))


@pytest.mark.parametrize("file", [ADAPTER_CONFIG_FILE, ADAPTER_BASE_FILE])
@pytest.mark.parametrize("command", ["generate", "evaluate", "merge"])
def test_an_adapters_settings_files_are_read_bounded_before_any_model_loads(
    command, file, adapter, tmp_path, capsys, no_model
):
    """adapter_config.json and spannorm_base.json are JSON settings files like any other: read in blocks, up to
    SETTINGS_LIMIT (before, whole: a file of any size, or /dev/zero through a link, was read into memory)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    for entry in adapter.iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    (folder / file).write_text(padded_json(json.loads((adapter / file).read_text())))
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n")
    main, args = {
        "generate": (generation.main, ["--prompt", "def", "--device", "cpu"]),
        "evaluate": (evaluation.main, ["--text", str(tmp_path / "text.txt"), "--device", "cpu"]),
        "merge": (finetune.main, ["--merge", str(tmp_path / "merged")]),
    }[command]
    assert main(["--model", str(folder), *args]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{str(folder / file)!r} is larger than 16 MiB")
    assert not (tmp_path / "merged").exists()


def test_an_output_marker_past_its_bound_is_not_taken_as_ours(checkpoint, tmp_path, capsys, no_model):
    """An output folder's marker says the folder is an earlier output of the command, which may then write into it:
    one too big to be ours is read no further than its bound, and the folder is refused as not ours."""
    target = tmp_path / "hub"
    target.mkdir()
    (target / OUTPUT_MARKER).write_text(padded_json({"kind": "hub-folder", "files": []}))
    args = ["--model", str(checkpoint), "--repo-id", "alice/x", "--dry-run", "--output-dir", str(target)]
    assert hub.publish_main(args) == 2
    assert_one_error_line(capsys.readouterr().err, f"{str(target)!r} is not empty", "not created by this command")


# -------------------------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize(
    "main, args, fragment",
    [
        (finetune.main, ["--rank", "33"], "--rank 33 is larger than the model's width (hidden_size 32)"),
        (finetune.main, ["--rank", "1000000000"], "--rank 1000000000 is larger than the model's width"),
        (finetune.main, ["--max-length", "129"], "--max-length 129 is longer than the model's context of 128 tokens"),
        (evaluation.main, ["--batch-size", "1000000"], "--batch-size '1000000' must be a whole number from 1 to 1024"),
        (evaluation.main, ["--batch-size", "auto:0"], "--batch-size 'auto:0'"),
        (evaluation.main, ["--batch-size", "auto:x"], "--batch-size 'auto:x'"),
        (evaluation.main, ["--batch-size", "automatic"], "--batch-size 'automatic'"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "" if isinstance(value, str) else None,
)
def test_numeric_options_are_bounded_from_above_before_any_model_loads(
    main, args, fragment, checkpoint, data, tmp_path, capsys, no_model
):
    what = {finetune.main: ["--data", str(data), "--output", str(tmp_path / "a")], evaluation.main: ["--tasks", "x"]}
    assert main(["--model", str(checkpoint), *what[main], *args]) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "a").exists()


def test_the_lora_rank_may_reach_the_models_width():
    """Every adapted matrix has the width as one side, so its update has rank <= width: up to there a rank counts."""
    assert lora_config(tiny_config(), rank=32).r == 32
    with pytest.raises(ValueError, match="--rank 33 is larger than the model's width"):
        lora_config(tiny_config(), rank=33)


def test_the_default_max_length_is_cut_to_a_shorter_context_with_a_note(checkpoint, data, tmp_path, capsys):
    """--max-length defaults to 512; the tiny model's context is 128 tokens, so without --max-length blocks are 128
    tokens long and a line says so (before, 512-token blocks trained positions the model does not have)."""
    args = ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a"), "--max-steps", "1"]
    assert finetune.main([*args, "--rank", "2"]) == 0
    assert "--max-length: the default 512 is longer than the model's context of 128 tokens; using 128" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "a" / "training_details.json").read_text())["max_length"] == 128
