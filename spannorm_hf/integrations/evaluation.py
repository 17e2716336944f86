"""Evaluating a SpanNorm checkpoint: sliding-window perplexity on held-out text, and the lm-evaluation-harness
tasks the paper reports, run through lm-eval's own `hf` model class (`pretrained=DIR`; this package is imported, so
its registered classes load the folder and `trust_remote_code` stays off: no code from the folder runs).

`evaluate`'s perplexity metric is not used: it lives on the Hub (so fails offline) and reloads the model by name
on every call; the sliding-window loop below is the standard one (the transformers perplexity guide), written
so that every token from position 1 on is scored exactly once.
"""

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..cli import (
    ArgumentParser,
    InputError,
    check_range,
    command,
    one_line,
    read_json_records,
    read_text,
    text_fields,
)
from ..files import atomic_write_text, check_output_file, check_writable, output_lock
from .adapters import adapter_base, is_adapter_folder, load_adapter
from .generation import check_device, load_model
from .hub import check_tokenizer_code, read_checkpoint_config

# The zero-shot tasks the paper reports, by their lm-eval names. Their data comes from the Hub (or its cache).
PAPER_TASKS = ("hellaswag", "winogrande", "piqa", "wikitext", "sciq", "lambada_openai", "arc_challenge")
LOCAL_DATASET_BUILDERS = ("json", "csv", "text", "parquet", "arrow")
TEXT_LIMIT = 64 << 20  # --text is read whole and tokenized in one piece
TEXT_BIGGER = "evaluate a part of it, e.g. its first lines (head -n 500000 FILE > part.txt): 64 MiB is ~16M tokens"
MAX_FEWSHOT = 100  # more examples than any task's prompt could hold in a context
# lm-eval scores a batch in one forward pass (batch x longest request x vocabulary logits); its 'auto' search stops at
# 64. 'auto:N' measures the largest batch N times over the run (lm-eval divides the requests into N parts).
MAX_BATCH_SIZE = 1024
MAX_BATCH_SEARCHES = 100


@dataclass
class Perplexity:
    dataset: str
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    max_length: int
    stride: int


