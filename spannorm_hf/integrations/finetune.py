"""LoRA fine-tuning of a SpanNorm checkpoint with PEFT and the transformers `Trainer`.

Dense layers get LoRA on every linear layer (`target_modules="all-linear"`, which leaves the LM head alone); the
fused 3D expert weights of MoE layers are not `nn.Linear`, so they are adapted through PEFT's
`target_parameters`. Data is text (packed into blocks, loss on every token) or instruction jsonl with
`prompt`/`response` (loss on the response only, prompt rendered with the tokenizer's chat template when it has
one). The adapter folder records a fingerprint of its base's weights, so it is never silently applied to
another base. The data is read and checked (`read_training_data`: bounded, UTF-8, every record's fields strings),
the settings checked against the base's config (`--rank` up to its width, `--max-length` up to its context) and
the output folders probed and locked (`files.output_lock`, held to the end) before the model loads, so bad input
costs seconds, not a training run.
"""

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import TrainOutput

from ..cli import (
    MAX_SEED,
    ArgumentParser,
    InputError,
    check_range,
    command,
    read_json_object,
    read_json_records,
    read_text,
    text_fields,
)
from ..configuration_spannorm import SpanNormConfig
from ..files import atomic_output_dir, hold_outputs, naming_disk_full
from .adapters import ADAPTER_BASE_FILE, base_fingerprint, is_adapter_folder, load_adapter
from .hub import TRAINING_DETAILS_FILE, load_checkpoint, read_checkpoint_config
from .prompts import PROMPT_TEMPLATE, format_prompt  # noqa: F401  (PROMPT_TEMPLATE: re-exported for callers)

logger = logging.getLogger(__name__)

EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
IGNORE_INDEX = -100
DATA_LIMIT = 1 << 30  # --data is held in memory (and a plain text file tokenized in one piece)
DATA_BIGGER = "fine-tune on a part of it (split the file; a LoRA adapter rarely needs more)"
DEFAULT_MAX_LENGTH = 512  # tokens per example, or the model's context when that is shorter


# ----------------------------------------------------------------------------------------------------------- LoRA


def lora_config(
    config: Any,
    *,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = "all-linear",
    target_parameters: Sequence[str] | None = None,
) -> LoraConfig:
    """LoRA settings for a SpanNorm config; `target_parameters=None` means the fused experts of MoE models. The rank
    is at most the model's width: every matrix LoRA adapts here (projections, experts, even the embeddings or the
    LM head if named) has the width as one side, so its update B @ A has rank <= width whatever `rank` is, and a
    higher one only adds weights (and memory: `--rank 10**9` would allocate billions per matrix)."""
    if rank < 1:
        raise InputError(f"LoRA rank={rank} must be >= 1 (--rank)")
    if rank > config.hidden_size:
        raise InputError(
            f"--rank {rank} is larger than the model's width (hidden_size {config.hidden_size}): a LoRA update of a "
            f"matrix with the width as one side has rank <= {config.hidden_size} whatever the rank, so a higher one "
            f"only adds weights; use a rank from 1 to {config.hidden_size} (8 to 64 is usual)"
        )
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout={dropout} must be in [0, 1) (--dropout)")
    if target_parameters is None:
        target_parameters = EXPERT_PARAMETERS if config.num_experts > 0 else ()
    if isinstance(target_modules, Sequence) and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        target_parameters=list(target_parameters) or None,
        task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------------------------------------- data


def _response_text(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, prompt_text: str) -> str:
    if not tokenizer.chat_template:
        return response
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    # The assistant turn with the template's own closing markup, when the template renders the prompt as a prefix.
    return full[len(prompt_text) :] if full.startswith(prompt_text) else response


