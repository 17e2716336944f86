"""What the norm comparison runs: the arms (what varies between runs) and the grids (which arm x depth x experts x
learning rate x seed runs, and the model and training shape every run of a grid shares). A new grid is one entry of
`GRIDS`; `compare_norms.py --grid NAME` runs it."""

import dataclasses
import itertools
from collections.abc import Callable

import torch
from torch import nn

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
    mup_base_width: int | None = None  # the width rule (issue 19): SpanNormConfig's field, None = off


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
        # The width rule (issue 19) at base width 128, where the default was tuned; each arm otherwise as above.
        Arm(
            "span-completep-w",
            "span",
            "completep",
            "deepnet",
            label="SpanNorm default + width rule (base 128)",
            mup_base_width=128,
        ),
        Arm("pre-w", "pre", label="PreNorm + width rule (base 128)", mup_base_width=128),
        Arm("peri-w", "peri", label="Peri-LN + width rule (base 128)", mup_base_width=128),
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
    width: int | None = None  # None: the grid's width (every grid before the width study)

    @property
    def key(self) -> str:
        width = "" if self.width is None else f"|W{self.width}"
        return f"{self.arm}|L{self.layers}{width}|E{self.experts}|lr{self.lr:g}|s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Section:
    """A block of the grid: every arm x layers x width x lr x seed, dense (`experts=0`) or MoE. `seeds` overrides
    the grid's seeds (for a cheap extra learning rate measured on fewer seeds); `widths` other than None scale the
    grid's model (`Grid.dims`)."""

    arms: tuple[str, ...]
    layers: tuple[int, ...]
    lrs: tuple[float, ...]
    experts: int = 0
    seeds: tuple[int, ...] | None = None
    widths: tuple[int | None, ...] = (None,)


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
                for layers, width, lr, arm in itertools.product(sec.layers, sec.widths, sec.lrs, sec.arms):
                    spec = RunSpec(arm, layers, sec.experts, lr, seed, width)
                    if spec.key not in seen:
                        seen.add(spec.key)
                        out.append(spec)
        return out

    def dims(self, width: int | None) -> tuple[int, int, int]:
        """(hidden size, heads, FFN width) of a run at `width`: the grid's own for None; otherwise heads of the
        grid's head size and an FFN of the grid's FFN/width ratio, so every hidden dimension grows together (the
        width rule's assumption)."""
        if width is None:
            return self.width, self.heads, self.ffn
        head_dim = self.width // self.heads
        if width % head_dim or (self.ffn * width) % self.width:
            raise ValueError(f"width {width} is not a multiple of the head size {head_dim} and FFN ratio's unit")
        return width, width // head_dim, self.ffn * width // self.width

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