@torch.no_grad()
def sliding_window_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, max_length: int, stride: int
) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of a 1-D token sequence. Windows of `max_length` tokens start every
    `stride` tokens; each window scores only the tokens no earlier window scored, so with stride < max_length
    every token has at least max_length - stride tokens of context. With stride == max_length (no overlap) the
    first token of each window has no context and is skipped, as is token 0."""
    if input_ids.dim() != 1:  # a caller's mistake, not the user's
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if max_length < 2:
        raise InputError(f"max_length={max_length} must be >= 2 (--max-length)")
    if not 1 <= stride <= max_length:
        raise InputError(f"stride={stride} must be in [1, max_length={max_length}] (--stride)")
    n = input_ids.numel()
    if n < 2:
        raise InputError(f"need at least 2 tokens to score, got {n}; give a longer --text")
    device = next(model.parameters()).device
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(scored_until, begin + 1)  # first position scored in this window
        keep = end - first + 1  # logits at positions first-1 .. end-1 (the last predicts nothing)
        window = input_ids[begin:end].unsqueeze(0).to(device)
        logits = model(window, logits_to_keep=keep, use_cache=False).logits[0, :-1].float()
        targets = input_ids[first:end].to(device)
        total -= F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).sum().item()
        count += end - first
        scored_until = end
        if end == n:
            break
    return total, count


def read_eval_text(path: str | os.PathLike) -> str:
    """Held-out text: a plain text file, or .jsonl/.json records with a 'text' field (joined by blank lines), at
    most TEXT_LIMIT bytes of UTF-8 (see `cli.read_text`)."""
    if Path(path).suffix not in (".jsonl", ".json"):
        return read_text(path, flag="--text", limit=TEXT_LIMIT, bigger=TEXT_BIGGER)
    records = read_json_records(path, flag="--text", limit=TEXT_LIMIT, bigger=TEXT_BIGGER)
    return "\n\n".join(text_fields(records, "text", flag="--text", path=path))


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    dataset: str = "text",
) -> Perplexity:
    """Sliding-window perplexity of `text`; max_length defaults to the model's context, stride to half of it. A
    window longer than the context would score positions the model never trained on: refused."""
    context = model.config.max_position_embeddings
    max_length = context if max_length is None else max_length
    if max_length > context:
        raise InputError(
            f"max_length={max_length} is longer than the model's context of {context} tokens "
            "(max_position_embeddings); lower --max-length"
        )
    stride = max(1, max_length // 2) if stride is None else stride
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    total, count = sliding_window_nll(model, ids, max_length, stride)
    return Perplexity(dataset, math.exp(total / count), total / count, count, max_length, stride)


def lm_eval_model_args(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """lm-eval `hf` model arguments: the checkpoint, or an adapter's base plus `peft=` (after checking that the
    adapter belongs to that base), with `trust_remote_code` off: this package's classes are registered in this
    process, and a folder that asks for other code is refused here, naming the file."""
    path = Path(name_or_path).expanduser()
    if is_adapter_folder(path):
        base = adapter_base(path)
        model, _ = load_adapter(path)  # raises when the adapter does not belong to its base, or asks for code
        del model
        return {"pretrained": base, "peft": str(path.resolve()), "trust_remote_code": False}
    read_checkpoint_config(name_or_path)
    check_tokenizer_code(name_or_path)
    pretrained = str(path.resolve()) if path.exists() else str(name_or_path)
    return {"pretrained": pretrained, "trust_remote_code": False}


def summarize_lm_eval(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {"metrics": {metric: value}, "dataset": Hub dataset id or None}} from lm-eval's results dict."""
    summary = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and "_stderr" not in metric and isinstance(value, (int, float)):
                metrics[metric if filter_name == "none" else f"{metric} ({filter_name})"] = value
        dataset = results.get("configs", {}).get(task, {}).get("dataset_path")
        summary[task] = {"metrics": metrics, "dataset": None if dataset in LOCAL_DATASET_BUILDERS else dataset}
    return summary


@functools.cache
def task_manager(include_path: str | None = None):
    """lm-eval's task index (built-in tasks plus the YAMLs under `include_path`); indexing takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_lm_eval(
    name_or_path: str | os.PathLike,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on our checkpoint; returns lm-eval's full results dict. `include_path` adds a
    folder of task YAMLs (local tasks). Tasks that need Hub data fail with a message saying so."""
    model_args = lm_eval_model_args(name_or_path)  # first: a folder that asks for code is refused at once
    device = check_device(device)
    import lm_eval

    tasks = [t for name in tasks for t in (PAPER_TASKS if name == "paper" else (name,))]
    manager = task_manager(str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"unknown lm-eval task(s) {unknown}; 'paper' stands for {list(PAPER_TASKS)}; "
            "define other tasks in YAML files and pass their folder with --include-path"
        )
    try:
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=manager,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            limit=limit,
            device=device,
        )
    except (ConnectionError, OSError) as error:
        raise InputError(
            f"lm-eval could not run {list(tasks)}: {error}. The paper's tasks read their datasets from the Hub: run "
            "once with network access (they are cached in HF_DATASETS_CACHE) or define local tasks with --include-path"
        ) from error


def check_batch_size(size: str) -> None:
    """`InputError` unless `size` is an lm-eval batch size within bounds: a whole number up to MAX_BATCH_SIZE,
    'auto', or 'auto:N' with N up to MAX_BATCH_SEARCHES (lm-eval would take any number, and fail on 'auto:0')."""
    auto, colon, searches = size.partition(":")
    if size.isdecimal() and 1 <= int(size) <= MAX_BATCH_SIZE:
        return
    if auto == "auto" and (not colon or (searches.isdecimal() and 1 <= int(searches) <= MAX_BATCH_SEARCHES)):
        return
    raise InputError(
        f"--batch-size {size!r} must be a whole number from 1 to {MAX_BATCH_SIZE}, 'auto' (the largest batch that "
        f"fits), or 'auto:N' with N from 1 to {MAX_BATCH_SEARCHES}"
    )


