"""The side-by-side bench at tiny sizes: it runs and prints its tables (numbers are not asserted: CI is noisy)."""

import re

import pytest
import torch

from spannorm_hf import NORM_SCHEME_NAMES

from benchmark import (
    QUICK,
    build,
    llama_config,
    main,
    matmul_params,
    paired_ratio,
    qwen3_moe_config,
    spannorm_config,
)

RATIO = r"\d+\.\d{3}x \(\d+\.\d{2}-\d+\.\d{2}\)"


@pytest.mark.slow
def test_quick_bench_prints_the_ratio_tables(capsys, tmp_path):
    report = main(["--quick", "--sections", "ratios,growth", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "| llama (reference) |" in out and "| qwen3-moe (reference) |" in out
    for name in [*NORM_SCHEME_NAMES, "span + width rule", "llama again (A/A)", "span-moe", "qwen3-moe again (A/A)"]:
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert len(re.findall(RATIO, row)) == 4, row  # train, prefill, decode b1, decode b2
        assert re.search(r"\| \d+\.\d{3}x \|$", row), row  # peak memory ratio
    assert "Targets for `span`:" in out and "Targets for `span-moe`:" in out
    assert "Targets for `span + width rule`:" in out
    for title in ("### Depth", "### Sequence length", "### Experts at fixed active parameters"):
        assert title in out
    assert set(report["dense"]["ratios"]) == {*NORM_SCHEME_NAMES, "span + width rule", "llama again (A/A)"}
    assert (tmp_path / "bench.json").read_text().startswith("{")


def test_contenders_share_every_weight_matrix_shape():
    dense_ref = build(llama_config(QUICK), torch.device("cpu"), torch.float32)
    moe_ref = build(qwen3_moe_config(QUICK), torch.device("cpu"), torch.float32)
    for scheme in NORM_SCHEME_NAMES:
        model = build(spannorm_config(QUICK, scheme), torch.device("cpu"), torch.float32)
        assert matmul_params(model) == matmul_params(dense_ref), scheme
    ruled = build(spannorm_config(QUICK, width_rule=True), torch.device("cpu"), torch.float32)
    assert matmul_params(ruled) == matmul_params(dense_ref) and ruled.config.width_multiplier == 4
    moe = build(spannorm_config(QUICK, moe=True), torch.device("cpu"), torch.float32)
    assert matmul_params(moe) == matmul_params(moe_ref)
    assert moe.config.qk_norm and moe.config._experts_implementation == moe_ref.config._experts_implementation


def test_paired_ratio_is_the_median_of_within_round_ratios():
    times = {"ref": [1.0, 2.0, 4.0, 1.0, 1.0], "x": [1.1, 2.2, 4.4, 1.1, 5.0]}
    median, q1, q3 = paired_ratio(times, "x", "ref")
    assert median == pytest.approx(1.1) and q1 == pytest.approx(1.1) and q3 > 1.1


def test_bad_arguments_are_rejected_naming_the_value(capsys):
    with pytest.raises(SystemExit):
        main(["--sections", "ratios,speed"])
    assert "speed" in capsys.readouterr().err