def encode_instruction(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids and labels with the prompt masked out (IGNORE_INDEX). Prompt and response are tokenized apart,
    so the training prompt tokens are exactly those generation will start from."""
    prompt_text = format_prompt(tokenizer, prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(_response_text(tokenizer, prompt, response, prompt_text), add_special_tokens=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    if eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids = response_ids + [eos]  # teach the model to stop
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _check_responses(path: Path, responses: Sequence[str]) -> None:
    """Refuse instruction data whose responses are all empty (the loss would be on EOS alone: the adapter learns
    only to stop); warn when some are."""
    empty = sum(1 for response in responses if not response.strip())
    if empty == len(responses):
        raise InputError(
            f"training data {str(path)!r}: all {empty} responses are empty, so the loss would be on EOS alone and "
            "the adapter would learn only to stop; fill the 'response' fields"
        )
    if empty:
        logger.warning(
            "training data %r: %d of %d responses are empty; those examples teach only EOS",
            str(path),
            empty,
            len(responses),
        )


def read_training_data(path: str | os.PathLike) -> dict[str, list[str]]:
    """The columns of the training data, checked before any model loads: `prompt` and `response` (instruction
    records) or `text`, from `.jsonl`/`.json` records (`cli.read_json_records`) or a plain text file (any other
    suffix: the file is one document), at most DATA_LIMIT bytes of UTF-8. A record without those fields, or with a
    field that is not a string, is refused, naming its line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(path)!r} not found")
    if path.suffix not in (".jsonl", ".json"):
        return {"text": [read_text(path, flag="--data", limit=DATA_LIMIT, bigger=DATA_BIGGER)]}
    records = read_json_records(path, flag="--data", limit=DATA_LIMIT, bigger=DATA_BIGGER)
    if not records:
        raise InputError(f"training data {str(path)!r} holds no records; give one JSON object per line")
    columns = set().union(*(record for _, record in records))
    names = ("prompt", "response") if columns & {"prompt", "response"} else ("text",) if "text" in columns else ()
    if not names:
        raise InputError(
            f"training data {str(path)!r}: records need 'prompt' and 'response' (instruction data) or 'text'; "
            f"found columns {sorted(columns)}"
        )
    data = {name: text_fields(records, name, flag="--data", path=path) for name in names}
    if "response" in data:
        _check_responses(path, data["response"])
    return data


def example_length(max_length: int | None, context: int) -> int:
    """Tokens per training example for a model with `context` positions (`max_position_embeddings`): `max_length`
    when given, refused past the context (longer examples would train positions the model does not have);
    without it DEFAULT_MAX_LENGTH, cut to the context with a printed note."""
    if max_length is None:
        if context < DEFAULT_MAX_LENGTH:
            print(
                f"--max-length: the default {DEFAULT_MAX_LENGTH} is longer than the model's context of {context} "
                f"tokens; using {context}"
            )
        return min(DEFAULT_MAX_LENGTH, context)
    if max_length > context:
        raise InputError(
            f"--max-length {max_length} is longer than the model's context of {context} tokens "
            "(max_position_embeddings): examples that long would train positions the model does not have; give at "
            f"most {context}, or leave --max-length out"
        )
    return max_length


def load_training_data(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: dict[str, list[str]] | None = None,
) -> Dataset:
    """A tokenized dataset from the data file at `path` (or the `columns` `read_training_data` already read from
    it): instruction examples (loss on the response), or text packed into `max_length` blocks joined by EOS."""
    columns = read_training_data(path) if columns is None else columns
    if max_length < 2:
        raise InputError(f"max_length={max_length} must be >= 2 (--max-length)")
    raw = Dataset.from_dict(columns)
    if "response" in columns:

        def encode(example):
            return encode_instruction(tokenizer, example["prompt"], example["response"], max_length)

        data = raw.map(encode, remove_columns=raw.column_names)
        kept = data.filter(lambda example: any(label != IGNORE_INDEX for label in example["labels"]))
        if len(kept) < len(data):
            logger.warning(
                "%d of %d examples dropped: the prompt fills max_length=%d",
                len(data) - len(kept),
                len(data),
                max_length,
            )
        data = kept
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def pack(batch):
            ids = [i for text in batch["text"] for i in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
            blocks = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
            blocks = [block for block in blocks if len(block) > 1]
            return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

        data = raw.map(pack, batched=True, remove_columns=raw.column_names)
    if len(data) == 0:
        raise InputError(f"training data {str(path)!r} gave no training examples; check the file and --max-length")
    return data


# ------------------------------------------------------------------------------------------------------- adapters


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Fold the adapter into the base (`merge_and_unload`) and save a standalone SpanNorm checkpoint.
    `output_dir` must be new, empty or an earlier merge output (see `spannorm_hf.files`), unless `overwrite`; it is
    locked from before the adapter loads until the merged model is in it."""
    with hold_outputs([(output_dir, "merged-model", "--merge")], overwrite=overwrite):
        details_path = Path(adapter_dir) / TRAINING_DETAILS_FILE
        details = read_json_object(details_path, what="adapter file") if details_path.is_file() else {}
        model, tokenizer = load_adapter(adapter_dir, base)
        merged = model.merge_and_unload()
        details["merged"] = "LoRA adapter merged into the base weights (merge_and_unload)"
        with atomic_output_dir(output_dir, "merged-model", flag="--merge", overwrite=overwrite) as staging:
            with naming_disk_full(staging):
                merged.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                (staging / TRAINING_DETAILS_FILE).write_text(json.dumps(details, indent=2) + "\n")
    return Path(output_dir).expanduser().resolve()


def _base_reference(name_or_path: str | os.PathLike) -> str:
    """Where the adapter will find its base again: an absolute path for local folders, else the Hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


# ------------------------------------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    adapter_dir: Path
    merged_dir: Path | None
    model: PeftModel  # the trained model, in eval mode
    train_loss: float
    steps: int
    examples: int


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    batch_size: int,
    grad_accum: int,
    learning_rate: float,
    epochs: float,
    max_steps: int,
    logging_steps: int,
    seed: int,
    gradient_checkpointing: bool,
) -> TrainOutput:
    """transformers' Trainer over the encoded examples: cosine schedule, 3% warm-up, no checkpoints of its own
    (the adapter is saved by the caller, atomically)."""
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            learning_rate=learning_rate,
            num_train_epochs=epochs,
            max_steps=max_steps,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to="none",
            seed=seed,
            activation_checkpointing=gradient_checkpointing,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        output = trainer.train()
    return output


