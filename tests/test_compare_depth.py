"""The depth study of issue 10: its grid, the per-depth measures, the pre-registered default rule, and a report on
a partial grid."""

import dataclasses
import math

import pytest
import torch

from spannorm_hf.training.corpus import read_default_corpus
from spannorm_hf.training.diagnostics import decoder_blocks

from compare_norms import run_grid
from grids import (
    ARMS,
    DEPTH_ARMS,
    DEPTH_EDGE_LRS,
    DEPTH_LRS,
    DEPTH_RULE_ARMS,
    GRIDS,
    REVISIT_DEPTHS,
    REVISIT_SEEDS,
    Grid,
    RunSpec,
    Section,
)
from report import write_report
from run import build_model, read_records
from verdicts import depth_cells, depth_verdict

BASELINE = 3.355  # unigram loss of the synthetic records below
ALL_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


def test_depth_grid_plan():
    grid = GRIDS["depth"]
    # Same model and protocol as the "wide" grid, which the old records were written under.
    assert grid.shape() == GRIDS["wide"].shape()
    assert grid.shape() == {
        "width": 128,
        "heads": 4,
        "ffn": 344,
        "experts_per_tok": 2,
        "seq_len": 64,
        "batch_size": 16,
        "steps": 200,
        "warmup_frac": 0.1,
        "eval_batches": 8,
        "sweep_layers": 12,
    }
    runs = grid.runs()
    assert len({s.key for s in runs}) == len(runs)
    assert {s.arm for s in runs} == {"pre", "peri", "span", "span-mup", "span-completep"}
    assert {(s.layers, s.experts) for s in runs} == {(6, 0), (12, 0), (24, 0), (48, 0), (12, 4)}
    for arm in {s.arm for s in runs}:  # every arm is built through public config fields only
        assert not ARMS[arm].learnable_skip and ARMS[arm].block is None
    # Priority order: the cells that decide the default come first, on both seeds; then the edge learning rates seed 0
    # showed they need (up for the depth-muP/CompleteP rules, down for PreNorm/Peri-LN); then their third seed; then
    # L=48 and MoE, then the remaining edges.
    first = runs[:90]
    assert {(s.layers, s.experts) for s in first} == {(6, 0), (12, 0), (24, 0)}
    assert {s.lr for s in first} == set(DEPTH_LRS) and {s.seed for s in first} == {0, 1}
    assert [s.seed for s in first] == sorted(s.seed for s in first)  # seed-major within the section
    edges = runs[90:110]
    assert {(s.arm, s.lr) for s in edges} == {(a, 1.6e-2) for a in ("span-mup", "span-completep")} | {
        (a, 1e-3) for a in ("pre", "peri")
    }
    third = runs[110:143]
    assert {s.seed for s in third} == {2} and {s.arm for s in third} == set(DEPTH_RULE_ARMS)
    assert {(s.layers, s.experts) for s in third} == {(6, 0), (12, 0), (24, 0)}
    assert all(s.seed < 2 for s in runs[:110] + runs[143:])
    brackets = runs[143:149]  # the verdict's brackets: one x2 step past each rule's best where it sat at an edge
    assert {(s.arm, s.layers, s.lr) for s in brackets} == {("span", 6, 1.6e-2)} | {
        ("span-completep", layers, 3.2e-2) for layers in (6, 24)
    }
    deep = runs[149:194]  # L=48 seed 0, MoE seeds 0 and 1
    assert [(s.layers, s.experts, s.seed) for s in deep[::15]] == [(48, 0, 0), (12, 4, 0), (12, 4, 1)]
    for i in range(0, 45, 15):
        assert len({(s.layers, s.experts, s.seed) for s in deep[i : i + 15]}) == 1
    revisit = runs[194:209]  # what the revisit needs: the rules' L=48 seed 1, and the brackets seed 0 showed
    assert {(s.arm, s.layers, s.seed) for s in revisit[:9]} == {(a, 48, 1) for a in DEPTH_RULE_ARMS}
    assert {(s.arm, s.lr, s.seed) for s in revisit[9:]} == {("span", 1e-3, i) for i in (0, 1)} | {
        ("span-completep", lr, i) for lr in (1.6e-2, 3.2e-2) for i in (0, 1)
    }
    assert {(s.arm, s.layers, s.seed) for s in runs[209:215]} == {(a, 48, 1) for a in ("pre", "peri")}
    brackets = runs[215:229]  # the brackets the baselines and MoE need, MoE's first
    assert {(s.arm, s.lr) for s in brackets[:8]} == {(a, 1.6e-2) for a in ("span-mup", "span-completep")} | {
        (a, 1e-3) for a in ("pre", "peri")
    }
    assert {s.experts for s in brackets[:8]} == {4}
    assert {(s.arm, s.layers, s.lr) for s in brackets[8:]} == {("pre", 6, 1e-3), ("pre", 48, 1e-3), ("peri", 48, 1e-3)}
    assert {s.lr for s in runs[229:]} == set(DEPTH_EDGE_LRS)


