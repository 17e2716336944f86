"""LoRA fine-tuning: data formats and loss masking, dense and MoE targets, adapter reload, merge, bad adapters."""

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.integrations.finetune import (
    ADAPTER_BASE_FILE,
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    encode_instruction,
    finetune_lora,
    format_prompt,
    load_adapter,
    load_training_data,
)
from spannorm_hf.integrations.hub import TRAINING_DETAILS_FILE

from helpers import (
    assert_one_error_line,
    finished_run_folder,
    run_script,
    save_tiny_checkpoint,
    snapshot,
    tiny_tokenizer,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant: {% endif %}"
)

INSTRUCTIONS = [
    {"prompt": f"Which module handles paths, case {i}?", "response": " os.path handles paths."} for i in range(12)
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    # a wider init than 0.02 lets the frozen LM head express confident predictions after a few LoRA steps
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ft") / "dense", initializer_range=0.2)


def test_instruction_loss_is_masked_to_the_response():
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = None  # a tokenizer without one (trained ones have it): the fallback format
    example = encode_instruction(tokenizer, "Name a module.", " os", max_length=64)
    prompt_ids = tokenizer(PROMPT_TEMPLATE.format(prompt="Name a module."))["input_ids"]
    response_ids = tokenizer(" os")["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + response_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    short = encode_instruction(tokenizer, "Name a module.", " os", max_length=len(prompt_ids) + 1)
    assert short["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids[:1]


def test_chat_template_formats_instruction_data():
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt_text = format_prompt(tokenizer, "hi")
    assert prompt_text == "<|bos|>user: hi<|endoftext|><|bos|>assistant: "
    example = encode_instruction(tokenizer, "hi", "hello", max_length=64)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    response = tokenizer.decode(example["input_ids"][n_prompt:])
    assert response == "hello<|endoftext|>"  # the template's own end of turn, not a second EOS
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


def test_text_data_is_packed_into_blocks(tmp_path):
    tokenizer = tiny_tokenizer()
    text = "\n".join(f"Line {i} of the documentation." for i in range(40))
    (tmp_path / "notes.txt").write_text(text)
    data = load_training_data(tmp_path / "notes.txt", tokenizer, max_length=16)
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert [len(r) for r in data["input_ids"][:-1]] == [16] * (len(data) - 1)
    assert sum(data["input_ids"], []) == expected
    assert data["labels"] == data["input_ids"]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b"}, {"text": "c d"}])
    packed = load_training_data(jsonl, tokenizer, max_length=64)
    eos = tokenizer.eos_token_id
    assert packed["input_ids"] == [tokenizer("a b")["input_ids"] + [eos] + tokenizer("c d")["input_ids"] + [eos]]
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        load_training_data(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}]), tokenizer, 16)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_training_data(tmp_path / "missing.jsonl", tokenizer, 16)