def _save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    base: str | os.PathLike,
    fingerprint: str,
    details: dict[str, Any],
    *,
    overwrite: bool,
) -> Path:
    """Write the adapter folder atomically (a failed save leaves no half adapter): weights, tokenizer, the base it
    belongs to (reference and weight fingerprint, so it is never applied to another base) and training details."""
    with atomic_output_dir(output_dir, "lora-adapter", flag="--output", overwrite=overwrite) as staging:
        with naming_disk_full(staging):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            record = {"base": _base_reference(base), "fingerprint": fingerprint}
            (staging / ADAPTER_BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            (staging / TRAINING_DETAILS_FILE).write_text(json.dumps(details, indent=2) + "\n")
    return Path(output_dir).expanduser().resolve()


def finetune_lora(
    base: str | os.PathLike,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    merge_dir: str | os.PathLike | None = None,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = "all-linear",
    target_parameters: Sequence[str] | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 2e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int | None = None,
    gradient_checkpointing: bool = True,
    seed: int = 0,
    dtype: str | torch.dtype = "auto",
    logging_steps: int = 10,
    overwrite: bool = False,
) -> FinetuneResult:
    """Train a LoRA adapter on `data`, save it (with tokenizer and fingerprint) to `output_dir`, and with
    `merge_dir` also a merged standalone checkpoint. Both folders must be new, empty or earlier outputs of the
    same kind (see `spannorm_hf.files`), unless `overwrite`, and writable; that, the data and the settings are
    checked before any work, and both folders are locked until the end. `max_length` defaults to
    DEFAULT_MAX_LENGTH or the base's context, whichever is shorter (see `example_length`)."""
    outputs = [(output_dir, "lora-adapter", "--output")]
    if merge_dir:
        outputs.append((merge_dir, "merged-model", "--merge"))
    with hold_outputs(outputs, overwrite=overwrite):
        config = SpanNormConfig.from_dict(read_checkpoint_config(base))  # the base's shape, before its weights load
        settings = lora_config(
            config,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            target_parameters=target_parameters,
        )
        max_length = example_length(max_length, config.max_position_embeddings)
        columns = read_training_data(data)
        model, tokenizer = load_checkpoint(base, dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = load_training_data(data, tokenizer, max_length, columns)
        fingerprint = base_fingerprint(model)
        set_seed(seed)  # the LoRA init
        model = get_peft_model(model, settings)
        model.peft_config["default"].base_model_name_or_path = _base_reference(base)
        if gradient_checkpointing:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        output = _train(
            model,
            tokenizer,
            dataset,
            batch_size=batch_size,
            grad_accum=grad_accum,
            learning_rate=learning_rate,
            epochs=epochs,
            max_steps=max_steps,
            logging_steps=logging_steps,
            seed=seed,
            gradient_checkpointing=gradient_checkpointing,
        )
        model.eval()
        modules = settings.target_modules
        details = {
            "base_model": str(base) if not Path(base).expanduser().exists() else f"local checkpoint {Path(base).name}",
            "method": f"LoRA (PEFT {peft.__version__}): r={rank}, alpha={alpha}, dropout={dropout}",
            "target_modules": modules if isinstance(modules, str) else sorted(modules),
            "target_parameters": list(settings.target_parameters or []),
            "data": Path(data).name,
            "examples": len(dataset),
            "optimizer_steps": output.global_step,
            "learning_rate": learning_rate,
            "batch_size": f"{batch_size} x {grad_accum} accumulation",
            "max_length": max_length,
            "gradient_checkpointing": gradient_checkpointing,
            "final_train_loss": round(output.training_loss, 4),
        }
        adapter_dir = _save_adapter(model, tokenizer, output_dir, base, fingerprint, details, overwrite=overwrite)
        merged_dir = merge_adapter(adapter_dir, merge_dir, overwrite=overwrite) if merge_dir else None
    return FinetuneResult(adapter_dir, merged_dir, model, output.training_loss, output.global_step, len(dataset))


# ------------------------------------------------------------------------------------------------------------- CLI


@dataclass
class FinetuneArguments:
    """The options of `spannorm-finetune`: fine-tune (--data, --output), or merge an adapter (--model, --merge)."""

    model: str = field(metadata={"help": "base checkpoint folder or Hub id (an adapter folder to merge)"})
    data: str | None = field(
        default=None, metadata={"help": "training data: .jsonl/.json (prompt+response, or text) or a plain text file"}
    )
    output: str | None = field(default=None, metadata={"help": "adapter output folder"})
    merge: str | None = field(
        default=None, metadata={"help": "also write the merged standalone model here", "metavar": "DIR"}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "write into output folders this command did not create (only the files it writes are replaced)"
        },
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / rank)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout, in [0, 1)"})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules"})
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": f"parameter targets (default: {' '.join(EXPERT_PARAMETERS)} for MoE models; give none to disable)",
            "allow_empty": True,
        },
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data"})
    max_steps: int = field(
        default=-1, metadata={"help": "stop after this many optimizer steps (-1: when --epochs are done)"}
    )
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (cosine decay after a short warm-up)"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": f"tokens per example (text is packed into such blocks), at most the model's context; default "
            f"{DEFAULT_MAX_LENGTH}, or the context when shorter"
        },
    )
    no_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "keep activations instead of recomputing them (faster, more memory)"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "weights dtype", "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    seed: int = field(default=0, metadata={"help": "random seed (LoRA init, data order, dropout)"})

    def __post_init__(self):
        if self.data is None and not self.merge:
            raise InputError("give --data (and --output) to fine-tune, or an adapter folder as --model with --merge")
        if self.data is not None and not self.output:
            raise InputError("--output is required with --data (the folder the adapter is written to)")
        folders = {Path(folder).expanduser().resolve() for folder in (self.output, self.merge) if folder}
        if self.output and self.merge and len(folders) == 1:
            raise InputError(
                f"--output and --merge are the same folder ({self.merge!r}): the adapter and the merged model each "
                "need their own; give --merge another folder"
            )
        for flag in ("--rank", "--alpha", "--batch-size", "--grad-accum"):
            check_range(flag, getattr(self, flag[2:].replace("-", "_")), 1)
        check_range("--max-length", self.max_length, 2)
        check_range("--seed", self.seed, 0, MAX_SEED)
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_steps != -1:
            check_range("--max-steps", self.max_steps, 1)
        if self.epochs <= 0 or self.lr <= 0:
            raise InputError(f"--epochs and --lr must be > 0, got --epochs {self.epochs} --lr {self.lr}")


