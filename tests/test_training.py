"""Pretraining loop (spannorm_hf.training): metrics, checkpoints, exact resume after SIGINT / SIGKILL, export,
MoE aux loss, and the early errors for bad input. Tiny models, short sequences, CPU fp32."""

import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from spannorm_hf.files import LOCK_FILE, OUTPUT_MARKER, claim_output_dir
from spannorm_hf.training.checkpointing import write_manifest
from spannorm_hf.training.learning_rate import predicted_lr
from spannorm_hf.training.tokenizer import train_tokenizer
from spannorm_hf.training.trainer import load_config, main, parse_args, train

from fake_hub import closed_port_url
from helpers import (
    CODE_FILES,
    ROOT,
    argv,
    checkpoint_names,
    clean_accelerate_state,
    losses,
    records,
    snapshot,
    subprocess_env,
)

# Runs train in this process: accelerate's singletons are reset around every test.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.slow
def test_training_logs_evaluates_diagnoses_checkpoints_and_exports(files, tmp_path):
    out = tmp_path / "run"
    result = train(parse_args(argv(files, out, keep_last=2, save_every=3)))
    assert result.step == 12 and not result.interrupted
    recs = records(out)
    setup = next(r for r in recs if r.get("event") == "setup")
    assert setup["num_processes"] == 1 and setup["max_steps"] == 12 and setup["tokens_per_step"] == 4 * 32
    assert setup["attn_implementation"] == "sdpa" and setup["mixed_precision"] == "no"  # the CPU defaults
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)  # 2 warmup steps, then cosine
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert [r["tokens"] for r in steps] == [128 * s for s in range(1, 13)]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    diags = [r for r in recs if "block_0/output_rms" in r]
    assert [r["step"] for r in diags] == [4, 8, 12]
    for r in diags:
        for i in range(3):  # tiny_config has 3 blocks; block outputs are RMS-normalized under SpanNorm
            assert r[f"block_{i}/output_rms"] == pytest.approx(1.0, abs=0.05)
            assert r[f"block_{i}/grad_norm"] > 0 and -1 <= r[f"block_{i}/cosine"] <= 1
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert checkpoint_names(out) == ["step-00000009", "step-00000012"]  # keep_last=2
    exported = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= exported
    assert {"configuration_spannorm.py", "modeling_spannorm.py"} <= exported
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spannorm.SpanNormForCausalLM"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    # The export loads in a fresh process through its own code (trust_remote_code), and equals the trained model.
    probe = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "assert 'spannorm_hf' not in sys.modules\n"
        "x = t('def main(args):', return_tensors='pt').input_ids\n"
        "n = m.generate(x, max_new_tokens=5, do_sample=False).shape[1]\n"
        "print('RESULT', m(x).logits.double().sum().item(), n)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logits_sum, length = done.stdout.split("RESULT")[-1].split()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    x = AutoTokenizer.from_pretrained(out)("def main(args):", return_tensors="pt").input_ids
    assert float(logits_sum) == pytest.approx(model(x).logits.double().sum().item(), rel=1e-6)
    assert int(length) == x.shape[1] + 5


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _logged_steps(output: Path) -> int:
    """The last step with a loss record, read while the run may be writing (complete lines only)."""
    path = output / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return max((r["step"] for r in map(json.loads, lines) if "loss" in r), default=0)


