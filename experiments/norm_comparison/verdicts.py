"""A grid's runs aggregated over seeds (each arm's best learning rate, the depth-transfer measures) and the
pre-registered rules that chose SpanNorm's defaults from them: `scaling_verdict` (the full grid) and `depth_verdict`
(the depth grid, issue 10). Each rule was committed before the runs that decided it (see the README)."""

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable

from grids import (
    ARMS,
    DEPTH_LRS,
    DEPTH_RULE_ARMS,
    VERDICT_DEPTHS,
    VERDICT_SEEDS,
    WIDTH_ARMS,
    WIDTH_BASE,
    WIDTH_LRS,
    WIDTH_VERDICT_SETTINGS,
    RunSpec,
)

STUCK_NATS = 0.05  # a run ending within this of the unigram (byte-frequency) loss did not train


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


def lr_sensitivity(records: list[dict], layers: int, experts: int = 0) -> dict[str, dict[float, float]]:
    """Mean validation loss per learning rate, per arm (inf where a seed went non-finite)."""
    out = defaultdict(dict)
    for (arm, lay, exp, lr), runs in sorted(_group(records).items()):
        if lay == layers and exp == experts:
            out[arm][lr] = score(runs)
    return dict(out)


# ---------------------------------------------------------------------------------------------------------
# SpanNorm's default scaling (the full grid)
# ---------------------------------------------------------------------------------------------------------


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
    """One arm at one setting (a depth/MoE setting, or a width and depth): its learning-rate sweep summarised (losses
    are means over seeds)."""

    lrs: tuple[float, ...]  # learning rates with at least one finished run
    best_lr: float | None  # lowest mean loss; None when no run finished
    best_loss: float  # inf when every learning rate had a non-finite seed
    usable: tuple[float, ...]  # learning rates within USABLE_NATS of the best
    runs: int
    stuck: int
    diverged: int
    transfer_lr: float | None  # the arm's best learning rate at the base setting (dense L=6; width 128)
    transfer_error: float | None  # loss at transfer_lr minus loss at own best; None when either is missing