# The width study (issue 19): does one learning rate, tuned at width 128, carry to widths 64..512 with the width rule
# (`mup_base_width=128`), and without it? The depth grid's protocol (200 steps x 16 x 64 bytes, AdamW, warmup and
# cosine), heads of 32 and an FFN of 43/16 the width (4 heads and 344 at width 128, as in the depth grid). The rule
# that decides is `verdicts.width_verdict`, committed before any run of this grid. Sections in run order (a resumed
# grid runs the verdict's missing runs first, wherever they sit):
#   1-2. both arms at L = 6, widths 64, 128, 256, then 512, four central learning rates, seeds 0 and 1;
#   3. both arms at L = 12, widths 64, 128, 256, same, seeds 0 and 1;
#   4. the joint check: width 256 at L = 24 with both rules;
#   5. PreNorm and Peri-LN with the width rule at widths 256 and 512 (L = 6), around their width-128 bests;
#   6. the third seed at the verdict's cells (L = 6, every width, both arms, the three learning rates around the
#      default's width-128 best, 1.6e-2), and (added) the default's at 4e-3, its best at widths 256 and 512;
#   7. one x2 step beyond each end (2e-3, 6.4e-2) at every cell, seeds 0 and 1 (the verdict asks only for the
#      brackets that a best at an edge needs; the rest decide nothing).
# Sections 4-5 were moved before 6-7 after section 3 (same runs, new order): 6-7 are mostly runs the verdict does not
# need, and the verdict's own runs now go first anyway.
# Cost (CPU seconds of one 200-step L = 6 run, one thread, measured on the first 24 runs): 13 at width 64, 32 at 128,
# 100 at 256; about 350 at 512 (extrapolated, ~width^1.7); L = 12 twice that. Sections 1-3 about 3.5 CPU-hours.
WIDTH_ARMS = ("span-completep", "span-completep-w")  # without and with the width rule
WIDTH_BASE = 128
WIDTHS = (64, 128, 256, 512)
WIDTH_L12 = (64, 128, 256)
WIDTH_VERDICT_SETTINGS = ((6, WIDTHS), (12, WIDTH_L12))  # (depth, widths) the width verdict is decided on
WIDTH_LRS = (4e-3, 8e-3, 1.6e-2, 3.2e-2)
WIDTH_EDGE_LRS = (2e-3, 6.4e-2)
WIDTH_SECTIONS = (
    Section(WIDTH_ARMS, (6,), WIDTH_LRS, widths=(64, 128, 256), seeds=(0, 1)),
    Section(WIDTH_ARMS, (6,), WIDTH_LRS, widths=(512,), seeds=(0, 1)),
    Section(WIDTH_ARMS, (12,), WIDTH_LRS, widths=WIDTH_L12, seeds=(0, 1)),
    Section(("span-completep-w",), (24,), (4e-3, 8e-3, 1.6e-2, 3.2e-2), widths=(256,), seeds=(0, 1)),
    Section(("pre-w", "peri-w"), (6,), (2e-3, 4e-3, 8e-3, 1.6e-2), widths=(256, 512), seeds=(0, 1)),
    Section(WIDTH_ARMS, (6,), (8e-3, 1.6e-2, 3.2e-2), widths=WIDTHS, seeds=(2,)),
    # Added after sections 1-2 ran: the default's best at widths 256 and 512 fell to 4e-3, below section 6's guess,
    # and the verdict asks for seed 2 at each arm's best.
    Section(("span-completep",), (6,), (4e-3,), widths=(256, 512), seeds=(2,)),
    # Added when 2e-3 (the bracket) beat 4e-3 at width 512 on seed 0: the default's next bracket and its third seed
    # at its new best there.
    Section(("span-completep",), (6,), (1e-3,), widths=(512,), seeds=(0, 1)),
    Section(("span-completep",), (6,), (2e-3,), widths=(512,), seeds=(2,)),
    Section(WIDTH_ARMS, (6,), WIDTH_EDGE_LRS, widths=WIDTHS, seeds=(0, 1)),
    Section(WIDTH_ARMS, (12,), WIDTH_EDGE_LRS, widths=WIDTH_L12, seeds=(0, 1)),
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
    # Issue 19 item 4: does the deep lead last? L = 48, 800 steps (4x the depth grid's), seeds 0 and 1: PreNorm,
    # Peri-LN and the default (CompleteP) at their 200-step bests on the depth grid's two seeds at L = 48 (2e-3,
    # 2e-3, 1.6e-2) and one x2 step below (the depth-long runs at L = 24 found lower learning rates better for longer
    # runs). Seed-major: every arm's best on seed 0 first. About 25 CPU-minutes a run, 12 runs. Reordered after
    # three runs (Peri-LN 1.624 ahead of CompleteP 1.681 at their 200-step bests): CompleteP's step below comes
    # next, as it did better at 800 steps at L = 24; same runs, new order. Reordered again after four (CompleteP's
    # 8e-3 1.610, 0.014 ahead of Peri-LN's 2e-3): the two leaders and Peri-LN's step below first, PreNorm (0.4
    # behind) last.
    "depth48-long": Grid(
        "depth48-long",
        sections=(
            Section(("peri",), (48,), (2e-3,)),
            Section(("span-completep",), (48,), (8e-3,)),
            Section(("peri",), (48,), (1e-3,)),
            Section(("span-completep",), (48,), (1.6e-2,)),
            Section(("pre",), (48,), (2e-3, 1e-3)),
        ),
        seeds=(0, 1),
        width=128,
        heads=4,
        ffn=344,
        steps=800,
        verdict="none",  # a follow-up at chosen learning rates: no learning-rate sweep to decide on
    ),
    # Issue 19: one learning rate from width 64 to 512 (see the comment above WIDTH_SECTIONS).
    "width": Grid(
        "width",
        sections=WIDTH_SECTIONS,
        seeds=(0, 1, 2),
        order="section",
        width=WIDTH_BASE,
        heads=4,
        ffn=344,
        verdict="width",
    ),
}
