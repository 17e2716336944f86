"""One run of the norm comparison behind the README's "Does SpanNorm work?": a tiny byte-level LM trained in-process,
and the JSONL record it leaves.

Every arm (a `norm_scheme`, or a SpanNorm scaling candidate) trains with everything else identical: for a given
seed the same init seed, the same training batches in the same order, the same AdamW + warmup/cosine schedule,
the same number of tokens, and the same fixed validation windows. The loop is deliberately lean (no Accelerate,
no tokenizer training): a grid is hundreds of runs of a few seconds each on CPU, where per-run setup would
dominate. Tokens are raw UTF-8 bytes (vocab 256, like the reference prototype), so any text file works as data
and nothing is trained before the first step.

Results are one JSON line per finished run, appended and fsync'ed (`compare_norms.run_grid`), so an interrupted grid
resumes where it stopped; `report.write_report` turns the JSONL into `table.md` and the PNG plots.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spannorm_hf.configuration_spannorm import SpanNormConfig
from spannorm_hf.modeling_spannorm import SpanNormForCausalLM
from spannorm_hf.training.corpus import DEFAULT_CORPUS
from spannorm_hf.training.diagnostics import BlockStats, block_grad_norms, decoder_blocks

from grids import ARMS, Grid, RunSpec

VOCAB = 256  # byte-level tokens
SPIKE_NATS = 1.0  # a training loss this far above its running minimum (after warmup) counts as a loss spike
UNRECOVERED_NATS = 0.5  # a run whose training loss ends this far above its best has diverged


def is_diverged(record: dict) -> bool:
    """Non-finite loss, or a run that ended well above its own best training loss (a blow-up it never recovered
    from). Transient spikes that recover are counted separately (`spike`)."""
    curve = [v for v in record["train_curve"] if v is not None]
    if record["nonfinite"] or not curve:
        return True
    width = max(1, len(curve) // 10)  # compare window means, so batch noise does not look like a blow-up
    windows = [statistics.fmean(curve[i : i + width]) for i in range(len(curve) - width + 1)]
    return windows[-1] > min(windows) + UNRECOVERED_NATS


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_bytes(path: str | os.PathLike | None = None) -> tuple[torch.Tensor, str]:
    """The text as a 1-D tensor of byte ids, and a fingerprint of it. `None` reads the embedded corpus;
    `.gz` files are decompressed."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} is not a file")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if not raw:
        raise ValueError(f"--data {str(path)!r} is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long(), hashlib.sha256(raw).hexdigest()[:16]


def split_data(data: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Last 5% for validation; both parts must hold enough windows for the grid."""
    cut = int(len(data) * 0.95)
    train, val = data[:cut], data[cut:]
    need = grid.eval_batches * grid.batch_size * (grid.seq_len + 1)
    if len(val) < need or len(train) < 4 * need:
        raise ValueError(
            f"data has {len(data)} bytes; the {grid.name!r} grid needs at least {need * 100 // 5} "
            f"(validation is the last 5% and must hold {grid.eval_batches} batches of {grid.batch_size} x "
            f"{grid.seq_len + 1} bytes)"
        )
    return train, val


def val_batches(val: torch.Tensor, grid: Grid) -> list[torch.Tensor]:
    """Fixed, evenly spaced validation windows of `seq_len + 1` bytes: the same for every run."""
    n = grid.eval_batches * grid.batch_size
    stride = (len(val) - grid.seq_len - 1) // n
    windows = torch.stack([val[i * stride : i * stride + grid.seq_len + 1] for i in range(n)])
    return list(windows.split(grid.batch_size))


def train_batches(train: torch.Tensor, grid: Grid, seed: int) -> Iterable[torch.Tensor]:
    """Random windows drawn from a generator seeded by `seed` alone: identical for every arm."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    offsets = torch.arange(grid.seq_len + 1)
    for _ in range(grid.steps):
        starts = torch.randint(0, len(train) - grid.seq_len - 1, (grid.batch_size,), generator=gen)
        yield train[starts[:, None] + offsets]


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------


def build_model(spec: RunSpec, grid: Grid) -> SpanNormForCausalLM:
    """The arm's model, initialised from `spec.seed`."""
    arm = ARMS[spec.arm]
    width, heads, ffn = grid.dims(spec.width)
    moe = {"num_experts_per_tok": grid.experts_per_tok, "moe_intermediate_size": ffn // grid.experts_per_tok}
    rule = {} if arm.mup_base_width is None else {"mup_base_width": arm.mup_base_width}
    config = SpanNormConfig(  # MoE: the active FFN width (top-k x expert width) equals the dense FFN's
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=heads,
        max_position_embeddings=grid.seq_len,
        norm_scheme=arm.norm_scheme,
        residual_scale=arm.residual_scale,
        branch_init_gain=arm.branch_init_gain,
        num_experts=spec.experts,
        **(moe if spec.experts else {}),
        **rule,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(spec.seed)
    model = SpanNormForCausalLM(config)
    for layer in decoder_blocks(model):  # experiment-only variants, never part of the model file
        if arm.block is not None:
            layer.scheme = layer.scheme._replace(block=arm.block)
            layer.clean_scale = spec.layers**-0.5
        if arm.learnable_skip:
            layer.skip_scale = nn.Parameter(torch.tensor(float(layer.skip_scale)))
    return model


def _loss(model: SpanNormForCausalLM, window: torch.Tensor) -> torch.Tensor:
    moe = model.config.num_experts > 0
    out = model(input_ids=window[:, :-1], output_router_logits=moe, use_cache=False)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), window[:, 1:].flatten())
    if moe:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


def _diagnostics(model: SpanNormForCausalLM, window: torch.Tensor) -> dict:
    """Per-block output RMS, input/output cosine and gradient norm on one fixed validation batch."""
    with BlockStats(model) as stats:
        _loss(model, window).backward()
    grads = block_grad_norms(model)
    model.zero_grad(set_to_none=True)
    return {"rms": stats.output_rms, "cos": stats.cosine, "grad": grads}


@torch.no_grad()
def _val_loss(model: SpanNormForCausalLM, batches: list[torch.Tensor]) -> float:
    return sum(
        F.cross_entropy(
            model(input_ids=b[:, :-1], use_cache=False).logits.flatten(0, 1).float(), b[:, 1:].flatten()
        ).item()
        for b in batches
    ) / len(batches)


PRECISIONS = ("fp32", "bf16-autocast", "bf16-params")


def _bf16_params(model: SpanNormForCausalLM) -> SpanNormForCausalLM:
    """FSDP2 with `MixedPrecisionPolicy(param_dtype=bfloat16)` on a one-process gloo group: every block computes
    with bf16 weights while the optimizer keeps fp32 ones, as a sharded GPU run does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # removed by train_one
    mesh = init_device_mesh("cpu", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_blocks(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _fp32_copy(model: nn.Module, spec: RunSpec, grid: Grid) -> SpanNormForCausalLM:
    """The trained weights in a plain fp32 model (gathered from FSDP's shards where sharded)."""
    plain = build_model(spec, grid)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    plain.load_state_dict(state)
    return plain.eval()


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_one(spec: RunSpec, grid: Grid, train: torch.Tensor, val: list[torch.Tensor], precision: str = "fp32") -> dict:
    """Train one run and return its JSONL record. `precision` (one of PRECISIONS) other than fp32 trains under
    bf16 autocast or with bf16 parameters, and adds the trained weights' validation loss in fp32 to the record."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    t0, cpu0 = time.time(), time.process_time()
    model = build_model(spec, grid)
    init_diag = _diagnostics(model, val[0])
    if precision == "bf16-params":
        model = _bf16_params(model)

    def compute() -> contextlib.AbstractContextManager:
        on = precision == "bf16-autocast"
        return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, int(grid.warmup_frac * grid.steps))

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / grid.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses, grad_norms = [], []
    nonfinite, max_jump, running_min = False, 0.0, math.inf
    model.train()
    for step, window in enumerate(train_batches(train, grid, spec.seed)):
        with compute():
            loss = _loss(model, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        value = loss.item()
        losses.append(value)
        if not (math.isfinite(value) and math.isfinite(grad_norms[-1])):
            nonfinite = True
            break
        if step >= warmup:
            max_jump = max(max_jump, value - running_min)
        running_min = min(running_min, value)
        opt.step()
        sched.step()
    model.eval()
    with compute():
        val_loss = math.nan if nonfinite else _val_loss(model, val)
    extra = {}
    if precision != "fp32":
        model = _fp32_copy(model, spec, grid)
        if precision == "bf16-params":
            torch.distributed.destroy_process_group()
        extra = {"precision": precision, "val_loss_fp32": _finite_or_none(_val_loss(model, val))}
    end_diag = _diagnostics(model, val[0]) if math.isfinite(val_loss) else None
    finite_gn = [g for g in grad_norms if math.isfinite(g)]
    every = max(1, grid.steps // 50)
    record = {
        **dataclasses.asdict(spec),
        "key": spec.key,
        "grid": grid.name,
        "shape": grid.shape(),
        "val_loss": _finite_or_none(val_loss),
        "nonfinite": nonfinite,
        "spike": max_jump > SPIKE_NATS,
        "max_jump": max_jump,
        "train_curve": [_finite_or_none(statistics.fmean(losses[i : i + every])) for i in range(0, len(losses), every)],
        "curve_every": every,
        "grad_norm": {
            "mean": statistics.fmean(finite_gn) if finite_gn else None,
            "max": max(finite_gn) if finite_gn else None,
            "final": finite_gn[-1] if finite_gn else None,
            "clipped_frac": sum(g > 1.0 for g in finite_gn) / max(1, len(finite_gn)),
        },
        "skip_scale_final": [float(torch.as_tensor(layer.skip_scale).detach()) for layer in decoder_blocks(model)],
        "init": init_diag,
        "end": end_diag,
        "seconds": round(time.time() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),  # the run's cost, whatever else shares the cores
        **extra,
    }
    record["diverged"] = is_diverged(record)
    return record


# ---------------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """All complete records of a results JSONL, one per run key (the last wins; a torn line from a crash is
    ignored)."""
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        rec["diverged"] = is_diverged(rec)  # recomputed, so records written by older versions agree
        records[rec["key"]] = rec
    return list(records.values())


def _append(path: Path, record: dict) -> None:
    """One O_APPEND write per record, fsync'ed: shards writing the same file never interleave lines."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
