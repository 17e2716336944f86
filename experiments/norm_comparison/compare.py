"""The norm-scheme comparison behind the README's "Does SpanNorm work?": many tiny byte-level LM runs in one process.

Every arm (a `norm_scheme`, or a SpanNorm scaling candidate) trains with everything else identical: for a given
seed the same init seed, the same training batches in the same order, the same AdamW + warmup/cosine schedule,
the same number of tokens, and the same fixed validation windows. The loop is deliberately lean (no Accelerate,
no tokenizer training): a grid is hundreds of runs of a few seconds each on CPU, where per-run setup would
dominate. Tokens are raw UTF-8 bytes (vocab 256, like the reference prototype), so any text file works as data
and nothing is trained before the first step.

Results are one JSON line per finished run, appended and fsync'ed, so an interrupted grid resumes where it
stopped; `write_report` turns the JSONL into `table.md` and the PNG plots.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spannorm_hf.configuration_spannorm import SpanNormConfig
from spannorm_hf.files import atomic_write_bytes, atomic_write_text
from spannorm_hf.modeling_spannorm import SpanNormForCausalLM
from spannorm_hf.training.corpus import DEFAULT_CORPUS
from spannorm_hf.training.diagnostics import BlockStats, block_grad_norms, decoder_blocks

VOCAB = 256  # byte-level tokens
SPIKE_NATS = 1.0  # a training loss this far above its running minimum (after warmup) counts as a loss spike
UNRECOVERED_NATS = 0.5  # a run whose training loss ends this far above its best has diverged
STUCK_NATS = 0.05  # a run ending within this of the unigram (byte-frequency) loss did not train


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
# Arms: what varies between runs. Everything not named here is the same for every arm.
# ---------------------------------------------------------------------------------------------------------


def _b2t_block(layer: nn.Module, x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """SPEC section 6 "B2T-like" reading: y = N_a(a x + Attn(u)); x' = N_f(a x + y + FFN(y))."""
    a = layer.skip_scale
    y = layer.post_attention_layernorm(a * x + attn(layer.input_layernorm(x)))
    return layer.post_feedforward_layernorm(a * x + y + layer.mlp(y))


