"""Smoke test of the norm comparison on a grid shaped like --quick but tinier: runs, resumes, reports."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spannorm_hf.training.corpus import read_default_corpus
from spannorm_hf.training.diagnostics import decoder_blocks

from compare_norms import run_grid
from grids import ARMS, GRIDS, Grid, RunSpec, Section
from report import unigram_loss
from run import _loss, build_model, load_bytes, read_records, split_data, train_batches, train_one, val_batches
from verdicts import CHALLENGER, SHIPPED, best_lrs, lr_sensitivity, scaling_verdict

pytestmark = pytest.mark.slow  # the experiment harness: its module fixture trains a small grid

COMPARE_DIR = Path(__file__).resolve().parents[1] / "experiments" / "norm_comparison"

GRID = Grid(
    "test",
    sections=(
        Section(("pre", "post", "span"), (2,), (3e-3, 1e-2)),
        Section(("pre", "span"), (3,), (1e-2,)),
        Section(("span",), (2,), (1e-2,), experts=4),
    ),
    seeds=(0, 1),
    width=16,
    heads=2,
    ffn=32,
    steps=12,
    seq_len=16,
    batch_size=4,
    eval_batches=2,
    sweep_layers=2,
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(read_default_corpus()[:40_000])
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory, text_file):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("results")
    run_grid(GRID, out, data=text_file, log=lambda msg: None)
    return out


def test_every_run_is_recorded_with_sane_content(results):
    records = read_records(results / "runs.jsonl")
    assert sorted(r["key"] for r in records) == sorted(s.key for s in GRID.runs())
    for rec in records:
        assert rec["val_loss"] is not None and 1.0 < rec["val_loss"] < math.log(256) + 1.0, rec["key"]
        assert len(rec["train_curve"]) >= 6
        assert isinstance(rec["diverged"], bool)
        assert rec["grad_norm"]["max"] >= rec["grad_norm"]["mean"] > 0
        for when in ("init", "end"):
            diag = rec[when]
            assert len(diag["rms"]) == len(diag["cos"]) == len(diag["grad"]) == rec["layers"]
            assert all(math.isfinite(v) and v > 0 for v in diag["rms"] + diag["grad"])
            assert all(-1.0 <= v <= 1.0 for v in diag["cos"])
    # Post-style blocks normalize their output, so every block output has RMS ~ its norm gain (1 at init).
    span = next(r for r in records if r["arm"] == "span")
    assert all(abs(v - 1.0) < 1e-3 for v in span["init"]["rms"])
    # Training did something: the pre and span runs beat a uniform byte predictor.
    assert all(r["val_loss"] < math.log(256) for r in records if r["arm"] in ("pre", "span"))


def test_table_and_plots(results):
    table = (results / "table.md").read_text()
    assert "unigram (byte-frequency) loss" in table
    for header in ("## L=2, dense", "## L=3, dense", "## L=2, MoE (4 experts, top-2)"):
        assert header in table
    row = next(line for line in table.splitlines() if line.startswith("| span |"))
    assert row.count("±") >= 3  # lr 0.003, lr 0.01, at best lr
    for name in ("loss_curves", "lr_sensitivity", "loss_vs_depth", "per_layer_init", "per_layer_end"):
        png = (results / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_best_lr_is_the_lowest_mean_loss(results):
    records = read_records(results / "runs.jsonl")
    best = best_lrs(records, layers=2)
    sens = lr_sensitivity(records, layers=2)
    assert set(best) == {"pre", "post", "span"}
    for arm, lr in best.items():
        assert sens[arm][lr] == min(sens[arm].values())


def test_resume_skips_finished_runs_and_refuses_another_grid(results, text_file):
    before = (results / "runs.jsonl").read_text()
    logs = []
    run_grid(GRID, results, data=text_file, log=logs.append)
    assert "0 to go" in logs[0]
    assert (results / "runs.jsonl").read_text() == before
    with pytest.raises(ValueError, match="another grid or data"):
        run_grid(GRIDS["quick"], results, data=text_file, log=logs.append)


def test_a_run_is_reproducible_and_data_order_is_shared_across_arms(text_file):
    tokens, _ = load_bytes(text_file)
    train, val = split_data(tokens, GRID)
    val = val_batches(val, GRID)
    spec = RunSpec("span", 2, 0, 1e-2, 0)
    first, second = (train_one(spec, GRID, train, val) for _ in range(2))
    assert first["val_loss"] == second["val_loss"] and first["train_curve"] == second["train_curve"]
    batches = [list(train_batches(train, GRID, seed)) for seed in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1], strict=True))
    assert not torch.equal(batches[0][0], batches[2][0])


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_builds_and_runs(arm):
    model = build_model(RunSpec(arm, 2, 0, 1e-3, 0), GRID)
    loss = _loss(model, torch.randint(0, 256, (2, 9)))
    assert torch.isfinite(loss)
    loss.backward()
    learnable = [b.skip_scale for b in decoder_blocks(model) if isinstance(b.skip_scale, torch.nn.Parameter)]
    assert bool(learnable) == ARMS[arm].learnable_skip
    assert all(p.grad is not None for p in learnable)


def test_unigram_baseline():
    constant = torch.zeros(5000, dtype=torch.long)
    assert unigram_loss(constant, [constant[:34].view(2, 17)]) < 0.1
    noise = torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0))
    assert abs(unigram_loss(noise, [noise[:3400].view(200, 17)]) - math.log(256)) < 0.05


def test_bad_data_fails_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_bytes(tmp_path / "nope.txt")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    tokens, _ = load_bytes(small)
    with pytest.raises(ValueError, match="needs at least"):
        split_data(tokens, GRID)
    json.dumps(GRIDS["full"].shape())  # records embed the grid shape: it must be JSON


def _records(losses: dict[tuple[str, int, float], list[float]]) -> list[dict]:
    return [
        {"arm": arm, "layers": layers, "experts": 0, "lr": lr, "seed": seed, "val_loss": loss}
        for (arm, layers, lr), values in losses.items()
        for seed, loss in enumerate(values)
    ]


def test_scaling_verdict_needs_a_majority_and_a_lower_mean():
    shipped, challenger = SHIPPED, CHALLENGER
    # The challenger is better at its best lr (1e-2) at L=6 and L=12 but much worse at L=24: lower in a majority
    # of settings, higher on average -> the shipped default stays.
    losses = {
        (shipped, 6, 1e-2): [2.5, 2.5],
        (challenger, 6, 1e-2): [2.4, 2.4],
        (challenger, 6, 1e-3): [2.9, 2.9],
        (shipped, 12, 1e-2): [2.5, 2.5],
        (challenger, 12, 1e-2): [2.4, 2.4],
        (shipped, 24, 1e-2): [2.5, 2.5],
        (challenger, 24, 1e-2): [3.4, 3.4],
    }
    winner, rows = scaling_verdict(_records(losses))
    assert winner == shipped
    challenger_best = [(layers, lr_b, b) for layers, _, _, _, lr_b, b in rows]
    assert challenger_best == [(6, 1e-2, 2.4), (12, 1e-2, 2.4), (24, 1e-2, 3.4)]
    losses[(challenger, 24, 1e-2)] = [2.55, 2.55]
    assert scaling_verdict(_records(losses))[0] == challenger
    # Better in one setting of two, even by a lot: not a majority.
    del losses[(shipped, 24, 1e-2)], losses[(challenger, 24, 1e-2)]
    losses[(challenger, 6, 1e-2)] = [1.5, 1.5]
    losses[(challenger, 12, 1e-2)] = [2.6, 2.6]
    assert scaling_verdict(_records(losses))[0] == shipped


def test_quick_mode_end_to_end_as_documented(tmp_path):
    """The README's two-core recipe on the --quick grid: two shards appending to one JSONL, then --report-only."""
    script = [sys.executable, str(COMPARE_DIR / "compare_norms.py"), "--quick", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shards = [
        subprocess.Popen([*script, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    for proc in shards:
        out = proc.communicate(timeout=900)[0].decode()
        assert proc.returncode == 0, out
        assert f"results in {tmp_path.resolve()}" in out
    report = subprocess.run([*script, "--report-only"], env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    records = read_records(tmp_path / "runs.jsonl")
    assert sorted(r["key"] for r in records) == sorted(s.key for s in GRIDS["quick"].runs())
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(records)  # no torn or doubled lines
    table = (tmp_path / "table.md").read_text()
    assert "# Norm-scheme comparison (quick grid)" in table and "Verdict:" in table
    for name in ("loss_curves", "lr_sensitivity", "loss_vs_depth", "per_layer_init", "per_layer_end"):
        assert str(tmp_path / f"{name}.png") in report.stdout
