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
- Every bad input is checked before the first step (and every argument before anything is written). A run holds
  an exclusive lock on its output folder for its whole life, so a second run into the same folder is refused
  before it changes anything, and a run that fails while setting up removes what it added there, so its rerun
  is not refused as a write over an earlier run. With --overwrite, the earlier run's records are removed only
  once setup has worked, when the new run starts writing its own.
- A non-finite loss or gradient norm stops the run before that state is logged or saved (`DivergedError`), and
  what accelerate set up differently from what was launched is said (FSDP on CPU) or refused (unconnected
  processes); resuming on another number of processes keeps the tokens per step where it can, and says so.
"""

import math
import os
import shutil
import signal
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from accelerate.utils.environment import parse_flag_from_env
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_scheduler
from transformers.utils import is_flash_attn_2_available

from ..cli import InputError, command
from ..configuration_spannorm import SpanNormConfig
from ..files import (
    DiskFullError,
    is_disk_full,
    locked_output_dir,
    naming_disk_full,
    raise_if_busy,
    remove_additions_on_failure,
)
from ..integrations.hub import CheckpointPusher, check_repo_id, load_tokenizer
from ..parameters import parameter_counts
from .arguments import SetupError, TrainArguments, load_config, parse_args
from .checkpointing import Checkpointer, check_output, claim_output, read_train_state, remove_earlier_run
from .data import (
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
from .export import export_model, push_model
from .learning_rate import predicted_lr
from .metrics import TENSORBOARD_DIR, Throughput, trackers, truncate_metrics

__all__ = [
    "Trainer",
    "TrainArguments",
    "TrainResult",
    "build_accelerator",
    "load_config",
    "main",
    "parse_args",
    "train",
]


class DivergedError(InputError):
    """The training loss or gradient norm is not finite: the settings (learning rate, clipping, precision) or the
    data made the run diverge. Exit code 2, like bad input: resuming with the same settings diverges again."""


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
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers(args.output),
        project_config=ProjectConfiguration(
            project_dir=args.output, logging_dir=os.path.join(args.output, TENSORBOARD_DIR)
        ),
        dynamo_backend="inductor" if args.compile else None,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)] if timeout else None,
    )


def check_launch(accelerator: Accelerator) -> str | None:
    """What `accelerate launch` asked for and accelerate did not set up (see the design notes on CPU runs).
    Processes that did not join one group are refused: each would train alone, into the same --output. FSDP that
    accelerate did not enable (it shards only on GPUs and other accelerators; on CPU a `distributed_type: FSDP`
    config runs DDP) is returned as a line to print: the run trains the same numbers, unsharded."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SetupError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate did not connect them: each "
            "would train alone, into the same --output; on a machine without GPUs set ACCELERATE_USE_CPU=1 (with "
            "--multi_gpu or a DDP/FSDP config), or launch one process"
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        actual = str(accelerator.distributed_type).split(".")[-1]
        return (
            f"FSDP is not used: the accelerate config asks for it, but accelerate shards only on GPUs and other "
            f"accelerators, so this {accelerator.device.type} run is {actual}: every process holds the whole model, "
            "its gradients and optimizer state"
        )
    return None


def keep_global_batch(args: TrainArguments, saved: dict, world: int) -> str | None:
    """Resuming on another number of processes: --grad-accum is scaled so that each step still reads the
    checkpoint's rows (the same tokens per step, data order and schedule as the uninterrupted run), when the run's
    --batch-size and --grad-accum are unchanged and the rows divide. Returns the line that says what was done, or
    what changes when the tokens per step cannot be, or were not, kept."""
    old, old_world = saved["args"], saved["num_processes"]
    rows = old["batch_size"] * old["grad_accum"] * old_world
    unchanged = (args.batch_size, args.grad_accum) == (old["batch_size"], old["grad_accum"])
    if old_world != world and unchanged and rows % (args.batch_size * world) == 0:
        args.grad_accum = rows // (args.batch_size * world)
        return (
            f"resuming a run of {old_world} processes on {world}: --grad-accum {args.grad_accum} (it had "
            f"{old['grad_accum']}) keeps its {rows * old['seq_len']} tokens per step"
        )
    before, now = rows * old["seq_len"], args.batch_size * args.grad_accum * world * args.seq_len
    if before == now:
        return None
    return (
        f"resuming with {now} tokens per step ({world} processes x --batch-size {args.batch_size} x --grad-accum "
        f"{args.grad_accum} x --seq-len {args.seq_len}); the checkpoint's steps had {before} ({old_world} x "
        f"{old['batch_size']} x {old['grad_accum']} x {old['seq_len']})"
    )


