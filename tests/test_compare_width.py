"""The width study of issue 19: its grid, the per-width measures, the pre-registered rule that decides whether the
presets ship with the width rule, the joint check, and a report on a partial grid."""

import dataclasses
import math

import pytest
import torch

from spannorm_hf.training.corpus import read_default_corpus

from compare_norms import pending, run_grid
from grids import ARMS, GRIDS, WIDTH_ARMS, WIDTH_LRS, WIDTHS, Grid, RunSpec, Section
from report import write_report
from run import build_model, read_records
from verdicts import joint_check, missing_runs, width_cells, width_verdict

BASELINE = 3.355
ALL_LRS = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
SETTINGS = ((6, WIDTHS), (12, (64, 128, 256)))


def test_width_grid_plan():
    grid = GRIDS["width"]
    runs = grid.runs()
    assert len({s.key for s in runs}) == len(runs)
    assert grid.verdict == "width" and grid.order == "section"
    # The two arms of the verdict differ in the width rule alone.
    without, with_rule = (ARMS[a] for a in WIDTH_ARMS)
    assert dataclasses.replace(with_rule, name=without.name, label=without.label, mup_base_width=None) == without
    assert with_rule.mup_base_width == 128
    # Sections 1-3: both arms at every verdict cell x the four central lrs on seeds 0 and 1, cheap widths first.
    first = {s.key for s in runs[: 2 * (4 + 3) * 4 * 2]}
    want = {
        RunSpec(a, layers, 0, lr, seed, w).key
        for a in WIDTH_ARMS
        for layers, widths in SETTINGS
        for w in widths
        for lr in WIDTH_LRS
        for seed in (0, 1)
    }
    assert first == want
    assert runs[0].width == 64 and runs[47].width == 256 and runs[48].width == 512
    assert (runs[112].arm, runs[112].layers, runs[112].width) == ("span-completep-w", 24, 256)  # the joint check next
    # Every hidden dimension grows with the width: heads of 32, an FFN of 43/16 the width.
    assert grid.dims(None) == (128, 4, 344) == grid.dims(128)
    assert grid.dims(512) == (512, 16, 1376) and grid.dims(64) == (64, 2, 172)
    with pytest.raises(ValueError, match="width 100"):
        grid.dims(100)


def test_old_grids_keep_their_keys():
    """A run without a width is keyed as before the width study, so every committed record still matches."""
    assert RunSpec("span", 12, 0, 4e-3, 1).key == "span|L12|E0|lr0.004|s1"
    assert RunSpec("span", 12, 0, 4e-3, 1, 256).key == "span|L12|W256|E0|lr0.004|s1"
    assert all(s.width is None for name, g in GRIDS.items() if name != "width" for s in g.runs())


def test_build_model_scales_every_dimension_and_sets_the_rule():
    grid = GRIDS["width"]
    plain = build_model(RunSpec("span-completep", 2, 0, 1e-2, 0, 256), grid).config
    ruled = build_model(RunSpec("span-completep-w", 2, 0, 1e-2, 0, 256), grid).config
    assert (plain.hidden_size, plain.num_attention_heads, plain.intermediate_size) == (256, 8, 688)
    assert plain.mup_base_width is None and ruled.mup_base_width == 128
    assert plain.residual_scale == ruled.residual_scale == "completep"


# ---------------------------------------------------------------------------------------------------------
# The measures and the pre-registered rule, on synthetic records
# ---------------------------------------------------------------------------------------------------------


def curve(best: dict[tuple[int, int], float], level: float) -> dict[tuple[int, int, float], float]:
    """A V-shaped loss over log2(lr), lowest (`level`) at `best[(layers, width)]`: 0.1 nat per factor of 2."""
    return {(d, w, lr): level + 0.1 * abs(math.log2(lr / b)) for (d, w), b in best.items() for lr in ALL_LRS}


def records_of(losses: dict[str, dict[tuple[int, int, float], float]], seeds=(0, 1, 2)) -> list[dict]:
    out = []
    for arm, table in losses.items():
        for (layers, width, lr), loss in table.items():
            for seed in seeds:
                spec = RunSpec(arm, layers, 0, lr, seed, width)
                out.append({**dataclasses.asdict(spec), "key": spec.key, "val_loss": loss, "diverged": False})
    return out