def test_long_grid_is_the_depth_grid_run_four_times_longer():
    """Issue 10 item 5: the same model and protocol as the depth grid but 4x the steps, at L = 24, one run per arm at
    its chosen learning rate; a follow-up, so its report carries no verdict."""
    long, depth = GRIDS["depth-long"], GRIDS["depth"]
    assert long.shape() == {**depth.shape(), "steps": 4 * depth.steps}
    assert long.verdict == "none" and depth.verdict == "depth" and GRIDS["full"].verdict == "scaling"
    runs = long.runs()
    assert {(s.layers, s.experts, s.seed) for s in runs} == {(24, 0, 0)}
    assert {(s.arm, s.lr) for s in runs} == {
        ("pre", 2e-3),
        ("peri", 2e-3),
        ("span", 4e-3),
        ("span", 8e-3),
        ("span-mup", 8e-3),
        ("span-completep", 1.6e-2),
        ("span-completep", 8e-3),
    }


def test_l48_long_grid_is_the_depth_grid_at_l48_four_times_longer():
    """Issue 19 item 4: L = 48, 4x the steps, each arm at its 200-step best and one x2 step below, seeds 0 and 1,
    the two leaders (Peri-LN's 2e-3, CompleteP's 8e-3) first."""
    long, depth = GRIDS["depth48-long"], GRIDS["depth"]
    assert long.shape() == {**depth.shape(), "steps": 4 * depth.steps} and long.verdict == "none"
    runs = long.runs()
    arms = {"pre": (2e-3, 1e-3), "peri": (2e-3, 1e-3), "span-completep": (1.6e-2, 8e-3)}
    assert {(s.arm, s.lr) for s in runs} == {(arm, lr) for arm, lrs in arms.items() for lr in lrs}
    assert {(s.layers, s.experts) for s in runs} == {(48, 0)} and len(runs) == 12
    assert [(s.arm, s.lr, s.seed) for s in runs[:3]] == [
        ("peri", 2e-3, 0),
        ("span-completep", 8e-3, 0),
        ("peri", 1e-3, 0),
    ]
    assert runs[6].seed == 1


def test_seed2_grid_is_the_depth_grid_at_l48_for_the_default():
    """The new default's third seed at L = 48, at every learning rate at or below its best, same protocol."""
    check, depth = GRIDS["depth-seed2"], GRIDS["depth"]
    assert check.shape() == depth.shape() and check.verdict == "none"
    runs = check.runs()
    assert {(s.arm, s.layers, s.experts, s.seed) for s in runs} == {("span-completep", 48, 0, 2)}
    assert sorted(s.lr for s in runs) == [2e-3, 4e-3, 8e-3, 1.6e-2]


def test_plateau_grid_starts_like_the_stuck_runs():
    """The stuck 200-step runs' warmup (20 steps) and peak learning rate, then 4x the steps."""
    plateau, depth = GRIDS["depth-plateau"], GRIDS["depth"]
    assert plateau.shape() == {**depth.shape(), "steps": 800, "warmup_frac": 0.025}
    assert plateau.steps * plateau.warmup_frac == depth.steps * depth.warmup_frac == 20
    runs = plateau.runs()
    assert {(s.arm, s.layers, s.experts, s.lr, s.seed) for s in runs} == {
        ("span", 24, 0, 8e-3, 0),
        ("span-mup", 24, 0, 1.6e-2, 0),
    }


