"""Pretraining SpanNorm models with Accelerate: one process, DDP or FSDP2, on CPU or GPUs.

    accelerate launch [--config_file scripts/accelerate/fsdp2.yaml] scripts/train.py \
        --config configuration/spannorm-small.json --data my/*.jsonl --output runs/small

Design choices that make runs exact and safe:
- The loss of a step is the mean over every target token of the global batch (all processes, all
  micro-batches): each micro-batch loss is divided by the global token count, so 1 process, DDP and FSDP2
  train on the same numbers whatever the split. MoE layers add `router_aux_loss_coef * aux_loss` (the mean
  over micro-batches), and both parts are logged.
- Which rows a step reads is a function of the step (see `data.ShuffledRows`); checkpoints hold the model,
  optimizer, scheduler, step counter and every process's RNG state in safetensors and JSON (`checkpointing`:
  nothing is ever unpickled), so resuming repeats the uninterrupted run step for step.
- Checkpoints are written to a temporary directory, sealed with a manifest (sizes, sha256) and renamed into
  place: a killed run never leaves a half-written `step-*` directory, and `--resume latest` skips, naming it, a
  checkpoint whose files no longer match. SIGINT / SIGTERM stop at the next step boundary with a checkpoint.
- Every bad input is checked before the first step (and before anything is written besides the output dir).
"""

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, is_tensorboard_available, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, get_scheduler
from transformers.activations import ACT2FN
from transformers.utils import is_flash_attn_2_available

from ..configuration_spannorm import SpanNormConfig
from ..files import (
    OUTPUT_MARKER,
    DiskFullError,
    OutputDirError,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    is_disk_full,
    naming_disk_full,
)
from ..integrations.hub import CheckpointPusher, check_repo_id
from .checkpointing import (
    MANIFEST,
    TRAIN_STATE,
    CheckpointError,
    load_model_and_optimizer,
    load_process_state,
    read_json,
    save_model_and_optimizer,
    save_process_state,
    verify_checkpoint,
    write_manifest,
)
from .data import (
    DataError,
    ShuffledRows,
    StreamRows,
    collate,
    load_documents,
    load_or_train_tokenizer,
    pack_documents,
    require_rows,
    split_documents,
    split_stream,
    tokenizer_fingerprint,
)
from .diagnostics import BlockStats, block_grad_norms
from .run_details import METRICS_FILE, finish_export

CHECKPOINTS = "checkpoints"
HUB_UPLOADS = "hub-uploads"  # model snapshots waiting for their background upload (--push-to-hub)
# Config fields that may differ between a checkpoint and the run resuming it (runtime or tokenizer-derived).
RESUME_IGNORED_FIELDS = {
    "transformers_version",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "output_router_logits",
}
# Arguments whose change on resume changes what the resumed steps compute (allowed, with a warning).
RESUME_WATCHED_ARGS = ("seq_len", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_steps", "seed")


class SetupError(ValueError):
    """A bad argument, config, output directory or checkpoint, found before training starts."""


@dataclass
class TrainArguments:
    config: str = field(metadata={"help": "model config JSON, e.g. configuration/spannorm-small.json"})
    output: str = field(metadata={"help": "run directory: checkpoints/, metrics.jsonl, tensorboard/, final model"})
    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "text/jsonl/parquet files or globs, or a Hub dataset name[:config]; default: embedded corpus"
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
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "a transformers scheduler name"})
    warmup_steps: float = field(default=0.05, metadata={"help": "warmup steps, or a fraction of all steps if < 1"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0: off"})
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
    seed: int = 0
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
        if self.seq_len is not None and self.seq_len < 1:
            raise SetupError(f"--seq-len must be >= 1, got {self.seq_len}")
        for name in ("lr", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "val_size"):
            if not math.isfinite(getattr(self, name)):
                raise SetupError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SetupError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.diag_every < 0 or self.val_size < 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise SetupError("--diag-every, --val-size, --warmup-steps and --max-grad-norm must be >= 0")
        if self.lr <= 0:
            raise SetupError(f"--lr must be > 0, got {self.lr}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise SetupError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            raise SetupError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU")


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """Command-line arguments (both --seq-len and --seq_len spellings work)."""
    parser = HfArgumentParser(TrainArguments, description="Pretrain a SpanNorm model with Accelerate.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


class JSONLTracker(GeneralTracker):
    """An accelerate tracker writing one JSON object per `log` call to `<output>/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, output: str):
        super().__init__()
        self.path = Path(output) / "metrics.jsonl"
        self.file = None

    @property
    def tracker(self):
        return self.file

    def start(self):
        self.file = open(self.path, "a", encoding="utf-8")

    def store_init_configuration(self, values: dict):
        self._write({"event": "config", **values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, **values})

    def _write(self, record: dict) -> None:
        with naming_disk_full(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def finish(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class TrainProgress:
    """Step and token counters, saved in every checkpoint."""

    def __init__(self):
        self.step, self.tokens = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    output: Path
    checkpoint: Path | None
    model: torch.nn.Module  # as prepared by accelerate (DDP / FSDP wrapped)


class StopSignal:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary; a second signal acts as usual."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_accelerator(args: TrainArguments, timeout: timedelta | None = None) -> Accelerator:
    """The run's Accelerator: distribution from `accelerate launch`, JSONL + TensorBoard trackers."""
    trackers: list = [JSONLTracker(args.output)]
    if is_tensorboard_available():
        trackers.append("tensorboard")
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(
            project_dir=args.output, logging_dir=os.path.join(args.output, "tensorboard")
        ),
        dynamo_backend="inductor" if args.compile else None,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)] if timeout else None,
    )


