"""Training never goes on silently on garbage, and its fallbacks say what they did: a sequence length with nothing
to predict and absurd config sizes are refused before anything is written, a non-finite loss or gradient norm
stops the run keeping the last good checkpoint, FSDP that accelerate does not enable and processes that never
joined are named, resuming on another number of processes keeps (or names) the tokens per step, and unknown config
keys are not saved. Tiny models, CPU fp32."""

import json
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from spannorm_hf import SpanNormConfig, SpanNormForCausalLM
from spannorm_hf.training.trainer import Trainer, main, parse_args, train

from distributed_cpu import train_two_processes
from helpers import (
    ROOT,
    argv,
    assert_one_error_line,
    checkpoint_names,
    config_error,
    losses,
    records,
    subprocess_env,
    tiny_config,
)

# Runs train in this process: accelerate's singletons are reset around every test.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def setup_record(output) -> dict:
    """The last setup record (a resumed run appends its own)."""
    return [r for r in records(output) if r.get("event") == "setup"][-1]


def test_seq_len_1_is_refused_before_anything_is_written(files, tmp_path, capsys):
    """A row of one token has no next token to predict: the loss was 0 / 0, NaN at every step, and the run said
    "done" with exit 0."""
    out = tmp_path / "run"
    assert main(argv(files, out, seq_len=1)) == 2
    assert_one_error_line(capsys.readouterr().err, "--seq-len must be >= 2", "got 1")
    config = {**json.loads((files / "dense.json").read_text()), "max_position_embeddings": 1}
    (tmp_path / "one.json").write_text(json.dumps(config))
    assert main(argv(files, out, config=str(tmp_path / "one.json"), seq_len=None)) == 2  # the config's default
    assert_one_error_line(capsys.readouterr().err, "max_position_embeddings=1 leaves no next token to predict")
    assert not out.exists()


def poison_before_step(monkeypatch, step: int, what: str) -> None:
    """Just before optimizer step `step + 1`: a weight (its loss is NaN) or only a gradient (a finite loss, NaN
    weights after the update) becomes NaN, as a diverging run's would."""
    original = Trainer.train_step

    def train_step(self, stop):
        if self.progress.step == step:
            weight = self.unwrapped.model.layers[0].mlp.down_proj.weight
            if what == "weight":
                with torch.no_grad():
                    weight.fill_(float("nan"))
            else:
                weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return original(self, stop)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_nan_loss_stops_the_run_and_the_last_good_checkpoint_resumes(files, tmp_path, capsys, monkeypatch):
    """Old: the run trained on NaN, checkpointed and exported the NaN weights and exited 0 ("done")."""
    reference = train(parse_args(argv(files, tmp_path / "reference", max_steps=4, save_every=2))).output
    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    poison_before_step(monkeypatch, 2, "weight")
    assert main(argv(files, out, max_steps=4, save_every=2)) == 2
    assert_one_error_line(
        capsys.readouterr().err,
        "the training loss is nan and the gradient norm is nan at step 3: the run stopped without saving this state",
        f"--resume latest continues from the last good checkpoint, {out / 'checkpoints' / 'step-00000002'}",
    )
    assert checkpoint_names(out) == ["step-00000002"] and not (out / "model.safetensors").exists()  # no export
    assert sorted(losses(out)) == [1, 2]  # the NaN step is not logged

    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, max_steps=4, save_every=2), "--resume", "latest"]) == 0
    assert losses(out) == losses(reference)  # the same computation as the uninterrupted run: exact
    assert checkpoint_names(out) == ["step-00000002", "step-00000004"]


def step_lrs(output) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records(output) if "loss" in r}


def test_a_lower_lr_on_resume_is_the_one_the_resumed_steps_use(files, tmp_path):
    """The way on after a divergence: the last good checkpoint with a lower --lr. The checkpoint's scheduler state
    brought back its own peak learning rate, so the resumed steps ran at the old one, though a warning said not."""
    out = train(parse_args(argv(files, tmp_path / "run", max_steps=4, save_every=2))).output
    AcceleratorState._reset_state(True)
    lower = tmp_path / "lower"
    resume = ["--resume", str(out / "checkpoints" / "step-00000002")]
    with pytest.warns(UserWarning, match=r"changed arguments \(checkpoint, now\): \{'lr': \(0.003, 0.001\)\}"):
        train(parse_args([*argv(files, lower, max_steps=4, lr=1e-3), *resume]))
    before = step_lrs(out)
    assert before[3] > 0  # the cosine's last step is 0
    # the same schedule at a third of the peak: lr * factor, one float rounding apart
    assert step_lrs(lower) == pytest.approx({3: before[3] / 3, 4: before[4] / 3}, rel=1e-12)


def test_a_nan_gradient_stops_the_run_even_without_clipping(files, tmp_path, capsys, monkeypatch):
    """A finite loss with NaN gradients (an overflow in backward) leaves NaN weights: with --max-grad-norm 0 the
    gradient norm was not even measured, and the NaN weights were checkpointed."""
    out = tmp_path / "run"
    poison_before_step(monkeypatch, 1, "gradient")
    assert main(argv(files, out, max_steps=4, save_every=1, max_grad_norm=0)) == 2
    assert_one_error_line(capsys.readouterr().err, "the training gradient norm is nan at step 2")
    assert checkpoint_names(out) == ["step-00000001"]
    weights = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fsdp_that_accelerate_does_not_enable_on_cpu_is_named(files, tmp_path, capfd):
    """The shipped fsdp2.yaml (`distributed_type: FSDP`, which `accelerate launch` passes on as ACCELERATE_USE_FSDP)
    with ACCELERATE_USE_CPU=1: accelerate runs DDP, and the run said only "MULTI_CPU"."""
    out = tmp_path / "run"
    train_two_processes(argv(files, out, max_steps=1, batch_size=2, eval_every=1), accelerate_use_fsdp="true")
    printed = capfd.readouterr().out
    assert "FSDP is not used: the accelerate config asks for it, but accelerate shards only on GPUs" in printed
    assert "so this cpu run is MULTI_CPU: every process holds the whole model" in printed
    assert setup_record(out)["distributed_type"] == "MULTI_CPU"


