"""Shared tiny configs: every test builds its models from these, on CPU, in fp32."""

import pytest
import torch

from spannorm_hf import SpanNormConfig

from fake_hub import fake_hub, hub_at, no_token  # noqa: F401  (fixtures for the hub and training tests)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_layers=1)


def tiny_config(**overrides) -> SpanNormConfig:
    return SpanNormConfig(**{**TINY, **overrides})


def moe_config(**overrides) -> SpanNormConfig:
    return tiny_config(**{**MOE, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Two computations of the same logits (cached vs recomputed, batched vs alone, compiled vs eager) differ by float32
# rounding, ~1e-6 for these tiny models' logits (|logit| < 10: a few ulps of 1e-6 each, summed over <= 64-term dot
# products). A greedy choice whose top-2 logit gap is above NEAR_TIE cannot flip by that much; below it, it may.
NEAR_TIE = 1e-4


def assert_same_greedy_tokens(model, got: torch.Tensor, expected: torch.Tensor, start: int, what: str = "") -> None:
    """Greedy token sequences (1-D: prompt + generated) from two computations are equal, or equal up to a choice that
    was a near-tie in `expected`'s own logits (recomputed without a cache): bit-exact equality of argmaxes of
    differently rounded logits is not a property of the code."""
    if torch.equal(got, expected):
        return
    length = min(len(got), len(expected))
    first = next((i for i in range(start, length) if got[i] != expected[i]), length)
    assert first < len(expected), f"{what}: {got.tolist()} vs {expected.tolist()}"
    with torch.no_grad():
        logits = model(expected[None, :first], use_cache=False).logits[0, -1].float()
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap < NEAR_TIE, f"{what}: greedy tokens differ at position {first} where the top-2 logit gap is {gap:.2e}"


def finished_run_folder(path):
    """A folder as scripts/train.py leaves a finished run: its ownership marker, checkpoints, metrics, TensorBoard
    events and the exported model's config.json. Returns {relative path: bytes} of every file, to compare later."""
    from spannorm_hf.files import claim_output_dir

    claim_output_dir(path, "training-run", flag="--output")
    for name, data in {
        "checkpoints/step-00000004/model.safetensors": b"weights",
        "metrics.jsonl": b'{"step": 1, "loss": 5.0}\n',
        "tensorboard/events.out.tfevents.1": b"events",
        "config.json": b'{"model_type": "spannorm"}',
        "model.safetensors": b"exported",
    }.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return snapshot(path)


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
