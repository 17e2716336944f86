"""What a serving engine's Transformers backend (vLLM, SGLang with `model_impl="transformers"`) does to a model, done
on CPU: it swaps every RMSNorm module for its own kernel, the `experts` modules for its fused MoE (called as
`experts(hidden_states, top_k_index, top_k_weights)`), and routes attention through its own function registered with
`AttentionInterface`, to which the model must pass its kwargs down. The logits must not change."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from spannorm_hf import NORM_SCHEME_NAMES, SpanNormForCausalLM
from spannorm_hf.configuration_spannorm import AUTO_MAP

from helpers import moe_config, tiny_config

ENGINE_CALLS: list[dict] = []


def engine_attention(module, query, key, value, attention_mask, **kwargs):
    """The engine's attention: records what reached it, then runs SDPA."""
    ENGINE_CALLS.append({"layer": module.layer_idx, "tag": kwargs.get("engine_tag")})
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("engine_attention", engine_attention)
AttentionMaskInterface.register("engine_attention", sdpa_mask)  # the mask format its kernel takes


class EngineExperts(nn.Module):
    """A fused-MoE stand-in: the same weights, computed token by token, behind the `experts` call signature only."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up_proj), nn.Parameter(down_proj)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for token, (experts, weights) in enumerate(zip(top_k_index, top_k_weights, strict=True)):
            for expert, weight in zip(experts.tolist(), weights, strict=True):
                gate, up = (self.gate_up_proj[expert] @ hidden_states[token]).chunk(2)
                out[token] += weight * (self.down_proj[expert] @ (F.silu(gate) * up))
        return out


def swap_like_an_engine(model: SpanNormForCausalLM) -> dict[str, int]:
    """Replace every RMSNorm and experts module in place, as the engine's backend does, by module name and class."""
    swapped = {"norms": 0, "experts": 0}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if "RMSNorm" in type(module).__name__:
            plain = LlamaRMSNorm(module.weight.shape[0], eps=module.variance_epsilon)
            plain.weight = nn.Parameter(module.weight.detach().clone())
            setattr(parent, child, plain)
            swapped["norms"] += 1
        elif child == "experts":
            setattr(
                parent, child, EngineExperts(module.gate_up_proj.detach().clone(), module.down_proj.detach().clone())
            )
            swapped["experts"] += 1
    return swapped


def test_the_folder_is_served_through_automodel():
    assert "AutoModel" in AUTO_MAP and SpanNormForCausalLM._supports_attention_backend


CASES = [(s, k, None) for s in NORM_SCHEME_NAMES for k in ("dense", "moe")]
CASES += [("span", "moe", 8), ("pre", "dense", 8)]  # a width rule (mup_base_width) with m = 4


@pytest.mark.parametrize("scheme,kind,base_width", CASES)
def test_swapped_norms_experts_and_attention_give_the_same_logits(scheme, kind, base_width):
    """Also under a width rule (mup_base_width): its multipliers sit outside the modules an engine replaces."""
    factory = moe_config if kind == "moe" else tiny_config
    config = factory(norm_scheme=scheme, attn_implementation="sdpa", mup_base_width=base_width)
    model = SpanNormForCausalLM(config).eval()
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding reaches the engine's attention as a mask
    with torch.no_grad():
        reference = model(x, attention_mask=mask).logits

    swapped = swap_like_an_engine(model)
    assert swapped["norms"] > 0 and swapped["experts"] == (2 if kind == "moe" else 0)
    model.set_attn_implementation("engine_attention")
    ENGINE_CALLS.clear()
    with torch.no_grad():
        served = model(x, attention_mask=mask, engine_tag="from the top").logits
    assert ENGINE_CALLS == [{"layer": i, "tag": "from the top"} for i in range(config.num_hidden_layers)]
    if kind == "dense":
        # The same operations in the same order (the engine's norm is Llama's, its attention is SDPA): identical.
        assert torch.equal(served, reference)
    else:
        # The stand-in experts sum each token's expert outputs in another order: float32 rounding only.
        torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-5)