def _clean_block(layer: nn.Module, x: torch.Tensor, attn: Callable) -> torch.Tensor:
    """SPEC section 6 "clean across blocks": h = N_in(x); y = N_a(h + Attn(h)); x' = x + c N_o(y + FFN(y)),
    c = 1/sqrt(L) (stored on the layer as `clean_scale`). The skip x -> x' never passes a norm."""
    h = layer.input_layernorm(x)
    y = layer.post_attention_layernorm(h + attn(h))
    return x + layer.clean_scale * layer.post_feedforward_layernorm(y + layer.mlp(y))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One contender. `residual_scale`/`branch_init_gain` are SpanNormConfig values (numbers or named depth rules),
    so whatever wins is one config field away for a user. Experiment-only, used by the old "full" grid alone and
    never by new grids: `learnable_skip` makes the skip scale a trained per-layer scalar; `block` swaps in an
    experiment-only block (SPEC section 6 readings), built on `norm_scheme`'s layers so it owns the norms that block
    uses."""

    name: str
    norm_scheme: str
    residual_scale: float | str = "auto"  # pins DeepNet's a for span arms (the default when the old grids ran)
    branch_init_gain: float | str | None = "auto"
    learnable_skip: bool = False
    block: Callable | None = None
    label: str = ""


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("pre", "pre", label="PreNorm"),
        Arm("post", "post", label="PostNorm"),
        Arm("deepnorm", "deepnorm", label="DeepNorm"),
        Arm("peri", "peri", label="Peri-LN"),
        Arm("hybrid", "hybrid", label="HybridNorm"),
        Arm("span", "span", label="SpanNorm, DeepNet a,b (the default before the depth study)"),
        Arm("span-plain", "span", 1.0, None, label="SpanNorm, a=1, plain init"),
        Arm("span-init", "span", 1.0, "auto", label="SpanNorm, a=1, b=(8L)^-1/4"),
        Arm("span-learn", "span", "auto", "auto", learnable_skip=True, label="SpanNorm, DeepNet a,b, a learnable"),
        Arm("span-b2t", "span", block=_b2t_block, label="SPEC 6: B2T-like, DeepNet a,b"),
        Arm("span-clean", "peri", block=_clean_block, label="SPEC 6: clean across blocks, c=1/sqrt(L)"),
        # Depth rules (issue 10), both with DeepNet's init gain b like `span`, so the three SpanNorm arms of the
        # depth grid differ in `residual_scale` alone.
        Arm("span-mup", "span", "depth_mup", "deepnet", label="SpanNorm, a=(2L)^1/2 (depth-muP), b=(8L)^-1/4"),
        Arm("span-completep", "span", "completep", "deepnet", label="SpanNorm, a=2L (CompleteP; default), b=(8L)^-1/4"),
    )
}


# ---------------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run; its `key` identifies it in the JSONL."""

    arm: str
    layers: int
    experts: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}|L{self.layers}|E{self.experts}|lr{self.lr:g}|s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Section:
    """A block of the grid: every arm x layers x lr x seed, dense (`experts=0`) or MoE. `seeds` overrides the
    grid's seeds (for a cheap extra learning rate measured on fewer seeds)."""

    arms: tuple[str, ...]
    layers: tuple[int, ...]
    lrs: tuple[float, ...]
    experts: int = 0
    seeds: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """Model/training shape shared by every run, plus the sections to run, in priority order.

    `order="seed"` runs seed-major over all sections (a grid cut short still covers every section with the same
    seeds); `order="section"` finishes each section, seed-major within it, before the next (a grid that spans
    sessions gets its decisive cells on every seed first)."""

    name: str
    sections: tuple[Section, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    order: str = "seed"
    width: int = 32
    heads: int = 2
    ffn: int = 88
    experts_per_tok: int = 2
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 200
    warmup_frac: float = 0.1
    eval_batches: int = 8
    sweep_layers: int = 12  # depth of the LR sweep that picks each arm's best LR
    verdict: str = "scaling"  # the pre-registered verdict the report ends with: "scaling", "depth" or "none"

    def runs(self) -> list[RunSpec]:
        if self.order not in ("seed", "section"):
            raise ValueError(f"Grid.order={self.order!r} is invalid: must be 'seed' or 'section'")
        seen, out = set(), []
        if self.order == "seed":
            passes = [(seed, self.sections) for seed in self.seeds]
        else:
            passes = [(seed, (sec,)) for sec in self.sections for seed in self.seeds]
        for seed, sections in passes:
            for sec in sections:
                if seed not in (sec.seeds or self.seeds):
                    continue
                for layers in sec.layers:
                    for lr in sec.lrs:
                        for arm in sec.arms:
                            spec = RunSpec(arm, layers, sec.experts, lr, seed)
                            if spec.key not in seen:
                                seen.add(spec.key)
                                out.append(spec)
        return out

    def shape(self) -> dict:
        """The fields every record of this grid must share (checked when resuming). The run order is not one of
        them: it changes which runs come first, not what a run is."""
        skip = {"name", "sections", "seeds", "order", "verdict"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


MAIN_ARMS = ("pre", "post", "deepnorm", "peri", "hybrid", "span")
LRS = (4e-3, 8e-3, 1.6e-2)
DEEP_LRS = (2e-3, 4e-3, 8e-3)  # deeper models want lower learning rates

DEPTH_ARMS = ("pre", "peri", "span", "span-mup", "span-completep")
DEPTH_RULE_ARMS = ("span", "span-mup", "span-completep")  # the SpanNorm rules the default is chosen among
DEPTH_LRS = (2e-3, 4e-3, 8e-3)  # around 4e-3, every arm's best at width 128, L=12 in the "wide" grid
DEPTH_EDGE_LRS = (1e-3, 1.6e-2)  # one x2 step beyond each end
VERDICT_DEPTHS = (6, 12, 24)  # the dense depths the default is chosen on; L=48 and MoE then test the choice
VERDICT_SEEDS = (0, 1, 2)
# The revisit (added 2026-12-01, after L = 48's seed 0 and before its seed 1 and its edge learning rates ran): seed 0
# got depth-muP, the verdict's winner, stuck at L = 48 at its L = 6 best (8e-3). The same rule is then applied over
# L = 6 to 48 on seeds 0 and 1; once it is decided, its winner becomes the default if it differs. Decided
# 2026-12-02 after 209 runs: CompleteP (mean transfer error 0.014; depth-muP stuck at 2e-3 at L = 48, seed 1).
REVISIT_DEPTHS, REVISIT_SEEDS = VERDICT_DEPTHS + (48,), (0, 1)

# The depth grid (issue 10) at the "wide" grid's width 128 and protocol (200 steps x 16 x 64 bytes): dense L = 6,
# 12, 24, 48 and MoE (4 experts, top-2) at L = 12; PreNorm, Peri-LN and SpanNorm with a = (2L)^(1/4) (today's
# default), (2L)^(1/2) (depth-muP) and 2L (CompleteP), all three with DeepNet's b, so they differ in one field.
# Sections in priority order (`order="section"`): each finishes on every seed before the next starts.
#   1. what decides the default: every arm at L = 6, 12, 24 at the three central learning rates, seeds 0, 1;
#   2. the edges that seed 0 of section 1 showed are needed (reordered 2026-12-01, after 52 runs; the order changes
#      which runs come first, not what a run is): 1.6e-2 for depth-muP and CompleteP, whose best sat at 8e-3 at
#      every verdict depth, and 1e-3 for PreNorm and Peri-LN, whose best sat at 2e-3 at L = 12 and 24;
#   3. a third seed at the cells that decide the default (the SpanNorm rules at L = 6, 12, 24, edges included);
#   4. the brackets the verdict asks for (added 2026-12-01 as they appeared, after 105 and 141 runs): 1.6e-2 for
#      DeepNet's rule at L = 6 (best at 8e-3) and 3.2e-2 for CompleteP at L = 24 and, once the third seed moved its
#      best there to 1.6e-2, at L = 6;
#   5. L = 48 and MoE L = 12, same learning rates: L = 48 seed 0, MoE seeds 0 and 1, then L = 48 seed 1 (a session
#      that ends mid-section has every depth on one seed, and MoE's 1/3 the cost of L = 48 buys its second seed first);
#   6. the remaining edge learning rates, seeds 0, 1: the SpanNorm rules' at L = 48 first (the revisit's brackets,
#      see REVISIT_DEPTHS), then everywhere else.
#   Reordered 2026-12-02 (after 185 runs, before any L = 48 seed 1 run): the revisit's runs come right after MoE's
#   seed 1: the three rules' seed 1 at L = 48, then the brackets L = 48's seed 0 asked for (1e-3 for DeepNet's rule,
#   best at 2e-3; 1.6e-2 for CompleteP, best at 8e-3), then PreNorm's and Peri-LN's seed 1 at L = 48, then the
#   other brackets seed 0 showed are needed, before the edges nobody's best is near. Added after 199 runs, when
#   CompleteP's 1.6e-2 at L = 48 came out best on seed 0 (2.106): its bracket 3.2e-2 there, seeds 0 and 1, right
#   after 1.6e-2 (the revisit needs every best bracketed). After 209 runs, with MoE's seed 1 in: its brackets
#   first (PreNorm's best moved to 2e-3, so 1e-3 there, not 1.6e-2; Peri-LN's 1e-3 added).
# Cost, measured 2026-12-01 (CPU seconds of one 200-step run on one thread, from 20- and 40-step runs, so jobs sharing
# the cores do not count): L=6 48 s, L=12 105 s, L=24 218 s, L=48 350-430 s (noisy; ~linear in L), MoE L=12 138 s.
# Sections 1-3: 143 runs, about 5 h on one idle core; all: 283 runs, about 14 h. On the shared 2-core VM the wall
# time was 2-6x the CPU time.
DEPTH_SECTIONS = (
    Section(DEPTH_ARMS, VERDICT_DEPTHS, DEPTH_LRS, seeds=(0, 1)),
    Section(("span-mup", "span-completep"), VERDICT_DEPTHS, (1.6e-2,), seeds=(0, 1)),
    Section(("pre", "peri"), (12, 24), (1e-3,), seeds=(0, 1)),
    Section(DEPTH_RULE_ARMS, VERDICT_DEPTHS, DEPTH_LRS, seeds=(2,)),
    Section(("span-mup", "span-completep"), VERDICT_DEPTHS, (1.6e-2,), seeds=(2,)),
    Section(("span",), (6,), (1.6e-2,), seeds=(0, 1)),
    Section(("span-completep",), (6, 24), (3.2e-2,), seeds=(0, 1)),
    Section(DEPTH_ARMS, (48,), DEPTH_LRS, seeds=(0,)),
    Section(DEPTH_ARMS, (12,), DEPTH_LRS, experts=4, seeds=(0,)),
    Section(DEPTH_ARMS, (12,), DEPTH_LRS, experts=4, seeds=(1,)),
    Section(DEPTH_RULE_ARMS, (48,), DEPTH_LRS, seeds=(1,)),
    Section(("span",), (48,), (1e-3,), seeds=(0, 1)),  # the revisit's brackets that seed 0 showed are needed
    Section(("span-completep",), (48,), (1.6e-2,), seeds=(0, 1)),
    Section(("span-completep",), (48,), (3.2e-2,), seeds=(0, 1)),  # added when 1.6e-2 came out best on seed 0
    Section(("pre", "peri"), (48,), DEPTH_LRS, seeds=(1,)),
    # The brackets the baselines and MoE need: MoE's depth-muP and CompleteP (best at 8e-3) and its PreNorm and
    # Peri-LN (best at 2e-3 on two seeds); PreNorm at L = 6 and the baselines at L = 48 (best at 2e-3).
    Section(("span-mup", "span-completep"), (12,), (1.6e-2,), experts=4, seeds=(0, 1)),
    Section(("pre", "peri"), (12,), (1e-3,), experts=4, seeds=(0, 1)),
    Section(("pre",), (6,), (1e-3,), seeds=(0, 1)),
    Section(("pre", "peri"), (48,), (1e-3,), seeds=(0, 1)),
    Section(DEPTH_RULE_ARMS, (48,), DEPTH_EDGE_LRS, seeds=(0, 1)),  # the revisit's other brackets at L = 48
    Section(DEPTH_ARMS, VERDICT_DEPTHS + (48,), DEPTH_EDGE_LRS, seeds=(0, 1)),
    Section(DEPTH_ARMS, (12,), DEPTH_EDGE_LRS, experts=4, seeds=(0, 1)),
)

# The full grid, in seed-major order: the L=12 LR sweep of every scheme, SpanNorm's scaling candidates, L=6 dense and
# MoE and L=24 dense each over three learning rates, a learnable skip scale and SPEC section 6's other readings, then
# a fourth learning rate wherever an arm's best sat at the edge of its range. Every cell has three seeds except six
# single-seed probes at the far ends of the L=12 sweep.
GRIDS: dict[str, Grid] = {
    "full": Grid(
        "full",
        sections=(
            Section(MAIN_ARMS, (12,), LRS),
            Section(MAIN_ARMS, (12,), (2e-3,), seeds=(0,)),
            Section(("peri",), (12,), (3.2e-2, 6.4e-2)),  # still improving at 1.6e-2: widen the sweep up
            Section(("span",), (12,), (3.2e-2,), seeds=(0,)),
            Section(("peri",), (12,), (1.28e-1,), seeds=(0,)),
            Section(("post", "deepnorm"), (12,), (1e-3, 2e-3)),  # they fail from lr 4e-3 on: widen it down
            Section(("span-plain", "span-init"), (12,), LRS),
            Section(MAIN_ARMS + ("span-init",), (6,), LRS),
            Section(MAIN_ARMS + ("span-init",), (6,), LRS, experts=4),
            Section(MAIN_ARMS + ("span-init",), (24,), DEEP_LRS),
            Section(("span-learn", "span-b2t", "span-clean"), (12,), LRS),  # a learnable a; SPEC section 6
            # Widen the sweeps where an arm's best learning rate sat at an edge of its range.
            Section(("post", "deepnorm", "hybrid", "span", "span-init"), (24,), (1e-3,)),
            Section(("peri",), (24,), (1.6e-2,)),
            Section(("deepnorm", "span-init"), (6,), (2e-3,)),
            Section(("peri",), (6,), (3.2e-2,)),
            Section(("pre", "post", "deepnorm"), (6,), (2e-3,), experts=4),
            Section(("peri", "span", "span-init"), (6,), (3.2e-2,), experts=4),
        ),
    ),
    "quick": Grid(
        "quick",
        sections=(
            Section(MAIN_ARMS + ("span-plain",), (4,), (2e-3, 1.6e-2)),
            Section(("pre", "span"), (2, 8), (2e-3, 1.6e-2)),
            Section(("pre", "span"), (4,), (2e-3, 1.6e-2), experts=4),
        ),
        seeds=(0, 1),
        width=32,
        steps=100,
        seq_len=32,
        batch_size=8,
        eval_batches=2,
        sweep_layers=4,
    ),
    # Is what the full grid shows a property of width 32? The same L=12 runs at the prototype's width 128 (about 4x
    # the cost per run; 45 runs, 34 min on 2 idle cores).
    "wide": Grid(
        "wide",
        sections=(Section(("pre", "post", "peri", "span", "span-init"), (12,), (2e-3, 4e-3, 8e-3)),),
        width=128,
        heads=4,
        ffn=344,
    ),
    # Issue 10: does the best learning rate hold from L=6 to L=48? See the comment above DEPTH_SECTIONS.
    "depth": Grid(
        "depth",
        sections=DEPTH_SECTIONS,
        seeds=(0, 1, 2),
        order="section",
        width=128,
        heads=4,
        ffn=344,
        verdict="depth",
    ),
    # Issue 10 item 5: does the gap to PreNorm hold over a 4x longer run, and do stuck runs ever leave the plateau?
    # L = 24, 800 steps, seed 0; learning rates chosen 2026-12-01 from the depth grid's seed-0 runs at L = 24 (the
    # best of 2e-3/4e-3/8e-3 per arm): PreNorm and Peri-LN at 2e-3, the two best SpanNorm rules at theirs (DeepNet
    # 4e-3, depth-muP 8e-3), and DeepNet at 8e-3, where seed 0 stuck at the unigram loss after 200 steps. Added
    # after the depth grid's seeds 0 and 1 at L = 24 (105 runs): CompleteP at its two-seed best there, 1.6e-2.
    # Added 2026-12-02, when CompleteP became the default and was the weakest SpanNorm rule here at 1.6e-2: CompleteP
    # at 8e-3, its near-tie at L = 24 over three seeds (2.170 vs 2.168) and its best at L = 12.
    "depth-long": Grid(
        "depth-long",
        sections=(
            Section(("pre", "peri"), (24,), (2e-3,)),
            Section(("span",), (24,), (4e-3, 8e-3)),
            Section(("span-mup",), (24,), (8e-3,)),
            Section(("span-completep",), (24,), (1.6e-2, 8e-3)),
        ),
        seeds=(0,),
        width=128,
        heads=4,
        ffn=344,
        steps=800,
        verdict="none",  # a follow-up at chosen learning rates: no learning-rate sweep to decide on
    ),
    # Issue 10 item 5, second half: does a run that is stuck at the unigram loss ever leave the plateau? The two
    # settings of the depth grid where seed 0 stuck at L = 24 (DeepNet at 8e-3, depth-muP at 1.6e-2), with the
    # 200-step runs' 20 warmup steps (warmup_frac 0.025 of 800) so the start is the one that stuck, then 4x the
    # steps: the learning rate stays near its peak through step 200 instead of decaying to zero.
    "depth-plateau": Grid(
        "depth-plateau",
        sections=(Section(("span",), (24,), (8e-3,)), Section(("span-mup",), (24,), (1.6e-2,))),
        seeds=(0,),
        width=128,
        heads=4,
        ffn=344,
        steps=800,
        warmup_frac=0.025,
        verdict="none",
    ),
    # A third seed for the new default where it was decided (added 2026-12-02, after the revisit chose CompleteP on
    # seeds 0 and 1): CompleteP at L = 48, the depth grid's protocol, seed 2, at every learning rate at or below its
    # best. Does any seed get stuck there? A follow-up in its own folder, so the verdict's data stay as registered.
    "depth-seed2": Grid(
        "depth-seed2",
        sections=(Section(("span-completep",), (48,), (1.6e-2, 8e-3, 4e-3, 2e-3)),),
        seeds=(2,),
        width=128,
        heads=4,
        ffn=344,
        verdict="none",
    ),
}


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
    moe = {"num_experts_per_tok": grid.experts_per_tok, "moe_intermediate_size": grid.ffn // grid.experts_per_tok}
    config = SpanNormConfig(  # MoE: the active FFN width (top-k x expert width) equals the dense FFN's
        vocab_size=VOCAB,
        hidden_size=grid.width,
        intermediate_size=grid.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=grid.heads,
        max_position_embeddings=grid.seq_len,
        norm_scheme=arm.norm_scheme,
        residual_scale=arm.residual_scale,
        branch_init_gain=arm.branch_init_gain,
        num_experts=spec.experts,
        **(moe if spec.experts else {}),
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


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_one(spec: RunSpec, grid: Grid, train: torch.Tensor, val: list[torch.Tensor]) -> dict:
    """Train one run and return its JSONL record."""
    t0, cpu0 = time.time(), time.process_time()
    model = build_model(spec, grid)
    init_diag = _diagnostics(model, val[0])
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, int(grid.warmup_frac * grid.steps))

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / grid.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses, grad_norms = [], []
    nonfinite, max_jump, running_min = False, 0.0, math.inf
    model.train()
    for step, window in enumerate(train_batches(train, grid, spec.seed)):
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
    val_loss = math.nan if nonfinite else _val_loss(model, val)
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
    }
    record["diverged"] = is_diverged(record)
    return record


# ---------------------------------------------------------------------------------------------------------
# The grid, resumable
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


def run_grid(
    grid: Grid,
    out_dir: Path,
    data: str | os.PathLike | None = None,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> Path:
    """Run every not-yet-recorded run of `grid` into `out_dir/runs.jsonl`, then write the report.

    `shard=(i, n)` takes every n-th pending run starting at i, so n processes can share a grid (and the cores)."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is invalid: need 0 <= index < count")
    tokens, fingerprint = load_bytes(data)
    train, val = split_data(tokens, grid)
    val = val_batches(val, grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "runs.jsonl"
    done = {}
    for rec in read_records(path):
        if rec["shape"] != grid.shape() or rec.get("data") != fingerprint:
            raise ValueError(
                f"{path} holds runs of another grid or data (run {rec['key']!r}: grid {rec['grid']!r}, data "
                f"{rec.get('data')!r}); pass a fresh --out to start a new comparison"
            )
        done[rec["key"]] = rec
    todo = [spec for spec in grid.runs() if spec.key not in done][index::count]
    log(
        f"[compare] grid {grid.name!r}: {len(grid.runs())} runs, {len(done)} already in {path}, "
        f"{len(todo)} to go in shard {index}/{count}"
    )
    t0 = time.time()
    for i, spec in enumerate(todo, 1):
        record = train_one(spec, grid, train, val)
        record["data"] = fingerprint
        _append(path, record)
        eta = (time.time() - t0) / i * (len(todo) - i)
        val_loss = record["val_loss"]
        shown = f"{val_loss:.3f}" if val_loss is not None else "nan"
        log(
            f"[compare] {i}/{len(todo)} {spec.key}: val {shown}{' DIVERGED' if record['diverged'] else ''} "
            f"({record['seconds']:.0f}s, eta {eta / 60:.0f} min)"
        )
    write_report(out_dir, grid, data)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Aggregation and the markdown table
# ---------------------------------------------------------------------------------------------------------


def _group(records: Iterable[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for rec in records:
        groups[(rec["arm"], rec["layers"], rec["experts"], rec["lr"])].append(rec)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def score(runs: list[dict]) -> float:
    """Mean validation loss over seeds; a run that went non-finite makes the setting unusable (inf)."""
    if any(r["val_loss"] is None for r in runs):
        return math.inf
    return statistics.fmean(r["val_loss"] for r in runs)


def cell(runs: list[dict]) -> str:
    """`mean ± std` over seeds of the finite runs, with the count of diverged seeds and of seeds with a spike."""
    vals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
    mean, std = _mean_std(vals)
    text = (f"{mean:.3f} ± {std:.3f}" if len(vals) > 1 else f"{mean:.3f} (n=1)") if vals else "—"
    flags = []
    for flag, count in (
        ("div", sum(r["diverged"] for r in runs)),
        ("stuck", sum(r.get("stuck", False) and not r["diverged"] for r in runs)),
        ("spk", sum(r["spike"] and not r["diverged"] for r in runs)),
    ):
        if count:
            flags.append(f"{count}/{len(runs)} {flag}")
    return text + (f" ({', '.join(flags)})" if flags else "")


def best_lrs(records: list[dict], layers: int, experts: int = 0) -> dict[str, float]:
    """Each arm's best learning rate at this depth: the lowest mean validation loss over seeds."""
    by_arm = defaultdict(dict)
    for (arm, lay, exp, lr), runs in _group(records).items():
        if lay == layers and exp == experts:
            by_arm[arm][lr] = score(runs)
    return {arm: min(scores, key=scores.get) for arm, scores in by_arm.items()}


def _arms_in(records: list[dict]) -> list[str]:
    present = {r["arm"] for r in records}
    return [a for a in ARMS if a in present]


def markdown_table(records: list[dict], grid: Grid, baseline: float = math.nan) -> str:
    """All result tables as markdown (mean ± std over seeds of the final validation loss, in nats per byte)."""
    groups = _group(records)
    arms = _arms_in(records)
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"# Norm-scheme comparison ({grid.name} grid)",
        "",
        f"Byte-level LM on one text; d={grid.width}, {grid.heads} heads, FFN {grid.ffn}, {grid.steps} steps x "
        f"{grid.batch_size} x {grid.seq_len} bytes, AdamW (0.9, 0.95, wd 0.1), {100 * grid.warmup_frac:g}% warmup + "
        f"cosine, clip 1.0. Validation loss in nats/byte, mean ± std over seeds {seeds}; `k/n div` = seeds "
        f"with a non-finite loss or a training loss that ended > {UNRECOVERED_NATS} nat above its best; `stuck` = "
        f"ended within {STUCK_NATS} nat of the unigram (byte-frequency) loss {baseline:.3f}, i.e. did not train; "
        f"`spk` = a transient spike > {SPIKE_NATS} nat above the running minimum after warmup.",
        "",
    ]
    configs = sorted({(r["layers"], r["experts"]) for r in records})
    for layers, experts in configs:
        lrs = sorted({r["lr"] for r in records if r["layers"] == layers and r["experts"] == experts})
        kind = f"MoE ({experts} experts, top-{grid.experts_per_tok})" if experts else "dense"
        here = [a for a in arms if any((a, layers, experts, lr) in groups for lr in lrs)]
        best = best_lrs(records, layers, experts)
        lines += [
            f"## L={layers}, {kind}",
            "",
            "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | at best lr |",
            "|---|" + "---|" * (len(lrs) + 2),
        ]
        for arm in here:
            row = [
                cell(groups[(arm, layers, experts, lr)]) if (arm, layers, experts, lr) in groups else "" for lr in lrs
            ]
            b = best[arm]
            lines.append(f"| {arm} | " + " | ".join(row) + f" | {b:g} | {cell(groups[(arm, layers, experts, b)])} |")
        lines.append("")
    lines += _summary(records), ""
    lines += _headline(records, grid), ""
    if grid.verdict == "depth":
        lines += _depth_tables(records, grid, baseline), ""
    elif grid.verdict == "scaling":
        lines += _verdict_table(records), ""
    lines += _grad_table(records, grid), ""
    lines += ["## Arms", ""] + [f"- `{a}`: {ARMS[a].label} (norm_scheme `{ARMS[a].norm_scheme}`)" for a in arms]
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "—"


def _summary(records: list[dict]) -> str:
    """One row per arm, one column per depth/MoE setting: each arm at its own best learning rate there."""
    configs = sorted({(r["layers"], r["experts"]) for r in records})
    groups = _group(records)
    best = {c: best_lrs(records, *c) for c in configs}
    names = [f"L={layers} {'MoE' if experts else 'dense'}" for layers, experts in configs]
    lines = [
        "## Summary: each arm at its own best learning rate",
        "",
        "Validation loss, mean ± std over seeds, at the learning rate (in brackets) with the lowest mean.",
        "",
        "| arm | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(configs),
    ]
    for arm in _arms_in(records):
        row = [f"{cell(groups[(arm, *c, best[c][arm])])} [{best[c][arm]:g}]" if arm in best[c] else "" for c in configs]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _headline(records: list[dict], grid: Grid) -> str:
    """The fair protocol: every arm at its own best learning rate, compared with PreNorm at PreNorm's best, as
    paired differences over the shared seeds (same data order and init seed: most seed noise cancels)."""
    rows = [
        "## Each arm at its own best learning rate vs PreNorm at its own best",
        "",
        "delta = arm − PreNorm, per seed, then mean ± std over seeds (negative: the arm reaches a lower loss).",
        "",
        "| config | arm | best lr | val loss | delta vs pre | seeds where arm < pre |",
        "|---|---|---|---|---|---|",
    ]
    groups = _group(records)
    for layers, experts in sorted({(r["layers"], r["experts"]) for r in records}):
        best = best_lrs(records, layers, experts)
        if "pre" not in best:
            continue
        pre = {r["seed"]: r["val_loss"] for r in groups[("pre", layers, experts, best["pre"])]}
        ranked = sorted(best, key=lambda a: score(groups[(a, layers, experts, best[a])]))
        for arm in ranked:
            runs = groups[(arm, layers, experts, best[arm])]
            pairs = [
                (r["val_loss"], pre[r["seed"]])
                for r in runs
                if r["seed"] in pre and None not in (r["val_loss"], pre[r["seed"]])
            ]
            mean, std = _mean_std([a - p for a, p in pairs])
            delta = f"{mean:+.3f} ± {std:.3f}" if arm != "pre" and pairs else "—"
            wins = f"{sum(a < p for a, p in pairs)}/{len(pairs)}" if arm != "pre" else "—"
            kind = f"L={layers} {'MoE' if experts else 'dense'}"
            rows.append(f"| {kind} | {arm} | {best[arm]:g} | {cell(runs)} | {delta} | {wins} |")
    return "\n".join(rows)


SHIPPED, CHALLENGER = "span", "span-init"  # SpanNorm's shipped scaling, and the candidate that may replace it


def scaling_verdict(records: list[dict]) -> tuple[str, list[tuple]]:
    """The rule that picks SpanNorm's default scaling, fixed before the full grid ran: in every depth/MoE setting
    where both ran, compare each at its own best learning rate; the challenger replaces the shipped default only
    if its loss is lower in a majority of settings *and* on average over them. Returns the winner and the rows
    (layers, experts, shipped lr, shipped loss, challenger lr, challenger loss)."""
    groups = _group(records)
    rows = []
    for layers, experts in sorted({(r["layers"], r["experts"]) for r in records}):
        best = best_lrs(records, layers, experts)
        if SHIPPED in best and CHALLENGER in best:
            a, b = (score(groups[(arm, layers, experts, best[arm])]) for arm in (SHIPPED, CHALLENGER))
            rows.append((layers, experts, best[SHIPPED], a, best[CHALLENGER], b))
    wins = sum(b < a for *_, a, _, b in rows)
    mean_gap = statistics.fmean(b - a for *_, a, _, b in rows) if rows else math.inf
    return (CHALLENGER if rows and 2 * wins > len(rows) and mean_gap < 0 else SHIPPED), rows


def _verdict_table(records: list[dict]) -> str:
    winner, rows = scaling_verdict(records)
    groups = _group(records)
    lines = [
        f"## SpanNorm's default scaling: `{SHIPPED}` ({ARMS[SHIPPED].label}) vs `{CHALLENGER}` "
        f"({ARMS[CHALLENGER].label})",
        "",
        "Each at its own best learning rate; the challenger replaces the shipped default only if it is lower in a "
        "majority of settings and on average.",
        "",
        f"| config | {SHIPPED} best lr | {SHIPPED} | {CHALLENGER} best lr | {CHALLENGER} |",
        "|---|---|---|---|---|",
    ]
    for layers, experts, lr_a, _, lr_b, _ in rows:
        shipped, challenger = groups[(SHIPPED, layers, experts, lr_a)], groups[(CHALLENGER, layers, experts, lr_b)]
        kind = "MoE" if experts else "dense"
        lines.append(f"| L={layers} {kind} | {lr_a:g} | {cell(shipped)} | {lr_b:g} | {cell(challenger)} |")
    lines += ["", f"Verdict: `{winner}`."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Depth transfer (issue 10): measures and the pre-registered rule for SpanNorm's default depth scaling
# ---------------------------------------------------------------------------------------------------------

USABLE_NATS = 0.05  # a learning rate is in the usable window when its mean loss is within this of the best
TRANSFER_TIE = 0.01  # mean transfer errors this close count as a tie, broken by the mean loss at own best


def is_stuck(record: dict, baseline: float) -> bool:
    """A finite run that ended within `STUCK_NATS` of the unigram loss: it learned nothing beyond byte frequencies."""
    return record["val_loss"] is not None and record["val_loss"] > baseline - STUCK_NATS


def _lr_key(lr: float) -> str:
    return f"{lr:g}"  # how a learning rate is spelled in a run key; 2 * 8e-3 and 1.6e-2 spell the same


@dataclasses.dataclass(frozen=True)
class DepthCell:
    """One arm at one depth/MoE setting: its learning-rate sweep summarised (losses are means over seeds)."""

    lrs: tuple[float, ...]  # learning rates with at least one finished run
    best_lr: float | None  # lowest mean loss; None when no run finished
    best_loss: float  # inf when every learning rate had a non-finite seed
    usable: tuple[float, ...]  # learning rates within USABLE_NATS of the best
    runs: int
    stuck: int
    diverged: int
    transfer_lr: float | None  # the arm's best learning rate at dense L=6
    transfer_error: float | None  # loss at transfer_lr minus loss at own best; None when either is missing


def depth_cells(records: list[dict], baseline: float, base_layers: int = 6) -> dict[tuple[str, int, int], DepthCell]:
    """Per (arm, layers, experts): best lr, loss at best, usable window, stuck/diverged counts and the transfer error
    (the loss at the learning rate that was the arm's best at dense `base_layers`, minus the loss at its own best;
    0 at the base depth by construction, inf when the transferred learning rate has a non-finite seed)."""
    groups = _group(records)
    scores = defaultdict(dict)
    for (arm, layers, experts, lr), runs in groups.items():
        scores[(arm, layers, experts)][lr] = score(runs)
    base = {arm: sc for (arm, layers, experts), sc in scores.items() if (layers, experts) == (base_layers, 0)}
    base_best = {arm: min(sc, key=sc.get) for arm, sc in base.items()}
    out = {}
    for (arm, layers, experts), sc in sorted(scores.items()):
        best_lr = min(sc, key=sc.get)
        best = sc[best_lr]
        runs = [r for lr in sc for r in groups[(arm, layers, experts, lr)]]
        t_lr = base_best.get(arm)
        error = None
        if t_lr is not None and t_lr in sc and math.isfinite(best):
            error = sc[t_lr] - best
        out[(arm, layers, experts)] = DepthCell(
            lrs=tuple(sorted(sc)),
            best_lr=best_lr if math.isfinite(best) else None,
            best_loss=best,
            usable=tuple(lr for lr in sorted(sc) if sc[lr] <= best + USABLE_NATS),
            runs=len(runs),
            stuck=sum(is_stuck(r, baseline) and not r["diverged"] for r in runs),
            diverged=sum(r["diverged"] for r in runs),
            transfer_lr=t_lr,
            transfer_error=error,
        )
    return out


@dataclasses.dataclass(frozen=True)
class DepthVerdict:
    """The outcome of `depth_verdict`. `status` is "decided" (then `winner` is the new default), "undecided"
    (`missing` lists the run keys still needed) or "none qualifies" (every rule has a stuck or diverged seed at
    or below its best learning rate somewhere: no rule wins and the shipped default stays, as a fallback, not as
    a winner). `provisional` is what the rule would pick on the records present, whatever the status."""

    status: str
    winner: str | None
    provisional: str | None
    rows: dict[str, dict]  # per arm: transfer errors per depth, their mean, mean loss at own best, why disqualified
    missing: tuple[str, ...]


def depth_verdict(
    records: list[dict],
    baseline: float,
    arms: tuple[str, ...] = DEPTH_RULE_ARMS,
    depths: tuple[int, ...] = VERDICT_DEPTHS,
    lrs: tuple[float, ...] = DEPTH_LRS,
    seeds: tuple[int, ...] = VERDICT_SEEDS,
) -> DepthVerdict:
    """The rule that picks SpanNorm's default depth scaling (issue 10), committed before the depth grid ran.

    Among the SpanNorm rules `arms`, on dense models at `depths` (the first is the base depth whose best learning
    rate is transferred):
    1. An arm qualifies only if no seed is stuck (within STUCK_NATS of the unigram loss) or diverged at any
       learning rate at or below its own best, at any of the depths: a user going lower to be safe must not get
       a model that does not train.
    2. Among qualifying arms, the winner has the smallest mean transfer error over the depths after the base
       (the loss at the base depth's best learning rate minus the loss at the arm's own best there).
    3. Arms within TRANSFER_TIE of that smallest mean tie; the tie goes to the lowest mean loss at own best over
       all `depths`. The shipped default (`span`) gets no preference: it stays only if it wins by 1-3.
    Data required before a verdict ("undecided" until then): every arm x depth x `lrs` x `seeds`; the base
    depth's best learning rate run at every depth on seeds 0 and 1; and each best learning rate bracketed, that
    is, where the best sits at the lowest (highest) learning rate run, half (twice) it run on seeds 0 and 1.
    """
    have = {r["key"] for r in records}
    cells = depth_cells([r for r in records if r["arm"] in arms], baseline, base_layers=depths[0])
    need = [RunSpec(arm, layers, 0, lr, seed) for arm in arms for layers in depths for lr in lrs for seed in seeds]
    two = tuple(s for s in seeds if s in (0, 1))
    for arm in arms:
        for layers in depths:
            cell_ = cells.get((arm, layers, 0))
            if cell_ is None or cell_.best_lr is None:
                continue
            if cell_.best_lr == cell_.lrs[0]:
                need += [RunSpec(arm, layers, 0, cell_.best_lr / 2, seed) for seed in two]
            if cell_.best_lr == cell_.lrs[-1]:
                need += [RunSpec(arm, layers, 0, cell_.best_lr * 2, seed) for seed in two]
            if cell_.transfer_lr is not None:
                need += [RunSpec(arm, layers, 0, cell_.transfer_lr, seed) for seed in two]
    by_key = {spec.key: spec for spec in need}  # RunSpec.key spells lr with :g, so 2 * 8e-3 matches 1.6e-2
    missing = tuple(key for key in by_key if key not in have)

    groups = _group(records)
    rows = {}
    for arm in arms:
        here = [cells.get((arm, layers, 0)) for layers in depths]
        if any(c is None or c.best_lr is None for c in here):
            why = [
                f"L={layers}: " + ("no run yet" if c is None else "a non-finite seed at every lr")
                for layers, c in zip(depths, here, strict=True)
                if c is None or c.best_lr is None
            ]
            rows[arm] = {"transfer": {}, "mean_transfer": math.inf, "mean_best": math.inf, "fails": why}
            continue
        fails = []
        for layers, c in zip(depths, here, strict=True):
            for lr in c.lrs:
                if lr > c.best_lr:
                    continue
                bad = [r for r in groups[(arm, layers, 0, lr)] if r["diverged"] or is_stuck(r, baseline)]
                fails += [f"L={layers} lr {_lr_key(lr)} seed {r['seed']}" for r in bad]
        transfer = {layers: c.transfer_error for layers, c in zip(depths, here, strict=True)}
        later = [transfer[layers] for layers in depths[1:]]
        rows[arm] = {
            "transfer": transfer,
            "mean_transfer": statistics.fmean(later) if later and None not in later else math.inf,
            "mean_best": statistics.fmean(c.best_loss for c in here),
            "fails": fails,
        }
    ok = [arm for arm in arms if not rows[arm]["fails"] and math.isfinite(rows[arm]["mean_transfer"])]
    provisional = None
    if ok:
        least = min(rows[arm]["mean_transfer"] for arm in ok)
        tied = [arm for arm in ok if rows[arm]["mean_transfer"] <= least + TRANSFER_TIE]
        provisional = min(tied, key=lambda arm: rows[arm]["mean_best"])  # min keeps `arms` order on exact ties
    if missing:
        return DepthVerdict("undecided", None, provisional, rows, missing)
    if provisional is None:
        return DepthVerdict("none qualifies", None, None, rows, ())
    return DepthVerdict("decided", provisional, provisional, rows, ())


def _depth_tables(records: list[dict], grid: Grid, baseline: float) -> str:
    """The depth-transfer measures of every arm, the pre-registered verdict, and what of the grid has run."""
    return "\n\n".join(
        (
            _depth_sweep_table(records, grid, baseline),
            _depth_rule_table(records, baseline, VERDICT_DEPTHS, VERDICT_SEEDS, "the pre-registered rule"),
            _depth_rule_table(records, baseline, REVISIT_DEPTHS, REVISIT_SEEDS, "the same rule revisited at L = 48"),
            _coverage_table(records, grid),
        )
    )


def _depth_sweep_table(records: list[dict], grid: Grid, baseline: float) -> str:
    """Each arm's learning-rate sweep at each depth (best lr, usable window, stuck/diverged, transfer error), with
    the planned cells not run yet marked `missing`, so a partial grid shows what it still lacks."""
    cells = depth_cells(records, baseline)
    planned = grid.runs()
    configs = sorted({(s.layers, s.experts) for s in planned} | {(r["layers"], r["experts"]) for r in records})
    configs.sort(key=lambda c: (c[1], c[0]))  # dense by depth, then MoE
    lines = [
        "## Depth transfer: each arm's learning-rate sweep at each depth",
        "",
        f"Loss = mean validation loss over seeds. Usable window: the learning rates within {USABLE_NATS} nat of the "
        "best. Stuck / div: runs (all learning rates, all seeds) that did not train / diverged. Transfer error: the "
        "loss at the learning rate that was the arm's best at dense L=6, minus the loss at its own best (MoE too "
        "takes the dense L=6 best). `missing`: not run yet.",
        "",
        "| arm | config | lrs run | best lr | loss at best | usable window | stuck | div | transfer error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = _group(records)
    for arm in [a for a in ARMS if any(s.arm == a for s in planned) or a in {r["arm"] for r in records}]:
        for layers, experts in configs:
            name = f"L={layers} {'MoE' if experts else 'dense'}"
            c = cells.get((arm, layers, experts))
            if c is None:
                if any((s.arm, s.layers, s.experts) == (arm, layers, experts) for s in planned):
                    lines.append(f"| {arm} | {name} | missing | | | | | | |")
                continue
            best = cell(groups[(arm, layers, experts, c.best_lr)]) if c.best_lr is not None else "—"
            usable = ", ".join(_lr_key(lr) for lr in c.usable) if c.best_lr is not None else "none"
            if c.transfer_error is None:
                te = "missing" if c.transfer_lr is not None else "no L=6 best yet"
            else:
                te = f"{c.transfer_error:+.3f} (lr {_lr_key(c.transfer_lr)})"
            lines.append(
                f"| {arm} | {name} | {', '.join(_lr_key(lr) for lr in c.lrs)} | "
                f"{_lr_key(c.best_lr) if c.best_lr is not None else '—'} | {best} | {usable} | {c.stuck}/{c.runs} | "
                f"{c.diverged}/{c.runs} | {te} |"
            )
    return "\n".join(lines)


def _depth_rule_table(
    records: list[dict], baseline: float, depths: tuple[int, ...], seeds: tuple[int, ...], title: str
) -> str:
    """The rule for SpanNorm's default depth scaling over `depths`, each arm's numbers under it, and its verdict
    (with the provisional leader and the missing runs while undecided), as `depth_verdict` computes them."""
    verdict = depth_verdict(records, baseline, depths=depths, seeds=seeds)
    lines = [
        f"## SpanNorm's default depth scaling: {title}",
        "",
        "Among " + ", ".join(f"`{a}` ({ARMS[a].label})" for a in DEPTH_RULE_ARMS) + ": an arm qualifies only if "
        f"no seed is stuck or diverged at any learning rate at or below its best at L = {depths}; the "
        f"default is the qualifying arm with the smallest mean transfer error over L = {depths[1:]}, ties "
        f"(within {TRANSFER_TIE}) going to the lowest mean loss at own best. Needs seeds {seeds} at lrs "
        f"{', '.join(_lr_key(lr) for lr in DEPTH_LRS)}, and every best learning rate bracketed (`depth_verdict`).",
        "",
        "| arm | " + " | ".join(f"transfer error L={d}" for d in depths[1:]) + " | mean | "
        "mean loss at own best | stuck/diverged at or below best |",
        "|---|" + "---|" * (len(depths) + 2),
    ]
    for arm, row in verdict.rows.items():
        te = [row["transfer"].get(d) for d in depths[1:]]
        fails = ", ".join(row["fails"][:6]) + (f" (+{len(row['fails']) - 6})" if len(row["fails"]) > 6 else "")
        lines.append(
            f"| {arm} | "
            + " | ".join("—" if v is None else f"{v:+.3f}" for v in te)
            + f" | {_num(row['mean_transfer'])} | {_num(row['mean_best'])} | {fails or 'none'} |"
        )
    lines += ["", f"Verdict: **{verdict.status}**" + (f": `{verdict.winner}`." if verdict.winner else ".")]
    if verdict.status == "undecided":
        shown = ", ".join(f"`{k}`" for k in verdict.missing[:30])
        more = f" and {len(verdict.missing) - 30} more" if len(verdict.missing) > 30 else ""
        lines += [
            "",
            "Provisional leader on the runs so far (not a verdict): "
            + (f"`{verdict.provisional}`." if verdict.provisional else "none yet."),
            "",
            f"Missing {len(verdict.missing)} runs: {shown}{more}.",
        ]
    return "\n".join(lines)


def _coverage_table(records: list[dict], grid: Grid) -> str:
    """How many runs of each section of the grid are done: where a resumable, partly run grid stands."""
    done = {r["key"] for r in records}
    lines = [
        "## Grid coverage",
        "",
        "| section | arms | layers | experts | lrs | seeds | done |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, sec in enumerate(grid.sections, 1):
        seeds = sec.seeds or grid.seeds
        keys = {
            RunSpec(arm, layers, sec.experts, lr, seed).key
            for arm in sec.arms
            for layers in sec.layers
            for lr in sec.lrs
            for seed in seeds
        }
        lines.append(
            f"| {i} | {', '.join(sec.arms)} | {', '.join(map(str, sec.layers))} | {sec.experts} | "
            f"{', '.join(_lr_key(lr) for lr in sec.lrs)} | {', '.join(map(str, seeds))} | "
            f"{len(keys & done)}/{len(keys)} |"
        )
    return "\n".join(lines)


def _grad_table(records: list[dict], grid: Grid) -> str:
    """Gradient-norm statistics and the per-block signal-propagation summary of every dense setting."""
    rows = [
        "## Gradients and signal propagation (dense)",
        "",
        "Total gradient norm before clipping (mean / max over steps, fraction of steps clipped at 1.0); per-block "
        "diagnostics on a fixed validation batch (see the per_layer PNGs): output RMS of the last block over the "
        "first block's, mean input/output cosine of the last quarter of blocks, and the gradient norm of the first "
        "block over the last block's, at init and at the end. Means over the seeds that stayed finite.",
        "",
        "| arm | L | lr | n | grad norm mean | grad norm max | clipped | RMS last/first (end) | "
        "cos last quarter (init / end) | grad first/last (init / end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = _group(records)
    for (arm, layers, experts, lr), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][3])):
        fin = [r for r in runs if r["end"] is not None]
        if experts or not fin:
            continue
        quarter = max(1, layers // 4)

        def both(stat: Callable[[dict], float], runs: list[dict] = fin) -> str:
            return f"{_ms([stat(r['init']) for r in runs])} / {_ms([stat(r['end']) for r in runs])}"

        rows.append(
            f"| {arm} | {layers} | {lr:g} | {len(fin)}/{len(runs)} | {_ms([r['grad_norm']['mean'] for r in fin])} | "
            f"{_ms([r['grad_norm']['max'] for r in fin])} | "
            f"{statistics.fmean(r['grad_norm']['clipped_frac'] for r in fin):.2f} | "
            f"{_ms([r['end']['rms'][-1] / r['end']['rms'][0] for r in fin])} | "
            f"{both(lambda d, q=quarter: statistics.fmean(d['cos'][-q:]))} | "
            f"{both(lambda d: d['grad'][0] / max(d['grad'][-1], 1e-30))} |"
        )
    return "\n".join(rows)


def _ms(values: list[float]) -> str:
    mean, std = _mean_std([v for v in values if v is not None])
    return f"{mean:.3g} ± {std:.2g}" if len(values) > 1 else f"{mean:.3g}"


def lr_sensitivity(records: list[dict], layers: int, experts: int = 0) -> dict[str, dict[float, float]]:
    """Mean validation loss per learning rate, per arm (inf where a seed went non-finite)."""
    out = defaultdict(dict)
    for (arm, lay, exp, lr), runs in sorted(_group(records).items()):
        if lay == layers and exp == experts:
            out[arm][lr] = score(runs)
    return dict(out)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    """Atomic PNG write: a crash never leaves a half-written plot."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90, bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())


def _style(arm: str) -> dict:
    colors = {
        "pre": "tab:blue",
        "post": "tab:red",
        "deepnorm": "tab:orange",
        "peri": "tab:green",
        "hybrid": "tab:purple",
        "span": "black",
        "span-plain": "tab:gray",
        "span-init": "tab:olive",
        "span-learn": "tab:pink",
        "span-b2t": "goldenrod",
        "span-clean": "teal",
        "span-mup": "tab:cyan",
        "span-completep": "tab:brown",
    }
    dashed = arm.startswith("span-")
    return {"color": colors.get(arm, "black"), "ls": "--" if dashed else "-", "lw": 2.2 if arm == "span" else 1.3}


def _pyplot():
    """matplotlib.pyplot on the Agg backend: the plots are written to files, never shown, and need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(records: list[dict], grid: Grid, out_dir: Path, baseline: float = math.nan) -> list[Path]:
    """loss_curves.png, lr_sensitivity.png, loss_vs_depth.png, per_layer_init.png, per_layer_end.png."""
    made = [_plot_loss_curves(records, grid, out_dir, baseline), _plot_lr_sensitivity(records, out_dir, baseline)]
    dense_depths = sorted({r["layers"] for r in records if r["experts"] == 0})
    if len(dense_depths) > 1:
        made.append(_plot_loss_vs_depth(records, dense_depths, out_dir, baseline))
    depths = sorted({grid.sweep_layers, dense_depths[-1]} & set(dense_depths)) if dense_depths else []
    for when in ("init", "end") if depths else ():
        made.append(_plot_per_layer(records, depths, when, out_dir))
    if grid.verdict == "depth":
        made.append(plot_depth(records, out_dir, baseline))
    return made


def _plot_loss_curves(records: list[dict], grid: Grid, out_dir: Path, baseline: float) -> Path:
    """loss_curves.png: training-loss curves at the sweep depth (a grid without it: its deepest dense depth), every
    arm at its own best lr, then one panel per learning rate that most arms ran at (an lr only a few arms ran would
    be a near-empty panel)."""
    plt = _pyplot()
    groups = _group(records)
    arms = _arms_in(records)
    dense_depths = {r["layers"] for r in records if r["experts"] == 0}
    layers = grid.sweep_layers if grid.sweep_layers in dense_depths or not dense_depths else max(dense_depths)
    sweep = [r for r in records if r["layers"] == layers and r["experts"] == 0]
    arms_at = defaultdict(set)
    for r in sweep:
        arms_at[r["lr"]].add(r["arm"])
    common = max((len(a) for a in arms_at.values()), default=0)
    lrs = sorted(lr for lr, a in arms_at.items() if 2 * len(a) >= common)
    best = best_lrs(records, layers)
    panels = [("best", None)] + [(f"lr {lr:g}", lr) for lr in lrs]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (title, lr) in zip(axes[0], panels, strict=True):
        for arm in arms:
            runs = groups.get((arm, layers, 0, best.get(arm) if lr is None else lr))
            if not runs:
                continue
            curves = [r["train_curve"] for r in runs]
            n = min(len(c) for c in curves)
            mean = [_nanmean([c[i] for c in curves]) for i in range(n)]
            steps = [i * runs[0]["curve_every"] for i in range(n)]
            ax.plot(steps, mean, label=arm, **_style(arm))
        ax.axhline(baseline, color="gray", lw=0.8, ls=":")
        ax.set_title(f"L={layers} dense, {'each at its best lr' if lr is None else title}", fontsize=9)
        ax.set_xlabel("step")
    ys = [y for ax in axes[0] for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if ys:  # a partial grid may have no run at the sweep depth yet
        axes[0][0].set_ylim(min(ys) - 0.05, 4.0)
    axes[0][0].set_ylabel("train loss (nats/byte, mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _plot_lr_sensitivity(records: list[dict], out_dir: Path, baseline: float) -> Path:
    """lr_sensitivity.png: final val loss vs lr, one panel per depth and MoE setting that ran more than one learning
    rate (every setting if none did): how wide each arm's usable window is."""
    plt = _pyplot()
    groups = _group(records)
    arms = _arms_in(records)
    lrs_of = defaultdict(set)
    for r in records:
        lrs_of[(r["layers"], r["experts"])].add(r["lr"])
    configs = sorted(c for c, lrs_here in lrs_of.items() if len(lrs_here) > 1) or sorted(lrs_of)
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for ax, (layers, experts) in zip(axes[0], configs, strict=True):
        for arm in arms:
            pts = sorted(
                (lr, runs) for (a, lay, exp, lr), runs in groups.items() if (a, lay, exp) == (arm, layers, experts)
            )
            if not pts:
                continue
            _mean_std_series(ax, pts, arm)
        ax.axhline(baseline, color="gray", lw=0.8, ls=":", label="unigram loss")
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted(lrs_of[(layers, experts)])
        ax.set_xticks(ticks, labels=[f"{lr:g}" for lr in ticks], rotation=45 if len(ticks) > 5 else 0, fontsize=8)
        ax.set_xlabel("peak learning rate")
        ax.set_title(f"L={layers} {'MoE' if experts else 'dense'}: val loss vs lr")
        ax.set_ylim(*_ylim(ax))
    axes[0][0].set_ylabel("val loss (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    path = out_dir / "lr_sensitivity.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _plot_loss_vs_depth(records: list[dict], dense_depths: list[int], out_dir: Path, baseline: float) -> Path:
    """loss_vs_depth.png: final val loss vs depth (dense), each arm at its own best learning rate per depth, then one
    panel per learning rate that more than one depth ran at (the same lr at every depth, as a user would keep it)."""
    plt = _pyplot()
    groups = _group(records)
    arms = _arms_in(records)
    best_at = {layers: best_lrs(records, layers) for layers in dense_depths}
    depth_lrs = sorted(
        lr
        for lr in {r["lr"] for r in records if r["experts"] == 0}
        if len({r["layers"] for r in records if r["experts"] == 0 and r["lr"] == lr}) > 1
    )
    panels = [None, *depth_lrs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, lr in zip(axes[0], panels, strict=True):
        for arm in arms:
            pts = [
                (layers, groups[key])
                for layers in dense_depths
                if (key := (arm, layers, 0, best_at[layers].get(arm) if lr is None else lr)) in groups
            ]
            if len(pts) < 2:
                continue
            _mean_std_series(ax, pts, arm)
        ax.axhline(baseline, color="gray", lw=0.8, ls=":", label="unigram loss")
        ax.set_xscale("log", base=2)
        ax.set_xticks(dense_depths, labels=[str(d) for d in dense_depths])
        ax.set_xlabel("layers")
        ax.set_title(f"dense, {'each arm at its best lr' if lr is None else f'lr {lr:g}'}: val loss vs depth")
        ax.set_ylim(*_ylim(ax))
    axes[0][0].set_ylabel("val loss (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    path = out_dir / "loss_vs_depth.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _plot_per_layer(records: list[dict], depths: list[int], when: str, out_dir: Path) -> Path:
    """per_layer_{when}.png: per-block output RMS, gradient norm and input/output cosine at `when` ("init" or
    "end"), one row per depth, each arm at its own best learning rate there (the fair protocol; the table has
    every other lr)."""
    plt = _pyplot()
    groups = _group(records)
    arms = _arms_in(records)
    fig, axes = plt.subplots(len(depths), 3, figsize=(15, 3.8 * len(depths)), squeeze=False)
    for row, layers in zip(axes, depths, strict=True):
        best = best_lrs(records, layers)
        for arm in arms:
            runs = [r for r in groups.get((arm, layers, 0, best.get(arm)), []) if r[when] is not None]
            if not runs:
                continue
            for ax, stat in zip(row, ("rms", "grad", "cos"), strict=True):
                series = [r[when][stat] for r in runs]
                mean = [_nanmean(col) for col in zip(*series, strict=True)]
                label = f"{arm} lr {best[arm]:g} (n={len(runs)})"
                ax.plot(range(layers), mean, label=label, **_style(arm))
        titles = ("block output RMS", "block gradient norm", "cos(block input, output)")
        for ax, title in zip(row, titles, strict=True):
            ax.set_title(f"{title}\n({when}, L={layers} dense, each arm at its best lr)", fontsize=9)
            ax.set_xlabel("layer index")
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[2].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"per_layer_{when}.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_depth(records: list[dict], out_dir: Path, baseline: float = math.nan, base_layers: int = 6) -> Path:
    """depth_transfer.png: per arm, best learning rate vs depth, and loss vs depth at its own best and at the
    learning rate that was its best at L=6 (dense; a partial grid draws the points it has)."""
    plt = _pyplot()
    cells = depth_cells(records, baseline, base_layers)
    groups = _group(records)
    depths = sorted({r["layers"] for r in records if r["experts"] == 0})
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2), squeeze=False)
    for arm in _arms_in(records):
        here = [(d, cells[(arm, d, 0)]) for d in depths if (arm, d, 0) in cells]
        best = [(d, c.best_lr) for d, c in here if c.best_lr is not None]
        if best:
            axes[0][0].plot(*zip(*best, strict=True), marker="o", alpha=0.8, label=arm, **_style(arm))
        own = [(d, groups[(arm, d, 0, c.best_lr)]) for d, c in here if c.best_lr is not None]
        moved = [(d, groups[(arm, d, 0, c.transfer_lr)]) for d, c in here if c.transfer_error is not None]
        for ax, pts in ((axes[0][1], own), (axes[0][2], moved)):
            if pts:
                _mean_std_series(ax, pts, arm)
    axes[0][0].set_yscale("log", base=2)
    axes[0][0].minorticks_off()
    lrs = sorted({c.best_lr for (_, _, experts), c in cells.items() if experts == 0 and c.best_lr is not None})
    axes[0][0].set_yticks(lrs, labels=[_lr_key(lr) for lr in lrs])
    axes[0][0].set_ylabel("best peak learning rate")
    axes[0][0].set_title("dense: best learning rate vs depth")
    titles = ("dense: val loss vs depth, each arm at its own best lr", "dense: val loss vs depth, at the L=6 best lr")
    for ax, title in zip(axes[0][1:], titles, strict=True):
        ax.axhline(baseline, color="gray", lw=0.8, ls=":", label="unigram loss")
        ax.set_title(title)
        ax.set_ylabel("val loss (mean ± std over seeds)")
        ax.set_ylim(*_ylim(ax))
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(depths, labels=[str(d) for d in depths])
        ax.set_xlabel("layers")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = out_dir / "depth_transfer.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _nanmean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def _mean_std_series(ax, pts: list[tuple[float, list[dict]]], arm: str) -> None:
    """One arm's line of (x, runs) points: mean validation loss over the finite seeds, std as error bars."""
    stats = [_finite_stats(runs) for _, runs in pts]
    xs, means, stds = [x for x, _ in pts], [m for m, _ in stats], [sd for _, sd in stats]
    ax.errorbar(xs, means, yerr=stds, label=arm, capsize=2, **_style(arm))


def _finite_stats(runs: list[dict]) -> tuple[float, float]:
    return _mean_std([r["val_loss"] for r in runs if r["val_loss"] is not None])


def _ylim(ax) -> tuple[float, float]:
    """Zoom on the competitive range: a diverged arm is drawn off the top instead of flattening the rest."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if not ys:
        return 0.0, 1.0
    low = min(ys)
    return low - 0.05, min(max(ys), low + 1.0) + 0.05


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def unigram_loss(train: torch.Tensor, val: list[torch.Tensor]) -> float:
    """Validation loss of the best context-free model (add-one byte frequencies of the training split): a run
    that ends near it learned nothing beyond byte frequencies."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1
    logp = counts.log() - counts.sum().log()
    targets = torch.cat([b[:, 1:].flatten() for b in val])
    return -logp[targets].mean().item()


def write_report(out_dir: Path, grid: Grid, data: str | os.PathLike | None = None) -> list[Path]:
    """table.md and the PNGs from `out_dir/runs.jsonl` (`data`: the text the runs trained on, for the unigram
    baseline); returns the files written."""
    records = [r for r in read_records(out_dir / "runs.jsonl") if r["shape"] == grid.shape()]
    if not records:
        raise ValueError(f"{out_dir / 'runs.jsonl'} holds no finished runs of the {grid.name!r} grid")
    tokens, fingerprint = load_bytes(data)
    if any(r.get("data") != fingerprint for r in records):
        raise ValueError(f"{out_dir} holds runs on other data than {data or 'the embedded corpus'}: pass their --data")
    train, val = split_data(tokens, grid)
    baseline = unigram_loss(train, val_batches(val, grid))
    for rec in records:
        rec["stuck"] = rec["val_loss"] is not None and rec["val_loss"] > baseline - STUCK_NATS
    table = out_dir / "table.md"
    atomic_write_text(table, markdown_table(records, grid, baseline))
    return [table, *plot_all(records, grid, out_dir, baseline)]


__all__ = [
    "ARMS",
    "GRIDS",
    "Arm",
    "Grid",
    "RunSpec",
    "Section",
    "best_lrs",
    "build_model",
    "depth_cells",
    "depth_verdict",
    "load_bytes",
    "lr_sensitivity",
    "markdown_table",
    "plot_all",
    "read_records",
    "run_grid",
    "scaling_verdict",
    "train_one",
    "write_report",
]
