"""The model as tools this project did not write see it (issue 20): every block projection is a plain `nn.Linear`,
so type-driven tools (dynamic quantization, LoRA's "all-linear", serving engines' parallel linears) reach all of
them, and the init is chosen by role, not by a Linear subclass."""

import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.configuration_spannorm import UNIT_EMBEDDING_SCHEMES

from helpers import moe_config, run_without_package, tiny_config

QUANTIZED_LINEAR = torch.ao.nn.quantized.dynamic.Linear


def quantized_count(model: nn.Module) -> tuple[int, int]:
    """(Linears before, quantized Linears after) `torch.ao.quantization.quantize_dynamic`, which swaps modules whose
    type is exactly `nn.Linear`."""
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice (eager-mode quantization moved to torchao)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return linears, sum(type(m) is QUANTIZED_LINEAR for m in quantized.modules())


def test_dynamic_quantization_reaches_every_linear_like_llama():
    """It used to quantize 1 of 15 (the LM head): the projections were Linear subclasses."""
    config = tiny_config(num_hidden_layers=2)
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    llama = LlamaForCausalLM(LlamaConfig(**{k: getattr(config, k) for k in sizes}, num_key_value_heads=2))
    assert quantized_count(llama) == (15, 15)  # 7 per layer + the LM head
    assert quantized_count(SpanNormForCausalLM(config)) == (15, 15)
    moe = SpanNormForCausalLM(moe_config(num_hidden_layers=2))  # a dense layer, a routed one (experts are 3D)
    assert quantized_count(moe) == (12, 12)  # 7 + 4 attention projections + the LM head


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The state dict of a `span` model, written out: it must not change with the module types."""
    hidden, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "lm_head.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (config.num_attention_heads * config.head_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden),
            layer + "self_attn.o_proj.weight": (hidden, config.num_attention_heads * config.head_dim),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "post_feedforward_layernorm.weight": (hidden,),
        }
        if config.is_sparse_layer(i):
            moe_inter = config.moe_intermediate_size
            shapes |= {
                layer + "mlp.experts.gate_up_proj": (config.num_experts, 2 * moe_inter, hidden),
                layer + "mlp.experts.down_proj": (config.num_experts, hidden, moe_inter),
                layer + "mlp.gate.weight": (config.num_experts, hidden),
            }
        else:
            shapes |= {
                layer + "mlp.gate_proj.weight": (inter, hidden),
                layer + "mlp.up_proj.weight": (inter, hidden),
                layer + "mlp.down_proj.weight": (hidden, inter),
            }
    shapes["model.layers.0.input_layernorm.weight"] = (hidden,)
    return shapes


@pytest.mark.parametrize("factory", [tiny_config, moe_config])
def test_state_dict_keys_and_shapes_are_unchanged(factory):
    config = factory()
    found = {name: tuple(t.shape) for name, t in SpanNormForCausalLM(config).state_dict().items()}
    assert found == expected_shapes(config)


# The init of 0.2.0 (Linear subclasses typed the roles), spelled out from its code: the same tensors drawn in the same
# order as transformers visits modules (children before parents; for leaves that is `named_modules()` order).
QUERY_KEY = ("q_proj", "k_proj")
BRANCH = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def old_init(model: SpanNormForCausalLM) -> None:
    config = model.config
    std, gain = config.initializer_range, config.branch_gain
    for name, module in model.named_modules():
        role = name.rpartition(".")[2]
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)  # transformers' default, drawn first
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if gain is not None and role in QUERY_KEY + BRANCH:
                nn.init.xavier_normal_(module.weight, gain=gain if role in BRANCH else 1.0)
        elif isinstance(module, nn.Embedding):
            for embedding_std in (std, 1.0) if config.norm_scheme in UNIT_EMBEDDING_SCHEMES else (std,):
                nn.init.normal_(module.weight, std=embedding_std)
                nn.init.zeros_(module.weight[module.padding_idx])
        elif role == "experts":
            hidden, inter = module.hidden_dim, module.intermediate_dim
            nn.init.normal_(module.gate_up_proj, std=std if gain is None else gain * (2 / (hidden + 2 * inter)) ** 0.5)
            nn.init.normal_(module.down_proj, std=std if gain is None else gain * (2 / (hidden + inter)) ** 0.5)
        elif role == "gate":  # the router
            nn.init.normal_(module.weight, std=std)
        elif "norm" in role:
            nn.init.ones_(module.weight)


INIT_CASES = {
    "span": tiny_config(),
    "span-moe-bias": moe_config(attention_bias=True, mlp_bias=True),
    "deepnorm-moe": moe_config(norm_scheme="deepnorm"),
    "pre": tiny_config(norm_scheme="pre"),
    "plain-init": tiny_config(branch_init_gain=None),
}


@pytest.mark.parametrize("case", INIT_CASES)
def test_init_is_the_old_init_bit_for_bit(case):
    model = SpanNormForCausalLM(INIT_CASES[case])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(7.0)  # so that anything the init leaves alone differs from the reference
        for module in model.modules():
            module._is_hf_initialized = False
    torch.manual_seed(11)
    model.init_weights()
    new = {name: t.clone() for name, t in model.state_dict().items()}
    torch.manual_seed(11)
    with torch.no_grad():
        old_init(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(new[name], tensor), name


FRESH_INIT = """
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
torch.manual_seed(7)
model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
sums = {name: [t.double().sum().item(), t.double().square().sum().item()] for name, t in model.state_dict().items()}
print(json.dumps(sums))
"""


@pytest.mark.slow  # a fresh Python (~10 s on a busy 2-core machine)
def test_remote_code_fresh_init_chooses_the_same_roles(tmp_path):
    """Under remote code transformers skips `_init_weights` on parameter-less parents (attention, MLP): roles must be
    found on the leaves. A fresh model built through remote code equals one built by the package from the same seed."""
    config = moe_config(attention_bias=True)
    SpanNormForCausalLM(config).save_pretrained(tmp_path / "model")
    torch.set_num_threads(1)
    torch.manual_seed(7)
    expected = SpanNormForCausalLM(config).state_dict()
    found, _ = run_without_package(FRESH_INIT, [str(tmp_path / "model")], tmp_path)
    assert set(found) == set(expected)
    for name, tensor in expected.items():  # the same draws sum the same way: equal sums and sums of squares
        assert found[name] == [tensor.double().sum().item(), tensor.double().square().sum().item()], name