@pytest.mark.slow
def test_sigint_then_sigkill_then_resume_repeat_the_uninterrupted_losses(files, tmp_path):
    """Reference: 12 uninterrupted steps. Interrupted: SIGINT early (checkpoint + clean exit), resume, SIGKILL just
    after the step-6 checkpoint, resume again to step 12. Every step's loss must be identical."""
    train(parse_args(argv(files, tmp_path / "ref")))
    reference = losses(tmp_path / "ref")
    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *argv(files, out)]

    first = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged_steps(out) >= 1, first, "step 1")  # the signal handler is installed by then
    first.send_signal(signal.SIGSTOP)  # pin the step, then interrupt as Ctrl-C would
    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by a signal at step" in stdout
    (interrupted,) = checkpoint_names(out)
    stopped_at = int(interrupted.removeprefix("step-"))
    assert 1 <= stopped_at < 6 and not (out / "config.json").exists()  # stopped early, nothing exported

    second = subprocess.Popen(
        [*cmd, "--resume", "latest"], env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    _wait_for(lambda: (out / "checkpoints" / "step-00000006").is_dir(), second, "the step-6 checkpoint")
    second.send_signal(signal.SIGKILL)
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL and not (out / "config.json").exists()

    result = train(parse_args([*argv(files, out), "--resume", "latest"]))
    assert result.step == 12 and not result.interrupted
    assert not [n for n in checkpoint_names(out) if n.startswith(".")]  # no temporary directory left
    resumed_from = [r["resumed_from"] for r in records(out) if r.get("event") == "setup"]
    assert resumed_from[0] is None and resumed_from[1].endswith(interrupted)
    assert resumed_from[2].endswith("step-00000006")
    assert losses(out) == reference  # bit-identical, every step


def test_gradient_accumulation_gives_the_same_steps(files, tmp_path):
    whole = train(parse_args(argv(files, tmp_path / "a", max_steps=4, batch_size=4)))
    AcceleratorState._reset_state(True)
    split = train(parse_args(argv(files, tmp_path / "b", max_steps=4, batch_size=2, grad_accum=2)))
    assert whole.step == split.step == 4
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)


@pytest.mark.parametrize(
    "option, value, tolerance",
    [
        # the same forward recomputed in backward: only the order gradients are summed in may change (~1 ulp)
        ("activation_checkpointing", True, 1e-6),
        # another kernel for the same attention (other summation order): fp32 rounding, grown over 3 updates
        ("attn_implementation", "eager", 1e-5),
        # bf16 autocast: ~3 significant digits per matmul
        ("mixed_precision", "bf16", 0.05),
    ],
)
def test_runtime_options_train_the_same_model(files, tmp_path, option, value, tolerance):
    """Recomputing activations, another attention kernel or bf16 autocast change speed, not the model: the losses
    agree within the rounding each option brings (bit-equality is not promised: it depends on the CPU's kernels)."""
    train(parse_args(argv(files, tmp_path / "base", max_steps=3, eval_every=3)))
    AcceleratorState._reset_state(True)
    train(parse_args(argv(files, tmp_path / "variant", max_steps=3, eval_every=3, **{option: value})))
    base, variant = losses(tmp_path / "base"), losses(tmp_path / "variant")
    assert base.keys() == variant.keys() == {1, 2, 3}
    assert all(variant[s] == pytest.approx(base[s], rel=0, abs=tolerance) for s in base)
    if option == "mixed_precision":  # and bf16 did run: its rounding shows (~5e-5 here), above fp32's (~1e-6)
        assert next(r for r in records(tmp_path / "variant") if r.get("event") == "setup")["mixed_precision"] == "bf16"
        assert max(abs(variant[s] - base[s]) for s in base) > 1e-5


def test_moe_aux_loss_is_logged_and_optimized(files, tmp_path):
    train(parse_args(argv(files, tmp_path / "aux", "moe.json", max_steps=4, max_tokens=3 * 128 - 1)))
    AcceleratorState._reset_state(True)
    train(parse_args(argv(files, tmp_path / "noaux", "moe-noaux.json", max_steps=4, max_tokens=3 * 128 - 1)))
    with_aux = [r for r in records(tmp_path / "aux") if "loss" in r]
    assert len(with_aux) == 3  # --max-tokens wins over --max-steps
    assert all(1.5 < r["aux_loss"] < 4 for r in with_aux)  # load balancing: ~num_experts_per_tok=2 when balanced
    without = losses(tmp_path / "noaux")
    # Same start: the logged loss is the LM part. With the aux term it is logged as (lm + coef * aux) - coef * aux in
    # float32: the plain LM loss in exact arithmetic, off by the rounding of that sum and difference in float32, at
    # most about one ulp of lm + coef * aux (< 16 here: 9.5e-7; measured 4.8e-7 on an Intel Xeon, 0 on AMD EPYC).
    # 2e-6 allows two ulps; the aux term's own effect on the loss two steps later is 30 times larger (6e-5).
    assert with_aux[0]["loss"] == pytest.approx(without[1], rel=0, abs=2e-6)
    assert abs(with_aux[2]["loss"] - without[3]) > 2e-5  # the aux term changed the updates: it is in the objective