def everywhere(best_at: dict[int, float]) -> dict[tuple[int, int], float]:
    return {(d, w): best_at[w] for d, widths in SETTINGS for w in widths}


def synthetic(rule_level: float = 2.20) -> list[dict]:
    return records_of(
        {
            # without the rule the best learning rate halves per doubling of width (standard parametrization)
            "span-completep": curve(everywhere({64: 3.2e-2, 128: 1.6e-2, 256: 8e-3, 512: 4e-3}), 2.20),
            # with it the best stays at width 128's
            "span-completep-w": curve(everywhere(dict.fromkeys(WIDTHS, 1.6e-2)), rule_level),
        }
    )


def replace_loss(records: list[dict], key: str, loss: float | None, diverged: bool = False) -> None:
    hits = [r for r in records if r["key"] == key]
    assert hits, key
    for rec in hits:
        rec["val_loss"], rec["diverged"] = loss, diverged


def test_width_cells_transfer_the_base_widths_best_at_each_depth():
    cells = width_cells(synthetic(), BASELINE)
    c = cells[("span-completep", 512, 6)]
    assert (c.best_lr, c.transfer_lr) == (4e-3, 1.6e-2)
    assert c.transfer_error == pytest.approx(0.2)
    assert cells[("span-completep-w", 256, 12)].transfer_error == 0.0
    assert cells[("span-completep", 128, 12)].transfer_error == 0.0


def test_width_verdict_rule_on_when_it_transfers_and_costs_nothing():
    verdict = width_verdict(synthetic(), BASELINE)
    assert verdict.status == "rule on", verdict.reasons
    assert verdict.rows["span-completep-w"]["mean_transfer"] == 0.0
    assert verdict.rows["span-completep"]["mean_transfer"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.1 + 0.1) / 5)


def test_width_verdict_rule_off_when_it_costs_loss_at_the_largest_width():
    verdict = width_verdict(synthetic(rule_level=2.26), BASELINE)
    assert verdict.status == "rule off" and verdict.reasons[2].startswith("3 fails")


def test_width_verdict_rule_off_without_a_transfer_gain():
    records = synthetic()
    plain = [r for r in records if r["arm"] == "span-completep-w"]
    records = plain + [{**r, "arm": "span-completep", "key": r["key"].replace("-w|", "|")} for r in plain]
    verdict = width_verdict(records, BASELINE)
    assert verdict.status == "rule off" and verdict.reasons[1].startswith("2 fails")


def test_width_verdict_a_stuck_seed_at_or_below_the_best_disqualifies():
    records = synthetic()
    replace_loss(records, "span-completep-w|L12|W64|E0|lr0.004|s1", BASELINE)
    verdict = width_verdict(records, BASELINE)
    assert verdict.status == "rule off" and "L=12 W=64 lr 0.004 seed 1" in verdict.reasons[0]
    records = synthetic()  # above the best it is the user's risk, as in the depth rule
    replace_loss(records, "span-completep-w|L12|W64|E0|lr0.064|s1", None, diverged=True)
    assert width_verdict(records, BASELINE).status == "rule on"


def test_width_verdict_is_undecided_until_every_required_run_is_in():
    records = [r for r in synthetic() if r["key"] != "span-completep|L6|W512|E0|lr0.004|s2"]
    verdict = width_verdict(records, BASELINE)
    assert verdict.status == "undecided" and verdict.provisional == "rule on"
    assert verdict.missing == ("span-completep|L6|W512|E0|lr0.004|s2",)
    # Only the central lrs: the bests at an edge must be bracketed (here SP's 3.2e-2 at width 64 asks for 6.4e-2).
    core = [r for r in synthetic() if r["lr"] in WIDTH_LRS]
    missing = set(width_verdict(core, BASELINE).missing)
    assert "span-completep|L6|W64|E0|lr0.064|s0" in missing  # best 3.2e-2 sits at the highest lr run
    assert "span-completep|L6|W512|E0|lr0.002|s1" in missing  # best 4e-3 sits at the lowest
    assert not any("|L12|W512|" in key or key.startswith("span-completep-w") for key in missing)
    assert width_verdict([], BASELINE).status == "undecided"


