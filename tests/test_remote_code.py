"""The exported folder through remote code, with the package hidden, in clients this project did not write: TRL's
SFTTrainer on a dense model, every class in `auto_map`, and the oldest transformers the model files support."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from spannorm_hf import SpanNormForCausalLM, SpanNormModel
from spannorm_hf.configuration_spannorm import AUTO_MAP, MIN_TRANSFORMERS_VERSION, MOE_FIELDS

from helpers import moe_config, run_without_package, save_tiny_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parent.parent
# `make test` installs transformers==MIN_TRANSFORMERS_VERSION here (Makefile, target `floor`); see test_floor_version.
FLOOR_SITE = ROOT / ".venv-floor-site"
SKIP_FLOOR_VARIABLE = "SPANNORM_SKIP_FLOOR_TEST"


def ids(batch=2, length=9, vocab=97, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- dense looks dense


def test_dense_config_carries_no_moe_settings(tmp_path):
    dense = tiny_config()
    for name in MOE_FIELDS:
        assert not hasattr(dense, name), name
    dense.save_pretrained(tmp_path)
    assert not MOE_FIELDS & set(json.loads((tmp_path / "config.json").read_text()))
    moe = moe_config(router_aux_loss_coef=0.5)
    assert moe.router_aux_loss_coef == 0.5 and moe.num_experts_per_tok == 2 and moe.output_router_logits is False
    assert MOE_FIELDS <= set(moe.to_dict())


def test_a_dense_config_made_moe_afterwards_has_the_moe_defaults():
    dense = tiny_config()
    for moe in (type(dense).from_dict(dense.to_dict(), num_experts=4), copy.deepcopy(dense)):
        moe.num_experts = 4
        assert moe.moe_intermediate_size == dense.intermediate_size and moe.num_experts_per_tok == 2
        assert torch.isfinite(SpanNormForCausalLM(moe)(ids()).logits).all()


def test_dense_config_saved_before_still_loads(tmp_path):
    """Folders exported before dense configs dropped their MoE settings carry them at the defaults: loaded quietly."""
    saved = {**tiny_config().to_dict(), "router_aux_loss_coef": 0.001, "output_router_logits": False}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = type(tiny_config()).from_pretrained(tmp_path)
    assert not hasattr(config, "router_aux_loss_coef") and not hasattr(config, "output_router_logits")


def test_a_dense_model_asked_for_router_logits_does_not_break():
    model = SpanNormForCausalLM(tiny_config()).eval()
    x = ids()
    plain = model(x, labels=x)
    asked = model(x, labels=x, output_router_logits=True)
    assert asked.router_logits is None and asked.aux_loss.item() == 0.0
    assert torch.equal(asked.loss, plain.loss)
    base = model.model(x, output_router_logits=True)  # what TRL's fused loss calls
    assert not base.router_logits


DENSE_SFT = """
import tempfile
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

folder = sys.argv[1]
texts = [f"The os module provides a portable way of using operating system functionality, case {i}." for i in range(6)]
results = {}
for lora in (False, True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, max_steps=3, per_device_train_batch_size=2, max_length=48,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         dataloader_num_workers=0, seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, peft_config=peft_config)
        output = trainer.train()
    trained = trainer.model.get_base_model() if lora else trainer.model
    results["lora" if lora else "full"] = {
        "steps": output.global_step,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "aux_loss": trainer.aux_loss_enabled,
        "changed": sum(not torch.equal(p, before[n]) for n, p in trained.named_parameters() if n in before),
        "lora_b_moved": sum(p.abs().sum().item() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n),
    }
print(json.dumps(results))
"""


@pytest.mark.slow  # two SFTTrainer runs in a fresh Python that imports TRL (~30 s on a busy 2-core machine)
def test_trl_sft_trains_a_dense_folder_through_remote_code(tmp_path):
    """TRL used to turn its MoE load-balancing loss on for dense models and crash in it (issue 13.1)."""
    folder = save_tiny_checkpoint(tmp_path / "dense")
    results, _ = run_without_package(DENSE_SFT, [str(folder)], tmp_path)
    for name, found in results.items():
        assert found["steps"] == 3 and len(found["losses"]) == 3, (name, found)
        assert all(0 < loss < 20 for loss in found["losses"]), (name, found)
        assert found["aux_loss"] is False, name  # a dense model has no load-balancing loss
    assert results["full"]["changed"] > 0
    assert results["lora"]["changed"] == 0 and results["lora"]["lora_b_moved"] > 0


# ------------------------------------------------------------------------------------- every auto_map class loads


AUTO_CLASSES = """
import transformers
from transformers import AutoConfig

