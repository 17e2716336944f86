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