def test_a_resumed_grid_runs_what_the_verdict_still_needs_first():
    """Where the bests fell decides which brackets and third seeds the verdict needs; those go before the rest."""
    grid = GRIDS["width"]
    core = [r for r in synthetic() if r["lr"] in WIDTH_LRS and r["seed"] in (0, 1) and r["layers"] == 6]
    done = {r["key"]: r for r in core}
    needed = missing_runs(core, grid.verdict, BASELINE)
    assert "span-completep|L6|W512|E0|lr0.002|s0" in needed  # the default's best at 512 sits at the lowest lr
    order = [spec.key for spec in pending(grid, done, needed)]
    assert sorted(order) == sorted(spec.key for spec in grid.runs() if spec.key not in done)  # nothing lost
    assert order[: len(needed)] == [k for k in (s.key for s in grid.runs()) if k in set(needed)]
    assert order.index("span-completep|L6|W512|E0|lr0.002|s0") < order.index("span-completep|L6|W64|E0|lr0.002|s0")
    assert [s.key for s in pending(grid, done)] == [s.key for s in grid.runs() if s.key not in done]
    assert missing_runs(core, None, BASELINE) == ()


def test_joint_check_within_one_x2_step_of_the_base():
    records = records_of(
        {"span-completep-w": curve({(6, 128): 1.6e-2, (6, 256): 1.6e-2, (12, 256): 8e-3, (24, 256): 4e-3}, 2.2)}
    )
    assert joint_check(records, BASELINE) == {
        6: (1.6e-2, 1.6e-2, True),
        12: (8e-3, 1.6e-2, True),
        24: (4e-3, 1.6e-2, False),
    }


# ---------------------------------------------------------------------------------------------------------
# A report on a partial grid
# ---------------------------------------------------------------------------------------------------------

TINY = Grid(
    "tiny-width",
    sections=(
        Section(WIDTH_ARMS, (2,), (3e-3,), widths=(64, 128), seeds=(0,)),
        Section(WIDTH_ARMS, (2,), (1e-2,), widths=(64, 128, 256)),
    ),
    seeds=(0, 1),
    order="section",
    width=128,
    heads=4,
    ffn=344,
    steps=8,
    seq_len=16,
    batch_size=4,
    eval_batches=2,
    verdict="width",
)


@pytest.mark.slow
def test_report_on_a_partial_width_grid(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "corpus.txt"
    data.write_text(read_default_corpus()[:40_000])
    first = dataclasses.replace(TINY, sections=TINY.sections[:1])
    run_grid(first, tmp_path, data=data, log=lambda msg: None)
    records = read_records(tmp_path / "runs.jsonl")
    assert {(r["arm"], r["width"]) for r in records} == {(a, w) for a in WIDTH_ARMS for w in (64, 128)}
    # At the rule's base width its multipliers are 1: the same run, bit for bit.
    at_base = {r["arm"]: r["val_loss"] for r in records if r["width"] == 128}
    assert at_base["span-completep"] == at_base["span-completep-w"]
    written = write_report(tmp_path, TINY, data=data)
    table = (tmp_path / "table.md").read_text()
    assert "# Width transfer (tiny-width grid)" in table
    assert "| span-completep-w | 2 | 64 | 0.003 | 0.003 |" in table
    assert "Verdict: **undecided**" in table
    assert "| 1 | span-completep, span-completep-w | 2 | 64, 128 | 0 | 0.003 | 0 | 4/4 |" in table
    assert "| 2 | span-completep, span-completep-w | 2 | 64, 128, 256 | 0 | 0.01 | 0, 1 | 0/12 |" in table
    assert written == [tmp_path / "table.md", tmp_path / "width_transfer.png"]
    assert (tmp_path / "width_transfer.png").stat().st_size > 10_000
