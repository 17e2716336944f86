"""Clients this project did not write, on the folders it exports: chat (the trained tokenizer's template, the
`text-generation` pipeline, `generate.py --chat`, fine-tuning's instruction format), the model card of a training
run, and TRL's `SFTTrainer` / the plain `Trainer` loading the folder through remote code with the package hidden."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from spannorm_hf.integrations.finetune import IGNORE_INDEX, encode_instruction, format_prompt
from spannorm_hf.integrations.generation import generate, generation_config, load_model
from spannorm_hf.integrations.hub import TRAINING_DETAILS_FILE, build_hub_folder, load_checkpoint
from spannorm_hf.training.tokenizer import EOS, IM_END, IM_START
from spannorm_hf.training.trainer import parse_args, train

from helpers import (
    argv,
    clean_accelerate_state,
    make_train_files,
    run_script,
    run_without_package,
    save_tiny_checkpoint,
    tiny_tokenizer,
)

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Which module handles paths?"},
    {"role": "assistant", "content": "os.path"},
]


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]


def hub_folder(root: Path, kind: str, **overrides) -> Path:
    """A tiny checkpoint with the trained tokenizer, exported as a Hub folder (what a user downloads)."""
    model, tokenizer = load_checkpoint(save_tiny_checkpoint(root / f"{kind}-ckpt", kind=kind, **overrides))
    return build_hub_folder(model, tokenizer, root / f"{kind}-hub", f"alice/spannorm-{kind}")


# ----------------------------------------------------------------------------------------------------------- chat


def test_trained_tokenizer_has_a_chat_template_with_dedicated_tokens(tmp_path):
    tokenizer = tiny_tokenizer()
    start, end, eos = tokenizer.convert_tokens_to_ids([IM_START, IM_END, EOS])
    assert (start, end, eos) == (3, 4, tokenizer.eos_token_id) and {IM_START, IM_END} <= set(
        tokenizer.all_special_tokens
    )
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|><|im_start|>user\nWhich module handles paths?<|im_end|>"
        "<|im_start|>assistant\nos.path<|im_end|><|endoftext|>"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")

    encoded = tokenizer.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids.count(start) == 3 and ids.count(end) == 3 and ids[-2:] == [end, eos]  # markers are single tokens
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert answer == tokenizer("os.path")["input_ids"] + [end, eos]  # TRL's assistant_only_loss learns to stop
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "system\nAnswer briefly.user\nWhich module handles paths?assistant\nos.path"
    )
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert chat_ids(reloaded, MESSAGES) == ids


def test_instruction_data_and_generate_chat_use_the_chat_template(tmp_path, monkeypatch, capsys):
    tokenizer = tiny_tokenizer()
    prompt_text = format_prompt(tokenizer, "Which module handles paths?")
    assert prompt_text == tokenizer.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    example = encode_instruction(tokenizer, "Which module handles paths?", "os.path", max_length=64)
    n_prompt = len(tokenizer(prompt_text)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["input_ids"] == chat_ids(tokenizer, MESSAGES[1:])  # one EOS, the template's own
    assert tokenizer.decode(example["labels"][n_prompt:]) == "os.path<|im_end|><|endoftext|>"

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    model, loaded_tokenizer = load_model(checkpoint, device="cpu")
    config = generation_config(model, max_new_tokens=6)
    ids = torch.tensor([tokenizer(prompt_text)["input_ids"]])
    expected_ids = model.generate(ids, generation_config=config)[0, ids.shape[1] :]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert generate(model, loaded_tokenizer, ["Which module handles paths?"], config, chat=True) == [expected]
    argv = ["--model", str(checkpoint), "--prompt", "Which module handles paths?", "--chat", "--max-new-tokens", "6"]
    assert run_script("generate.py", [*argv, "--device", "cpu"], monkeypatch) == 0
    assert f"Which module handles paths?{expected}\n" in capsys.readouterr().out


CHAT_PIPELINE = """
from transformers import AutoTokenizer, pipeline
folder, messages = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
chat = pipeline("text-generation", model=folder, trust_remote_code=True, device="cpu")
assert type(chat.model).__module__.startswith("transformers_modules"), type(chat.model).__module__
out = chat(messages, max_new_tokens=6, do_sample=False)
print(json.dumps({"max_length": tokenizer.model_max_length, "template": tokenizer.chat_template,
                  "tokenizer": type(tokenizer).__name__, "reply": out[0]["generated_text"][-1]}))