def test_old_grids_keep_seed_major_order():
    runs = GRIDS["full"].runs()
    assert [s.seed for s in runs] == sorted(s.seed for s in runs)
    with pytest.raises(ValueError, match="Grid.order='random'"):
        dataclasses.replace(GRIDS["quick"], order="random").runs()


@pytest.mark.parametrize("arm,layers,expected", [("span-mup", 6, 12**0.5), ("span-completep", 48, 96.0)])
def test_depth_arms_use_the_named_rules(arm, layers, expected):
    model = build_model(RunSpec(arm, layers, 0, 1e-3, 0), GRIDS["quick"])
    assert model.config.residual_scale == ARMS[arm].residual_scale
    assert all(b.skip_scale == pytest.approx(expected) for b in decoder_blocks(model))


# ---------------------------------------------------------------------------------------------------------
# The measures and the pre-registered rule, on synthetic records
# ---------------------------------------------------------------------------------------------------------


def curve(best: dict[int, float], level: float) -> dict[tuple[int, float], float]:
    """A V-shaped loss over log2(lr), lowest (`level`) at `best[depth]`: 0.1 nat per factor of 2 away."""
    return {(d, lr): level + 0.1 * abs(math.log2(lr / b)) for d, b in best.items() for lr in ALL_LRS}


def records_of(losses: dict[str, dict[tuple[int, float], float]], seeds=(0, 1, 2)) -> list[dict]:
    out = []
    for arm, table in losses.items():
        for (layers, lr), loss in table.items():
            for seed in seeds:
                spec = RunSpec(arm, layers, 0, lr, seed)
                out.append({**dataclasses.asdict(spec), "key": spec.key, "val_loss": loss, "diverged": False})
    return out


def synthetic() -> list[dict]:
    return records_of(
        {
            # today's default: its best moves from 4e-3 to 2e-3 at L=24 (transfer error 0.1 there)
            "span": curve({6: 4e-3, 12: 4e-3, 24: 2e-3}, 2.20),
            # both new rules keep their best in place; depth-muP reaches the lower loss
            "span-mup": curve({6: 4e-3, 12: 4e-3, 24: 4e-3}, 2.25),
            "span-completep": curve({6: 8e-3, 12: 8e-3, 24: 8e-3}, 2.30),
        }
    )


def replace_loss(records: list[dict], key: str, loss: float | None, diverged: bool = False) -> None:
    for rec in records:
        if rec["key"] == key:
            rec["val_loss"], rec["diverged"] = loss, diverged


def test_depth_cells_measures():
    records = synthetic()
    replace_loss(records, "span|L24|E0|lr0.016|s0", BASELINE)  # one stuck seed
    cells = depth_cells(records, BASELINE)
    c6, c24 = cells[("span", 6, 0)], cells[("span", 24, 0)]
    assert (c6.best_lr, c6.transfer_lr, c6.transfer_error) == (4e-3, 4e-3, 0.0)
    assert c24.best_lr == 2e-3 and c24.transfer_lr == 4e-3
    assert c24.transfer_error == pytest.approx(0.1)
    assert c24.best_loss == pytest.approx(2.20)
    assert c6.usable == (4e-3,)  # neighbours are 0.1 worse: outside the 0.05 window
    assert (c24.runs, c24.stuck, c24.diverged) == (15, 1, 0)


def test_depth_verdict_smallest_transfer_error_then_loss():
    verdict = depth_verdict(synthetic(), BASELINE)
    assert verdict.status == "decided" and not verdict.missing
    assert verdict.rows["span"]["mean_transfer"] == pytest.approx(0.05)
    # depth-muP and CompleteP both transfer perfectly (a tie): the lower mean loss at own best wins
    assert verdict.winner == "span-mup"


