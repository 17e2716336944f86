# Copyright 2026 The spannorm-hf authors. Licensed under the Apache License, Version 2.0.
"""SpanNorm decoder-only transformers, dense and Mixture-of-Experts, with every published norm placement.

SpanNorm (Wang et al., "SpanNorm: Reconciling Training Stability and Performance in Deep Transformers",
arXiv 2601.22580) keeps a clean skip connection across the whole block, from its input to its output, and
normalizes the aggregated sum PostNorm-style. The paper's full text was not available to us; the block
below is how the one secondary source that quotes its equations reads it, and it fits every phrase of the
abstract. With x_0 the token embeddings and N an RMSNorm with a learnable gain:

    u_l     = N_in(x_0) if l == 0 else x_l
    y_l     = N_attn(a * x_l + Attn(u_l))
    x_{l+1} = N_ffn(a * x_l + FFN(y_l))         # the skip from x_l spans both sublayers
    logits  = lm_head(x_L)                      # x_L is already normalized: no final norm

The paper's "principled scaling strategy" is not published where we can read it. The default skip scale is
CompleteP's a = 2L (`residual_scale`, a branch multiplier 1/a since N is scale-invariant), chosen by a
measured depth study, with DeepNet's Xavier-normal init gain b = (8L)^(-1/4) (`branch_init_gain`) on the branch
output weights. Both take a number or a named depth rule (see `SpanNormConfig`), resolved by the config's
`skip_scale` and `branch_gain`.

All block wiring lives in `NORM_SCHEMES` next to the decoder layer; attention, MLP and experts know nothing
about the scheme, and every norm is a plain RMSNorm module called on a sum computed outside it, so a serving
engine can swap the norms, the attention function and the experts for its own kernels. A width rule (muP,
`SpanNormConfig.mup_base_width`) is a multiplier 1/m on the input and output of the attention, MLP and MoE modules
and on the base model's output, outside everything an engine swaps, plus an init scale in `_init_weights`.

This file imports only torch, transformers and `configuration_spannorm`, so it can be shipped as Hub remote code; it
runs on every transformers from `MIN_TRANSFORMERS_VERSION` (checked in `configuration_spannorm`) to the newest,
through the small compatibility block below the imports.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation, use_kernelized_func
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_spannorm import UNIT_EMBEDDING_SCHEMES, SpanNormConfig

# ---------------------------------------------------------------------------------------------------------
# Compatibility with the transformers that runs this file. 5.17-5.23 call the KV cache `past_key_values` (the
# keyword generate passes, the output field it reads back, create_causal_mask's argument); 5.24 renamed it `cache`.
# The model says `cache` throughout and gives the cache the library's name at those three seams.
# ---------------------------------------------------------------------------------------------------------
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
if CACHE_NAME == "cache":
    accepts_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:
    _create_causal_mask = create_causal_mask

    def create_causal_mask(*, cache: Cache | None, **kwargs):
        return _create_causal_mask(past_key_values=cache, **kwargs)

    def accepts_past_key_values(forward: Callable) -> Callable:
        """Take the library's `past_key_values` under the model's name `cache`, silently (it is not deprecated here)."""

        @functools.wraps(forward)
        def wrapper(*args, past_key_values: Cache | None = None, **kwargs):
            if past_key_values is not None:
                kwargs.setdefault("cache", past_key_values)
            return forward(*args, **kwargs)

        return wrapper


class SpanNormRMSNorm(LlamaRMSNorm):
    """RMSNorm with a learnable gain, computed in fp32 (Llama's), and nothing more: the blocks compute a sum outside
    and call the norm on it, so a serving engine may swap every RMSNorm module for its own kernel."""


def no_norm(hidden_states: torch.Tensor) -> torch.Tensor:
    """Stands where a scheme has no norm: a plain function, so it owns no weight and costs no module call."""
    return hidden_states


class SpanNormRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding; its buffers are rebuilt by `_init_weights` after `from_pretrained`."""


# A block's Linears by attribute name (the names `base_model_tp_plan` uses), for the init: with a branch gain `b`
# (span/deepnorm) they start Xavier-normal, DeepNet's init, with gain 1 for queries and keys and `b` for the rest,
# whose outputs flow into the residual sum. They are plain `nn.Linear`, so tools that act on that type (dynamic
# quantization, LoRA, serving engines' parallel linears) see every one of them.
QUERY_KEY_LINEARS = ("q_proj", "k_proj")
BRANCH_LINEARS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_LINEARS = QUERY_KEY_LINEARS + BRANCH_LINEARS  # the hidden matrices a width rule scales (with the experts)


def width_scale(config: SpanNormConfig) -> float | None:
    """`1 / m` under a width rule (`SpanNormConfig.mup_base_width`); `None` without one or at the base width (m = 1),
    where the model is the one without a rule, operation for operation. On each branch's input and output it makes
    every hidden matrix inside act as `w / m`; the router (inside the MoE branch) and the model's output are
    readouts, which muP scales by `1 / m`."""
    multiplier = config.width_multiplier
    return None if multiplier in (None, 1.0) else 1.0 / multiplier


def scaled(hidden_states: torch.Tensor, scale: float | None) -> torch.Tensor:
    """`hidden_states * scale`; no operation at all without a width rule."""
    return hidden_states if scale is None else hidden_states * scale


class SpanNormMLP(nn.Module):
    """SwiGLU MLP, down(act(gate(x)) * up(x)), as Llama's; under a width rule its input and output are times 1/m."""

    def __init__(self, config: SpanNormConfig):
        super().__init__()
        self.width_scale = width_scale(config)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = scaled(x, self.width_scale)
        return scaled(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)), self.width_scale)


