"""The arguments of `spannorm-train` (one dataclass, parsed by the shared `spannorm_hf.cli.ArgumentParser`) and
the model config they name, both checked before anything is written."""

import math
from dataclasses import dataclass, field

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM
from transformers.utils import is_flash_attn_2_available

from ..cli import ArgumentParser, InputError, one_line, read_json_object
from ..configuration_spannorm import SpanNormConfig

# transformers' schedulers (`get_scheduler`) that need only the warmup and total steps: not cosine_with_min_lr and
# warmup_stable_decay (they need settings of their own) nor reduce_lr_on_plateau and greedy (they step on a metric).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


class SetupError(InputError):
    """A bad argument, config, output directory or checkpoint, found before training starts."""


@dataclass
class TrainArguments:
    config: str = field(metadata={"help": "model config JSON, e.g. configuration/spannorm-small.json"})
    output: str = field(metadata={"help": "run directory: checkpoints/, metrics.jsonl, tensorboard/, final model"})
    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "text/jsonl/parquet files or globs, or a Hub dataset name[:config]; default: embedded corpus",
            "action": "extend",
        },
    )
    text_column: str = field(default="text", metadata={"help": "column holding the documents (jsonl/parquet/Hub)"})
    streaming: bool = field(default=False, metadata={"help": "stream the data (large Hub datasets); in order"})
    tokenizer: str | None = field(default=None, metadata={"help": "existing tokenizer; default: train a BPE"})
    val_size: float = field(default=0.01, metadata={"help": "held-out documents: fraction (<1) or count; 0: none"})
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per packed row; default: the config's max_position_embeddings"}
    )
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (ignored if --max-tokens is set)"})
    max_tokens: int | None = field(default=None, metadata={"help": "train for this many tokens instead"})
    lr: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate; default: the one the width and depth studies measured for the config "
            "(printed at start), or the checkpoint's when resuming"
        },
    )
    lr_scheduler: str = field(
        default="cosine", metadata={"help": f"learning-rate schedule (transformers'): {', '.join(LR_SCHEDULERS)}"}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "warmup steps, or a fraction of all steps if < 1"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (decay of the gradient mean)"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (decay of the squared-gradient mean)"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient clipping; 0: off (the norm is still logged, and must be finite)"}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no | bf16 | fp16; default: the accelerate config's, else fp32"}
    )
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | flex_attention | flash_attention_2; default: flash_attention_2 when installed "
            "and training in bf16/fp16 on a GPU (varlen kernels for packed documents), else sdpa"
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile (inductor) through accelerate"})
    seed: int = field(default=0, metadata={"help": "random seed (model init, validation split, data order)"})
    log_every: int = field(default=10, metadata={"help": "steps between metric records"})
    eval_every: int = field(default=200, metadata={"help": "steps between validation passes"})
    eval_batches: int = field(default=20, metadata={"help": "validation micro-batches per process per pass"})
    diag_every: int = field(default=100, metadata={"help": "steps between per-block diagnostics; 0: off"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept"})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint directory"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "start a new run in an --output that holds an earlier run or files this command did not write "
            "(only the files training writes are replaced: metrics, tensorboard events, checkpoints, the model)"
        },
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub repo (namespace/name): each checkpoint's model goes to a branch, the final to main"},
    )

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("keep_last", "eval_batches"):
            if getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:  # a row of one token has no next token: a loss of 0 / 0
            raise SetupError(f"--seq-len must be >= 2 (each row's tokens predict the next one), got {self.seq_len}")
        for name in ("lr", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "val_size"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise SetupError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SetupError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.diag_every < 0 or self.val_size < 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise SetupError("--diag-every, --val-size, --warmup-steps and --max-grad-norm must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise SetupError(f"--lr must be > 0, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise SetupError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SetupError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler!r}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise SetupError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            raise SetupError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU")


def parser() -> ArgumentParser:
    """The parser of `spannorm-train`, built from `TrainArguments`."""
    return ArgumentParser(TrainArguments, description="Pretrain a SpanNorm model with Accelerate.")


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """Command-line arguments (both --seq-len and --seq_len spellings work)."""
    (args,) = parser().parse_args_into_dataclasses(argv)
    return args


def load_config(args: TrainArguments) -> SpanNormConfig:
    """The model config, proven buildable (on the meta device: no memory), with the --attn-implementation asked
    for, before anything is written; a missing --seq-len becomes the config's context length."""
    settings = read_json_object(args.config, what="--config")  # bounded: --config /dev/zero is refused, not read
    try:
        config = SpanNormConfig(**settings)
    except (OSError, ValueError, TypeError, StrictDataclassError) as err:
        raise SetupError(f"--config {args.config!r}: {err}") from err
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (KeyError, ValueError, TypeError, AttributeError, StrictDataclassError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise SetupError(f"--config {args.config!r}: no model can be built from it: {problem}") from err
    if args.attn_implementation is not None:  # transformers decides which names (and installed kernels) it takes
        try:
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
        except (ValueError, ImportError) as err:
            raise SetupError(f"--attn-implementation {args.attn_implementation!r}: {one_line(err)}") from err
    if args.seq_len is None:
        args.seq_len = config.max_position_embeddings
        if args.seq_len < 2:
            raise SetupError(f"--config {args.config!r}: max_position_embeddings=1 leaves no next token to predict")
    if args.seq_len > config.max_position_embeddings:
        raise SetupError(
            f"--seq-len {args.seq_len} exceeds the config's max_position_embeddings={config.max_position_embeddings}"
        )
    return config
