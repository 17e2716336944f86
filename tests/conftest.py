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