# transformers finds the `experts_implementation` switch by reading this decorator in the model's own file.
@use_experts_implementation
class SpanNormExperts(Qwen3MoeExperts):
    """Qwen3-MoE's experts: all experts of one layer as fused 3D weights `gate_up_proj [E, 2I, H]`, `down_proj
    [E, H, I]`, called as `experts(hidden_states, top_k_index, top_k_weights)`; `experts_implementation` picks the
    kernel. Reused, not copied, so the installed transformers' expert-parallel handling comes with it."""


class SpanNormTopKRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's softmax router `weight [E, H]`; returns (logits, top-k weights, top-k expert indices)."""


class SpanNormSparseMoeBlock(nn.Module):
    """Top-k routed experts; drops in wherever the dense MLP sits, in every norm scheme. Under a width rule its input
    (the router's too) and output are times 1/m, here and not in the experts, which serving engines replace."""

    def __init__(self, config: SpanNormConfig):
        super().__init__()
        self.width_scale = width_scale(config)
        self.experts = SpanNormExperts(config)
        self.gate = SpanNormTopKRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = scaled(hidden_states.view(-1, hidden_dim), self.width_scale)
        _, routing_weights, selected_experts = self.gate(flat)
        routed = self.experts(flat, selected_experts, routing_weights)
        return scaled(routed, self.width_scale).reshape(batch_size, sequence_length, hidden_dim)


@use_kernelized_func(apply_rotary_pos_emb)
class SpanNormAttention(nn.Module):
    """Multi-head attention with GQA and RoPE; `norms` names the per-head norms it owns (q_norm, k_norm, v_norm).
    Under a width rule its input and output are times 1/m, here and not in the attention function, which serving
    engines replace; the attention scaling stays 1/sqrt(head_dim) (heads are added as width grows)."""

    def __init__(self, config: SpanNormConfig, layer_idx: int, norms: tuple[str, ...] = ()):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.width_scale = width_scale(config)

        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        for name in ("q_norm", "k_norm", "v_norm"):
            setattr(self, name, SpanNormRMSNorm(self.head_dim, eps=config.rms_norm_eps) if name in norms else no_norm)

    @accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        hidden_states = scaled(hidden_states, self.width_scale)

        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_norm(self.v_proj(hidden_states).view(hidden_shape)).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return scaled(self.o_proj(attn_output), self.width_scale), attn_weights


# ---------------------------------------------------------------------------------------------------------
# Norm schemes. Each block function is the scheme's equations as code: `x` is the block input, `attn` the
# attention sublayer, `layer.mlp` the FFN (dense or MoE), `a` the skip scale. Norms are called on sums, never handed
# the pieces. Norms a scheme does not list are `no_norm` in its layers, so state dicts carry no dead weights.
# ---------------------------------------------------------------------------------------------------------


