"""Generation: greedy / sampling / beam over batches, streaming, the text-generation pipeline, and the CLI."""

import sys

import pytest
import torch
from transformers import pipeline

from spannorm_hf.integrations.generation import generate, generation_config

from helpers import assert_one_error_line, assert_same_greedy_tokens, run_script

PROMPTS = ["The Python interpreter", "import os", "A list comprehension is"]


def test_batch_generation_equals_one_prompt_at_a_time_and_the_pipeline(checkpoint, loaded):
    model, tokenizer = loaded
    config = generation_config(model, max_new_tokens=8)
    assert not config.do_sample and config.num_beams == 1 and config.eos_token_id == tokenizer.eos_token_id
    batch = generate(model, tokenizer, PROMPTS, config)
    alone = [generate(model, tokenizer, [p], config)[0] for p in PROMPTS]
    for prompt, together, single in zip(PROMPTS, batch, alone, strict=True):
        if together != single:  # left padding rounds the logits differently: only a near-tie may flip a token
            assert_departs_at_a_near_tie(model, tokenizer, prompt, together, config)
    assert all(len(tokenizer(t)["input_ids"]) > 0 for t in batch)  # something was generated
    pipe = pipeline("text-generation", model=str(checkpoint), trust_remote_code=True, device="cpu")
    for prompt, continuation in zip(PROMPTS, alone, strict=True):  # one prompt, the same computation: exact
        out = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
        assert out == prompt + continuation


def assert_departs_at_a_near_tie(model, tokenizer, prompt: str, text: str, config) -> None:
    """`text`, another computation's continuation of `prompt`, leaves the prompt's own greedy continuation only at
    a token whose choice was a near-tie (see conftest.assert_same_greedy_tokens)."""
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
    new = generated_ids(model, tokenizer, prompt, config)
    agree = 0  # leading tokens of the greedy continuation that `text` starts with
    while agree < len(new) and text.startswith(tokenizer.decode(new[: agree + 1], skip_special_tokens=True)):
        agree += 1
    expected = torch.cat([prompt_ids, new])
    got = torch.cat([expected[: len(prompt_ids) + agree], expected.new_full((1,), -1)])  # departs where text does
    assert_same_greedy_tokens(model, got, expected, len(prompt_ids), prompt)


def generated_ids(model, tokenizer, prompt, config):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    return out[0, inputs["input_ids"].shape[1] :]


def test_sampling_settings_reach_generate(loaded):
    model, tokenizer = loaded
    greedy = generated_ids(model, tokenizer, PROMPTS[0], generation_config(model, max_new_tokens=10))
    top1 = generation_config(model, mode="sample", top_k=1, max_new_tokens=10)
    assert top1.do_sample and top1.top_k == 1
    assert torch.equal(generated_ids(model, tokenizer, PROMPTS[0], top1), greedy)
    hot = generation_config(model, mode="sample", temperature=1.5, top_p=0.95, max_new_tokens=10)
    samples = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        samples.append(generated_ids(model, tokenizer, PROMPTS[0], hot))
    assert torch.equal(samples[0], samples[1])  # reproducible for a seed
    assert not torch.equal(samples[0], samples[2])  # and really sampling


def test_repetition_penalty_reaches_generate(loaded):
    model, tokenizer = loaded
    prompt_ids = tokenizer(PROMPTS[1])["input_ids"]
    config = generation_config(model, max_new_tokens=24, repetition_penalty=1e6)
    new = generated_ids(model, tokenizer, PROMPTS[1], config).tolist()
    assert len(set(new)) == len(new) and not set(new) & set(prompt_ids)
    plain = generated_ids(model, tokenizer, PROMPTS[1], generation_config(model, max_new_tokens=24)).tolist()
    assert len(set(plain)) < len(plain)  # without the penalty this tiny model repeats itself


def sequence_logprob(model, prompt_ids, new_ids):
    ids = torch.cat([prompt_ids, new_ids])[None]
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, positions + 1]].sum().item()


def test_beam_search_finds_a_likelier_continuation_than_greedy(loaded):
    model, tokenizer = loaded
    prompt_ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"][0]
    beam_config = generation_config(model, mode="beam", num_beams=4, max_new_tokens=6)
    assert beam_config.num_beams == 4 and not beam_config.do_sample
    beam = generated_ids(model, tokenizer, PROMPTS[2], beam_config)
    greedy = generated_ids(model, tokenizer, PROMPTS[2], generation_config(model, max_new_tokens=6))
    assert len(beam) == len(greedy) == 6
    assert not torch.equal(beam, greedy)
    assert sequence_logprob(model, prompt_ids, beam) > sequence_logprob(model, prompt_ids, greedy)
    texts = generate(model, tokenizer, PROMPTS, beam_config)
    assert texts[2] == tokenizer.decode(beam, skip_special_tokens=True)