def parser() -> ArgumentParser:
    """The parser of `spannorm-finetune`, built from `FinetuneArguments`."""
    return ArgumentParser(
        FinetuneArguments,
        description="LoRA fine-tuning of a SpanNorm checkpoint (local folder or Hub id). Without --data, merge an "
        "existing adapter (--model ADAPTER_DIR) into its base with --merge.",
    )


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`spannorm-finetune` / `scripts/finetune_lora.py`: 0 on success, 2 (one `error:` line) for bad input."""
    (args,) = parser().parse_args_into_dataclasses(argv)
    if args.data is None:
        if not is_adapter_folder(args.model):
            raise InputError(
                f"--model {args.model!r} is not a LoRA adapter folder (no adapter_config.json); to merge, pass the "
                "folder a fine-tuning run wrote (its --output), or give --data to fine-tune"
            )
        print(f"Merged model: {merge_adapter(args.model, args.merge, overwrite=args.overwrite)}")
        return 0
    modules = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    result = finetune_lora(
        args.model,
        args.data,
        args.output,
        merge_dir=args.merge,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=modules,
        target_parameters=args.target_parameters,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        seed=args.seed,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"{result.examples} examples, {result.steps} optimizer steps, train loss {result.train_loss:.4f}")
    print(f"Adapter: {result.adapter_dir}")
    if result.merged_dir:
        print(f"Merged model: {result.merged_dir}")
    return 0