folder, expected = sys.argv[1], json.loads(sys.argv[2])
found = {}
# The classifier first: loaded after AutoModel, it would find the base class already registered by that load.
classifier = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    found["scores"] = classifier(torch.tensor(json.loads(sys.argv[3]))).logits.tolist()
for auto_class in expected:
    loaded = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
    found[auto_class] = [type(loaded).__module__.split(".")[0], type(loaded).__name__]
print(json.dumps(found))
"""


def test_every_auto_map_class_loads_through_remote_code(tmp_path):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=3)).eval()
    assert type(classifier.model) is SpanNormModel
    classifier.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    x = ids()
    with torch.no_grad():
        expected_scores = classifier(x).logits
    found, _ = run_without_package(
        AUTO_CLASSES, [str(folder), json.dumps(list(AUTO_MAP)), json.dumps(x.tolist())], tmp_path
    )
    for auto_class, reference in AUTO_MAP.items():
        assert found[auto_class] == ["transformers_modules", reference.split(".")[1]], auto_class
    # The same weights and ops, but the fresh process runs on one thread and this one on OMP_NUM_THREADS, which
    # changes the order of float32 reductions: ~1e-6 on scores of order 1. Loading the wrong weights or code would
    # move them by order 1e-1.
    torch.testing.assert_close(torch.tensor(found["scores"]), expected_scores, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ the oldest transformers


def test_below_the_floor_the_config_says_which_versions_in_one_line(monkeypatch):
    import importlib

    import transformers

    import spannorm_hf.configuration_spannorm as configuration

    monkeypatch.setattr(transformers, "__version__", "5.16.2")
    with pytest.raises(ImportError) as raised:
        importlib.reload(configuration)
    message = str(raised.value)
    assert "\n" not in message and "5.16.2" in message and f">={MIN_TRANSFORMERS_VERSION}" in message
    monkeypatch.undo()
    importlib.reload(configuration)


FLOOR_GENERATE = """
import transformers
from transformers import AutoModelForCausalLM

prompts, found = json.loads(sys.argv[1]), {"version": transformers.__version__, "tokens": {}}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    batch, mask = torch.tensor(prompts["ids"]), torch.tensor(prompts["mask"])
    found["tokens"][folder] = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False).tolist()
print(json.dumps(found))
"""


@pytest.mark.slow  # three model loads in a fresh Python (~15 s on a busy 2-core machine)
def test_floor_version(tmp_path):
    """Folders exported by the newest transformers (dense, MoE, MoE with a width rule) give the same greedy tokens on
    MIN_TRANSFORMERS_VERSION, run from `make test`'s floor environment (.venv-floor-site, ahead of .venv's
    site-packages)."""
    if not (FLOOR_SITE / "transformers").is_dir():
        if os.environ.get(SKIP_FLOOR_VARIABLE) == "1":
            pytest.skip(f"{SKIP_FLOOR_VARIABLE}=1: the transformers-floor check is off")
        pytest.fail(f"no floor environment at {FLOOR_SITE}: run `make floor` (or set {SKIP_FLOOR_VARIABLE}=1)")
    torch.set_num_threads(1)  # as the fresh process: the same float computation, only the transformers differs
    prompts = {"ids": [[0, 0, 5, 17, 33], [9, 8, 7, 6, 5]], "mask": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]}
    folders, expected = [], {}
    for kind, config in (("dense", tiny_config()), ("moe", moe_config()), ("width-rule", moe_config(mup_base_width=8))):
        model = SpanNormForCausalLM(config).eval()
        model.save_pretrained(tmp_path / kind)
        folders.append(str(tmp_path / kind))
        batch, mask = torch.tensor(prompts["ids"]), torch.tensor(prompts["mask"])
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False)
        expected[folders[-1]] = generated.tolist()
    found, _ = run_without_package(
        FLOOR_GENERATE, [json.dumps(prompts), *folders], tmp_path, pythonpath=str(FLOOR_SITE)
    )
    assert found["version"] == MIN_TRANSFORMERS_VERSION
    assert found["tokens"] == expected
