"""The command-line tools against hostile or broken input ("Trust, round two"): code planted in a model folder never
runs, not even when a terminal answers y; files the user names are read in bounded blocks; numeric options are
bounded; and every bad input, an unwritable or full output folder, and Ctrl-C end in one line on stderr with exit
code 2 (130 for Ctrl-C), no traceback, and nothing already written lost."""

import errno
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.files import claim_output_dir
from spannorm_hf.integrations import evaluation, finetune, generation, hub
from spannorm_hf.training import trainer
from spannorm_hf.training.checkpointing import write_manifest

from helpers import ROOT, argv, assert_one_error_line, snapshot, subprocess_env

# Imported from a .py planted next to a folder's config: the marker file proves the code ran.
PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("planted code ran")
from transformers import PreTrainedTokenizerFast


class PlantedTokenizer(PreTrainedTokenizerFast):
    pass


class PlantedModel:
    pass
"""
# Written by a full disk's safetensors (the Rust error, as torch and transformers pass it on).
STORAGE_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def plant_tokenizer_code(folder: Path, marker: Path) -> Path:
    """A tokenizer_config.json that asks for a tokenizer class from planted.py beside it (without a standard
    `tokenizer_class`, so transformers asks y/N rather than loading its own class). Returns the file."""
    (folder / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    settings["auto_map"] = {"AutoTokenizer": [None, "planted.PlantedTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder / "tokenizer_config.json"


def answer_yes(monkeypatch):
    """In this process, every y/N question gets y (transformers asks with `input`)."""
    monkeypatch.setattr("builtins.input", lambda *prompt: "y")


def run_in_terminal_answering_yes(args: list[str], cwd: Path, timeout: float = 180) -> tuple[int, str]:
    """`python ARGS` with a pseudo-terminal as stdin, stdout and stderr that answers y to every [y/N] question;
    its exit code and everything it printed."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # this checkout's package
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join(paths), "HF_MODULES_CACHE": str(cwd / "modules")}
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, *args], stdin=child, stdout=child, stderr=child, cwd=cwd, env=env, start_new_session=True
    )
    os.close(child)
    output, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([main], [], [], 0.5)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if output.count(b"[y/N]") > answered:
                os.write(main, b"y\n")
                answered += 1
        else:
            process.kill()
            pytest.fail(f"{args} did not finish in {timeout} s: {output.decode(errors='replace')[-2000:]}")
        return process.wait(timeout=30), output.decode(errors="replace").replace("\r\n", "\n")
    finally:
        os.close(main)


def assert_refused_in_terminal(code: int, output: str, file: Path, marker: Path) -> None:
    assert code == 2 and "[y/N]" not in output and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(file) in errors[0] and "auto_map" in errors[0], output[-3000:]
    assert not marker.exists()


@pytest.fixture
def planted(checkpoint, tmp_path):
    """A copy of the tiny checkpoint whose tokenizer_config.json asks for planted code: (folder, file, marker)."""
    folder = Path(shutil.copytree(checkpoint, tmp_path / "planted-checkpoint"))
    marker = tmp_path / "planted-code-ran"
    return folder, plant_tokenizer_code(folder, marker), marker


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what these tests refuse must be refused before any model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for module in (generation, finetune, hub):
        monkeypatch.setattr(module, "load_checkpoint", refuse)


# ------------------------------------------------------------------------------------------ code from a folder


@pytest.mark.slow
def test_generate_never_runs_a_folders_tokenizer_code_in_a_terminal_answering_yes(planted, tmp_path):
    folder, file, marker = planted
    script = ROOT / "scripts" / "generate.py"
    code, output = run_in_terminal_answering_yes(
        [str(script), "--model", str(folder), "--prompt", "def", "--max-new-tokens", "2", "--device", "cpu"], tmp_path
    )
    assert_refused_in_terminal(code, output, file, marker)


@pytest.fixture
def finished_run(files, tmp_path, fresh_accelerate_state):
    """A finished 2-step run (a checkpoint at step 2, the model exported)."""
    out = tmp_path / "run"
    assert trainer.main(argv(files, out, max_steps=2, save_every=2, eval_every=2)) == 0
    return out


@pytest.mark.slow
def test_resume_never_runs_a_checkpoints_tokenizer_code_in_a_terminal_answering_yes(files, finished_run, tmp_path):
    """A run folder handed over by someone else, with code planted in a checkpoint's tokenizer and a manifest made
    to match: resuming refuses it, naming the file, and neither runs the code nor copies it into the export."""
    checkpoint = finished_run / "checkpoints" / "step-00000002"
    marker = tmp_path / "planted-code-ran"
    file = plant_tokenizer_code(checkpoint / "tokenizer", marker)
    write_manifest(checkpoint)  # the attacker controls the whole folder
    script = ROOT / "scripts" / "train.py"
    code, output = run_in_terminal_answering_yes(
        [str(script), *argv(files, finished_run, max_steps=4), "--resume", "latest"], tmp_path
    )
    assert_refused_in_terminal(code, output, file, marker)
    assert list(finished_run.rglob("planted.py")) == [file.with_name("planted.py")]  # copied nowhere (the export)