def test_depth_verdict_the_shipped_default_wins_only_by_the_rule():
    records = records_of({"span": curve({6: 4e-3, 12: 4e-3, 24: 4e-3}, 2.20)})
    records += [r for r in synthetic() if r["arm"] != "span"]
    assert depth_verdict(records, BASELINE).winner == "span"  # ties on transfer, lowest loss
    # A transfer error just over the tie margin loses although its loss is far lower.
    records = records_of({"span": curve({6: 4e-3, 12: 4e-3, 24: 4e-3}, 1.50)}) + [
        r for r in synthetic() if r["arm"] != "span"
    ]
    for seed in (0, 1, 2):
        replace_loss(records, f"span|L24|E0|lr0.004|s{seed}", 1.50 + 0.011 * 2)  # mean over 12, 24: 0.011
        replace_loss(records, f"span|L24|E0|lr0.008|s{seed}", 1.50)  # own best at L=24 moves to 8e-3
    verdict = depth_verdict(records, BASELINE)
    assert verdict.rows["span"]["mean_transfer"] == pytest.approx(0.011)
    assert verdict.winner == "span-mup"


def test_the_revisit_at_l48_applies_the_same_rule_to_one_more_depth():
    """The verdict's winner stuck at L = 48 at its L = 6 best: over L = 6..48 on seeds 0, 1 the arm that keeps its
    best in place wins, and until L = 48 is complete the revisit is undecided and names the missing runs."""
    curves = {
        "span": curve({6: 4e-3, 12: 4e-3, 24: 2e-3, 48: 2e-3}, 2.20),
        "span-mup": curve({6: 4e-3, 12: 4e-3, 24: 4e-3, 48: 2e-3}, 2.25),
        "span-completep": curve({6: 8e-3, 12: 8e-3, 24: 8e-3, 48: 8e-3}, 2.30),
    }
    records = records_of(curves, seeds=(0, 1))
    replace_loss(records, "span-mup|L48|E0|lr0.004|s0", BASELINE)  # above its L = 48 best: not a disqualification
    first = depth_verdict(records, BASELINE, seeds=(0, 1))
    revisit = depth_verdict(records, BASELINE, depths=REVISIT_DEPTHS, seeds=REVISIT_SEEDS)
    assert first.winner == "span-mup" and revisit.winner == "span-completep"
    # depth-muP at L = 48: its L = 6 best (4e-3) is the stuck seed 0 and seed 1 at 2.35, against 2.25 at its own best
    assert revisit.rows["span-mup"]["transfer"][48] == pytest.approx((BASELINE + 2.35) / 2 - 2.25)
    assert revisit.rows["span-completep"]["transfer"][48] == 0
    partial = [r for r in records if not (r["layers"] == 48 and r["seed"] == 1)]
    undecided = depth_verdict(partial, BASELINE, depths=REVISIT_DEPTHS, seeds=REVISIT_SEEDS)
    assert undecided.status == "undecided" and "span-completep|L48|E0|lr0.008|s1" in undecided.missing


def test_depth_verdict_a_stuck_seed_at_or_below_the_best_disqualifies():
    records = synthetic()
    replace_loss(records, "span-mup|L24|E0|lr0.002|s1", BASELINE + 0.01)
    verdict = depth_verdict(records, BASELINE)
    assert verdict.rows["span-mup"]["fails"] == ["L=24 lr 0.002 seed 1"]
    assert verdict.winner == "span-completep"
    # At the best learning rate itself too (the other seeds there are good enough to keep it the best).
    records = synthetic()
    replace_loss(records, "span-mup|L12|E0|lr0.004|s0", BASELINE - 0.04)
    for seed in (1, 2):
        replace_loss(records, f"span-mup|L12|E0|lr0.004|s{seed}", 1.0)
    verdict = depth_verdict(records, BASELINE)
    assert depth_cells(records, BASELINE)[("span-mup", 12, 0)].best_lr == 4e-3
    assert verdict.rows["span-mup"]["fails"] == ["L=12 lr 0.004 seed 0"]
    # Above the best learning rate a stuck (or diverged) seed does not disqualify.
    records = synthetic()
    replace_loss(records, "span-mup|L24|E0|lr0.016|s1", BASELINE + 0.01)
    replace_loss(records, "span-mup|L12|E0|lr0.016|s0", None, diverged=True)
    assert depth_verdict(records, BASELINE).winner == "span-mup"
    # A diverged seed below the best disqualifies like a stuck one.
    records = synthetic()
    replace_loss(records, "span-mup|L6|E0|lr0.001|s2", None, diverged=True)
    assert depth_verdict(records, BASELINE).rows["span-mup"]["fails"] == ["L=6 lr 0.001 seed 2"]
    # Nothing qualifies: no winner, and the verdict says so.
    records = synthetic()
    for arm in DEPTH_RULE_ARMS:
        replace_loss(records, f"{arm}|L6|E0|lr0.001|s0", BASELINE)
    verdict = depth_verdict(records, BASELINE)
    assert (verdict.status, verdict.winner, verdict.provisional) == ("none qualifies", None, None)


