# Copyright 2026 The spannorm-hf authors. Licensed under the Apache License, Version 2.0.
"""SpanNorm model configuration.

This file is copied next to the weights by `save_pretrained`, so the Hub's remote-code loader can use it:
it imports only transformers. It is also the first file a remote-code load runs, so it checks the version.
"""

import dataclasses
import difflib
from typing import Literal, get_args

import transformers

# The oldest transformers the two model files run on (remote code runs on whatever transformers the user has).
MIN_TRANSFORMERS_VERSION = "5.17.0"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


if _major_minor(transformers.__version__) < _major_minor(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"SpanNorm's model code needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers "
        f"{transformers.__version__} is installed: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )

# huggingface_hub is transformers' own dependency; its `strict` dataclasses are how transformers validates configs.
from huggingface_hub.dataclasses import as_validated_field, strict  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402
from transformers.generation import GenerationConfig  # noqa: E402
from transformers.utils import logging  # noqa: E402
from transformers.utils.type_validators import activation_fn_key  # noqa: E402

logger = logging.get_logger(__name__)

# The norm placements a config may name; the block equations live in `modeling_spannorm.NORM_SCHEMES`.
NormSchemeName = Literal["span", "pre", "post", "deepnorm", "peri", "hybrid"]
NORM_SCHEME_NAMES = get_args(NormSchemeName)
# Schemes whose block has the DeepNet-style skip scale `a` and branch init gain `b`.
SCALED_SCHEMES = ("span", "deepnorm")
# Named depth rules for the skip scale, as the exponent alpha of `a = (2 L) ** alpha` (L = num_hidden_layers; 2L
# counts the normalized sums, attention and FFN, as DeepNet does). RMSNorm is scale-invariant, N(a x + F) =
# N(x + F / a), so `a` is a branch multiplier 1 / a: "deepnet" damps each block's update as L^(-1/4), "depth_mup" as
# depth-muP's 1 / sqrt(L), "completep" as CompleteP's 1 / L. "auto" is "deepnet" under its first name: the default
# until the depth study, so every config saved before it holds "auto", which must keep meaning DeepNet's `a`.
RESIDUAL_SCALE_RULES = {"auto": 0.25, "deepnet": 0.25, "depth_mup": 0.5, "completep": 1.0}
# The rule a config gets when `residual_scale` is not given (None), by scheme: for `span` the one the depth study's
# pre-registered rule chose (experiments/norm_comparison, `verdicts.depth_verdict`), for `deepnorm` DeepNet's own;
# other schemes have no skip scale. Resolved at construction, so a saved config names its rule and loads unchanged
# whatever this table says later.
DEFAULT_RESIDUAL_SCALE = {"span": "completep", "deepnorm": "auto"}
# Named depth rules for the branch init gain, as the exponent beta of `b = (8 L) ** beta`; "auto" is "deepnet".
BRANCH_INIT_GAIN_RULES = {"auto": -0.25, "deepnet": -0.25}
# Schemes whose token embeddings start at N(0, 1) (post-style: the residual stream is normalized to unit scale), not
# N(0, initializer_range). Tied to the LM head, such embeddings give logits of std ~sqrt(hidden_size) at init.
UNIT_EMBEDDING_SCHEMES = ("span", "post", "deepnorm", "peri")
# Settings only a Mixture-of-Experts model has. A dense config (num_experts=0) does not carry them, neither as
# attributes nor in config.json, because clients decide "is this MoE?" by their presence: TRL turns its load-balancing
# loss on when `output_router_logits` exists and `router_aux_loss_coef` is non-zero, and counts expert FLOPs when
# `num_experts_per_tok` exists.
MOE_FIELDS = frozenset(
    (
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "router_aux_loss_coef",
        "output_router_logits",
        "first_k_dense_layers",
    )
)
# Keys transformers itself reads or writes besides the dataclass fields (legacy names it converts, settings it moves
# elsewhere, bookkeeping, old defaults): never reported as unknown, and left to transformers (which keeps or converts
# them). Generation settings are added from transformers.
TRANSFORMERS_KEYS = frozenset(
    (
        "model_type",
        "auto_map",
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "use_return_dict",
        "torchscript",
        "pruned_heads",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "tokenizer_class",
        "finetuning_task",
        "task_specific_params",
        "prefix",
        "use_bfloat16",
        "tf_legacy_loss",
        # set by from_pretrained / quantizers and saved with the model; a quantized checkpoint needs its own back
        "quantization_config",
        "fusion_config",
        "distributed_config",
        "transformers_weights",
    )
)
# Written into every saved config.json so the folder loads through any of these auto classes with
# `trust_remote_code=True` (save_pretrained adds only the saving class's own entry).
AUTO_MAP = {
    "AutoConfig": "configuration_spannorm.SpanNormConfig",
    "AutoModel": "modeling_spannorm.SpanNormModel",
    "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM",
    "AutoModelForSequenceClassification": "modeling_spannorm.SpanNormForSequenceClassification",
}


# Field validators (`@strict` runs them on construction and on every assignment; the field's type is checked too).


@as_validated_field
def positive(value: int | float | None) -> None:
    """> 0; `None` where `__post_init__` derives the value."""
    if value is not None and not value > 0:
        raise ValueError(f"must be positive, got {value!r}")


@as_validated_field
def non_negative(value: int | float) -> None:
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def size(limit: int, minimum: int = 1):
    """A validated size field: an integer in [minimum, limit] (`None` where `__post_init__` derives it). The limits
    (`SIZE_LIMITS`) lie far above every published model, so only a slip such as extra digits is refused: before a
    tokenizer trainer or the model allocates for it (`vocab_size=10**12` asks the BPE trainer for 72 TB, and its
    failed allocation aborts the process)."""

    @as_validated_field
    def check(value: int | None) -> None:
        if value is not None and not minimum <= value <= limit:
            why = " (a limit far above any published model: a typo?)" if value > limit else ""
            raise ValueError(f"must be in [{minimum}, {limit}]{why}, got {value!r}")

    return check


# Published models reach vocabularies of ~256k tokens, widths of ~25k, FFN widths of ~100k, 128 heads, ~1000 layers
# (DeepNet), 10M-token contexts and ~1M experts (PEER); each limit leaves a wide margin.
SIZE_LIMITS = {
    "vocab": 2**24,
    "width": 2**20,
    "heads": 2**16,
    "layers": 2**16,
    "context": 2**30,
    "experts": 2**20,
}


@as_validated_field
def dropout_probability(value: int | float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value!r}")


def depth_rule(rules: dict[str, float], allow_none: bool = False):
    """A validated field taking a positive number or the name of one of `rules` (or `None` where `allow_none`)."""

    @as_validated_field
    def check(value: float | int | str | None) -> None:
        if value is None and allow_none or value in rules:
            return
        if isinstance(value, str) or value is None or not value > 0:
            raise ValueError(f"must be a positive number or one of {tuple(rules)}, got {value!r}")

    return check


def invalid(config: "SpanNormConfig", field: str, why: str) -> ValueError:
    return ValueError(f"SpanNormConfig.{field}={getattr(config, field)!r} is invalid: {why}")


@strict
class SpanNormConfig(PreTrainedConfig):
    r"""
    Configuration of a SpanNorm decoder-only transformer (Llama-class attention and SwiGLU MLP, optional
    Mixture-of-Experts), with the normalization placement chosen by `norm_scheme`.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, hidden_act, max_position_embeddings, initializer_range,
        rms_norm_eps, use_cache, rope_parameters, attention_bias, attention_dropout, mlp_bias,
        tie_word_embeddings, pad_token_id, bos_token_id, eos_token_id:
            As in [`LlamaConfig`]. `num_key_value_heads` defaults to `num_attention_heads` (no GQA) and
            `head_dim` to `hidden_size // num_attention_heads`.
        qk_norm (`bool`, defaults to `False`):
            Per-head RMSNorm on queries and keys (as in Qwen3/OLMo2), in any scheme.
        norm_scheme (`str`, defaults to `"span"`):
            Where the RMSNorms sit: `"span"` (SpanNorm, arXiv 2601.22580), `"pre"`, `"post"`, `"deepnorm"`,
            `"peri"` (Peri-LN) or `"hybrid"` (HybridNorm). Everything else is identical across schemes.
        residual_scale (`float`, `str` or `None`, defaults to `None`):
            The skip scale `a` of `span` and `deepnorm` blocks, `N(a * x + F(x))`: a positive number, or a named
            depth rule `a = (2 L) ** alpha` with L = `num_hidden_layers`. Because RMSNorm is scale-invariant,
            `N(a x + F) = N(x + F / a)`, so `a` acts as a branch multiplier `1 / a`. `None` becomes the scheme's
            rule when the config is built: `"completep"` for `span`, `"auto"` (DeepNet) for `deepnorm` and the
            schemes without a skip scale; the config then stores and saves that name. Named rules:

            - `"deepnet"` (alpha = 1/4; DeepNet, arXiv 2203.00555): 1.861 at L=6, 3.130 at L=48.
            - `"depth_mup"` (alpha = 1/2; depth-muP's `1 / sqrt(L)` branch multiplier, Yang et al. 2023): 3.464 at
              L=6, 9.798 at L=48.
            - `"completep"` (alpha = 1; CompleteP's `1 / L` branch multiplier, Dey et al. 2025): 12 at L=6, 96 at
              L=48.
            - `"auto"`: the same as `"deepnet"`, under the name every config saved before the depth study holds
              (DeepNet's rule was `span`'s default until then), so those checkpoints load unchanged.

            How `span`'s default was chosen: a width-128 depth study (experiments/norm_comparison, grid `depth`:
            byte-level LMs at L = 6, 12, 24, 48, learning rates 1e-3 to 3.2e-2 on a x2 grid, 2-3 seeds) decided
            between the three rules by a rule committed before its deciding runs (`verdicts.depth_verdict`): no
            seed stuck at or below the rule's best learning rate, then the smallest loss lost when L = 6's best
            learning rate is used at the deeper depths. Over L = 6 to 24 `"depth_mup"` won (it lost nothing,
            CompleteP 0.022 nats/byte) and was the default for a while; L = 48 then failed it (a seed stuck at
            2e-3, below its best, and its L = 6 best 8e-3 stuck on one of two seeds), and the same rule over
            L = 6 to 48, registered before L = 48's second seed ran, chose `"completep"`: mean loss lost 0.014
            (its L = 6 best, 1.6e-2, was also best at L = 24 and 48), against 0.894 for DeepNet's rule, whose
            L = 6 best gets stuck from L = 12 on. CompleteP also reached the lowest dense loss at every depth from
            12 on. Above its best it has a cliff (3.2e-2 stuck on 1 of 2 seeds at L = 6). With `a = 2L` a block
            moves the stream by about 1/(2L) of its size; bf16 weights round one synthetic block's update by up
            to 22% at L = 48, yet casting a trained L = 48 model to bf16 changed its loss by only +0.0001 nats/byte;
            autocast with fp32 weights keeps the stream in fp32. The name, not the number, is stored, so a saved
            config keeps its rule (configs saved by earlier 0.2.0 builds name `"depth_mup"`). Schemes without a
            skip scale accept only `"auto"` (or `None`).
        branch_init_gain (`float`, `str` or `None`, defaults to `"auto"`):
            Xavier-normal init gain `b` of the branch output weights (v_proj, o_proj, MLP and expert weights;
            q/k get gain 1) in `span` and `deepnorm` blocks: a positive number, or the named rule `"deepnet"`,
            DeepNet's `(8 L) ** (-1 / 4)` (0.3799 at L=6, 0.2259 at L=48); `"auto"` is `"deepnet"`. `None` keeps the
            plain `N(0, initializer_range)` init. Other schemes accept only `"auto"`. DeepNet's pair was kept
            over `residual_scale=1.0` by an earlier pre-registered rule (width 32: neither won a majority of
            settings); the depth study kept this `b` in every arm and varied `a` alone.
        mup_base_width (`int`, *optional*):
            A width rule: the `hidden_size` at which the learning rate was tuned. `None` (the default) is the model
            without a rule, bit for bit, with no extra operation in its forward; so is `hidden_size ==
            mup_base_width`. Otherwise, with `m = hidden_size / mup_base_width`, it is muP for Adam (Tensor Programs
            V) realized in the model's own parametrization, not in optimizer parameter groups, so that any optimizer
            with one learning rate gets the rule, given only the model (this project's trainer, transformers'
            `Trainer`, TRL). By the abc symmetry, a hidden matrix stored as `w` and used as `W = w / m` moves by
            `lr / m` per Adam step, as muP's per-layer learning rate would have it:

            - Every branch (the attention sublayer, the dense MLP, the MoE block with its router) takes its input
              times `1 / m` and its output times `1 / m`, so its matrices (q/k/v/o, gate/up/down, the experts'
              gate_up/down) act as `w / m`. They are stored at `m` times their effective init: with a branch gain
              `b` that stays Xavier-normal, so each block computes what it computes without the rule; the plain
              `N(0, initializer_range)` init is read as tuned at the base width, so its effective std is
              `initializer_range / sqrt(m)` (muP's init variance ~ 1 / fan_in).
            - The readouts get muP's `1 / m` (the `mup` package's MuReadout) with their stored init unchanged: the
              base model's output, so that the LM head, a classification head and a serving engine's own LM head
              all read it, and the router's logits.
            - Unchanged: token embeddings, norm gains, the skip scale `a` and branch gain `b` (so the rule composes
              with every depth rule and norm scheme, dense and MoE) and the attention scaling `1 / sqrt(head_dim)`.

            It assumes every hidden size grows with `hidden_size`: `intermediate_size`, `moe_intermediate_size` and
            the number of heads at a fixed `head_dim`. What differs from muP with per-group learning rates:
            decoupled weight decay stays relative per step (`w <- w - lr * wd * w`), so it does not shrink as
            `1 / m` as a per-group rate would; the gradients of hidden weights shrink as `1 / m`, which global-norm
            clipping sees, and Adam's `eps` matters sooner as they get small; the output projections' biases
            (`attention_bias`, `mlp_bias`) share the output multiplier, so their effective rate is `lr / m`, not
            `lr`. The coordinate check in tests/test_width_rule.py measures each block's branch outputs, the
            logits and their updates after a few steps of transformers' `Trainer` within 2x across widths 64 to 512
            with the rule, and the updates growing 3.7x to 25x without it. A learning-rate transfer study has not
            been run with it.
        num_experts (`int`, defaults to 0):
            Routed experts per sparse layer; 0 builds a dense model, whose config has none of the MoE settings below
            (reading one raises `AttributeError`, as on a Llama config).
        num_experts_per_tok (`int`, defaults to 2):
            Top-k experts per token.
        moe_intermediate_size (`int`, *optional*):
            Hidden size of each expert; defaults to `intermediate_size`.
        norm_topk_prob (`bool`, defaults to `True`):
            Renormalize the top-k router probabilities to sum to 1.
        router_aux_loss_coef (`float`, defaults to 0.001):
            Weight of the load-balancing loss added to the LM loss when `output_router_logits` is on.
        output_router_logits (`bool`, defaults to `False`):
            Return router logits (and so compute the aux loss) by default.
        first_k_dense_layers (`int`, defaults to 0):
            Keep the first k layers dense in an MoE model.

    Validation is transformers' (`@strict`): a value of the wrong type or out of range raises huggingface_hub's
    `StrictDataclassError` naming the field, on construction and on assignment; the rules between fields
    (`validate_*`) run after construction, at `save_pretrained` and when a model is built.

    Example:

    ```python
    >>> from spannorm_hf import SpanNormConfig, SpanNormForCausalLM
    >>> model = SpanNormForCausalLM(SpanNormConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4))
    ```
    """

    model_type = "spannorm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # 5.24 and older names

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = size(SIZE_LIMITS["vocab"])(default=32000)
    hidden_size: int = size(SIZE_LIMITS["width"])(default=768)
    intermediate_size: int = size(SIZE_LIMITS["width"])(default=2048)
    num_hidden_layers: int = size(SIZE_LIMITS["layers"])(default=12)
    num_attention_heads: int = size(SIZE_LIMITS["heads"])(default=12)
    num_key_value_heads: int | None = size(SIZE_LIMITS["heads"])(default=None)
    head_dim: int | None = size(SIZE_LIMITS["width"])(default=None)
    hidden_act: str = activation_fn_key(default="silu")
    max_position_embeddings: int = size(SIZE_LIMITS["context"])(default=2048)
    initializer_range: float = positive(default=0.02)
    rms_norm_eps: float = positive(default=1e-6)
    use_cache: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = dropout_probability(default=0.0)
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    norm_scheme: NormSchemeName = "span"
    residual_scale: float | int | str | None = depth_rule(RESIDUAL_SCALE_RULES, allow_none=True)(default=None)
    branch_init_gain: float | int | str | None = depth_rule(BRANCH_INIT_GAIN_RULES, allow_none=True)(default="auto")
    mup_base_width: int | None = positive(default=None)
    num_experts: int = size(SIZE_LIMITS["experts"], minimum=0)(default=0)
    num_experts_per_tok: int = positive(default=2)
    moe_intermediate_size: int | None = size(SIZE_LIMITS["width"])(default=None)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float | int = non_negative(default=0.001)
    output_router_logits: bool = False
    first_k_dense_layers: int = non_negative(default=0)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.residual_scale = self.residual_rule
        self._drop_unknown_keys(kwargs)
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        if self.num_experts == 0:
            self._drop_moe_fields()

    def _drop_unknown_keys(self, kwargs: dict) -> None:
        """Keys that are neither fields nor transformers' own are used by nothing: warn, naming the closest field, so
        that a typo such as `num_hidden_layer` does not silently build another model, and drop them (transformers
        would keep them), so that the typo is not carried into every config saved from this one."""
        fields = [f.name for f in dataclasses.fields(self)]
        known = TRANSFORMERS_KEYS | set(GenerationConfig._get_default_generation_params())
        for key in list(kwargs):
            if key in known or key.startswith("_") or key.endswith("_token_id"):
                continue
            closest = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {closest[0]}?" if closest else ""
            logger.warning(f"SpanNormConfig: unknown key {key!r} is ignored and not saved{hint}")
            del kwargs[key]

    def _drop_moe_fields(self) -> None:
        """A dense config forgets its MoE settings (see `MOE_FIELDS`); one set to a non-default value was a mistake."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in MOE_FIELDS}
        defaults["moe_intermediate_size"] = self.intermediate_size
        for name in MOE_FIELDS:
            value = self.__dict__.pop(name, defaults[name])
            if value != defaults[name]:
                logger.warning(f"SpanNormConfig.{name}={value!r} is ignored: num_experts=0 builds a dense model")

    def __getattribute__(self, key: str):
        if key in MOE_FIELDS and key not in super().__getattribute__("__dict__"):
            if not self.num_experts:
                raise AttributeError(f"{key!r} is a Mixture-of-Experts setting; this config is dense (num_experts=0)")
            if key == "moe_intermediate_size":  # a dense config made MoE afterwards: the derived default
                return self.intermediate_size
        return super().__getattribute__(key)

    # Cross-field rules: `@strict` runs every `validate_*` method after construction, transformers again at
    # `save_pretrained`, and the model when it is built (attribute edits run only the field validators).

    def validate_attention_shape(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise invalid(self, "num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise invalid(self, "num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise invalid(self, "head_dim", "must be even for rotary embeddings")

    def validate_norm_scheme(self) -> None:
        if self.tie_word_embeddings and self.norm_scheme in UNIT_EMBEDDING_SCHEMES:
            raise invalid(
                self,
                "tie_word_embeddings",
                f"norm_scheme={self.norm_scheme!r} starts its embeddings at N(0, 1), which as a tied LM head gives "
                "logits of std ~sqrt(hidden_size) at init; set tie_word_embeddings=False or norm_scheme 'pre'/'hybrid'",
            )
        # None for residual_scale means "the scheme's rule"; for branch_init_gain it means plain init, a real choice.
        for field, unscaled in (("residual_scale", ("auto", None)), ("branch_init_gain", ("auto",))):
            if self.norm_scheme not in SCALED_SCHEMES and getattr(self, field) not in unscaled:
                why = f"only the {SCALED_SCHEMES} schemes use it; norm_scheme={self.norm_scheme!r} takes "
                raise invalid(self, field, why + " or ".join(repr(v) for v in unscaled))

    def validate_experts(self) -> None:
        if not self.num_experts:
            return
        if self.num_experts_per_tok > self.num_experts:
            raise invalid(self, "num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        if self.first_k_dense_layers > self.num_hidden_layers:
            why = f"must be an integer in [0, num_hidden_layers={self.num_hidden_layers}]"
            raise invalid(self, "first_k_dense_layers", why)

    @property
    def residual_rule(self) -> float | int | str:
        """`residual_scale`, with None (set at construction or later) read as the scheme's default rule."""
        if self.residual_scale is None:
            return DEFAULT_RESIDUAL_SCALE.get(self.norm_scheme, "auto")
        return self.residual_scale

    @property
    def skip_scale(self) -> float:
        """The resolved skip scale `a` (1.0 for schemes without one)."""
        if self.norm_scheme not in SCALED_SCHEMES:
            return 1.0
        rule = self.residual_rule
        if isinstance(rule, str):
            return (2 * self.num_hidden_layers) ** RESIDUAL_SCALE_RULES[rule]
        return float(rule)

    @property
    def branch_gain(self) -> float | None:
        """The resolved branch init gain `b`, or `None` for the plain `N(0, initializer_range)` init."""
        if self.norm_scheme not in SCALED_SCHEMES or self.branch_init_gain is None:
            return None
        if isinstance(self.branch_init_gain, str):
            return (8 * self.num_hidden_layers) ** BRANCH_INIT_GAIN_RULES[self.branch_init_gain]
        return float(self.branch_init_gain)

    @property
    def width_multiplier(self) -> float | None:
        """The width rule's `m = hidden_size / mup_base_width`, or `None` without a rule."""
        return None if self.mup_base_width is None else self.hidden_size / self.mup_base_width

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` holds a routed MoE instead of the dense MLP."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_layers


__all__ = ["SpanNormConfig"]