"""


@pytest.mark.slow  # a fresh Python importing transformers (~20 s on a busy 2-core machine)
def test_exported_folder_chats_through_the_pipeline_without_the_package(tmp_path):
    folder = hub_folder(tmp_path, "dense", max_position_embeddings=96)
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 96
    model, tokenizer = load_checkpoint(folder)
    ids = torch.tensor([chat_ids(tokenizer, MESSAGES[:2], add_generation_prompt=True)])
    new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    expected = tokenizer.decode(new, skip_special_tokens=True)

    found, output = run_without_package(CHAT_PIPELINE, [str(folder), json.dumps(MESSAGES[:2])], tmp_path)
    assert found["reply"] == {"role": "assistant", "content": expected}
    assert found["max_length"] == 96 and found["template"] == tokenizer.chat_template
    assert found["tokenizer"] == "TokenizersBackend"  # a plain fast tokenizer: no tokenizer code runs
    assert "custom code" not in output and "model of type" not in output  # loads without a prompt or warning


PLAIN_TOKENIZER = """
import os
os.dup2(1, 2)  # stderr into stdout, so what each load prints stays in order around the markers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
folder, messages = sys.argv[1], json.loads(sys.argv[2])
def describe(tokenizer):
    texts = ["def main(args):", "Which module handles paths?\\n\\tos.path  <|im_end|>"]
    return {"class": type(tokenizer).__name__, "ids": [tokenizer(text)["input_ids"] for text in texts],
            "template": tokenizer.chat_template, "special": tokenizer.all_special_tokens,
            "chat": tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"],
            "max_length": tokenizer.model_max_length}
print("[plain AutoTokenizer]", flush=True)
plain = describe(AutoTokenizer.from_pretrained(folder))  # no trust_remote_code, stdin closed
print("[the rest]", flush=True)
print(json.dumps({"plain": plain, "no_config": describe(PreTrainedTokenizerFast.from_pretrained(folder)),
                  "trusted": describe(AutoTokenizer.from_pretrained(folder, trust_remote_code=True)),
                  "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
                  "model": type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__}))
"""


@pytest.mark.slow  # a fresh Python importing transformers (~20 s on a busy 2-core machine)
def test_exported_tokenizer_loads_the_same_without_trust_remote_code(tmp_path):
    """Issue 13.4: the folder's tokenizer is a stock one, so `AutoTokenizer.from_pretrained(DIR)` should load it
    silently on a machine without the package. It loads the same tokenizer, but transformers 5 (5.17 to 5.24)
    reads config.json first, and the `auto_map.AutoConfig` there (which AutoConfig/AutoModel* with
    trust_remote_code=True need) makes it ask whether to run the folder's code. Known limitation (README)."""
    folder = hub_folder(tmp_path, "dense", max_position_embeddings=96)
    found, output = run_without_package(PLAIN_TOKENIZER, [str(folder), json.dumps(MESSAGES)], tmp_path)
    assert found["config"] == "SpanNormConfig" and found["model"] == "SpanNormForCausalLM"
    assert found["trusted"]["class"] == "TokenizersBackend" and found["trusted"]["max_length"] == 96
    assert found["plain"] == found["trusted"] and found["no_config"] == found["trusted"]
    plain_output, _, rest = output.partition("[the rest]")
    assert "custom code" not in rest and "model of type" not in rest  # the other loads are silent
    # The limitation itself, asserted so that the README is corrected when a transformers release stops asking.
    assert "custom code" in plain_output, "transformers no longer asks: update README (Loading without the package)"


# ----------------------------------------------------------------------------------------------------------- cards