@dataclass
class EvaluateArguments:
    """The options of `spannorm-evaluate`."""

    model: str = field(metadata={"help": "checkpoint folder, Hub id, or LoRA adapter folder"})
    text: str | None = field(
        default=None, metadata={"help": "held-out text for perplexity (.txt, or .jsonl with a 'text' field)"}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "perplexity window (default: the model's context length)"}
    )
    stride: int | None = field(default=None, metadata={"help": "perplexity stride (default: half the window)"})
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": f"lm-eval tasks; 'paper' = {' '.join(PAPER_TASKS)}", "action": "extend"},
    )
    include_path: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAMLs"})
    num_fewshot: int | None = field(
        default=None,
        metadata={"help": f"few-shot examples per question, 0 to {MAX_FEWSHOT} (default: each task's own)"},
    )
    limit: float | None = field(
        default=None,
        metadata={"help": "examples per task (a whole number), or a fraction in (0, 1) (lm-eval --limit; smoke tests)"},
    )
    batch_size: str = field(
        default="1",
        metadata={
            "help": f"lm-eval batch size: a whole number from 1 to {MAX_BATCH_SIZE}, 'auto' (the largest that fits), "
            f"or 'auto:N' (measured again N times over the run, N from 1 to {MAX_BATCH_SEARCHES})"
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)"})
    output: str | None = field(
        default=None, metadata={"help": "write the results as JSON here (publish.py --eval-results reads it)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output file"})

    def __post_init__(self):
        if not self.text and not self.tasks:
            raise InputError("nothing to do: give --text (perplexity) and/or --tasks (lm-eval)")
        check_batch_size(self.batch_size)
        check_range("--num-fewshot", self.num_fewshot, 0, MAX_FEWSHOT)
        if self.limit is not None and not (0 < self.limit < 1 or (self.limit >= 1 and self.limit == int(self.limit))):
            raise InputError(
                f"--limit {self.limit:g} must be a whole number of examples (>= 1) or a fraction in (0, 1)"
            )
        check_device(self.device)


def parser() -> ArgumentParser:
    """The parser of `spannorm-evaluate`, built from `EvaluateArguments`."""
    return ArgumentParser(
        EvaluateArguments, description="Perplexity and lm-evaluation-harness scores of a SpanNorm checkpoint."
    )


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`spannorm-evaluate` / `scripts/evaluate_model.py`: 0 on success, 2 (one `error:` line) for bad input."""
    (args,) = parser().parse_args_into_dataclasses(argv)
    if not args.output:
        _evaluate(args)
        return 0
    check_writable(args.output, flag="--output")  # before any work
    with output_lock(args.output, flag="--output"):  # to the end: a second evaluation into the same file is refused
        check_output_file(args.output, flag="--output", overwrite=args.overwrite)
        report = _evaluate(args)
        try:
            atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
        except OSError as error:  # e.g. the disk filled up while evaluating: the results are not lost with it
            print(json.dumps(report, indent=2))
            raise InputError(
                f"could not write --output {str(args.output)!r} ({one_line(error)}); the results are printed above"
            ) from error
    print(f"Results: {args.output}")
    return 0


def _evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """The scores `main` prints and writes: perplexity on --text, lm-eval --tasks."""
    report: dict[str, Any] = {"model": str(args.model)}
    if args.text:
        text = read_eval_text(args.text)
        model, tokenizer = load_model(args.model, device=args.device)
        result = perplexity(
            model, tokenizer, text, max_length=args.max_length, stride=args.stride, dataset=Path(args.text).name
        )
        report["perplexity"] = asdict(result)
        print(
            f"perplexity {result.perplexity:.4f} ({result.tokens} tokens, window {result.max_length}, "
            f"stride {result.stride})"
        )
        del model
    if args.tasks:
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
        results = run_lm_eval(
            args.model,
            args.tasks,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            batch_size=batch_size,
            limit=limit,
            device=args.device,
        )
        report["lm_eval"] = summarize_lm_eval(results)
        for task, info in report["lm_eval"].items():
            print(task, " ".join(f"{m}={v:.4f}" for m, v in info["metrics"].items()))
    return report
