"""The PNG plots of a results folder, drawn from its records (matplotlib on the Agg backend, imported only when a
plot is drawn)."""

import io
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from spannorm_hf.files import atomic_write_bytes

from grids import ARMS, Grid
from verdicts import _arms_in, _group, _lr_key, _mean_std, best_lrs, depth_cells


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
    """loss_curves.png, lr_sensitivity.png, loss_vs_depth.png, per_layer_init.png, per_layer_end.png (the width
    grid: width_transfer.png alone, since the others do not tell widths apart)."""
    if grid.verdict == "width":
        return [plot_width(records, grid, out_dir, baseline)]
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


def plot_width(records: list[dict], grid: Grid, out_dir: Path, baseline: float = math.nan) -> Path:
    """width_transfer.png, muP's figure: validation loss vs learning rate, one curve per width (mean ± std over
    seeds, non-finite settings left out), one row per depth, one column per arm of the width grid."""
    plt = _pyplot()
    arms = [a for a in _arms_in(records) if any(sec.widths != (None,) and a in sec.arms for sec in grid.sections)]
    depths = sorted({r["layers"] for r in records if r["arm"] in arms})
    widths = sorted({r.get("width") or grid.width for r in records})
    runs = defaultdict(list)
    for r in records:
        runs[(r["arm"], r["layers"], r.get("width") or grid.width, r["lr"])].append(r)
    colors = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(depths), len(arms), figsize=(5.2 * len(arms), 3.8 * len(depths)), squeeze=False)
    for (i, layers), (j, arm) in itertools.product(enumerate(depths), enumerate(arms)):
        ax = axes[i][j]
        if not any((a, lay) == (arm, layers) for a, lay, _, _ in runs):  # e.g. the joint check's depth: one arm
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{ARMS[arm].label}: not run at L={layers}", ha="center", transform=ax.transAxes)
            continue
        for k, width in enumerate(widths):
            pts = sorted((lr, rs) for (a, lay, w, lr), rs in runs.items() if (a, lay, w) == (arm, layers, width))
            pts = [(lr, _finite_stats(rs)) for lr, rs in pts if all(r["val_loss"] is not None for r in rs)]
            if pts:
                lrs, stats = zip(*pts, strict=True)
                means, stds = zip(*stats, strict=True)
                color = colors(k / max(1, len(widths) - 1))
                ax.errorbar(lrs, means, yerr=stds, marker="o", ms=3, capsize=2, color=color, label=f"width {width}")
                best = min(range(len(means)), key=means.__getitem__)
                ax.plot(lrs[best], means[best], marker="*", ms=12, color=color)
        ax.axhline(baseline, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ticks = sorted({lr for (a, lay, _, lr) in runs if (a, lay) == (arm, layers)})
        ax.set_xticks(ticks, labels=[_lr_key(lr) for lr in ticks], fontsize=8)
        ax.set_title(f"{ARMS[arm].label}, L={layers}", fontsize=9)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("val loss (nats/byte)")
        ax.set_ylim(*_ylim(ax))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "width_transfer.png"
    _save(fig, path)
    plt.close(fig)
    return path