def load_config(args: TrainArguments) -> SpanNormConfig:
    """The model config, proven buildable (on the meta device: no memory) before anything is written; a missing
    --seq-len becomes the config's context length."""
    try:
        config = SpanNormConfig.from_json_file(args.config)
    except (OSError, ValueError, TypeError) as err:
        raise SetupError(f"--config {args.config!r}: {err}") from err
    if config.hidden_act not in ACT2FN:
        raise SetupError(
            f"--config {args.config!r}: hidden_act {config.hidden_act!r} is not an activation transformers knows "
            "(e.g. silu, gelu, relu)"
        )
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise SetupError(f"--config {args.config!r}: no model can be built from it: {problem}") from err
    if args.seq_len is None:
        args.seq_len = config.max_position_embeddings
    if args.seq_len > config.max_position_embeddings:
        raise SetupError(
            f"--seq-len {args.seq_len} exceeds the config's max_position_embeddings={config.max_position_embeddings}"
        )
    return config


def check_output(args: TrainArguments) -> Path:
    """The run directory must be new, empty or a training run (`spannorm_hf.files`), unless --overwrite; read-only."""
    try:
        return check_output_dir(args.output, "training-run", flag="--output", overwrite=args.overwrite)
    except OutputDirError as err:
        raise SetupError(str(err)) from err


def claim_output(output: Path, overwrite: bool, fresh: bool) -> None:
    """Create and mark the run directory and prove it is writable (main process, after every check). A fresh run
    with --overwrite first removes what an earlier run wrote there (only the files training writes)."""
    try:
        claim_output_dir(output, "training-run", flag="--output", overwrite=overwrite)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SetupError(f"output directory {str(output)!r} is not writable: {err}") from err
    if fresh and overwrite:
        (output / "metrics.jsonl").unlink(missing_ok=True)
        for events in (output / "tensorboard").glob("**/events.out.tfevents.*"):
            events.unlink()
        for stale in [*list_checkpoints(output), output / HUB_UPLOADS]:
            shutil.rmtree(stale, ignore_errors=True)


