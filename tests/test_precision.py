"""The bf16 measurement the experiment README quotes (experiments/precision/bf16_skip.py)."""

import torch
from bf16_skip import update_error

from spannorm_hf import SpanNormForCausalLM

from helpers import tiny_config


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