def sweep_cells(
    records: list[dict], baseline: float, setting: Callable[[dict], tuple], base_of: Callable[[tuple], tuple]
) -> dict[tuple, DepthCell]:
    """Per (arm, *setting(record)): best lr, loss at best, usable window, stuck/diverged counts and the transfer
    error (the loss at the learning rate that was the arm's best at the setting `base_of(setting)`, minus the loss
    at its own best; 0 at the base by construction, inf when the transferred learning rate has a non-finite seed)."""
    groups = defaultdict(list)
    for rec in records:
        groups[(rec["arm"], *setting(rec), rec["lr"])].append(rec)
    scores = defaultdict(dict)
    for (*where, lr), runs in groups.items():
        scores[tuple(where)][lr] = score(runs)
    out = {}
    for (arm, *where), sc in sorted(scores.items()):
        best_lr = min(sc, key=sc.get)
        best = sc[best_lr]
        runs = [r for lr in sc for r in groups[(arm, *where, lr)]]
        base = scores.get((arm, *base_of(tuple(where))))
        t_lr = min(base, key=base.get) if base else None
        error = None
        if t_lr is not None and t_lr in sc and math.isfinite(best):
            error = sc[t_lr] - best
        out[(arm, *where)] = DepthCell(
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


def depth_cells(records: list[dict], baseline: float, base_layers: int = 6) -> dict[tuple[str, int, int], DepthCell]:
    """`sweep_cells` per (arm, layers, experts), transferring each arm's best learning rate at dense `base_layers`."""
    return sweep_cells(records, baseline, lambda r: (r["layers"], r["experts"]), lambda _: (base_layers, 0))


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


# ---------------------------------------------------------------------------------------------------------
# The width study (issue 19)
# ---------------------------------------------------------------------------------------------------------


def width_cells(records: list[dict], baseline: float, base_width: int = WIDTH_BASE) -> dict[tuple, DepthCell]:
    """`sweep_cells` per (arm, width, layers), transferring each arm's best learning rate at `base_width` and the
    same depth (a run without a width ran at the base width)."""
    return sweep_cells(
        records, baseline, lambda r: (r.get("width") or base_width, r["layers"]), lambda w: (base_width, w[1])
    )


@dataclasses.dataclass(frozen=True)
class WidthVerdict:
    """The outcome of `width_verdict`: `status` "rule on" (the presets ship with the width rule), "rule off" or
    "undecided" (`missing` lists the run keys still needed); `provisional` is the status the rule gives on the
    records present; `reasons` say which conditions hold and which fail."""

    status: str
    provisional: str
    reasons: tuple[str, ...]
    rows: dict[str, dict]  # per arm: transfer errors per (layers, width), their mean, why disqualified
    missing: tuple[str, ...]


def width_verdict(
    records: list[dict],
    baseline: float,
    arms: tuple[str, str] = WIDTH_ARMS,
    settings: tuple[tuple[int, tuple[int, ...]], ...] = WIDTH_VERDICT_SETTINGS,
    lrs: tuple[float, ...] = WIDTH_LRS,
    base_width: int = WIDTH_BASE,
) -> WidthVerdict:
    """The rule that decides whether the presets ship with the width rule on (issue 19), committed before any run
    of the width grid. `arms` = (the default without the width rule, the default with it); `settings` = (depth,
    widths) pairs; at each depth the learning rate transferred is the arm's best at `base_width` and that depth.

    The width rule is on if and only if all three hold:
    1. It qualifies: at no (depth, width) does a seed of the rule's arm get stuck (within STUCK_NATS of the unigram
       loss) or diverge at any learning rate at or below that cell's best (a user going lower to be safe must get a
       model that trains).
    2. It transfers better: its mean transfer error over every (depth, width) other than the base width is smaller
       than the arm without the rule's by more than TRANSFER_TIE.
    3. It costs nothing at scale: at the largest width of the first depth, its loss at its own best is at most
       USABLE_NATS above the loss of the arm without the rule at that arm's own best.
    Data required ("undecided" until then): both arms at every (depth, width) x `lrs` on seeds 0 and 1; every best
    bracketed (where the best sits at the lowest or highest learning rate run, half or twice it, seeds 0 and 1);
    the transferred learning rate at every width, seeds 0 and 1; and seed 2 at the first depth, at every width, at
    each arm's best and transferred learning rates (the verdict's cells).
    """
    have = {r["key"] for r in records}
    cells = width_cells([r for r in records if r["arm"] in arms], baseline, base_width)
    where = [(layers, width) for layers, widths in settings for width in widths]
    need = [RunSpec(a, layers, 0, lr, s, w) for a in arms for layers, w in where for lr in lrs for s in (0, 1)]
    for arm in arms:
        for layers, width in where:
            c = cells.get((arm, width, layers))
            if c is None or c.best_lr is None:
                continue
            extra = [c.transfer_lr] if c.transfer_lr is not None else []
            extra += [c.best_lr / 2] if c.best_lr == c.lrs[0] else []
            extra += [c.best_lr * 2] if c.best_lr == c.lrs[-1] else []
            need += [RunSpec(arm, layers, 0, lr, s, width) for lr in extra for s in (0, 1)]
            if layers == settings[0][0]:
                third = sorted({c.best_lr, c.transfer_lr} - {None})
                need += [RunSpec(arm, layers, 0, lr, 2, width) for lr in third]
    missing = tuple(dict.fromkeys(spec.key for spec in need if spec.key not in have))

    rows = {}
    for arm in arms:
        here = {(layers, width): cells.get((arm, width, layers)) for layers, width in where}
        fails = [f"L={lw[0]} W={lw[1]}: no finished run" for lw, c in here.items() if c is None or c.best_lr is None]
        for (layers, width), c in here.items():
            if c is None or c.best_lr is None:
                continue
            for r in records:
                if (r["arm"], r.get("width") or base_width, r["layers"]) != (arm, width, layers):
                    continue
                if r["lr"] <= c.best_lr and (r["diverged"] or is_stuck(r, baseline)):
                    fails.append(f"L={layers} W={width} lr {_lr_key(r['lr'])} seed {r['seed']}")
        errors = [c.transfer_error for (layers, width), c in here.items() if width != base_width and c is not None]
        complete = len(errors) == sum(width != base_width for _, width in where) and None not in errors
        rows[arm] = {
            "transfer": {lw: (c.transfer_error if c is not None else None) for lw, c in here.items()},
            "mean_transfer": statistics.fmean(errors) if complete else math.inf,
            "fails": fails,
        }
    without, with_rule = arms
    top = (settings[0][0], max(settings[0][1]))
    best = {arm: cells.get((arm, top[1], top[0])) for arm in arms}
    reasons = []
    ok1 = not rows[with_rule]["fails"]
    reasons.append("1 holds" if ok1 else "1 fails: " + "; ".join(rows[with_rule]["fails"][:5]))
    gain = rows[without]["mean_transfer"] - rows[with_rule]["mean_transfer"]
    ok2 = math.isfinite(rows[with_rule]["mean_transfer"]) and gain > TRANSFER_TIE
    reasons.append(f"2 {'holds' if ok2 else 'fails'}: mean transfer error lower by {gain:.3f} (needs > {TRANSFER_TIE})")
    cost = math.inf
    if all(c is not None and c.best_lr is not None for c in best.values()):
        cost = best[with_rule].best_loss - best[without].best_loss
    ok3 = cost <= USABLE_NATS
    reasons.append(f"3 {'holds' if ok3 else 'fails'}: loss at own best at L={top[0]} W={top[1]} {cost:+.3f} vs no rule")
    provisional = "rule on" if ok1 and ok2 and ok3 else "rule off"
    return WidthVerdict("undecided" if missing else provisional, provisional, tuple(reasons), rows, missing)


def missing_runs(records: list[dict], verdict: str | None, baseline: float) -> tuple[str, ...]:
    """The run keys a grid's pre-registered verdict still needs on `records` (none for a grid without one), so a
    resumed grid can run them first: which runs decide depends on where the bests fell, which a fixed order cannot
    know."""
    if verdict == "width":
        return width_verdict(records, baseline).missing
    if verdict == "depth":
        return depth_verdict(records, baseline).missing
    return ()


def joint_check(
    records: list[dict], baseline: float, arm: str = "span-completep-w", width: int = 256, base_width: int = WIDTH_BASE
) -> dict[int, tuple[float | None, float | None, bool | None]]:
    """Issue 19 item 3, per depth at `width`: (best lr, the arm's best lr at `base_width` and L = 6, whether the
    two are within one x2 step). None where a cell has no finished run."""
    cells = width_cells([r for r in records if r["arm"] == arm], baseline, base_width)
    base = cells.get((arm, base_width, 6))
    base_lr = base.best_lr if base is not None else None
    out = {}
    for (_, w, layers), c in sorted(cells.items()):
        if w != width:
            continue
        ok = None if c.best_lr is None or base_lr is None else abs(math.log2(c.best_lr / base_lr)) <= 1 + 1e-9
        out[layers] = (c.best_lr, base_lr, ok)
    return out