@pytest.mark.parametrize("command", ["generate", "evaluate-text", "evaluate-tasks", "finetune", "publish"])
def test_every_command_refuses_a_checkpoint_whose_tokenizer_asks_for_code(
    command, planted, tmp_path, monkeypatch, capsys, no_token
):
    """Whichever command loads the folder (lm-eval too: it used to be told `trust_remote_code=True`), the y/N
    question is never asked (here it would be answered y) and the planted code never runs."""
    folder, file, marker = planted
    answer_yes(monkeypatch)
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    model = ["--model", str(folder)]
    main, args = {
        "generate": (generation.main, [*model, "--prompt", "def", "--device", "cpu"]),
        "evaluate-text": (evaluation.main, [*model, "--text", str(tmp_path / "text.txt"), "--device", "cpu"]),
        "evaluate-tasks": (evaluation.main, [*model, "--tasks", "hellaswag", "--limit", "1", "--device", "cpu"]),
        "finetune": (finetune.main, [*model, "--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "a")]),
        "publish": (hub.publish_main, [*model, "--repo-id", "alice/x", "--output-dir", str(tmp_path / "hub")]),
    }[command]
    assert main(args) == 2
    assert_one_error_line(capsys.readouterr().err, str(file), "asks to run code from its folder", "auto_map")
    assert not marker.exists() and not (tmp_path / "a").exists() and not (tmp_path / "hub").exists()


def test_a_model_config_asking_for_other_code_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    """config.json may keep this package's own auto_map (its registered classes load the folder); any other entry
    is refused, naming the file."""
    folder = Path(shutil.copytree(checkpoint, tmp_path / "folder"))
    marker = tmp_path / "planted-code-ran"
    (folder / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "planted.PlantedModel"
    (folder / "config.json").write_text(json.dumps(config))
    answer_yes(monkeypatch)
    assert generation.main(["--model", str(folder), "--prompt", "def", "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(folder / "config.json"), "planted.PlantedModel")
    assert not marker.exists()


def test_an_adapters_tokenizer_asking_for_code_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    from spannorm_hf.integrations.hub import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(adapter)  # names the checkpoint as its base
    tokenizer.save_pretrained(adapter)
    marker = tmp_path / "planted-code-ran"
    file = plant_tokenizer_code(adapter, marker)
    answer_yes(monkeypatch)
    assert generation.main(["--model", str(adapter), "--prompt", "def", "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(file), "asks to run code from its folder")
    assert not marker.exists()


def test_train_refuses_a_tokenizer_that_asks_for_code(files, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    tokenizer = Path(shutil.copytree(files / "tok", tmp_path / "tok"))
    marker = tmp_path / "planted-code-ran"
    file = plant_tokenizer_code(tokenizer, marker)
    answer_yes(monkeypatch)
    assert trainer.main(argv(files, tmp_path / "run", tokenizer=tokenizer)) == 2
    assert_one_error_line(capsys.readouterr().err, str(file), "asks to run code from its folder")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ bounded reads


def test_an_endless_prompts_file_is_refused_at_its_first_block(checkpoint, capsys, no_model):
    assert generation.main(["--model", str(checkpoint), "--prompts-file", "/dev/zero", "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--prompts-file '/dev/zero' is not a text file", "NUL")


def test_an_endless_training_config_is_refused_before_anything_is_written(files, tmp_path, capsys):
    """--config is read as every settings file is: a block at a time, bounded (/dev/zero once ate all memory)."""
    assert trainer.main(argv(files, tmp_path / "run", config="/dev/zero")) == 2
    assert_one_error_line(capsys.readouterr().err, "--config '/dev/zero' is not a text file", "NUL")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "module, limit, option",
    [
        (generation, "PROMPTS_LIMIT", "--prompts-file"),
        (evaluation, "TEXT_LIMIT", "--text"),
        (finetune, "DATA_LIMIT", "--data"),
    ],
)
def test_a_file_over_its_bound_is_refused_naming_the_bound_and_the_way_around(
    module, limit, option, checkpoint, tmp_path, monkeypatch, capsys, no_model
):
    """Each file a command reads as text has a bound (here lowered to 1000 bytes, to keep the test small), checked
    as the file is read; the error names the bound and what to do instead."""
    monkeypatch.setattr(module, limit, 1000)
    text = tmp_path / "big.txt"
    text.write_text("a line of text\n" * 67)  # 1005 bytes
    args = {
        "--prompts-file": ["--device", "cpu"],
        "--text": ["--device", "cpu"],
        "--data": ["--output", str(tmp_path / "adapter")],
    }[option]
    assert module.main(["--model", str(checkpoint), option, str(text), *args]) == 2
    bigger = {"--prompts-file": "split it", "--text": "part of it", "--data": "part of it"}[option]
    assert_one_error_line(capsys.readouterr().err, f"{option} {str(text)!r} is larger than 1,000 bytes", bigger)


@pytest.mark.parametrize(
    "main, args, fragment",
    [
        (generation.main, ["--mode", "beam", "--num-beams", "100000"], "num_beams=100000 must be in [2, 64]"),
        (generation.main, ["--seed", "-1"], "--seed must be >= 0, got -1"),
        (generation.main, ["--seed", str(2**64)], "--seed must be <= 4294967295"),
        (evaluation.main, ["--tasks", "hellaswag", "--limit", "0"], "--limit 0 must be a whole number"),
        (evaluation.main, ["--tasks", "hellaswag", "--limit", "2.5"], "--limit 2.5 must be a whole number"),
        (evaluation.main, ["--tasks", "hellaswag", "--num-fewshot", "-1"], "--num-fewshot must be >= 0, got -1"),
        (evaluation.main, ["--tasks", "hellaswag", "--num-fewshot", "1000"], "--num-fewshot must be <= 100"),
        (finetune.main, ["--data", "d.jsonl", "--output", "a", "--batch-size", "0"], "--batch-size must be >= 1"),
        (finetune.main, ["--data", "d.jsonl", "--output", "a", "--grad-accum", "0"], "--grad-accum must be >= 1"),
        (finetune.main, ["--data", "d.jsonl", "--output", "a", "--seed", "-1"], "--seed must be >= 0, got -1"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_numeric_options_out_of_bounds_are_refused_before_any_work(
    main, args, fragment, checkpoint, capsys, no_model, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(checkpoint), *args]) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_a_perplexity_window_longer_than_the_context_is_refused(checkpoint, tmp_path, capsys):
    """Past max_position_embeddings the model meets positions it never trained on (as generation refuses)."""
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n" * 20)
    args = ["--model", str(checkpoint), "--text", str(tmp_path / "text.txt"), "--device", "cpu"]
    assert evaluation.main([*args, "--max-length", "100000"]) == 2
    assert_one_error_line(capsys.readouterr().err, "max_length=100000 is longer than the model's context of 128")


@pytest.mark.parametrize("main", [generation.main, evaluation.main], ids=["generate", "evaluate"])
@pytest.mark.parametrize("device, fragment", [("bogus", "is not a device name"), ("cuda", "has no cuda device")])
def test_a_device_this_machine_lacks_is_refused_before_any_work(main, device, fragment, checkpoint, capsys, no_model):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = ["--prompt", "def"] if main is generation.main else ["--text", "any.txt"]
    assert main(["--model", str(checkpoint), *args, "--device", device]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--device {device!r}", fragment)


def test_a_device_index_this_machine_lacks_is_refused(checkpoint, monkeypatch, capsys, no_model):
    """As on a machine with one CUDA device (torch.accelerator, which the check reads, says so)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert generation.main(["--model", str(checkpoint), "--prompt", "def", "--device", "cuda:3"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--device 'cuda:3': this machine has 1 cuda device(s)")
    assert generation.main(["--model", str(checkpoint), "--prompt", "def", "--device", "mps"]) == 2
    assert_one_error_line(capsys.readouterr().err, "has no mps device (it has cpu and cuda)")


# ---------------------------------------------------------------------------------------------- broken inputs


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("broken.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a", ', ["line 2 is not valid JSON"]),
        ("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["is not a text file", "byte 8 is NUL"]),
        ("latin1.jsonl", '{"prompt": "café", "response": "b"}\n'.encode("latin-1"), ["not UTF-8", "byte 15 is 0xe9"]),
        ("list.jsonl", b"[1, 2, 3]\n", ["line 1 is an array, not a JSON object"]),
        ("list.json", b"[1, 2, 3]\n", ["record 1 is a number, not a JSON object"]),
        (
            "numeric.jsonl",
            b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 5}\n',
            ["line 2", "'response' is a number (5)"],
        ),
        ("latin1.txt", "café\n".encode("latin-1"), ["not UTF-8 text (byte 3 is 0xe9)"]),
    ],
)
def test_broken_finetune_data_is_one_line_before_any_model_loads(
    name, content, fragments, checkpoint, tmp_path, capsys, no_model
):
    data = tmp_path / name
    data.write_bytes(content)
    assert finetune.main(["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a")]) == 2
    assert_one_error_line(capsys.readouterr().err, str(data), *fragments)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "main, option", [(evaluation.main, "--text"), (generation.main, "--prompts-file")], ids=["evaluate", "generate"]
)
def test_a_binary_text_file_is_one_line(main, option, checkpoint, tmp_path, capsys, no_model):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["--model", str(checkpoint), option, str(binary), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{option} {str(binary)!r} is not a text file (byte 0 is NUL)")


# ------------------------------------------------------------------------------------------ unwritable outputs


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be created in (root writes through permission bits, so for root the calls that create
    files and folders refuse too)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_mkdir, real_open = os.mkdir, os.open

        def inside(path) -> bool:
            return folder in Path(os.fsdecode(path)).absolute().parents

        def mkdir(path, *args, **kwargs):
            if inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        def open_(path, flags, *args, **kwargs):
            if inside(path) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["finetune", "finetune-merge", "publish", "evaluate"])
def test_a_read_only_output_is_refused_before_any_work(command, read_only, checkpoint, tmp_path, capsys, no_model):
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n")
    model = ["--model", str(checkpoint)]
    main, args, flag = {
        "finetune": (finetune.main, ["--data", str(tmp_path / "data.jsonl"), "--output"], "--output"),
        "finetune-merge": (
            finetune.main,
            ["--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "a"), "--merge"],
            "--merge",
        ),
        "publish": (hub.publish_main, ["--repo-id", "alice/x", "--dry-run", "--output-dir"], "--output-dir"),
        "evaluate": (evaluation.main, ["--text", str(tmp_path / "text.txt"), "--output"], "--output"),
    }[command]
    target = read_only / "out"
    assert main([*model, *args, str(target)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{flag} {str(target)!r} cannot be written", "choose a folder")
    assert sorted(p.name for p in read_only.iterdir()) == ["mine.txt"] and not (tmp_path / "a").exists()


def staging_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_while_saving_an_adapter_is_one_line_and_keeps_the_earlier_one(
    checkpoint, tmp_path, monkeypatch, capsys
):
    from peft import PeftModel

    adapter = claim_output_dir(tmp_path / "adapter", "lora-adapter", flag="--output")
    (adapter / "adapter_model.safetensors").write_bytes(b"the earlier adapter")
    before = snapshot(adapter)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise SafetensorError(STORAGE_FULL)

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    args = ["--model", str(checkpoint), "--data", str(data), "--output", str(adapter), "--max-steps", "1"]
    assert finetune.main([*args, "--rank", "2", "--max-length", "64"]) == 2
    assert_one_error_line(capsys.readouterr().err, "no space left on device while writing", "free some space")
    assert snapshot(adapter) == before and not staging_leftovers(tmp_path)


def test_a_full_disk_while_building_a_hub_folder_is_one_line_and_keeps_the_earlier_one(
    checkpoint, tmp_path, monkeypatch, capsys, no_token
):
    out = claim_output_dir(tmp_path / "hub", "hub-folder", flag="--output-dir")
    (out / "README.md").write_text("the earlier card")
    before = snapshot(out)

    def disk_full(self, folder, **kwargs):
        raise SafetensorError(STORAGE_FULL)

    monkeypatch.setattr(SpanNormForCausalLM, "save_pretrained", disk_full)
    assert hub.publish_main(["--model", str(checkpoint), "--repo-id", "alice/x", "--output-dir", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "no space left on device while writing")
    assert snapshot(out) == before and not staging_leftovers(tmp_path)


def test_a_full_disk_at_the_end_of_an_evaluation_keeps_its_results(checkpoint, tmp_path, monkeypatch, capsys):
    """The results are computed, then the disk is full: they are printed rather than lost with the file."""
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n" * 20)
    out = tmp_path / "results.json"

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    args = ["--model", str(checkpoint), "--text", str(tmp_path / "text.txt"), "--device", "cpu", "--output", str(out)]
    assert evaluation.main(args) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, f"could not write --output {str(out)!r}", "no space left", "printed above")
    report = json.loads(captured.out[captured.out.index("{") :])
    assert report["perplexity"]["tokens"] > 0 and not out.exists() and not staging_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------ Ctrl-C


def exit_code(main, args: list[str]) -> int:
    try:
        return main(args)
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("Ctrl-C escaped the command (a traceback)")


def test_ctrl_c_while_fine_tuning_exits_130_in_one_line_and_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_train", interrupted)
    args = ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "a")]
    assert exit_code(finetune.main, args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert not (tmp_path / "a").exists() and not staging_leftovers(tmp_path)


def test_ctrl_c_while_evaluating_exits_130_in_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text("def main():\n    return 0\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "perplexity", interrupted)
    args = ["--model", str(checkpoint), "--text", str(tmp_path / "text.txt"), "--device", "cpu"]
    assert exit_code(evaluation.main, [*args, "--output", str(tmp_path / "results.json")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert not (tmp_path / "results.json").exists()
