"""A results folder's report: `write_report` turns its runs.jsonl into table.md (every table, and the verdict the grid
asks for) and the PNG plots of `plots.py`. It only reads the runs, so `compare_norms.py --report-only` redraws a
folder at no training cost."""

import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from spannorm_hf.files import atomic_write_text

from grids import (
    ARMS,
    DEPTH_LRS,
    DEPTH_RULE_ARMS,
    REVISIT_DEPTHS,
    REVISIT_SEEDS,
    VERDICT_DEPTHS,
    VERDICT_SEEDS,
    WIDTH_BASE,
    WIDTH_VERDICT_SETTINGS,
    WIDTHS,
    Grid,
    RunSpec,
)
from plots import plot_all
from run import SPIKE_NATS, UNRECOVERED_NATS, VOCAB, load_bytes, read_records, split_data, val_batches
from verdicts import (
    CHALLENGER,
    SHIPPED,
    STUCK_NATS,
    TRANSFER_TIE,
    USABLE_NATS,
    DepthCell,
    _arms_in,
    _group,
    _lr_key,
    _mean_std,
    best_lrs,
    depth_cells,
    depth_verdict,
    joint_check,
    scaling_verdict,
    score,
    width_cells,
    width_verdict,
)


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


def markdown_table(records: list[dict], grid: Grid, baseline: float = math.nan) -> str:
    """All result tables as markdown (mean ± std over seeds of the final validation loss, in nats per byte)."""
    if grid.verdict == "width":
        return width_report(records, grid, baseline)
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


def _sweep_row(c: DepthCell, at_best: list[dict] | None) -> str:
    """The columns every sweep table shares: lrs run | best lr | loss at best | usable window | stuck | div."""
    found = c.best_lr is not None
    best, usable = (cell(at_best), ", ".join(_lr_key(lr) for lr in c.usable)) if found else ("—", "none")
    return (
        f"{', '.join(_lr_key(lr) for lr in c.lrs)} | {_lr_key(c.best_lr) if found else '—'} | {best} | {usable} | "
        f"{c.stuck}/{c.runs} | {c.diverged}/{c.runs}"
    )


def _fails(fails: list[str]) -> str:
    """Where a rule's arm got stuck or diverged, the first six named."""
    return ", ".join(fails[:6]) + (f" (+{len(fails) - 6})" if len(fails) > 6 else "") or "none"


def _missing(missing: tuple[str, ...]) -> str:
    """The runs a verdict still needs, the first 30 named."""
    shown = ", ".join(f"`{k}`" for k in missing[:30])
    return f"Missing {len(missing)} runs: {shown}" + (f" and {len(missing) - 30} more." if len(missing) > 30 else ".")


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
            if c.transfer_error is None:
                te = "missing" if c.transfer_lr is not None else "no L=6 best yet"
            else:
                te = f"{c.transfer_error:+.3f} (lr {_lr_key(c.transfer_lr)})"
            lines.append(f"| {arm} | {name} | {_sweep_row(c, groups.get((arm, layers, experts, c.best_lr)))} | {te} |")
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
        lines.append(
            f"| {arm} | "
            + " | ".join("—" if v is None else f"{v:+.3f}" for v in te)
            + f" | {_num(row['mean_transfer'])} | {_num(row['mean_best'])} | {_fails(row['fails'])} |"
        )
    lines += ["", f"Verdict: **{verdict.status}**" + (f": `{verdict.winner}`." if verdict.winner else ".")]
    if verdict.status == "undecided":
        lines += [
            "",
            "Provisional leader on the runs so far (not a verdict): "
            + (f"`{verdict.provisional}`." if verdict.provisional else "none yet."),
            "",
            _missing(verdict.missing),
        ]
    return "\n".join(lines)