def test_depth_verdict_is_undecided_until_every_required_run_is_in():
    records = [r for r in synthetic() if r["key"] != "span-completep|L12|E0|lr0.004|s2"]
    verdict = depth_verdict(records, BASELINE)
    assert verdict.status == "undecided" and verdict.winner is None
    assert verdict.missing == ("span-completep|L12|E0|lr0.004|s2",)
    assert verdict.provisional == "span-mup"
    # A best learning rate at the edge of what ran must be bracketed: twice it, on seeds 0 and 1.
    records = [r for r in synthetic() if not (r["arm"] == "span-completep" and r["lr"] > 8e-3)]
    verdict = depth_verdict(records, BASELINE)
    assert verdict.status == "undecided"
    assert set(verdict.missing) == {f"span-completep|L{d}|E0|lr0.016|s{s}" for d in (6, 12, 24) for s in (0, 1)}
    # Only the core cells, no edges at all: half the lowest / twice the highest where the best sits there.
    core = [r for r in synthetic() if r["lr"] in DEPTH_LRS]
    missing = set(depth_verdict(core, BASELINE).missing)
    assert "span|L24|E0|lr0.001|s0" in missing and "span-completep|L6|E0|lr0.016|s1" in missing
    assert not any(k.startswith("span-mup") for k in missing)
    assert depth_verdict([], BASELINE).status == "undecided"


# ---------------------------------------------------------------------------------------------------------
# A report on a partial grid
# ---------------------------------------------------------------------------------------------------------

TINY = Grid(
    "tiny-depth",
    sections=(Section(DEPTH_ARMS, (2,), (3e-3,), seeds=(0,)),),
    seeds=(0, 1),
    order="section",
    width=16,
    heads=2,
    ffn=32,
    steps=12,
    seq_len=16,
    batch_size=4,
    eval_batches=2,
    sweep_layers=3,
    verdict="depth",
)


@pytest.mark.slow
def test_report_on_a_partial_grid_marks_missing_cells(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "corpus.txt"
    data.write_text(read_default_corpus()[:40_000])
    run_grid(TINY, tmp_path, data=data, log=lambda msg: None)
    assert all(0 < r["cpu_seconds"] < 600 for r in read_records(tmp_path / "runs.jsonl"))
    planned = dataclasses.replace(
        TINY,
        sections=TINY.sections
        + (
            Section(DEPTH_ARMS, (2, 3), (3e-3, 1e-2)),
            Section(("span",), (2,), (1e-2,), experts=4),
        ),
    )
    written = write_report(tmp_path, planned, data=data)
    table = (tmp_path / "table.md").read_text()
    assert "| span-mup | L=3 dense | missing |" in table
    assert "| span | L=2 MoE | missing |" in table
    assert table.count("Verdict: **undecided**") == 2  # the rule, and its revisit at L = 48
    assert "## SpanNorm's default depth scaling: the same rule revisited at L = 48" in table
    assert "| 1 | pre, peri, span, span-mup, span-completep | 2 | 0 | 0.003 | 0 | 5/5 |" in table
    assert "| 2 | pre, peri, span, span-mup, span-completep | 2, 3 | 0 | 0.003, 0.01 | 0, 1 | 5/40 |" in table
    assert "Verdict: `span`" not in table  # the old span vs span-init verdict needs span-init
    assert tmp_path / "depth_transfer.png" in written
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
