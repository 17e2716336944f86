"""What a pretraining run records about itself in the folder it exports, so a published card says how the model
was trained without the user writing anything.

The run's `metrics.jsonl` (written by the trainer's JSONL tracker) already holds everything: a `config` record
with the arguments, a `setup` record (processes, precision, tokens per step) and per-step records with the loss,
tokens seen and validation loss. `training_details` turns the latest of each into the flat object of
`training_details.json` that `integrations.hub` renders as the card's training table. Local file paths are cut to
their names: a card is public, the layout of the machine it was trained on is not.
"""

import ast
import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..integrations.hub import TRAINING_DETAILS_FILE, save_tokenizer
from .data import _looks_local


def _argument(config: dict[str, Any], name: str) -> Any:
    """An argument as the run had it: the tracker stores lists and None as their str()."""
    value = config.get(name)
    if isinstance(value, str) and (value == "None" or value.startswith("[")):
        return ast.literal_eval(value)
    return value


def _describe_data(data: list[str] | None) -> str:
    if not data:
        return "the embedded corpus (an excerpt of the Python 3.11 documentation, PSF license)"
    if len(data) == 1 and not _looks_local(data[0]):
        return f"Hub dataset {data[0]}"
    return "local files: " + ", ".join(Path(spec).name for spec in data)


def _describe_tokenizer(tokenizer: str | None) -> str:
    if tokenizer is None:
        return "byte-level BPE trained on the training data, with the chat template of spannorm_hf.training.tokenizer"
    path = Path(tokenizer).expanduser()
    return f"local tokenizer {path.name}" if path.exists() else tokenizer


def training_details(metrics_path: str | os.PathLike) -> dict[str, Any] | None:
    """The card's training table from a run's metrics.jsonl, or None when there is no such file or no run in it."""
    path = Path(metrics_path)
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    configs = [r for r in records if r.get("event") == "config"]
    setups = [r for r in records if r.get("event") == "setup"]
    steps = [r for r in records if r.get("event") is None and r.get("step")]
    if not configs or not setups:
        return None
    args, setup = configs[-1], setups[-1]
    last = max(steps, key=lambda r: r["step"], default={})
    last_loss = next((r for r in reversed(steps) if "loss" in r), None)
    last_val = next((r for r in reversed(steps) if "val_loss" in r), None)
    processes = setup["num_processes"]
    details: dict[str, Any] = {
        "method": "pretrained from scratch with spannorm-hf (scripts/train.py, Accelerate)",
        "data": _describe_data(_argument(args, "data")),
        "tokenizer": _describe_tokenizer(_argument(args, "tokenizer")),
        "optimizer_steps": last.get("step", 0),
        "tokens_seen": last_loss["tokens"] if last_loss else 0,
        "sequence_length": args["seq_len"],
        "batch": f"{args['batch_size']} rows x {args['grad_accum']} accumulation x {processes} process(es) = "
        f"{setup['tokens_per_step']} tokens per step",
        "optimizer": f"AdamW, betas ({args['adam_beta1']}, {args['adam_beta2']}), weight decay "
        f"{args['weight_decay']}, gradient clipping {args['max_grad_norm'] or 'off'}",
        "learning_rate": f"{args['lr']:g} peak, {args['lr_scheduler']} schedule, warmup {args['warmup_steps']:g}",
        "precision": "fp32" if setup["mixed_precision"] == "no" else f"{setup['mixed_precision']} mixed precision",
        "distributed": "one process" if processes == 1 else f"{setup['distributed_type']}, {processes} processes",
        "seed": args["seed"],
    }
    if last_loss is not None:
        details["final_train_loss"] = round(last_loss["loss"], 4)
    if last_val is not None:
        details["last_validation_loss"] = (
            f"{last_val['val_loss']:.4f} at step {last_val['step']} (perplexity {last_val['val_perplexity']:.2f})"
        )
    else:
        details["last_validation_loss"] = "none (no validation split)"
    return details


def finish_export(
    folder: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, metrics_path: str | os.PathLike | None
) -> None:
    """What an exported folder needs besides the model's `save_pretrained`: the tokenizer, saved with the model's
    context (folder/config.json) as `model_max_length`, and training_details.json from the run's metrics."""
    folder = Path(folder)
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    save_tokenizer(tokenizer, folder, context)
    details = training_details(metrics_path) if metrics_path is not None else None
    if details is not None:
        (folder / TRAINING_DETAILS_FILE).write_text(json.dumps(details, indent=2) + "\n")
