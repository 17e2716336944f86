"""The width rule (`SpanNormConfig.mup_base_width`, muP realized in the parametrization): a coordinate check with
transformers' plain `Trainer`, the model without a rule at the base width, the config round trip, the readout seen
by a serving engine's own LM head, and an exported folder through remote code."""

import json
import tempfile

import pytest
import torch
from transformers import Trainer, TrainingArguments

from spannorm_hf import SpanNormConfig, SpanNormForCausalLM
from spannorm_hf.training.learning_rate import BASE_LR, FALLBACK_LR, predicted_lr

from helpers import ROOT, clean_accelerate_state, config_error, moe_config, run_without_package, tiny_config

VOCAB, SEQ, BATCH, STEPS, LR = 97, 16, 8, 4, 1e-2
WIDTHS = (64, 128, 256, 512)
BASE = 64


def width_config(width: int, base: int | None, **overrides) -> SpanNormConfig:
    """Every hidden dimension grows with the width (the rule's assumption): heads of a fixed size 16, an MLP and
    experts of 2x and 1x the width; two layers."""
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=width // 16,
        head_dim=16,
        max_position_embeddings=SEQ,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        mup_base_width=base,
    )
    if overrides.get("num_experts"):
        sizes.update(num_experts_per_tok=2, moe_intermediate_size=width)
    return SpanNormConfig(**{**sizes, **overrides})