def masked_loss(model, tokenizer, rows) -> float:
    losses = []
    for row in rows:
        example = encode_instruction(tokenizer, row["prompt"], row["response"], 64)
        ids, labels = (torch.tensor([example[k]]) for k in ("input_ids", "labels"))
        with torch.no_grad():
            losses.append(model(ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_dense_lora_trains_reloads_exactly_and_merges(dense, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", INSTRUCTIONS)
    base = AutoModelForCausalLM.from_pretrained(dense).eval()
    tokenizer = tiny_tokenizer()
    before = masked_loss(base, tokenizer, INSTRUCTIONS)
    result = finetune_lora(
        dense, data, tmp_path / "adapter", merge_dir=tmp_path / "merged", max_steps=24, learning_rate=2e-2,
        batch_size=4, rank=4, alpha=8, dropout=0.0, max_length=64, logging_steps=4,
    )  # fmt: skip
    assert result.steps == 24 and result.examples == len(INSTRUCTIONS)
    assert result.model.base_model.model.is_activation_checkpointing  # on by default
    after = masked_loss(result.model, tokenizer, INSTRUCTIONS)
    assert after < 0.5 * before, (before, after)

    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", ADAPTER_BASE_FILE} <= files
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert all("lora_" in k for k in keys) and not any("lm_head" in k for k in keys)
    assert {k.split(".")[-3] for k in keys} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    details = json.loads((result.adapter_dir / TRAINING_DETAILS_FILE).read_text())
    assert details["optimizer_steps"] == 24 and details["base_model"] == "local checkpoint dense"

    x = torch.tensor([tokenizer("import os.path as p")["input_ids"]])
    with torch.no_grad():
        trained = result.model(x).logits
        reloaded_model, _ = load_adapter(result.adapter_dir)
        reloaded = reloaded_model(x).logits
        merged = SpanNormForCausalLM.from_pretrained(result.merged_dir).eval()
        assert type(AutoModelForCausalLM.from_pretrained(result.merged_dir)) is SpanNormForCausalLM
        merged_logits = merged(x).logits
        base_logits = base(x).logits
    assert torch.equal(reloaded, trained)  # the saved adapter is the trained one, bit for bit
    torch.testing.assert_close(merged_logits, trained, rtol=1e-5, atol=1e-5)  # merged == base + adapter
    assert (trained - base_logits).abs().max() > 1e-2  # and the adapter did change the model
    merged_files = {p.name for p in result.merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_spannorm.py", "tokenizer.json", TRAINING_DETAILS_FILE} <= (
        merged_files
    )
    assert not any("adapter" in name for name in merged_files)


def test_moe_lora_targets_fused_experts_via_the_script(tmp_path, monkeypatch):
    checkpoint = save_tiny_checkpoint(tmp_path / "moe", kind="moe")
    data = write_jsonl(tmp_path / "train.jsonl", INSTRUCTIONS[:8])
    argv = ["--model", str(checkpoint), "--data", str(data), "--output", str(tmp_path / "adapter"), "--max-steps", "4"]
    argv += ["--lr", "2e-2", "--rank", "4", "--max-length", "64", "--dropout", "0"]
    assert run_script("finetune_lora.py", argv, monkeypatch) == 0
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expert_b = [v for k, v in tensors.items() if ".mlp.experts." in k and "lora_B" in k]
    assert len(expert_b) == 2 * 2  # gate_up_proj and down_proj in the 2 sparse layers
    assert all(v.abs().sum() > 0 for v in expert_b)  # zero-initialised lora_B moved: the experts trained
    assert any(".mlp.gate_proj." in k for k in tensors)  # the dense first layer got all-linear LoRA

    merge_only = ["--model", str(tmp_path / "adapter"), "--merge", str(tmp_path / "merged")]
    assert run_script("finetune_lora.py", merge_only, monkeypatch) == 0
    adapted, tokenizer = load_adapter(tmp_path / "adapter")
    merged = SpanNormForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, rtol=0, atol=1e-5)


def test_adapter_for_another_base_is_rejected(dense, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", INSTRUCTIONS[:4])
    adapter = finetune_lora(dense, data, tmp_path / "adapter", max_steps=1, rank=2, batch_size=4).adapter_dir
    retrained = save_tiny_checkpoint(tmp_path / "same-shape-other-weights", seed=1)
    with pytest.raises(ValueError, match="trained on another base"):
        load_adapter(adapter, base=retrained)
    wider = save_tiny_checkpoint(tmp_path / "wider", hidden_size=48)
    (adapter / ADAPTER_BASE_FILE).write_text("{truncated")
    with pytest.raises(ValueError, match=f"{ADAPTER_BASE_FILE}' is not a base record"):
        load_adapter(adapter, base=dense)
    (adapter / ADAPTER_BASE_FILE).unlink()  # an adapter made elsewhere: only PEFT's shape checks remain
    with pytest.raises(ValueError, match="does not fit base"):
        load_adapter(adapter, base=wider)
    with caplog.at_level(logging.WARNING, logger="spannorm_hf.integrations.adapters"):
        load_adapter(adapter, base=retrained)  # same shapes: it loads, but not without a word
    assert f"has no {ADAPTER_BASE_FILE}: cannot check that" in caplog.text and str(retrained) in caplog.text
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(dense)


def test_finetune_script_bad_input_is_one_line_and_touches_nothing(tmp_path, monkeypatch, capsys):

    def fails(argv: list[str], *fragments: str) -> None:
        assert run_script("finetune_lora.py", argv, monkeypatch) == 2
        captured = capsys.readouterr()
        assert_one_error_line(captured.err, *fragments)

    base = save_tiny_checkpoint(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", INSTRUCTIONS[:4])
    adapter = finetune_lora(base, data, tmp_path / "adapter", max_steps=1, rank=2, batch_size=4).adapter_dir
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    fails(["--model", str(adapter), "--merge", str(precious)], str(precious))  # --merge into a non-empty folder
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "mine"
    fails(["--model", str(base), "--merge", str(tmp_path / "m")], "is not a LoRA adapter folder", "give --data")
    fails(["--model", str(base), "--data", str(data)], "--output is required with --data")
    fails(["--model", str(base), "--data", str(data), "--output", str(tmp_path / "a"), "--lr", "nan"], "--lr")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": f"q{i}", "response": ""} for i in range(4)])
    fails(["--model", str(base), "--data", str(empty), "--output", str(tmp_path / "a")], "all 4 responses are empty")
    save_tiny_checkpoint(base, seed=1)  # the base folder now holds other weights
    fails(["--model", str(adapter), "--merge", str(tmp_path / "merged")], "was trained on another base")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists() and not (tmp_path / "merged").exists()


def test_some_empty_responses_are_a_warning(tmp_path, caplog):
    rows = [*INSTRUCTIONS[:3], {"prompt": "Say nothing.", "response": "  "}]
    with caplog.at_level(logging.WARNING, logger="spannorm_hf.integrations.finetune"):
        data = load_training_data(write_jsonl(tmp_path / "some-empty.jsonl", rows), tiny_tokenizer(), 64)
    assert len(data) == 4 and "1 of 4 responses are empty" in caplog.text


def test_merge_never_writes_into_a_folder_it_did_not_create(dense, tmp_path, monkeypatch, capsys):
    """`--merge runs/r` into a training run, or into the adapter's own base, is refused before any work and leaves
    the folder as it was; --overwrite replaces only the files the merge writes."""
    data = write_jsonl(tmp_path / "train.jsonl", INSTRUCTIONS[:4])
    adapter = finetune_lora(dense, data, tmp_path / "adapter", max_steps=1, rank=2, batch_size=4).adapter_dir
    run = tmp_path / "runs" / "r"
    before = finished_run_folder(run)
    base_before = snapshot(dense)
    capsys.readouterr()
    for target, what in ((run, "holds a training run"), (dense, "was not created by this command")):
        assert run_script("finetune_lora.py", ["--model", str(adapter), "--merge", str(target)], monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --merge {str(target)!r} ") and what in err and "--overwrite" in err
    assert snapshot(run) == before and snapshot(dense) == base_before
    with pytest.raises(FileExistsError, match="holds a training run"):  # fine-tuning checks before training
        finetune_lora(dense, data, tmp_path / "adapter2", merge_dir=run, max_steps=1)
    assert not (tmp_path / "adapter2").exists()

    argv = ["--model", str(adapter), "--merge", str(run), "--overwrite"]
    assert run_script("finetune_lora.py", argv, monkeypatch) == 0
    after = snapshot(run)
    kept = ("checkpoints/step-00000004/model.safetensors", "metrics.jsonl", "tensorboard/events.out.tfevents.1")
    assert all(after[name] == before[name] for name in kept)
    assert after["model.safetensors"] != before["model.safetensors"]  # the merge's own files are replaced