def test_streaming_run_resumes_exactly_from_a_checkpoint(files, tmp_path):
    train(parse_args(argv(files, tmp_path / "ref", streaming=True, val_size=20, max_steps=8, save_every=4)))
    AcceleratorState._reset_state(True)
    checkpoint = tmp_path / "ref" / "checkpoints" / "step-00000004"
    train(
        parse_args(
            [*argv(files, tmp_path / "resumed", streaming=True, val_size=20, max_steps=8), "--resume", str(checkpoint)]
        )
    )
    ref, resumed = losses(tmp_path / "ref"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[s] == ref[s] for s in resumed)


def _bad_input(files: Path, tmp_path: Path, case: str) -> tuple[list[str], str]:
    out = tmp_path / "out"
    if case == "missing file":
        return argv(files, out, data=str(tmp_path / "nope.txt")), "nope.txt' does not exist"
    if case == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        return argv(files, out, data=str(tmp_path / "empty.jsonl")), "empty.jsonl' is empty"
    if case == "binary file":
        (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
        return argv(files, out, data=str(tmp_path / "blob.txt")), "blob.txt' looks binary"
    if case == "sequence too long":
        return argv(files, out, seq_len=65), "--seq-len 65 exceeds the config's max_position_embeddings=64"
    if case == "unwritable output":
        (tmp_path / "a-file").write_text("x")
        return argv(files, tmp_path / "a-file" / "run"), "is not writable"
    if case in ("lr nan", "lr inf", "lr zero"):
        value = {"lr nan": "nan", "lr inf": "inf", "lr zero": "0"}[case]
        return argv(files, out, lr=value), "--lr must be > 0" if value == "0" else f"--lr: {value} is not a finite"
    if case == "unknown activation":
        config = json.loads((files / "dense.json").read_text())
        (tmp_path / "bad.json").write_text(json.dumps({**config, "hidden_act": "nope"}))
        message = "field 'hidden_act': ValueError: Value must be one of"
        return argv(files, out, config=str(tmp_path / "bad.json"), tokenizer=None), message
    if case == "bad option":
        return argv(files, out, batch_size=0), "--batch-size must be >= 1, got 0"
    if case == "no flash-attn":
        return argv(files, out, attn_implementation="flash_attention_2"), "needs the flash-attn package and a CUDA"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "empty file",
        "binary file",
        "sequence too long",
        "unwritable output",
        "bad option",
        "no flash-attn",
        "lr nan",
        "lr inf",
        "lr zero",
        "unknown activation",
    ],
)
def test_bad_input_fails_early_with_a_clear_message(files, tmp_path, capsys, case):
    args, message = _bad_input(files, tmp_path, case)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")  # one line
    out = tmp_path / "out"
    if case in ("missing file", "empty file", "binary file"):  # found while reading data: a marked, empty folder
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, OUTPUT_MARKER])
    else:  # found before anything is written: not even the folder
        assert not out.exists()


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configuration").glob("*.json")))
def test_the_defaults_fit_every_shipped_preset(preset, tmp_path):
    """`--config PRESET` alone must not conflict with the preset: the context is the config's unless told."""
    path = str(ROOT / "configuration" / preset)
    args = parse_args(["--config", path, "--output", str(tmp_path / "run")])
    assert args.seq_len is None and load_config(args).max_position_embeddings == args.seq_len
    told = parse_args(["--config", path, "--output", str(tmp_path / "run"), "--seq-len", "64"])
    load_config(told)
    assert told.seq_len == 64


