"""The bf16 measurements the experiment README quotes (experiments/precision/)."""

import dataclasses

import pytest
import torch
from bf16_skip import update_error
from bf16_training import report

from spannorm_hf import SpanNormForCausalLM

from grids import GRIDS, RunSpec
from helpers import tiny_config
from run import PRECISIONS, load_bytes, split_data, train_one, val_batches


def test_bf16_rounding_eats_more_of_each_block_update_as_the_skip_scale_grows():
    """With the stream at unit RMS a block changes it by about |F| / a, so bf16's fixed relative rounding is a larger
    share of that change the larger `a`: CompleteP's a = 96 at L = 48 loses over 10% of it at a branch RMS of 1, where
    DeepNet's a = 3.1 loses about 1%. Summing in fp32 never does worse than summing in bf16."""
    errors = {a: update_error(a, branch_rms=1.0, rows=1024) for a in (96**0.25, 96**0.5, 96.0)}
    all_bf16 = [bf16 for bf16, _ in errors.values()]
    assert all_bf16 == sorted(all_bf16)
    assert all_bf16[0] < 0.02 and all_bf16[-1] > 0.10
    assert all(fp32_sum <= bf16 for bf16, fp32_sum in errors.values())


def test_autocast_keeps_the_stream_in_fp32():
    """What the READMEs tell bf16 users: autocast with fp32 weights (`--mixed-precision bf16`) computes the matmuls
    in bf16 but every hidden state the blocks hand on stays float32, so a = 2L loses nothing to the stream's rounding;
    bf16 weights put the stream itself in bf16."""
    model, ids = SpanNormForCausalLM(tiny_config()), torch.randint(0, 64, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16  # autocast is on: the LM head ran in bf16
    assert {h.dtype for h in out.hidden_states} == {torch.float32}
    out = model.to(torch.bfloat16)(ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}


def test_bf16_training_trains_close_to_fp32_in_each_precision(tmp_path):
    """experiments/precision/bf16_training.py: the depth grid's run in fp32, under autocast and with FSDP2's bf16
    parameters. Six steps of a 2-layer model: the bf16 runs differ from fp32 (they really compute in bf16) but by
    less than 0.02 nat (bf16's 8-bit mantissa: relative rounding ~4e-3 per operation); the fp32 run is the grid's own
    record, bit for bit, and no process group outlives a run."""
    grid = dataclasses.replace(GRIDS["depth"], steps=6, eval_batches=2)
    tokens, _ = load_bytes(None)
    train, val = split_data(tokens, grid)
    val = val_batches(val, grid)
    spec = RunSpec("span-completep", 2, 0, 1.6e-2, 0)
    runs = {p: train_one(spec, grid, train, val, p) for p in PRECISIONS}
    assert runs["fp32"]["val_loss"] == train_one(spec, grid, train, val)["val_loss"]
    assert "precision" not in runs["fp32"] and not torch.distributed.is_initialized()
    for name in ("bf16-autocast", "bf16-params"):
        run = runs[name]
        assert run["precision"] == name
        assert run["train_curve"] != runs["fp32"]["train_curve"]
        for loss in (run["val_loss"], run["val_loss_fp32"]):
            assert abs(loss - runs["fp32"]["val_loss"]) < 0.02
    table = report([{**r, "key": f"{r['key']}|{p}"} for p, r in runs.items()])
    assert table.count("\n| bf16") == 2 and "not run yet" not in table
    with pytest.raises(ValueError, match="fp16"):
        train_one(spec, grid, train, val, "fp16")