def test_streaming_prints_the_same_text(loaded, capsys):
    model, tokenizer = loaded
    config = generation_config(model, max_new_tokens=8)
    expected = generate(model, tokenizer, PROMPTS[:2], config)
    capsys.readouterr()
    streamed = generate(model, tokenizer, PROMPTS[:2], config, stream=True)
    printed = capsys.readouterr().out
    assert streamed == expected
    assert printed == "".join(f"{p}{e}\n" for p, e in zip(PROMPTS[:2], expected, strict=True))
    with pytest.raises(ValueError, match="beam"):
        generate(model, tokenizer, PROMPTS[:1], generation_config(model, mode="beam"), stream=True)


BAD_SETTINGS = [
    ("temperature", dict(mode="sample", temperature=0.0)),
    ("top_p", dict(mode="sample", top_p=1.5)),
    ("top_k", dict(mode="sample", top_k=-1)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("max_new_tokens", dict(max_new_tokens=0)),
    ("num_beams", dict(mode="beam", num_beams=1)),
    ("temperature", dict(mode="greedy", temperature=0.7)),  # would be silently ignored
    ("num_beams", dict(mode="sample", num_beams=3)),
    ("mode", dict(mode="nucleus")),
]


@pytest.mark.parametrize("name,kwargs", BAD_SETTINGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_SETTINGS)])
def test_bad_generation_settings_name_the_setting(loaded, name, kwargs):
    with pytest.raises(ValueError, match=name):
        generation_config(loaded[0], **kwargs)


def test_generate_script(checkpoint, loaded, monkeypatch, capsys, tmp_path):
    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPTS[:2], generation_config(model, max_new_tokens=5))
    argv = ["--model", str(checkpoint), "--max-new-tokens", "5", "--device", "cpu"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(PROMPTS[1] + "\n\n")
    assert (
        run_script("generate.py", [*argv, "--prompt", PROMPTS[0], "--prompts-file", str(prompts_file)], monkeypatch)
        == 0
    )
    out = capsys.readouterr().out
    assert f"{PROMPTS[0]}{expected[0]}\n" in out and f"{PROMPTS[1]}{expected[1]}\n" in out
    assert run_script("generate.py", [*argv, "--prompt", "x", "--mode", "beam", "--stream"], monkeypatch) == 2
    assert "beam" in capsys.readouterr().err
    assert run_script("generate.py", ["--model", str(tmp_path / "missing"), "--prompt", "x"], monkeypatch) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--prompt", ""], ["prompt 1 is empty", "give some text"]),
        (["--prompt", "ok", "--prompt", "import os " * 60], ["prompt 2 has", "more than the model's context of 128"]),
        (["--prompt", "ok", "--max-new-tokens", "200"], ["with max_new_tokens=200", "lower --max-new-tokens"]),
        (["--prompt", "ok", "--temperature", "nan"], ["--temperature", "nan is not a finite number"]),
        ([], ["give at least one --prompt or a --prompts-file"]),
    ],
)
def test_generate_script_rejects_bad_prompts_in_one_line(checkpoint, monkeypatch, capsys, extra, fragments):

    argv = ["--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "8", *extra]
    assert run_script("generate.py", argv, monkeypatch) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, *fragments)
    assert captured.out == ""


def test_a_prompt_that_fits_the_context_exactly_is_generated(loaded):
    model, tokenizer = loaded
    context = model.config.max_position_embeddings
    prompt = " ".join(["import"] * 200)
    ids = tokenizer(prompt)["input_ids"][: context - 4]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text)["input_ids"]) == context - 4
    (out,) = generate(model, tokenizer, [text], generation_config(model, max_new_tokens=4))
    assert len(tokenizer(out)["input_ids"]) > 0
    with pytest.raises(ValueError, match="more than the model's context"):
        generate(model, tokenizer, [text], generation_config(model, max_new_tokens=5))


@pytest.mark.slow  # a fresh Python importing torch and transformers (~20 s on a busy 2-core machine)
def test_generation_imports_neither_fine_tuning_nor_peft():
    """Generating text from a checkpoint loads no PEFT, datasets or Trainer (a fresh process: this one has them)."""
    code = (
        "import sys; import spannorm_hf.integrations.generation\n"
        "print(sorted(m for m in ('peft', 'datasets', 'transformers.trainer', 'spannorm_hf.integrations.finetune')"
        " if m in sys.modules))"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_greedy_token_check_flags_a_clear_departure(loaded):
    model, tokenizer = loaded
    config = generation_config(model, max_new_tokens=6)
    prompt_ids = torch.tensor(tokenizer(PROMPTS[0])["input_ids"])
    expected = torch.cat([prompt_ids, generated_ids(model, tokenizer, PROMPTS[0], config)])
    assert_same_greedy_tokens(model, expected.clone(), expected, len(prompt_ids))
    got = expected.clone()
    got[len(prompt_ids) + 2] = (got[len(prompt_ids) + 2] + 1) % len(tokenizer)
    with pytest.raises(AssertionError, match=f"position {len(prompt_ids) + 2} where the top-2 logit gap"):
        assert_same_greedy_tokens(model, got, expected, len(prompt_ids))