def earlier_run_files(output: Path) -> list[str]:
    """What an earlier run left in `output` (everything but the ownership marker and empty folders)."""
    if not output.is_dir():
        return []
    empty = [p for p in output.iterdir() if p.is_dir() and not any(p.iterdir())]
    return sorted(p.name for p in output.iterdir() if p.name != OUTPUT_MARKER and p not in empty)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = output / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(resume: str | None, output: Path, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; a fresh run never starts over an earlier one
    unless --overwrite."""
    existing = list_checkpoints(output)
    if resume is None and existing and not overwrite:
        raise SetupError(
            f"{output} already holds checkpoints (latest {existing[-1].name}); pass --resume latest to continue "
            "that run, --overwrite to start a new one over it, or choose a new --output"
        )
    if resume is None or (resume == "latest" and not existing):
        leftovers = earlier_run_files(output)
        if leftovers and not overwrite:
            raise SetupError(
                f"--output {str(output)!r} holds an earlier run ({', '.join(leftovers[:5])}) with no checkpoint to "
                "resume from: choose a new --output, or pass --overwrite to replace the files training writes"
            )
        return None
    if resume == "latest":
        return latest_valid_checkpoint(existing)
    path = Path(resume)
    if not (path / TRAIN_STATE).is_file() and not (path / MANIFEST).is_file():
        raise SetupError(f"--resume {resume!r} is not a checkpoint directory (no {TRAIN_STATE})")
    try:
        verify_checkpoint(path)
    except CheckpointError as err:
        raise SetupError(f"--resume {resume!r}: {err}") from err
    newer = [p.name for p in existing if p.name > path.name]
    if path.resolve().parent == (output / CHECKPOINTS).resolve() and newer:
        raise SetupError(
            f"--resume {resume!r}: {output} holds newer checkpoints {newer}; delete them or use a new --output"
        )
    return path


def latest_valid_checkpoint(existing: list[Path]) -> Path:
    """The newest checkpoint whose manifest verifies; each newer one is skipped with a warning saying why."""
    problems = []
    for path in reversed(existing):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"--resume latest: skipping checkpoint {path.name}: {err}", stacklevel=3)
            problems.append(f"{path.name}: {err}")
            continue
        return path
    raise SetupError(f"--resume latest: no usable checkpoint in {existing[0].parent} ({'; '.join(problems)})")


def check_resume_compatible(checkpoint: Path, config: SpanNormConfig, args: TrainArguments) -> dict:
    """Raise if the checkpoint's model or tokenizer differs; warn if arguments that change what the resumed steps
    compute differ. Returns the checkpoint's train_state.json."""
    try:
        saved, current = SpanNormConfig.from_json_file(checkpoint / "config.json").to_dict(), config.to_dict()
    except (OSError, ValueError) as err:
        raise SetupError(f"cannot resume: {checkpoint / 'config.json'} is not a valid config: {err}") from err
    keys = (saved.keys() | current.keys()) - RESUME_IGNORED_FIELDS
    diff = {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs --config {b!r}" for k, (a, b) in diff.items())
        raise SetupError(f"cannot resume {checkpoint}: the model config differs ({lines})")
    state = read_json(checkpoint / TRAIN_STATE)
    try:
        changed = {
            k: (state["args"][k], getattr(args, k)) for k in RESUME_WATCHED_ARGS if state["args"][k] != getattr(args, k)
        }
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{checkpoint / TRAIN_STATE} is not a valid training state: {err}") from err
    if changed:
        warnings.warn(f"resuming {checkpoint} with changed arguments (checkpoint, now): {changed}", stacklevel=2)
    if args.tokenizer is not None:
        ours = tokenizer_fingerprint(AutoTokenizer.from_pretrained(args.tokenizer))
        if ours != state["tokenizer_fingerprint"]:
            raise SetupError(f"cannot resume {checkpoint}: --tokenizer {args.tokenizer!r} is not the run's tokenizer")
    return state


def default_attention(accelerator: Accelerator) -> str:
    """FlashAttention-2 where it can run (CUDA, half precision, package installed), else PyTorch's sdpa."""
    usable = accelerator.device.type == "cuda" and accelerator.mixed_precision in ("bf16", "fp16")
    return "flash_attention_2" if usable and is_flash_attn_2_available() else "sdpa"


def resolve_max_steps(args: TrainArguments, tokens_per_step: int) -> int:
    return math.ceil(args.max_tokens / tokens_per_step) if args.max_tokens else args.max_steps


def make_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norm gains or biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2))


def parameter_counts(model: torch.nn.Module) -> dict:
    """Total parameters and those held by this process (fewer under FSDP sharding)."""
    params = list(model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    sharded = sum(hasattr(p, "to_local") for p in params)
    return {"params_total": sum(p.numel() for p in params), "params_local": local, "params_sharded": sharded}


def save_checkpoint(
    accelerator: Accelerator,
    output: Path,
    step: int,
    keep_last: int,
    state: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: SpanNormConfig,
    tokenizer,
    stream: StreamRows | None,
) -> Path:
    """Write the training state (see `checkpointing`) into a temporary directory, add the manifest last, and
    rename it into place once complete. `state` is train_state.json (scheduler, step, tokens, arguments)."""
    root = output / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        save_model_and_optimizer(accelerator, model, optimizer, tmp)
        save_process_state(tmp, accelerator.process_index)
        if stream is not None:
            state_file = tmp / f"stream_state_{accelerator.process_index}.json"
            with naming_disk_full(state_file):
                state_file.write_text(json.dumps(stream.state_dict()))
        if accelerator.is_main_process:
            with naming_disk_full(tmp / "config.json"):
                config.to_json_file(tmp / "config.json")
            with naming_disk_full(tmp / "tokenizer"):
                tokenizer.save_pretrained(tmp / "tokenizer")
            with naming_disk_full(tmp / TRAIN_STATE):
                (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (e.g. a full disk) leaves the older checkpoints alone
        raise
    if accelerator.is_main_process:
        if final.exists():
            stale = root / f".old-step-{step:08d}"
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)
        for old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: "TrainProgress",
    stream: StreamRows | None,
) -> None:
    """Restore what `save_checkpoint` wrote; never unpickles (see `checkpointing`)."""
    load_model_and_optimizer(accelerator, model, optimizer, checkpoint)
    state = read_json(checkpoint / TRAIN_STATE)
    try:
        scheduler.load_state_dict(state["scheduler"])
        progress.load_state_dict(state)
        if accelerator.scaler is not None and state.get("scaler") is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint / TRAIN_STATE} is not a valid training state: {err}") from err
    load_process_state(checkpoint, accelerator.process_index)
    if stream is not None:
        path = checkpoint / f"stream_state_{accelerator.process_index}.json"
        stream.load_state_dict(read_json(path))


