"""spannorm-hf: SpanNorm (arXiv 2601.22580) and the other norm placements as a transformers model family.

Importing the package registers model_type "spannorm" with AutoConfig, AutoModel, AutoModelForCausalLM and
AutoModelForSequenceClassification, and marks the classes for `save_pretrained` to write `auto_map` and copy
the two model files, so a saved folder also loads with `trust_remote_code=True` where this package is absent.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_spannorm import NORM_SCHEME_NAMES, SpanNormConfig
from .modeling_spannorm import (
    NORM_SCHEMES,
    SpanNormForCausalLM,
    SpanNormForSequenceClassification,
    SpanNormModel,
    SpanNormPreTrainedModel,
)

__version__ = "0.2.0"

AutoConfig.register("spannorm", SpanNormConfig, exist_ok=True)
AutoModel.register(SpanNormConfig, SpanNormModel, exist_ok=True)
AutoModelForCausalLM.register(SpanNormConfig, SpanNormForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(SpanNormConfig, SpanNormForSequenceClassification, exist_ok=True)

SpanNormConfig.register_for_auto_class()
SpanNormModel.register_for_auto_class("AutoModel")
SpanNormForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SpanNormForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "NORM_SCHEMES",
    "NORM_SCHEME_NAMES",
    "SpanNormConfig",
    "SpanNormForCausalLM",
    "SpanNormForSequenceClassification",
    "SpanNormModel",
    "SpanNormPreTrainedModel",
    "__version__",
]