def test_a_published_training_run_has_a_card_saying_how_it_was_trained(tmp_path, monkeypatch, capsys, no_token):
    (tmp_path / "files").mkdir()
    files = make_train_files(tmp_path / "files")
    run = tmp_path / "run"
    options = dict(config="moe.json", tokenizer=None, max_steps=4, eval_every=2, diag_every=0, save_every=4)
    with clean_accelerate_state():
        train(parse_args(argv(files, run, **options)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val_loss" in r][-1]
    assert last_val["step"] == 4
    assert json.loads((run / "tokenizer_config.json").read_text())["model_max_length"] == 64  # moe.json's context
    assert json.loads((run / TRAINING_DETAILS_FILE).read_text())["optimizer_steps"] == 4

    out = tmp_path / "hub"
    argv_publish = ["--model", str(run), "--repo-id", "alice/spannorm-run", "--dry-run", "--output-dir", str(out)]
    assert run_script("publish.py", argv_publish, monkeypatch) == 0
    card = ModelCard.load(out / "README.md").text
    assert "No training details were recorded" not in card
    assert "| method | pretrained from scratch with spannorm-hf (scripts/train.py, Accelerate) |" in card
    assert f"| last_validation_loss | {last_val['val_loss']:.4f} at step 4 " in card
    assert "| optimizer_steps | 4 |" in card and "| tokens_seen | 512 |" in card  # 4 steps x 4 rows x 32 tokens
    assert "| data | local files: data.txt |" in card and "| sequence_length | 32 |" in card
    assert str(tmp_path) not in card  # local paths stay on the machine that trained
    assert "chat_template.jinja" in capsys.readouterr().out  # the chat template is published with the tokenizer


# -------------------------------------------------------------------------------------------- TRL and the Trainer


SFT = """
import tempfile
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

folder, cases = sys.argv[1], json.loads(sys.argv[2])
texts = ["The os module provides a portable way of using operating system dependent functionality."] * 6
chats = [[{"role": "user", "content": f"Which module handles paths, case {i}?"},
          {"role": "assistant", "content": "os.path handles paths."}] for i in range(6)]
results = {}
for name, (data, lora) in cases.items():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"text": t} for t in texts] if data == "text" else [{"messages": m} for m in chats]
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]) if lora else None
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, max_steps=3, per_device_train_batch_size=2, max_length=80,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         dataloader_num_workers=0, seed=0, assistant_only_loss=data == "chat")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=peft_config)
        first = trainer.train_dataset[0]
        output = trainer.train()
    trained = trainer.model.get_base_model() if lora else trainer.model
    changed = sorted(n for n, p in trained.named_parameters() if n in before and not torch.equal(p, before[n]))
    results[name] = {
        "steps": output.global_step,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "aux_loss": trainer.aux_loss_enabled,
        "input_ids": first["input_ids"],
        "labels": first.get("labels"),
        "changed": changed,
        "lora_b_moved": [n for n, p in trainer.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0],
    }
print(json.dumps(results))
"""


@pytest.mark.slow  # four SFTTrainer runs in a fresh Python (~40 s on a busy 2-core machine)
def test_trl_sft_trains_a_moe_folder_through_remote_code(tmp_path):
    folder = hub_folder(tmp_path, "moe")
    cases = {"text": ["text", False], "text+lora": ["text", True], "chat": ["chat", False], "chat+lora": ["chat", True]}
    results, _ = run_without_package(SFT, [str(folder), json.dumps(cases)], tmp_path)
    _, tokenizer = load_checkpoint(folder)
    text = "The os module provides a portable way of using operating system dependent functionality."
    chat = [
        {"role": "user", "content": "Which module handles paths, case 0?"},
        {"role": "assistant", "content": "os.path handles paths."},
    ]
    for name, found in results.items():
        assert found["steps"] == 3 and len(found["losses"]) == 3, name
        assert all(0 < loss < 20 for loss in found["losses"]), (name, found["losses"])
        assert found["aux_loss"], name  # MoE: TRL adds the router's load-balancing loss
        if name.startswith("chat"):  # TRL rendered the conversations with the folder's chat template
            assert found["input_ids"] == chat_ids(tokenizer, chat)
            answer = [label for label in found["labels"] if label != -100]  # assistant_only_loss: the reply, its end
            assert tokenizer.decode(answer) == "os.path handles paths.<|im_end|><|endoftext|>"
        else:
            assert found["input_ids"] == tokenizer(text + tokenizer.eos_token)["input_ids"]
        if name.endswith("lora"):  # the base is frozen; LoRA trained attention, dense MLP and fused experts
            assert found["changed"] == [], name
            assert any(".mlp.experts." in n for n in found["lora_b_moved"]), name
            assert any(".self_attn.q_proj." in n for n in found["lora_b_moved"]), name
        else:
            assert any(".mlp.experts." in n for n in found["changed"]), name
            assert any(".mlp.router." in n or ".mlp.gate." in n for n in found["changed"]), (name, found["changed"])


TRAINER = """
import tempfile
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
from transformers import Trainer, TrainingArguments

results = {}
for folder in sys.argv[1:]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [f"import os\\nprint(os.getcwd())  # example {i}" for i in range(6)]
    data = Dataset.from_dict(tokenizer(texts))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                                 logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                                 dataloader_num_workers=0)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        output = Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    results[folder] = {
        "steps": output.global_step,
        "loss": output.training_loss,
        "changed": sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()),
        "params": len(before),
    }
print(json.dumps(results))
"""


@pytest.mark.slow  # two Trainer runs in a fresh Python (~35 s on a busy 2-core machine)
def test_plain_trainer_trains_dense_and_moe_folders_through_remote_code(tmp_path):
    folders = [str(hub_folder(tmp_path, "dense")), str(hub_folder(tmp_path, "moe"))]
    results, _ = run_without_package(TRAINER, folders, tmp_path)
    for folder in folders:
        found = results[folder]
        assert found["steps"] == 3 and 0 < found["loss"] < 20, found
        assert found["changed"] == found["params"], found  # every parameter got a gradient step