def test_without_lr_a_run_takes_the_studies_rate_and_a_resume_keeps_its_own(files, tmp_path, capsys):
    """No --lr: a new run uses `predicted_lr` (tiny config: span, CompleteP, width 32, no width rule: 8e-3 x 128 /
    32) and says so; resumed without --lr it keeps the checkpoint's learning rate, even one the user chose."""
    config = load_config(parse_args(argv(files, tmp_path / "x")))
    lr, _ = predicted_lr(config)
    assert config.hidden_size == 32 and lr == pytest.approx(3.2e-2)
    out = tmp_path / "run"
    assert main(argv(files, out, lr=None, max_steps=2, save_every=2, eval_every=2)) == 0
    assert f"--lr {lr:.3g}: the width and depth studies' rule" in capsys.readouterr().out
    assert [r["lr"] for r in records(out) if "loss" in r][0] == pytest.approx(lr / 2)  # warmup step 1 of 2
    chosen = tmp_path / "chosen"
    assert main(argv(files, chosen, lr=1e-3, max_steps=4, save_every=2, eval_every=2)) == 0
    AcceleratorState._reset_state(True)
    shutil.rmtree(chosen / "checkpoints" / "step-00000004")
    assert main([*argv(files, chosen, lr=None, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 0
    assert "--lr 0.001: the learning rate of" in capsys.readouterr().out
    resumed = [r["lr"] for r in records(chosen) if "loss" in r]
    assert resumed[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))  # the cosine of a 1e-3 peak


def test_bad_resume_fails_before_touching_the_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(argv(files, out, max_steps=2, save_every=1, eval_every=2)))
    AcceleratorState._reset_state(True)
    before = (checkpoint_names(out), (out / "metrics.jsonl").read_text())
    leftover = out / "checkpoints" / ".tmp-step-00000003"  # what a run killed while saving leaves
    leftover.mkdir()

    assert main([*argv(files, out, "wider.json"), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert (
        "the model config differs (head_dim: checkpoint 8 vs --config 12, hidden_size: checkpoint 32 vs --config 48)"
        in err
    )
    assert main(argv(files, out)) == 2  # a fresh run must not mix with an earlier one
    assert "already holds checkpoints (latest step-00000002); pass --resume latest" in capsys.readouterr().err
    train_tokenizer(["another tokenizer entirely " * 20], vocab_size=280).save_pretrained(tmp_path / "tok2")
    assert main([*argv(files, out, tokenizer=tmp_path / "tok2"), "--resume", "latest"]) == 2
    assert "is not the run's tokenizer" in capsys.readouterr().err
    assert main([*argv(files, out), "--resume", str(tmp_path)]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert main([*argv(files, out), "--resume", str(out / "checkpoints" / "step-00000001")]) == 2
    assert "holds newer checkpoints ['step-00000002']" in capsys.readouterr().err
    assert leftover.is_dir() and (out / "metrics.jsonl").read_text() == before[1]
    assert [n for n in checkpoint_names(out) if n != leftover.name] == before[0]

    # a valid resume at the end trains nothing, keeps the checkpoints, and clears the leftover temporary dir
    AcceleratorState._reset_state(True)
    with pytest.warns(UserWarning, match=r"changed arguments \(checkpoint, now\): \{'lr': \(0.003, 0.001\)\}"):
        assert main([*argv(files, out, max_steps=2, lr=1e-3), "--resume", "latest"]) == 0
    assert checkpoint_names(out) == before[0]


def test_a_new_run_never_overwrites_an_earlier_one(files, tmp_path, capsys):
    """A finished run whose checkpoints were removed: a new run into it (with or without --resume latest) is refused
    before anything is written; --overwrite starts over, replacing only the files training writes."""
    out = tmp_path / "run"
    train(parse_args(argv(files, out, max_steps=2, save_every=2, eval_every=2)))
    AcceleratorState._reset_state(True)
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert main(argv(files, out, max_steps=2)) == 2
    err = capsys.readouterr().err
    assert f"error: --output {str(out)!r} holds an earlier run (" in err and "config.json" in err
    assert main([*argv(files, out, max_steps=2), "--resume", "latest"]) == 2
    assert "with no checkpoint to resume from: choose a new --output, or pass --overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(argv(files, tmp_path / "mine")) == 2  # a folder training did not create
    assert "is not empty (notes.txt) and was not created by this command" in capsys.readouterr().err
    assert snapshot(out) == before and snapshot(tmp_path / "mine") == {"notes.txt": b"keep"}

    (out / "notes.txt").write_text("keep")
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, max_steps=3, save_every=3, eval_every=3), "--overwrite"]) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]  # the old records are gone, not mixed in
    assert len([r for r in records(out) if r.get("event") == "setup"]) == 1
    assert (out / "notes.txt").read_text() == "keep" and checkpoint_names(out) == ["step-00000003"]