def export_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, output: Path) -> None:
    """`save_pretrained` of the full model (safetensors, config with auto_map and code, tokenizer,
    generation_config) into the run directory; files are moved in one by one, config.json last."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards (a collective: every rank calls it)
    if accelerator.is_main_process:
        tmp = output / ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with naming_disk_full(tmp / "model.safetensors"):
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
                finish_export(tmp, tokenizer, Path(accelerator.project_dir or output) / METRICS_FILE)  # + card details
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(tmp / name, output / name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def push_model(accelerator: Accelerator, model, tokenizer, output: Path, step: int, pusher, final: bool) -> None:
    """Export the model as it is now into `hub-uploads/step-N` and hand it to the background `CheckpointPusher`
    (model, config + code, tokenizer, card; no optimizer state); the folder is removed once its upload is done.
    Every rank calls this (the export gathers FSDP shards); only the main process holds a pusher."""
    folder = output / HUB_UPLOADS / f"step-{step:08d}"
    export_model(accelerator, model, tokenizer, folder)
    if pusher is None:
        return
    if final:
        pusher.finish(folder, commit_message=f"Final model, step {step}")
        shutil.rmtree(output / HUB_UPLOADS, ignore_errors=True)
        return
    future = pusher.push(folder, commit_message=f"Checkpoint at step {step}")
    if future is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        future.add_done_callback(lambda _: shutil.rmtree(folder, ignore_errors=True))


def truncate_metrics(output: Path, step: int) -> None:
    """Drop metric records past `step` (a killed run may have logged beyond its last checkpoint). A torn last
    line (the disk filled up or the machine died mid-append) is dropped with a warning; a broken line before it
    is an error naming the line."""
    path = output / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as err:
            if number < len(lines):
                raise SetupError(f"{path} line {number} is not JSON ({err}); repair or delete that line") from err
            warnings.warn(f"{path}: dropping the torn last line {number} ({line[:60]!r})", stacklevel=2)
            continue
        if (record.get("step") or 0) <= step:
            kept.append(line)
    with naming_disk_full(path):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, val, batch_size: int, max_batches: int) -> dict:
    """Mean token loss and perplexity on the validation rows, split evenly across processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = min(len(val) // world, max_batches * batch_size)
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    model.eval()
    for start in range(rank * per_rank, (rank + 1) * per_rank, batch_size):
        stop = min(start + batch_size, (rank + 1) * per_rank)
        batch = {k: v.to(accelerator.device) for k, v in collate(val[start:stop]).items()}
        out = model(**batch, use_cache=False, output_router_logits=False)
        count = (batch["labels"][:, 1:] != -100).sum()
        totals += torch.stack([out.loss.double() * count, count.double()])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def _prepare_data(args: TrainArguments, accelerator: Accelerator, output: Path, checkpoint: Path | None, config):
    """Documents -> tokenizer -> validation split -> packed rows (main process first, others read the cache)."""
    with accelerator.main_process_first():
        docs = load_documents(args.data, args.text_column, streaming=args.streaming)
        if args.streaming:
            train_docs, val_docs = split_stream(docs, args.val_size)
        else:
            train_docs, val_docs = split_documents(docs, args.val_size, args.seed)
    if checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    elif args.tokenizer is not None:
        tokenizer = load_or_train_tokenizer(args.tokenizer, train_docs, config.vocab_size)
    else:  # train once, on the main process; the others load the saved result
        if accelerator.is_main_process:
            tokenizer = load_or_train_tokenizer(None, train_docs, config.vocab_size)
            with naming_disk_full(output / "tokenizer.json"):
                tokenizer.save_pretrained(output)  # the export writes the same files there at the end
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            tokenizer = AutoTokenizer.from_pretrained(output)
    with accelerator.main_process_first():
        train_rows = pack_documents(train_docs, tokenizer, args.seq_len)
        val_rows = pack_documents(val_docs, tokenizer, args.seq_len) if val_docs is not None else None
    if not args.streaming:
        require_rows(train_rows, "training", args.seq_len)
    if val_rows is not None:
        require_rows(val_rows, "validation", args.seq_len, need=accelerator.num_processes)
    return tokenizer, train_rows, val_rows


def train(args: TrainArguments, accelerator: Accelerator | None = None) -> TrainResult:
    """Run (or resume) pretraining as described by `args`; `accelerator` defaults to `build_accelerator(args)`."""
    config = load_config(args)
    output = check_output(args)
    checkpoint = find_resume_checkpoint(args.resume, output, args.overwrite)
    saved_state = check_resume_compatible(checkpoint, config, args) if checkpoint else None
    accelerator = accelerator or build_accelerator(args)
    world = accelerator.num_processes
    pusher = None
    if args.push_to_hub:
        try:  # a bad repo id stops the run here; no token or no network only warns, later, and training goes on
            check_repo_id(args.push_to_hub)
            if accelerator.is_main_process:
                pusher = CheckpointPusher(args.push_to_hub)
        except ValueError as err:
            raise SetupError(str(err)) from err
    if saved_state and args.streaming and saved_state["num_processes"] != world:
        raise SetupError(f"cannot resume a streaming run of {saved_state['num_processes']} processes on {world}")
    accelerator.wait_for_everyone()  # every process has checked the output directory before it is claimed
    if accelerator.is_main_process:
        claim_output(output, args.overwrite, fresh=checkpoint is None)
        for leftover in (output / CHECKPOINTS).glob(".*-step-*"):  # from a run killed while saving
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()

    tokenizer, train_rows, val_rows = _prepare_data(args, accelerator, output, checkpoint, config)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows_per_step = args.batch_size * args.grad_accum * world
    tokens_per_step = rows_per_step * args.seq_len
    max_steps = resolve_max_steps(args, tokens_per_step)
    warmup = int(args.warmup_steps * max_steps) if args.warmup_steps < 1 else int(args.warmup_steps)

    set_seed(args.seed)
    attention = args.attn_implementation or default_attention(accelerator)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = make_optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainProgress()
    stream = StreamRows(train_rows, accelerator.process_index, world) if args.streaming else None
    rows = None if args.streaming else ShuffledRows(train_rows, args.seed)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler, progress, stream)
    if accelerator.is_main_process:  # records past our starting step belong to a run that died after them
        truncate_metrics(output, progress.step)
    unwrapped = accelerator.unwrap_model(model)
    moe = config.num_experts > 0
    train_state = {
        "num_processes": world,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "args": asdict(args),
    }

    run_config = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in asdict(args).items()}
    # TensorBoard likewise drops the events a killed run wrote past the checkpoint it is resumed from
    tensorboard = {"tensorboard": {"purge_step": progress.step + 1}} if checkpoint else {}
    accelerator.init_trackers("spannorm", config=run_config, init_kwargs=tensorboard)
    setup = {
        "event": "setup",
        "num_processes": world,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "attn_implementation": attention,
        "max_steps": max_steps,
        "tokens_per_step": tokens_per_step,
        "train_rows": None if args.streaming else len(train_rows),
        "val_rows": len(val_rows) if val_rows is not None else 0,
        "resumed_from": str(checkpoint) if checkpoint else None,
        **parameter_counts(model),
    }
    accelerator.log(setup, step=progress.step)
    accelerator.print(
        f"training {setup['params_total'] / 1e6:.2f}M parameters on {world} process(es) "
        f"({setup['distributed_type']}), {max_steps} steps of {tokens_per_step} tokens"
        + (f", resuming at step {progress.step}" if checkpoint else "")
    )

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        if stream is not None:
            batch = stream.take(args.batch_size)
        else:
            start = (step * args.grad_accum + micro) * args.batch_size * world
            batch = rows.take(start + accelerator.process_index * args.batch_size, args.batch_size)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def checkpoint_now() -> Path:
        state = {
            **train_state,
            **progress.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        return save_checkpoint(
            accelerator, output, progress.step, args.keep_last, state, model, optimizer, config, tokenizer, stream
        )

    last_saved = progress.step if checkpoint else None
    interrupted = False
    bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train")
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    with StopSignal() as stop:
        while progress.step < max_steps:
            step = progress.step
            batches = [micro_batch(step, m) for m in range(args.grad_accum)]
            targets = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
            targets = accelerator.reduce(targets.to(accelerator.device), reduction="sum")
            diagnose = args.diag_every > 0 and (step + 1) % args.diag_every == 0
            lm_sum = torch.zeros((), device=accelerator.device)
            aux_sum = torch.zeros((), device=accelerator.device)
            if diagnose:  # an eager no-grad forward: hooks do not fire inside a torch.compile'd training forward
                with torch.no_grad(), BlockStats(unwrapped) as block_stats:
                    unwrapped(
                        input_ids=batches[0]["input_ids"], position_ids=batches[0]["position_ids"], use_cache=False
                    )
            for m, batch in enumerate(batches):
                sync = nullcontext() if m == args.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    out = model(**batch, use_cache=False, num_items_in_batch=targets, output_router_logits=moe)
                    lm = out.loss if out.aux_loss is None else out.loss - config.router_aux_loss_coef * out.aux_loss
                    objective = lm * world  # gradients are averaged over processes; the loss is a global mean
                    if out.aux_loss is not None:
                        objective = objective + config.router_aux_loss_coef * out.aux_loss / args.grad_accum
                    accelerator.backward(objective)
                lm_sum += lm.detach()
                if out.aux_loss is not None:
                    aux_sum += out.aux_loss.detach()
            grad_norms = block_grad_norms(unwrapped) if diagnose else None
            grad_norm = None
            if args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += tokens_per_step
            window_tokens += tokens_per_step

            flags = torch.stack([lm_sum, aux_sum, torch.tensor(float(stop.signum > 0), device=accelerator.device)])
            flags = accelerator.reduce(flags, reduction="sum")
            loss = flags[0].item()
            stopping = flags[2].item() > 0
            bar.update(1)
            metrics = {}
            if progress.step % args.log_every == 0 or progress.step == max_steps or stopping:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": progress.tokens,
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }
                if moe:
                    metrics["aux_loss"] = flags[1].item() / (args.grad_accum * world)
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if diagnose:
                rms = accelerator.reduce(torch.tensor(block_stats.output_rms, device=accelerator.device), "mean")
                cos = accelerator.reduce(torch.tensor(block_stats.cosine, device=accelerator.device), "mean")
                for i, (r, c, g) in enumerate(zip(rms.tolist(), cos.tolist(), grad_norms, strict=True)):
                    metrics[f"block_{i}/output_rms"] = r
                    metrics[f"block_{i}/cosine"] = c
                    metrics[f"block_{i}/grad_norm"] = g
            if val_rows is not None and (progress.step % args.eval_every == 0 or progress.step == max_steps):
                metrics.update(evaluate(accelerator, model, val_rows, args.batch_size, args.eval_batches))
            if metrics:
                accelerator.log(metrics, step=progress.step)
            if progress.step % args.save_every == 0 or progress.step == max_steps or stopping:
                checkpoint = checkpoint_now()
                last_saved = progress.step
                if args.push_to_hub and progress.step < max_steps:
                    push_model(accelerator, model, tokenizer, output, progress.step, pusher, final=False)
            if stopping:
                interrupted = True
                break
    bar.close()
    if last_saved != progress.step:  # e.g. resumed at max_steps
        checkpoint = checkpoint_now()
    if interrupted:
        accelerator.print(f"stopped by a signal at step {progress.step}; resume with --resume latest ({checkpoint})")
    else:
        export_model(accelerator, model, tokenizer, output)
        accelerator.print(f"done: {progress.step} steps; model exported to {output}")
        if args.push_to_hub:
            push_model(accelerator, model, tokenizer, output, progress.step, pusher, final=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(progress.step, interrupted, output, checkpoint, model)


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/train.py: a clear one-line error for bad input, 130 when stopped by a signal."""
    args = None
    try:
        args = parse_args(argv)
        result = train(args)
    except (SetupError, DataError, CheckpointError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk reported by a writer we do not wrap (e.g. TensorBoard's)
        if not is_disk_full(err):
            raise
        print(f"error: {DiskFullError(args.output if args else 'the output directory')}: {err}", file=sys.stderr)
        return 2
    return 130 if result.interrupted else 0