def _coverage_table(records: list[dict], grid: Grid) -> str:
    """How many runs of each section of the grid are done: where a resumable, partly run grid stands."""
    done = {r["key"] for r in records}
    sized = any(sec.widths != (None,) for sec in grid.sections)  # a widths column only for grids that vary width
    lines = [
        "## Grid coverage",
        "",
        "| section | arms | layers | " + ("widths | " if sized else "") + "experts | lrs | seeds | done |",
        "|---|---|---|---|---|---|" + ("---|" if sized else "") + "---|",
    ]
    for i, sec in enumerate(grid.sections, 1):
        seeds = sec.seeds or grid.seeds
        keys = {
            RunSpec(arm, layers, sec.experts, lr, seed, width).key
            for arm in sec.arms
            for layers in sec.layers
            for width in sec.widths
            for lr in sec.lrs
            for seed in seeds
        }
        widths = f"{', '.join(map(str, sec.widths))} | " if sized else ""
        lines.append(
            f"| {i} | {', '.join(sec.arms)} | {', '.join(map(str, sec.layers))} | {widths}{sec.experts} | "
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


# ---------------------------------------------------------------------------------------------------------
# The width study (issue 19)
# ---------------------------------------------------------------------------------------------------------


def width_report(records: list[dict], grid: Grid, baseline: float) -> str:
    """table.md of the width grid: each arm's sweep per width and depth, the pre-registered verdict, the joint
    check, and the grid's coverage."""
    seeds = sorted({r["seed"] for r in records})
    head = [
        f"# Width transfer ({grid.name} grid)",
        "",
        f"Byte-level LM on one text; widths {', '.join(map(str, WIDTHS))} with heads of {grid.width // grid.heads} "
        f"and an FFN of {grid.ffn}/{grid.width} the width, {grid.steps} steps x {grid.batch_size} x {grid.seq_len} "
        f"bytes, AdamW (0.9, 0.95, wd 0.1), {100 * grid.warmup_frac:g}% warmup + cosine, clip 1.0. Validation loss "
        f"in nats/byte, mean ± std over seeds {seeds}; unigram loss {baseline:.3f}. The width rule is "
        f"`mup_base_width={WIDTH_BASE}`.",
    ]
    parts = [
        "\n".join(head),
        _width_sweep_table(records, baseline),
        _width_rule_table(records, baseline),
        _joint_table(records, baseline),
        _coverage_table(records, grid),
        "## Arms\n\n" + "\n".join(f"- `{a}`: {ARMS[a].label}" for a in _arms_in(records)),
    ]
    return "\n\n".join(parts) + "\n"


def _width_sweep_table(records: list[dict], baseline: float) -> str:
    """Per arm, depth and width: lrs run, best lr, loss at best, usable window, stuck/div, transfer error."""
    cells = width_cells(records, baseline)
    lines = [
        "## Each arm's learning-rate sweep at each width",
        "",
        f"Usable window: learning rates within {USABLE_NATS} nat of the best. Transfer error: the loss at the arm's "
        f"best learning rate at width {WIDTH_BASE} (same depth) minus the loss at its own best.",
        "",
        "| arm | L | width | lrs run | best lr | loss at best | usable window | stuck | div | transfer error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = defaultdict(list)
    for r in records:
        runs[(r["arm"], r.get("width") or WIDTH_BASE, r["layers"], r["lr"])].append(r)
    for (arm, width, layers), c in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        te = "—" if c.transfer_error is None else f"{c.transfer_error:+.3f} (lr {_lr_key(c.transfer_lr)})"
        lines.append(f"| {arm} | {layers} | {width} | {_sweep_row(c, runs[(arm, width, layers, c.best_lr)])} | {te} |")
    return "\n".join(lines)


def _width_rule_table(records: list[dict], baseline: float) -> str:
    """The pre-registered rule (`width_verdict`), each arm's transfer errors under it, and its status."""
    verdict = width_verdict(records, baseline)
    where = [(layers, w) for layers, widths in WIDTH_VERDICT_SETTINGS for w in widths if w != WIDTH_BASE]
    lines = [
        "## Does the width rule ship on? (the pre-registered rule)",
        "",
        "On if and only if (1) no seed of the rule's arm is stuck or diverged at or below any cell's best, (2) its "
        f"mean transfer error beats the default without it by more than {TRANSFER_TIE}, and (3) at the largest "
        f"width its loss at own best is at most {USABLE_NATS} above the default's without it (`width_verdict`).",
        "",
        "| arm | " + " | ".join(f"L={lay} W={w}" for lay, w in where) + " | mean | stuck/diverged at or below best |",
        "|---|" + "---|" * (len(where) + 2),
    ]
    for arm, row in verdict.rows.items():
        te = [row["transfer"].get(lw) for lw in where]
        lines.append(
            f"| {arm} | "
            + " | ".join("—" if v is None else f"{v:+.3f}" for v in te)
            + f" | {_num(row['mean_transfer'])} | {_fails(row['fails'])} |"
        )
    lines += ["", f"Verdict: **{verdict.status}**. " + "; ".join(verdict.reasons) + "."]
    if verdict.status == "undecided":
        lines += [
            "",
            f"Provisional (not a verdict): {verdict.provisional}. {_missing(verdict.missing)}",
        ]
    return "\n".join(lines)


def _joint_table(records: list[dict], baseline: float) -> str:
    """Issue 19 item 3: at width 256 with both rules, is the best lr within one x2 step of width 128's at L = 6?"""
    lines = [
        "## Joint check: width 256 with both rules (span-completep-w)",
        "",
        "| L | best lr | width-128 L=6 best | within one x2 step |",
        "|---|---|---|---|",
    ]
    for layers, (best, base, ok) in joint_check(records, baseline).items():
        lines.append(
            f"| {layers} | {_lr_key(best) if best else '—'} | {_lr_key(base) if base else '—'} | "
            f"{'—' if ok is None else 'yes' if ok else 'no'} |"
        )
    return "\n".join(lines)