def test_processes_that_accelerate_did_not_join_are_refused(files, tmp_path, capsys, monkeypatch):
    """`accelerate launch --config_file scripts/accelerate/fsdp2.yaml` on a machine without GPUs and without
    ACCELERATE_USE_CPU=1 starts processes that accelerate leaves alone (WORLD_SIZE=2, each one process of its own):
    each trained alone into the same --output, until they tripped over each other's files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert main(argv(files, out)) == 2
    message = "2 processes were launched (WORLD_SIZE=2), but accelerate did not connect them"
    assert_one_error_line(capsys.readouterr().err, message, "set ACCELERATE_USE_CPU=1")
    assert not out.exists()


def test_resuming_on_fewer_processes_keeps_the_tokens_per_step(files, tmp_path, capfd):
    """2 processes x 2 rows, resumed on 1: the steps halved to 64 tokens without a word. Now --grad-accum doubles,
    the line says so, and the resumed steps are the uninterrupted run's."""
    options = dict(batch_size=2, save_every=2, eval_every=2, diag_every=0)
    out = tmp_path / "run"
    train_two_processes(argv(files, out, max_steps=2, **options))
    assert setup_record(out)["tokens_per_step"] == 128
    capfd.readouterr()
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, max_steps=4, **options), "--resume", "latest"]) == 0
    printed = capfd.readouterr().out
    assert "resuming a run of 2 processes on 1: --grad-accum 2 (it had 1) keeps its 128 tokens per step" in printed
    setup = setup_record(out)
    assert setup["num_processes"] == 1 and setup["tokens_per_step"] == 128 and setup["max_steps"] == 4

    AcceleratorState._reset_state(True)
    reference = tmp_path / "reference"  # one process, the same 4 rows per step from the start
    train(parse_args(argv(files, reference, max_steps=4, **{**options, "grad_accum": 2})))
    # 2 processes vs 1 sum the same numbers in another order (gloo all-reduce): equal to float32 rounding, ~1e-6
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)


def test_a_resume_that_cannot_keep_the_tokens_per_step_says_what_changes(files, tmp_path, capfd):
    """1 process x 3 rows resumed on 2 processes: 3 rows do not split into 2 equal shares, so each step now reads
    2 x 3 rows; a line says so instead of nothing."""
    options = dict(batch_size=3, save_every=2, eval_every=2, diag_every=0)
    out = tmp_path / "run"
    train(parse_args(argv(files, out, max_steps=2, **options)))
    capfd.readouterr()
    train_two_processes([*argv(files, out, max_steps=3, **options), "--resume", "latest"])
    printed = capfd.readouterr().out
    assert "resuming with 192 tokens per step (2 processes x --batch-size 3 x --grad-accum 1 x --seq-len 32)" in printed
    assert "the checkpoint's steps had 96 (1 x 3 x 1 x 32)" in printed
    assert setup_record(out)["tokens_per_step"] == 192


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 10**12),
        ("hidden_size", 10**9),
        ("intermediate_size", 10**9),
        ("num_hidden_layers", 10**6),
        ("num_attention_heads", 10**6),
        ("max_position_embeddings", 10**12),
        ("num_experts", 10**9),
    ],
)
def test_absurd_config_sizes_are_refused_naming_the_field(field, value):
    message = config_error(**{field: value})
    assert f"field '{field}'" in message and "far above any published model" in message and str(value) in message


def test_an_absurd_vocab_size_is_refused_before_anything_is_written(files, tmp_path):
    """vocab_size 10**12 asked the tokenizer trainer for 72 TB: it aborted in Rust (exit 134, no message) and left
    the output folder's marker behind. A fresh process, because the old code kills the process it runs in."""
    config = {**json.loads((files / "dense.json").read_text()), "vocab_size": 10**12}
    (tmp_path / "huge.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"),
               *argv(files, out, config=str(tmp_path / "huge.json"), tokenizer=None)]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_error_line(done.stderr, "field 'vocab_size'", "1000000000000")
    assert not out.exists()


def test_unknown_config_keys_are_warned_about_and_not_saved(tmp_path, caplog):
    """A typo key was warned about with a good suggestion, then kept in every config saved from that one (the
    export included). Keys transformers writes itself (a quantized checkpoint's quantization_config) stay."""
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    saved = {**tiny_config().to_dict(), "num_hidden_layer": 8, "quantization_config": quantization}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        config = SpanNormConfig.from_json_file(tmp_path / "config.json")
    assert "unknown key 'num_hidden_layer' is ignored and not saved; did you mean num_hidden_layers?" in caplog.text
    assert "quantization_config" not in caplog.text
    SpanNormForCausalLM(config).save_pretrained(tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "num_hidden_layer" not in exported and exported["num_hidden_layers"] == 3
    assert exported["quantization_config"] == quantization