def scaled_skip(a: float | torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """a x + f as one `torch.add` when `a` is a number: one rounding, as every published result was computed."""
    return torch.add(f, x, alpha=a) if isinstance(a, (int, float)) else f + a * x


def span_block(layer: "SpanNormDecoderLayer", x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """SpanNorm: y = N_attn(a x + Attn(u)), x' = N_ffn(a x + FFN(y)), u = N_in(x) in block 0 only."""
    a = layer.skip_scale
    y = layer.post_attention_layernorm(scaled_skip(a, x, attn(layer.input_layernorm(x))))
    return layer.post_feedforward_layernorm(scaled_skip(a, x, layer.mlp(y)))


def pre_block(layer: "SpanNormDecoderLayer", x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """PreNorm: h = x + Attn(N1(x)), x' = h + FFN(N2(h))."""
    h = x + attn(layer.input_layernorm(x))
    return h + layer.mlp(layer.pre_feedforward_layernorm(h))


def post_block(layer: "SpanNormDecoderLayer", x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """PostNorm (and DeepNorm with a != 1): h = N1(a x + Attn(x)), x' = N2(a h + FFN(h))."""
    a = layer.skip_scale
    h = layer.post_attention_layernorm(scaled_skip(a, x, attn(x)))
    return layer.post_feedforward_layernorm(scaled_skip(a, h, layer.mlp(h)))


def peri_block(layer: "SpanNormDecoderLayer", x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """Peri-LN: h = x + No1(Attn(N1(x))), x' = h + No2(FFN(N2(h)))."""
    h = x + layer.post_attention_layernorm(attn(layer.input_layernorm(x)))
    return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def hybrid_block(layer: "SpanNormDecoderLayer", x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """HybridNorm: x' = N(h) + FFN(N(h)) with h = x + Attn_qkv-norm(x); here `h` already holds N(h)."""
    h = layer.pre_feedforward_layernorm(x + attn(x))
    return h + layer.mlp(h)


IN, POST_ATTN, PRE_FFN, POST_FFN = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
BLOCK_NORMS = (IN, POST_ATTN, PRE_FFN, POST_FFN)


class NormScheme(NamedTuple):
    block: Callable  # the block equations
    norms: tuple[str, ...]  # block norms every layer owns
    first_block_norms: tuple[str, ...] = ()  # extra norms only layer 0 owns
    attn_norms: tuple[str, ...] = ()  # per-head norms inside attention
    final_norm: bool = False  # an RMSNorm before the LM head


NORM_SCHEMES: dict[str, NormScheme] = {
    "span": NormScheme(span_block, (POST_ATTN, POST_FFN), first_block_norms=(IN,)),
    "pre": NormScheme(pre_block, (IN, PRE_FFN), final_norm=True),
    "post": NormScheme(post_block, (POST_ATTN, POST_FFN)),
    "deepnorm": NormScheme(post_block, (POST_ATTN, POST_FFN)),
    "peri": NormScheme(peri_block, (IN, POST_ATTN, PRE_FFN, POST_FFN), final_norm=True),
    "hybrid": NormScheme(hybrid_block, (PRE_FFN,), attn_norms=("q_norm", "k_norm", "v_norm"), final_norm=True),
}


class SpanNormDecoderLayer(GradientCheckpointingLayer):
    """Attention + FFN (dense or MoE), wired by the config's `norm_scheme`."""

    def __init__(self, config: SpanNormConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.scheme = NORM_SCHEMES[config.norm_scheme]
        self.skip_scale = config.skip_scale
        attn_norms = self.scheme.attn_norms + (("q_norm", "k_norm") if config.qk_norm else ())
        self.self_attn = SpanNormAttention(config, layer_idx, norms=attn_norms)
        self.mlp = SpanNormSparseMoeBlock(config) if config.is_sparse_layer(layer_idx) else SpanNormMLP(config)
        owned = self.scheme.norms + (self.scheme.first_block_norms if layer_idx == 0 else ())
        for name in BLOCK_NORMS:
            norm = SpanNormRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if name in owned else no_norm
            setattr(self, name, norm)

    @accepts_past_key_values
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        def attn(h: torch.Tensor) -> torch.Tensor:
            return self.self_attn(
                hidden_states=h,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )[0]

        return self.scheme.block(self, hidden_states, attn)


class SpanNormPreTrainedModel(PreTrainedModel):
    config: SpanNormConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpanNormDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # MoE routing is data dependent; dense models still compile
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(SpanNormTopKRouter, index=0),
        "hidden_states": SpanNormDecoderLayer,
        "attentions": SpanNormAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) by default; the scheme's own init by module role: token embeddings N(0, 1) in
        `UNIT_EMBEDDING_SCHEMES`; with a branch gain `b` (span/deepnorm), block Linears (by attribute name) and experts
        Xavier-normal, gain `b` on the branch outputs and 1 on queries and keys; under a width rule, those hidden
        matrices stored at m times their effective init. Leaves only: transformers skips `_init_weights` for
        parameter-less parents under remote code. `init.*` skips weights that `from_pretrained` loaded, so a
        depth-scaled init never overwrites a checkpoint."""
        super()._init_weights(module)
        std = self.config.initializer_range
        gain = self.config.branch_gain
        # A width rule stores each hidden matrix (block Linears, experts) at m times its effective init, as the
        # forward divides by m; the plain N(0, std) is read as tuned at the base width: effective std / sqrt(m).
        m = self.config.width_multiplier or 1.0
        if isinstance(module, nn.Linear):
            name = self._attribute_name(module)
            if name in BLOCK_LINEARS and gain is not None:
                init.xavier_normal_(module.weight, gain=m * (gain if name in BRANCH_LINEARS else 1.0))
            elif name in BLOCK_LINEARS and m != 1.0:  # super() drew N(0, std), the init without a rule
                init.normal_(module.weight, mean=0.0, std=std * m**0.5)
        elif isinstance(module, nn.Embedding) and self.config.norm_scheme in UNIT_EMBEDDING_SCHEMES:
            init.normal_(module.weight, mean=0.0, std=1.0)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, SpanNormExperts):
            # Xavier-normal per expert matrix: fan_in + fan_out of [2I, H] and [H, I]
            hidden, inter = module.hidden_dim, module.intermediate_dim
            gate_up_std = std * m**0.5 if gain is None else m * gain * (2.0 / (hidden + 2 * inter)) ** 0.5
            down_std = std * m**0.5 if gain is None else m * gain * (2.0 / (hidden + inter)) ** 0.5
            init.normal_(module.gate_up_proj, mean=0.0, std=gate_up_std)
            init.normal_(module.down_proj, mean=0.0, std=down_std)
        elif isinstance(module, SpanNormTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)

    def _attribute_name(self, module: nn.Module) -> str:
        """The attribute name `module` has in its parent ("q_proj"), which is its role: a leaf does not know it, and
        under remote code `_init_weights` never sees the parent. A scan of this model's modules: init time only."""
        return next((name.rpartition(".")[2] for name, found in self.named_modules() if found is module), "")


class SpanNormModel(SpanNormPreTrainedModel):
    def __init__(self, config: SpanNormConfig):
        config.validate()  # the cross-field rules again: attribute edits run only the field validators
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SpanNormDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        final = NORM_SCHEMES[config.norm_scheme].final_norm
        self.norm = SpanNormRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if final else no_norm
        self.rotary_emb = SpanNormRotaryEmbedding(config=config)
        self.width_scale = width_scale(config)
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        # A width rule's readout multiplier (muP's MuReadout) sits here, not in the LM head: every head reads this
        # output, and serving engines run this base model under their own LM head.
        hidden_states = scaled(self.norm(hidden_states), self.width_scale)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


class SpanNormForCausalLM(SpanNormPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SpanNormConfig):
        super().__init__(config)
        self.model = SpanNormModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the LM loss (shifted inside the loss); -100 is ignored.
        output_router_logits (`bool`, *optional*):
            Return router logits and add `router_aux_loss_coef * aux_loss` to the loss (MoE models).
        """
        if output_router_logits is None:
            output_router_logits = self.config.num_experts > 0 and self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )

        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        elif output_router_logits:  # no routed layer (a dense model): nothing to balance, and no router logits
            aux_loss = logits.new_zeros(())

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits or None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


class SpanNormForSequenceClassification(GenericForSequenceClassification, SpanNormPreTrainedModel):
    """Scores the last non-padding token (transformers' generic head). The base model is built directly: the generic
    head builds it through `AutoModel`, which, through remote code, stops to ask for `trust_remote_code`."""

    def __init__(self, config: SpanNormConfig):
        SpanNormPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = SpanNormModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


__all__ = [
    "NORM_SCHEMES",
    "SpanNormForCausalLM",
    "SpanNormForSequenceClassification",
    "SpanNormModel",
    "SpanNormPreTrainedModel",
]
