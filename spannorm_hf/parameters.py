"""Parameter counts of a SpanNorm model or config: one definition for the model card (total and active per token)
and the training log (also what this process holds under FSDP sharding)."""

from dataclasses import dataclass

import torch

from .configuration_spannorm import SpanNormConfig
from .modeling_spannorm import SpanNormForCausalLM

ROUTED_EXPERTS = ".mlp.experts."  # parameters of routed experts; a token runs num_experts_per_tok of num_experts


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter once (tied weights once), at full size even when sharded
    active: int  # those one token runs through: routed experts count num_experts_per_tok / num_experts
    local: int  # held by this process (fewer than total under FSDP sharding)
    sharded: int  # how many parameter tensors are sharded (DTensors)

    def as_record(self) -> dict[str, int]:
        """The counts as the training log's setup record names them."""
        return {
            "params_total": self.total,
            "params_active": self.active,
            "params_local": self.local,
            "params_sharded": self.sharded,
        }


def _config_of(model: torch.nn.Module) -> SpanNormConfig | None:
    for candidate in (model, getattr(model, "module", None)):  # DDP keeps the model as .module
        config = getattr(candidate, "config", None)
        if config is not None:
            return config
    return None


def parameter_counts(model_or_config: torch.nn.Module | SpanNormConfig) -> ParameterCounts:
    """Counts of a model (as built, wrapped by DDP or sharded by FSDP) or of a config. A config's model is built on
    the meta device, so counting a large preset costs no memory."""
    if isinstance(model_or_config, SpanNormConfig):
        config = model_or_config
        with torch.device("meta"):
            model = SpanNormForCausalLM(config)
    else:
        model, config = model_or_config, _config_of(model_or_config)
    experts = getattr(config, "num_experts", 0) or 0
    total = active = local = sharded = 0
    for name, parameter in model.named_parameters():  # tied weights are listed once
        count = parameter.numel()
        total += count
        active += count * config.num_experts_per_tok // experts if experts and ROUTED_EXPERTS in name else count
        is_sharded = hasattr(parameter, "to_local")
        local += parameter.to_local().numel() if is_sharded else count
        sharded += is_sharded
    return ParameterCounts(total=total, active=active, local=local, sharded=sharded)