def set_peak_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """A checkpoint's scheduler state holds the peak learning rate of the run that saved it: the resumed run's --lr
    replaces it from the first resumed step (with the same --lr this recomputes the very same numbers), so that a
    run resumed with a lower --lr, e.g. after diverging, trains with it."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    scheduler._last_lr = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, value in zip(scheduler.optimizer.param_groups, scheduler._last_lr, strict=True):
        group["lr"], group["initial_lr"] = value, lr


def default_lr(config: SpanNormConfig, resume_from: Path | None) -> tuple[float, str]:
    """A run without --lr: a resumed one keeps its checkpoint's, a new one takes the studies' (`predicted_lr`)."""
    if resume_from is not None:
        return read_train_state(resume_from)["args"]["lr"], f"the learning rate of {resume_from}"
    return predicted_lr(config)


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


# A tokenizer trained by the main process, on its way to the others. Never the run folder itself: an earlier run's
# export there stays whole until this run exports its model and tokenizer together.
TOKENIZER_STAGING = ".tmp-tokenizer"


def prepare_data(args: TrainArguments, accelerator: Accelerator, output: Path, checkpoint: Path | None, config):
    """Documents -> tokenizer -> validation split -> packed rows (main process first, others read the cache)."""
    with accelerator.main_process_first():
        docs = load_documents(args.data, args.text_column, streaming=args.streaming)
        if args.streaming:
            train_docs, val_docs = split_stream(docs, args.val_size)
        else:
            train_docs, val_docs = split_documents(docs, args.val_size, args.seed)
    if checkpoint is not None:
        tokenizer = load_tokenizer(checkpoint / "tokenizer")
    elif args.tokenizer is not None:
        tokenizer = load_or_train_tokenizer(args.tokenizer, train_docs, config.vocab_size)
    else:  # train once, on the main process; the others load it from a staging folder, removed once they have
        staging = output / TOKENIZER_STAGING
        if accelerator.is_main_process:
            tokenizer = load_or_train_tokenizer(None, train_docs, config.vocab_size)
            with naming_disk_full(staging):
                tokenizer.save_pretrained(staging)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            tokenizer = load_tokenizer(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(staging)
    with accelerator.main_process_first():
        train_rows = pack_documents(train_docs, tokenizer, args.seq_len)
        val_rows = pack_documents(val_docs, tokenizer, args.seq_len) if val_docs is not None else None
    if not args.streaming:
        require_rows(train_rows, "training", args.seq_len)
    if val_rows is not None:
        require_rows(val_rows, "validation", args.seq_len, need=accelerator.num_processes)
    return tokenizer, train_rows, val_rows


@dataclass
class StepStats:
    """What one optimizer step measured, reduced over processes."""

    loss: float
    aux_loss: float | None
    grad_norm: float | None
    stopping: bool
    blocks: dict[str, float] = field(default_factory=dict)  # per-block diagnostics, on diagnostic steps


class Trainer:
    """One run. `__init__` checks every input, takes the output folder's lock, then sets up the output, data, model
    and optimizer (restoring a checkpoint when resuming); `train` is the loop of step / log / evaluate / checkpoint,
    and releases the lock; `finish` exports the model, or says how to resume a run stopped by a signal."""

    def __init__(self, args: TrainArguments, accelerator: Accelerator | None = None):
        self.args, self.config = args, load_config(args)
        self.accelerator = accelerator = accelerator or build_accelerator(args)
        self.world = accelerator.num_processes
        self.launch_note = check_launch(accelerator)  # unconnected processes are refused before any takes the lock
        self.pusher = self._hub_pusher()
        try:
            output = check_output(args)  # a folder that is not ours is refused before the lock is created in it
        except SetupError:  # unless a run starting there holds it: it locks the folder before marking it as its own
            raise_if_busy(args.output, flag="--output")
            raise
        accelerator.wait_for_everyone()  # every process has checked it before the main process writes the lock
        with ExitStack() as lock:
            if accelerator.is_main_process:  # the process that writes the run's files holds the lock
                lock.enter_context(locked_output_dir(output, flag="--output"))
            accelerator.wait_for_everyone()  # no process writes before it is held
            with remove_additions_on_failure(output) if accelerator.is_main_process else nullcontext():
                self._set_up()
            self.lock = lock.pop_all()  # held until `train` ends

    def _set_up(self) -> None:
        """Check the folder (under the lock) and the checkpoint to resume, claim the folder, read the data, build
        the model and optimizer, restore the checkpoint, start logging."""
        args, accelerator = self.args, self.accelerator
        self.checkpointer = Checkpointer(check_output(args), args.keep_last)
        self.output = self.checkpointer.output
        self.resume_from = self.checkpointer.find(args.resume, args.overwrite)
        if args.lr is None:
            args.lr, source = default_lr(self.config, self.resume_from)
            accelerator.print(f"--lr {args.lr:.3g}: {source}")
        saved = Checkpointer.check_compatible(self.resume_from, self.config, args) if self.resume_from else None
        notes = [self.launch_note]
        if saved and args.streaming and saved["num_processes"] != self.world:
            raise SetupError(f"cannot resume a streaming run of {saved['num_processes']} processes on {self.world}")
        if saved:
            notes.append(keep_global_batch(args, saved, self.world))
        for note in filter(None, notes):
            accelerator.print(note)
        accelerator.wait_for_everyone()  # every process has checked the output directory before it is claimed
        if accelerator.is_main_process:
            claim_output(self.output, args.overwrite)
            self.checkpointer.remove_leftovers()
        accelerator.wait_for_everyone()
        self.tokenizer, train_rows, self.val_rows = prepare_data(
            args, accelerator, self.output, self.resume_from, self.config
        )
        self.tokens_per_step = args.batch_size * args.grad_accum * self.world * args.seq_len
        self.max_steps = resolve_max_steps(args, self.tokens_per_step)
        self._build_model()
        self.progress = TrainProgress()
        self.stream = StreamRows(train_rows, accelerator.process_index, self.world) if args.streaming else None
        self.rows = None if args.streaming else ShuffledRows(train_rows, args.seed)
        if self.resume_from is not None:
            restored = (self.model, self.optimizer, self.scheduler, self.progress, self.stream)
            Checkpointer.load(accelerator, self.resume_from, *restored)
            set_peak_lr(self.scheduler, args.lr)
        self._start_logging(None if args.streaming else len(train_rows))

    def _hub_pusher(self) -> CheckpointPusher | None:
        """A bad repo id stops the run here; no token or no network only warns, later, and training goes on."""
        if not self.args.push_to_hub:
            return None
        try:
            check_repo_id(self.args.push_to_hub)
            return CheckpointPusher(self.args.push_to_hub) if self.accelerator.is_main_process else None
        except ValueError as err:
            raise SetupError(str(err)) from err

    def _build_model(self) -> None:
        args, config, tokenizer = self.args, self.config, self.tokenizer
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        warmup = int(args.warmup_steps * self.max_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
        set_seed(args.seed)
        self.attention = args.attn_implementation or default_attention(self.accelerator)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=self.attention)
        if args.activation_checkpointing:
            model.activation_checkpointing_enable()
        optimizer = make_optimizer(model, args)
        self.scheduler = get_scheduler(
            args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.moe = config.num_experts > 0

    def _start_logging(self, train_rows: int | None) -> None:
        """Trackers, the run's setup record, and the train_state.json every checkpoint carries."""
        args, accelerator, step = self.args, self.accelerator, self.progress.step
        if accelerator.is_main_process:
            if self.resume_from is None:  # an earlier run's records go only now, once this run's setup has worked
                remove_earlier_run(self.output)
            else:  # records past our starting step belong to a run that died after them
                truncate_metrics(self.output, step)
        self.train_state = {
            "num_processes": self.world,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "args": asdict(args),
        }
        run_config = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in asdict(args).items()}
        # TensorBoard likewise drops the events a killed run wrote past the checkpoint it is resumed from
        tensorboard = {"tensorboard": {"purge_step": step + 1}} if self.resume_from else {}
        accelerator.init_trackers("spannorm", config=run_config, init_kwargs=tensorboard)
        setup = {
            "event": "setup",
            "num_processes": self.world,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "mixed_precision": accelerator.mixed_precision,
            "attn_implementation": self.attention,
            "max_steps": self.max_steps,
            "tokens_per_step": self.tokens_per_step,
            "train_rows": train_rows,
            "val_rows": len(self.val_rows) if self.val_rows is not None else 0,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            **parameter_counts(self.model).as_record(),
        }
        accelerator.log(setup, step=step)
        accelerator.print(
            f"training {setup['params_total'] / 1e6:.2f}M parameters on {self.world} process(es) "
            f"({setup['distributed_type']}), {self.max_steps} steps of {self.tokens_per_step} tokens"
            + (f", resuming at step {step}" if self.resume_from else "")
        )

    # ------------------------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Train (`_train_loop`), then release the output folder's lock, however the loop ends."""
        with self.lock:
            return self._train_loop()

    def _train_loop(self) -> TrainResult:
        """Step, log, evaluate and checkpoint until max_steps, or until a signal asks to stop."""
        args, progress = self.args, self.progress
        checkpoint, last_saved = self.resume_from, progress.step if self.resume_from else None
        interrupted = False
        bar = tqdm(
            total=self.max_steps, initial=progress.step, disable=not self.accelerator.is_main_process, desc="train"
        )
        self.throughput = Throughput()
        self.model.train()
        with StopSignal() as stop, bar:  # an error closes the bar first: its line ends before the error's
            while progress.step < self.max_steps:
                stats = self.train_step(stop)
                self._stop_if_diverged(stats, checkpoint)
                bar.update(1)
                metrics = self.step_metrics(stats, bar)
                if self.val_rows is not None and self._due(args.eval_every):
                    metrics.update(self.evaluate())
                if metrics:
                    self.accelerator.log(metrics, step=progress.step)
                if self._due(args.save_every) or stats.stopping:
                    checkpoint, last_saved = self.save_checkpoint(), progress.step
                    if args.push_to_hub and progress.step < self.max_steps:
                        self.push(final=False)
                if stats.stopping:
                    interrupted = True
                    break
        if last_saved != progress.step:  # e.g. resumed at max_steps
            checkpoint = self.save_checkpoint()
        return self.finish(interrupted, checkpoint)

    def _stop_if_diverged(self, stats: StepStats, checkpoint: Path | None) -> None:
        """A non-finite loss or gradient norm stops the run before that state is logged or saved, so the last
        checkpoint stays the last good one (a gradient overflow the fp16 scaler skipped is not one: it retries)."""
        values = {"loss": stats.loss, "MoE aux loss": stats.aux_loss}
        if not self.accelerator.optimizer_step_was_skipped:
            values["gradient norm"] = stats.grad_norm
        bad = [f"{name} is {value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
        if not bad:
            return
        self.accelerator.end_training()  # flush the trackers: the metrics up to the last good step are kept
        then = "start again"
        if checkpoint is not None:
            ours = checkpoint.resolve().parent == self.checkpointer.root.resolve()
            then = f"--resume {'latest' if ours else checkpoint} continues from the last good checkpoint, {checkpoint}"
        raise DivergedError(
            f"the training {' and the '.join(bad)} at step {self.progress.step}: the run stopped without saving this "
            f"state; lower --lr (or check the data), then {then}"
        )

    def _due(self, every: int) -> bool:
        return self.progress.step % every == 0 or self.progress.step == self.max_steps

    def train_step(self, stop: "StopSignal") -> StepStats:
        """One optimizer step over `grad_accum` micro-batches per process; the loss is the global token mean."""
        args, accelerator, step = self.args, self.accelerator, self.progress.step
        batches = [self._micro_batch(step, m) for m in range(args.grad_accum)]
        targets = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
        targets = accelerator.reduce(targets.to(accelerator.device), reduction="sum")
        diagnose = args.diag_every > 0 and (step + 1) % args.diag_every == 0
        block_stats = self._block_forward(batches[0]) if diagnose else None
        lm_sum, aux_sum = self._forward_backward(batches, targets)
        grad_norms = block_grad_norms(self.unwrapped) if diagnose else None
        grad_norm = self._optimizer_step()
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.throughput.add(self.tokens_per_step)
        flags = torch.stack([lm_sum, aux_sum, torch.tensor(float(stop.signum > 0), device=accelerator.device)])
        flags = accelerator.reduce(flags, reduction="sum")
        return StepStats(
            loss=flags[0].item(),
            aux_loss=flags[1].item() / (args.grad_accum * self.world) if self.moe else None,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            stopping=flags[2].item() > 0,
            blocks=self._block_metrics(block_stats, grad_norms) if diagnose else {},
        )

    def _micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        args, accelerator = self.args, self.accelerator
        if self.stream is not None:
            batch = self.stream.take(args.batch_size)
        else:
            start = (step * args.grad_accum + micro) * args.batch_size * self.world
            batch = self.rows.take(start + accelerator.process_index * args.batch_size, args.batch_size)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def _forward_backward(self, batches: list[dict], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of every micro-batch (gradients synchronised on the last); the summed LM and aux losses."""
        args, accelerator = self.args, self.accelerator
        coef = self.config.router_aux_loss_coef if self.moe else 0.0  # dense configs have no MoE settings
        lm_sum = torch.zeros((), device=accelerator.device)
        aux_sum = torch.zeros((), device=accelerator.device)
        for m, batch in enumerate(batches):
            sync = nullcontext() if m == args.grad_accum - 1 else accelerator.no_sync(self.model)
            with sync:
                out = self.model(**batch, use_cache=False, num_items_in_batch=targets, output_router_logits=self.moe)
                lm = out.loss if out.aux_loss is None else out.loss - coef * out.aux_loss
                objective = lm * self.world  # gradients are averaged over processes; the loss is a global mean
                if out.aux_loss is not None:
                    objective = objective + coef * out.aux_loss / args.grad_accum
                accelerator.backward(objective)
            lm_sum += lm.detach()
            if out.aux_loss is not None:
                aux_sum += out.aux_loss.detach()
        return lm_sum, aux_sum

    def _optimizer_step(self) -> torch.Tensor | None:
        """Clip, step the optimizer and the schedule, zero the gradients; the gradient norm before clipping."""
        max_norm = self.args.max_grad_norm or math.inf  # 0: no clipping, but the norm is measured (and checked)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _block_forward(self, batch: dict) -> BlockStats:
        """An eager no-grad forward with hooks: they do not fire inside a torch.compile'd training forward."""
        with torch.no_grad(), BlockStats(self.unwrapped) as block_stats:
            self.unwrapped(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return block_stats

    def _block_metrics(self, block_stats: BlockStats, grad_norms: list[float]) -> dict[str, float]:
        accelerator, device = self.accelerator, self.accelerator.device
        rms = accelerator.reduce(torch.tensor(block_stats.output_rms, device=device), "mean")
        cos = accelerator.reduce(torch.tensor(block_stats.cosine, device=device), "mean")
        metrics = {}
        for i, (r, c, g) in enumerate(zip(rms.tolist(), cos.tolist(), grad_norms, strict=True)):
            metrics.update({f"block_{i}/output_rms": r, f"block_{i}/cosine": c, f"block_{i}/grad_norm": g})
        return metrics

    def step_metrics(self, stats: StepStats, bar) -> dict[str, float]:
        """The step's record: loss, lr, tokens, throughput on logging steps; block diagnostics when measured."""
        metrics = {}
        if self._due(self.args.log_every) or stats.stopping:
            metrics = {
                "loss": stats.loss,
                "lr": self.scheduler.get_last_lr()[0],
                "tokens": self.progress.tokens,
                "tokens_per_s": self.throughput.rate(),
            }
            if stats.aux_loss is not None:
                metrics["aux_loss"] = stats.aux_loss
            if stats.grad_norm is not None:
                metrics["grad_norm"] = stats.grad_norm
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        return {**metrics, **stats.blocks}

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.accelerator, self.model, self.val_rows, self.args.batch_size, self.args.eval_batches)

    def save_checkpoint(self) -> Path:
        state = {
            **self.train_state,
            **self.progress.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
        }
        return self.checkpointer.save(
            self.accelerator, self.progress.step, state, self.model, self.optimizer, self.config, self.tokenizer,
            self.stream,
        )  # fmt: skip

    def push(self, final: bool) -> None:
        push_model(
            self.accelerator, self.model, self.tokenizer, self.output, self.progress.step, self.pusher, final=final
        )

    def finish(self, interrupted: bool, checkpoint: Path | None) -> TrainResult:
        """Export the model (the step where the run's end products are written), or say how to resume."""
        accelerator, step = self.accelerator, self.progress.step
        if interrupted:
            accelerator.print(f"stopped by a signal at step {step}; resume with --resume latest ({checkpoint})")
        else:
            export_model(accelerator, self.model, self.tokenizer, self.output)
            accelerator.print(f"done: {step} steps; model exported to {self.output}")
            if self.args.push_to_hub:
                self.push(final=True)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(step, interrupted, self.output, checkpoint, self.model)


def train(args: TrainArguments, accelerator: Accelerator | None = None) -> TrainResult:
    """Run (or resume) pretraining as described by `args`; `accelerator` defaults to `build_accelerator(args)`."""
    return Trainer(args, accelerator).train()


@command
def main(argv: list[str] | None = None) -> int:
    """`spannorm-train` / scripts/train.py: 0 when done, 130 when stopped by a signal, 2 (one `error:` line) for
    bad input, a diverged run or a full disk."""
    args = parse_args(argv)
    try:
        result = train(args)
    except Exception as err:  # a full disk reported by a writer we do not wrap (e.g. TensorBoard's)
        if isinstance(err, DiskFullError) or not is_disk_full(err):
            raise
        raise DiskFullError(args.output) from err
    return 130 if result.interrupted else 0
