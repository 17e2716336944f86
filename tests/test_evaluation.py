"""Evaluation: sliding-window perplexity against a direct per-token computation, the evaluate script, and
lm-evaluation-harness scoring our model through its `hf` model class on a local task."""

import json
import math
from pathlib import Path

import pytest
import torch

from spannorm_hf.integrations.evaluation import (
    PAPER_TASKS,
    perplexity,
    run_lm_eval,
    sliding_window_nll,
    summarize_lm_eval,
    task_manager,
)

from helpers import assert_one_error_line, run_script

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TEXT = "The interpreter reads a line, parses it and runs it. " * 6


def direct_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Token by token: token i is scored, once, by the first window [b, b + max_length) (b = 0, stride, ...) that
    holds it at a position > 0, conditioned on ids[b:i] only."""
    total, count = 0.0, 0
    for i in range(1, len(ids)):
        starts = [b for b in range(0, len(ids), stride) if b < i < b + max_length]
        if not starts:
            continue
        context = ids[starts[0] : i][None]
        with torch.no_grad():
            logprobs = model(context).logits[0, -1].log_softmax(-1)
        total -= logprobs[ids[i]].item()
        count += 1
    return total, count


@pytest.mark.parametrize("max_length,stride", [(16, 5), (16, 1), (16, 16), (12, 11), (200, 100)])
def test_sliding_window_nll_equals_direct_computation(loaded, max_length, stride):
    model, tokenizer = loaded
    ids = torch.tensor(tokenizer(TEXT)["input_ids"][:45])
    total, count = sliding_window_nll(model, ids, max_length, stride)
    expected_total, expected_count = direct_nll(model, ids, max_length, stride)
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-5)
    if max_length >= len(ids):  # one window: the model's own mean loss
        with torch.no_grad():
            loss = model(ids[None], labels=ids[None]).loss.item()
        assert count == len(ids) - 1 and total / count == pytest.approx(loss, rel=1e-5)
    if stride < max_length:
        assert count == len(ids) - 1  # overlapping windows score every token after the first


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_length=1, stride=1), "max_length"),
        (dict(max_length=8, stride=9), "stride"),
        (dict(stride=0), "stride"),
    ],
)
def test_bad_window_settings(loaded, kwargs, match):
    ids = torch.arange(3, 40)
    with pytest.raises(ValueError, match=match):
        sliding_window_nll(loaded[0], ids, **{"max_length": 8, **kwargs})


def test_evaluate_script_writes_perplexity(checkpoint, loaded, tmp_path, monkeypatch):
    model, tokenizer = loaded
    (tmp_path / "held_out.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "results.json"
    argv = ["--model", str(checkpoint), "--text", str(tmp_path / "held_out.jsonl"), "--max-length", "32"]
    argv += ["--stride", "8", "--device", "cpu", "--output", str(out)]
    assert run_script("evaluate_model.py", argv, monkeypatch) == 0
    report = json.loads(out.read_text())["perplexity"]
    expected = perplexity(model, tokenizer, TEXT + "\n\n" + TEXT, max_length=32, stride=8, dataset="held_out.jsonl")
    assert report["tokens"] == expected.tokens == len(tokenizer(TEXT + "\n\n" + TEXT)["input_ids"]) - 1
    assert report["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(report["nll"]), rel=1e-9)
    assert run_script("evaluate_model.py", ["--model", str(tmp_path), "--text", str(out)], monkeypatch) == 2


def test_evaluate_never_replaces_a_file_it_was_not_told_to(checkpoint, tmp_path, monkeypatch, capsys):
    """An existing --output file is refused before any work (it may be anything of the user's); --overwrite
    replaces it."""
    (tmp_path / "held_out.txt").write_text(TEXT)
    mine = tmp_path / "notes.json"
    mine.write_text("my own notes")
    argv = ["--model", str(checkpoint), "--text", str(tmp_path / "held_out.txt"), "--device", "cpu"]
    capsys.readouterr()
    assert run_script("evaluate_model.py", [*argv, "--output", str(mine)], monkeypatch) == 2
    assert_one_error_line(capsys.readouterr().err, str(mine), "already exists", "--overwrite")
    assert mine.read_text() == "my own notes"
    assert run_script("evaluate_model.py", [*argv, "--output", str(mine), "--overwrite"], monkeypatch) == 0
    assert "perplexity" in json.loads(mine.read_text())


def choice_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized the way lm-eval's HFLM does (whole string, context prefix cut)."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.mark.slow
def test_lm_eval_scores_our_checkpoint_as_an_hf_client(checkpoint, loaded, monkeypatch, tmp_path):
    """lm-eval loads the folder itself (model="hf", pretrained=DIR; the package's registered classes, so no
    trust_remote_code) and scores a task defined in tests/lm_eval_tasks; its log-likelihoods and accuracy must
    equal ours."""
    monkeypatch.chdir(tmp_path)  # the task finds its data from any working directory
    results = run_lm_eval(checkpoint, ["spannorm_tiny_choice"], include_path=TASKS, batch_size=4, device="cpu")
    assert results["config"]["model"] == "hf"
    assert results["config"]["model_args"] == {"pretrained": str(checkpoint.resolve()), "trust_remote_code": False}
    model, tokenizer = loaded
    docs = [json.loads(line) for line in (TASKS / "spannorm_tiny_choice.jsonl").read_text().splitlines()]
    samples = sorted(results["samples"]["spannorm_tiny_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    correct = []
    for doc, sample in zip(docs, samples, strict=True):
        ours = [choice_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(float(max(range(len(ours)), key=ours.__getitem__) == doc["answer"]))
    summary = summarize_lm_eval(results)["spannorm_tiny_choice"]
    assert summary["metrics"]["acc"] == pytest.approx(sum(correct) / len(correct))
    assert set(summary["metrics"]) == {"acc", "acc_norm"} and summary["dataset"] is None

    with pytest.raises(ValueError, match="no_such_task"):
        run_lm_eval(checkpoint, ["no_such_task"], include_path=TASKS)
    assert set(PAPER_TASKS) <= set(task_manager(str(TASKS)).all_tasks)  # the names we pass through exist in lm-eval


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ([], ["nothing to do: give --text"]),
        (["--text", "missing.txt"], ["missing.txt' not found"]),
        (["--text", "held_out.txt", "--stride", "0"], ["stride=0 must be in [1,", "(--stride)"]),
        (["--tasks", "x", "--batch-size", "big"], ["--batch-size 'big' must be a whole number from 1 to 1024"]),
        (["--text", "held_out.txt", "--max-length", "nan"], ["argument --max-length/--max_length: invalid int value"]),
    ],
)
def test_evaluate_script_bad_input_is_one_line(checkpoint, tmp_path, monkeypatch, capsys, extra, fragments):

    monkeypatch.chdir(tmp_path)
    (tmp_path / "held_out.txt").write_text(TEXT)
    assert run_script("evaluate_model.py", ["--model", str(checkpoint), "--device", "cpu", *extra], monkeypatch) == 2
    assert_one_error_line(capsys.readouterr().err, *fragments)