def branch_outputs(model: SpanNormForCausalLM, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's attention and FFN outputs, as they enter the residual sum, and the logits, on `batch`."""
    found, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, module in (("attn", layer.self_attn), ("ffn", layer.mlp)):
            hook = module.register_forward_hook(
                lambda _, __, out, key=f"{name}{i}": found.__setitem__(key, out[0] if isinstance(out, tuple) else out)
            )
            hooks.append(hook)
    with torch.no_grad():
        found["logits"] = model.eval()(batch).logits
    for hook in hooks:
        hook.remove()
    return found


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def coordinates(width: int, base: int | None, seed: int = 0, **overrides) -> dict[str, tuple[float, float]]:
    """{branch or "logits": (RMS after training, RMS of its change)} after STEPS steps of transformers' `Trainer`
    (its AdamW and global-norm clipping at 1.0, one constant learning rate, no warmup or weight decay) on one batch,
    measured on that batch: the coordinate check's activations on the batch being trained."""
    torch.manual_seed(seed)
    model = SpanNormForCausalLM(width_config(width, base, **overrides))
    batch = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    before = branch_outputs(model, batch)
    with tempfile.TemporaryDirectory() as output, clean_accelerate_state():
        args = TrainingArguments(
            output_dir=output,
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        Trainer(model=model.train(), args=args, train_dataset=[{"input_ids": x, "labels": x} for x in batch]).train()
    after = branch_outputs(model, batch)
    return {key: (rms(after[key]), rms(after[key] - before[key])) for key in after}


def measured(widths: tuple[int, ...], base: int | None, **overrides) -> dict[str, tuple[list[float], list[float]]]:
    """{coordinate: (its RMS at each width, its update's RMS at each width)}, printed (pytest -s shows them)."""
    found = {width: coordinates(width, base, **overrides) for width in widths}
    out = {key: tuple([found[w][key][j] for w in widths] for j in (0, 1)) for key in found[widths[0]]}
    for key, (values, updates) in out.items():
        print(f"base {base} {overrides} {key}: rms {values}, update {updates}")
    return out


def spread(values: list[float]) -> float:
    return max(values) / min(values)


# Measured at seeds 0-3 (`coordinates(seed=...)`), with the rule: max/min <= 1.58 for dense span (widths 64..512),
# <= 1.92 for MoE and <= 1.79 for `pre` (widths 64 and 512). What moves is the attention update, which falls with
# width (to ~0.55-0.65 at 512): with 128 tokens a batch, the part of Adam's update uncorrelated with a token's
# activations is still comparable to the correlated part at width 64, and muP shrinks it as 1/sqrt(m). Without the
# rule every update grows from 64 to 512, by >= 3.67 (the logits; the FFN outputs by up to 25x).
FLAT, DRIFT = 2.0, 3.0


def assert_flat_with_the_rule_and_drifting_without(widths: tuple[int, ...], **overrides) -> None:
    with_rule = measured(widths, BASE, **overrides)
    assert set(with_rule) == {"attn0", "ffn0", "attn1", "ffn1", "logits"}
    for key, (values, updates) in with_rule.items():
        assert spread(values) < FLAT and spread(updates) < FLAT, (key, values, updates)
    for key, (_, updates) in measured(widths, None, **overrides).items():
        assert updates[-1] / updates[0] > DRIFT, (key, updates)


@pytest.mark.slow  # 8 tiny Trainer runs up to width 512 (~10 s on a busy 2-core machine)
def test_coordinate_check_is_flat_with_the_rule_and_drifts_without():
    assert_flat_with_the_rule_and_drifting_without(WIDTHS)


@pytest.mark.parametrize("overrides", [dict(num_experts=4), dict(norm_scheme="pre")], ids=["moe", "pre"])
def test_coordinate_check_moe_and_pre(overrides):
    assert_flat_with_the_rule_and_drifting_without((64, 512), **overrides)


def forward_backward(config: SpanNormConfig) -> tuple[dict, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = SpanNormForCausalLM(config)
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(x, labels=x)
    out.loss.backward()
    return model.state_dict(), out.logits, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("scheme", ["span", "pre", "deepnorm", "hybrid"])
@pytest.mark.parametrize("factory", [tiny_config, moe_config], ids=["dense", "moe"])
def test_at_the_base_width_the_rule_is_the_model_without_it(factory, scheme):
    """m = 1: the same init, outputs and gradients, bit for bit (the multipliers would be 1.0; they are skipped)."""
    plain = forward_backward(factory(norm_scheme=scheme))
    ruled = forward_backward(factory(norm_scheme=scheme, mup_base_width=32))  # hidden_size is 32
    for found, expected in zip(ruled, plain, strict=True):
        if isinstance(expected, dict):
            assert found.keys() == expected.keys()
            assert all(torch.equal(found[k], expected[k]) for k in expected)
        else:
            assert torch.equal(found, expected)


def test_with_xavier_init_the_rule_starts_as_the_same_function():
    """Stored hidden weights m times larger, branch inputs and outputs times 1/m: every block computes what it computes
    without the rule; only the readout (logits) is times 1/m. With m = 4 every scaling is exact in floating point."""
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    models, outputs = [], []
    for base in (None, 16):
        torch.manual_seed(0)
        models.append(SpanNormForCausalLM(tiny_config(hidden_size=64, num_attention_heads=4, mup_base_width=base)))
        with torch.no_grad():
            outputs.append(models[-1].eval()(x, output_hidden_states=True))
    plain, ruled = outputs
    for found, expected in zip(ruled.hidden_states[:-1], plain.hidden_states[:-1], strict=True):
        assert torch.equal(found, expected)
    assert torch.equal(ruled.logits * 4, plain.logits)
    stored, effective = (model.model.layers[0].self_attn.v_proj.weight for model in reversed(models))
    assert torch.equal(stored, 4 * effective)


def test_plain_init_is_read_as_tuned_at_the_base_width():
    """N(0, initializer_range) for hidden weights is the init at the base width: effective std 0.02 / sqrt(m), so
    stored (m times) 0.02 sqrt(m); embeddings, the router and the LM head keep 0.02."""
    config = moe_config(
        norm_scheme="pre", hidden_size=256, num_attention_heads=4, moe_intermediate_size=256, mup_base_width=16
    )
    model = SpanNormForCausalLM(config)
    layers = model.model.layers
    for hidden in (layers[0].self_attn.q_proj.weight, layers[0].mlp.down_proj.weight, layers[2].mlp.experts.down_proj):
        assert hidden.std().item() == pytest.approx(0.02 * 4, rel=0.05)
    for readout in (model.model.embed_tokens.weight, layers[2].mlp.gate.weight, model.lm_head.weight):
        assert readout.std().item() == pytest.approx(0.02, rel=0.1)


def test_a_serving_engines_own_lm_head_reads_the_readout_multiplier():
    """Engines run the base model (AutoModel) under their own LM head: the multiplier 1/m must be in its output."""
    model = SpanNormForCausalLM(tiny_config(mup_base_width=8)).eval()
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        engine_logits = model.model(x).last_hidden_state @ model.lm_head.weight.T
        torch.testing.assert_close(engine_logits, model(x).logits, rtol=1e-6, atol=1e-6)  # matmul vs linear kernels


@pytest.mark.parametrize("value", [0, -64, 64.0, "64", True])
def test_bad_base_width_is_an_error_naming_field_and_value(value):
    message = config_error(mup_base_width=value)
    assert "mup_base_width" in message and str(value) in message, message


def test_config_round_trip_and_old_configs_load_without_a_rule(tmp_path):
    config = tiny_config(mup_base_width=16)
    assert config.width_multiplier == 2.0 and tiny_config().width_multiplier is None
    config.save_pretrained(tmp_path)
    assert SpanNormConfig.from_pretrained(tmp_path).mup_base_width == 16
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["mup_base_width"]  # a config.json written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert SpanNormConfig.from_pretrained(tmp_path).mup_base_width is None


REMOTE_LOGITS = """
from transformers import AutoModelForCausalLM
x, found = torch.tensor(json.loads(sys.argv[1])), {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        found[folder] = {"base": model.config.mup_base_width, "logits": model(x).logits.tolist()}
print(json.dumps(found))
"""


@pytest.mark.slow  # a fresh Python (~10 s on a busy 2-core machine)
def test_an_exported_folder_carries_the_rule_through_remote_code(tmp_path):
    torch.set_num_threads(1)  # as the fresh process: the same float computation
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = {}
    for kind, factory in (("dense", tiny_config), ("moe", moe_config)):
        model = SpanNormForCausalLM(factory(mup_base_width=8)).eval()
        model.save_pretrained(tmp_path / kind)
        with torch.no_grad():
            expected[str(tmp_path / kind)] = model(x).logits
    found, _ = run_without_package(REMOTE_LOGITS, [json.dumps(x.tolist()), *expected], tmp_path)
    for folder, logits in expected.items():
        assert found[folder]["base"] == 8
        assert torch.equal(torch.tensor(found[folder]["logits"]), logits), folder


# ---------------------------------------------------------------------------------------------------------
# The learning rate a run takes without --lr, and the README's table of it
# ---------------------------------------------------------------------------------------------------------


def test_predicted_lr_follows_the_studies():
    """With the width rule the base width's rate at every width and depth; without it the rate halves per doubling
    of width (the width study's standard-parametrization finding); other schemes get the fallback and a note."""
    assert predicted_lr(tiny_config(hidden_size=256, mup_base_width=128))[0] == BASE_LR
    assert predicted_lr(tiny_config(hidden_size=512, num_hidden_layers=24, mup_base_width=128))[0] == BASE_LR
    assert predicted_lr(tiny_config(hidden_size=256, mup_base_width=64))[0] == 2 * BASE_LR
    assert predicted_lr(tiny_config(hidden_size=256))[0] == BASE_LR / 2
    assert predicted_lr(tiny_config(hidden_size=64))[0] == 2 * BASE_LR
    for other in (dict(norm_scheme="pre"), dict(residual_scale="deepnet")):
        lr, source = predicted_lr(tiny_config(**other))
        assert lr == FALLBACK_LR and "tune it" in source


def test_readme_states_each_presets_learning_rate():
    """The README's "Which learning rate for my model" table lists every preset with the rate `spannorm-train` takes
    for it without --lr."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Which learning rate for my model", 1)[1].split("\n#", 1)[0]
    rows = {line.split("|")[1].strip(" `"): line.split("|") for line in section.splitlines() if line.startswith("| `")}
    presets = sorted(ROOT.glob("configuration/*.json"))
    assert sorted(rows) == sorted(p.stem for p in presets)
    for path in presets:
        config = SpanNormConfig.from_json_file(path)
        lr, _ = predicted_lr(config)
        cells = [c.strip() for c in rows[path.stem]]
        assert float(cells[5]) == pytest.approx(lr, rel=0.01), path.stem
        assert (int(cells[2]), int(cells[3])) == (config.hidden_size, config.num_hidden_layers), path.stem
        assert cells[4] == ("on (128)" if config.mup_base_width == 128 else "off"), path.stem