def test_resume_latest_restarts_a_run_that_died_before_its_first_checkpoint(files, tmp_path):
    """A requeued job can always pass --resume latest: a run killed before any checkpoint (never exported)
    starts again, replacing what that attempt logged."""
    out = claim_output_dir(tmp_path / "run", "training-run", flag="--output")  # what the killed attempt left
    (out / "metrics.jsonl").write_text('{"event": "setup", "step": 0}\n{"step": 1, "loss": 9.0}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"events")
    assert main([*argv(files, out, max_steps=2, eval_every=2), "--resume", "latest"]) == 0
    assert [r["loss"] != 9.0 for r in records(out) if "loss" in r] == [True, True]  # steps 1, 2 of the new attempt
    assert len([r for r in records(out) if r.get("event") == "setup"]) == 1
    assert not (out / "tensorboard" / "events.out.tfevents.1.host").exists()


@pytest.fixture(scope="module")
def two_checkpoints(files, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("two-checkpoints") / "run"
    with clean_accelerate_state():
        train(parse_args(argv(files, out, max_steps=4, save_every=2, eval_every=2)))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


class PlantedPayload:
    """Unpickling this creates the file `path`: what a malicious checkpoint could run instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resuming_never_unpickles_a_planted_payload(files, two_checkpoints, tmp_path, capsys):
    """A checkpoint handed over by someone else, with pickles planted where accelerate's format kept its
    scheduler and step counter, or in place of the optimizer state, and a manifest made to match: resuming refuses
    it, naming the file, and the payload never runs."""
    out = copy_run(two_checkpoints, tmp_path)
    checkpoint = out / "checkpoints" / "step-00000004"
    ran = tmp_path / "payload-ran"
    torch.save(PlantedPayload(ran), checkpoint / "custom_checkpoint_0.pkl")
    write_manifest(checkpoint)  # the attacker controls the whole folder
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, max_steps=6), "--resume", str(checkpoint)]) == 2
    assert f"error: --resume {str(checkpoint)!r}: {checkpoint / 'custom_checkpoint_0.pkl'} is a pickle-format" in (
        capsys.readouterr().err
    )
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    torch.save(PlantedPayload(ran), checkpoint / "optimizer.safetensors")
    write_manifest(checkpoint)
    AcceleratorState._reset_state(True)
    assert main([*argv(files, out, max_steps=6), "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"error: {checkpoint / 'optimizer.safetensors'} is not a readable safetensors file" in err
    assert "Traceback" not in err and not ran.exists()


def test_a_corrupt_checkpoint_is_named_and_skipped(files, two_checkpoints, tmp_path, capsys):
    """A truncated file in the newest checkpoint: --resume latest falls back to the previous checkpoint, says
    which one it skipped and why, and repeats the run's steps exactly; --resume PATH to it is an error naming it."""
    out = copy_run(two_checkpoints, tmp_path)
    reference = losses(out)
    newest = out / "checkpoints" / "step-00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main([*argv(files, out, max_steps=4), "--resume", str(newest)]) == 2
    assert f"error: --resume {str(newest)!r}: {weights} is truncated or changed: 1000 bytes" in capsys.readouterr().err
    AcceleratorState._reset_state(True)
    skipped = rf"skipping checkpoint step-00000004: {weights} is truncated or changed: 1000 bytes"
    with pytest.warns(UserWarning, match=skipped):
        result = train(parse_args([*argv(files, out, max_steps=4), "--resume", "latest"]))
    resumed = [r["resumed_from"] for r in records(out) if r.get("event") == "setup"]
    assert result.step == 4 and resumed[-1].endswith("step-00000002")
    assert losses(out) == reference  # steps 3 and 4 again, bit for bit


def test_a_torn_last_metrics_line_is_dropped_on_resume(files, two_checkpoints, tmp_path):
    """What a full disk or a power cut mid-append leaves: half a JSON line. Resuming drops it with a warning."""
    out = copy_run(two_checkpoints, tmp_path)
    complete = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(complete + '{"step": 4, "loss": 5.1')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropping the torn last line \d+ \('\{\"step\": 4, \"loss"):
        result = train(parse_args([*argv(files, out, max_steps=4), "--resume", "latest"]))
    before = [json.loads(line) for line in complete.splitlines()]
    after = records(out)  # every line parses: the torn one is gone, the resumed run's records follow
    assert result.step == 4 and after[: len(before)] == before
    assert [r.get("event") for r in after[len(before) :]] == ["config", "setup"]


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount privileges): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_is_named_and_the_run_resumes_once_space_is_freed(files, two_checkpoints, tmp_path, capsys):
    """The disk fills up while a checkpoint is written: one line naming the file, exit 2, the earlier checkpoints
    intact, no half-written checkpoint left; once space is freed, --resume latest repeats the run exactly."""
    with small_disk(tmp_path / "disk", "8m") as disk:
        out = disk / "run"
        train(parse_args(argv(files, out, max_steps=2, save_every=2, eval_every=2)))
        filler = fill(disk, leave=300_000)  # room for metrics and the model, not for the optimizer state
        AcceleratorState._reset_state(True)
        assert main([*argv(files, out, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"error: no space left on device while writing {out / 'checkpoints' / '.tmp-step-00000004'}" in err
        assert checkpoint_names(out) == ["step-00000002"]  # the half-written one was removed, the older one kept
        filler.unlink()
        AcceleratorState._reset_state(True)
        assert main([*argv(files, out, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 0
        assert losses(out) == losses(two_checkpoints)  # the same four steps as a run that never ran out of space


def test_push_to_hub_uploads_each_checkpoint_and_the_final_model(files, tmp_path, hub_at, fake_hub):
    """One commit per checkpoint (its own branch), the final model on main; model files only, no optimizer."""
    hub_at(fake_hub.url)
    out = tmp_path / "run"
    result = train(parse_args(argv(files, out, save_every=4, push_to_hub="alice/tiny-run")))
    assert result.step == 12
    assert [(c["revision"], c["message"]) for c in fake_hub.commits] == [
        ("step-00000004", "Checkpoint at step 4"),
        ("step-00000008", "Checkpoint at step 8"),
        ("main", "Final model, step 12"),
    ]
    for commit in fake_hub.commits:
        files_sent = set(commit["files"])
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", *CODE_FILES} <= files_sent
        assert not any("optimizer" in name or "random_states" in name for name in files_sent)
    assert not (out / "hub-uploads").exists()  # snapshots are removed once uploaded


def test_push_to_hub_without_network_warns_and_training_goes_on(files, tmp_path, hub_at, caplog):
    hub_at(closed_port_url())
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="spannorm_hf.integrations.hub"):
        result = train(parse_args(argv(files, out, save_every=6, push_to_hub="alice/tiny-run")))
    assert result.step == 12 and (out / "model.safetensors").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training goes on" in warnings[0]


def test_push_to_hub_with_a_bad_repo_id_fails_before_training(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(files, out, push_to_hub="no-namespace")) == 2
    assert "namespace/name" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
