"""The model family: every norm scheme, dense and MoE, against transformers' machinery."""

import copy
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

import spannorm_hf
from spannorm_hf import NORM_SCHEME_NAMES, SpanNormConfig, SpanNormForCausalLM, SpanNormForSequenceClassification

from helpers import assert_same_greedy_tokens, config_error, generate_in_fresh_process, moe_config, tiny_config

SCHEMES_X_KIND = [(s, k) for s in NORM_SCHEME_NAMES for k in ("dense", "moe")]


def build(scheme="span", kind="dense", **kw) -> SpanNormForCausalLM:
    config = (moe_config if kind == "moe" else tiny_config)(norm_scheme=scheme, **kw)
    return SpanNormForCausalLM(config).eval()


def ids(batch=2, length=11, vocab=97, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme,kind", SCHEMES_X_KIND)
def test_forward_backward_and_loss(scheme, kind):
    model = build(scheme, kind).train()
    x = ids()
    out = model(x, labels=x)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_moe_aux_loss_is_added_with_its_coefficient():
    model = build("span", "moe", router_aux_loss_coef=0.5)
    x = ids()
    plain = model(x, labels=x)
    routed = model(x, labels=x, output_router_logits=True)
    assert plain.aux_loss is None and routed.aux_loss is not None
    assert len(routed.router_logits) == 2  # 3 layers, the first one dense
    assert routed.router_logits[0].shape == (x.numel(), 4)
    torch.testing.assert_close(routed.loss, plain.loss + 0.5 * routed.aux_loss)


def test_schemes_own_only_their_norms():
    keys = {s: set(build(s).state_dict()) for s in NORM_SCHEME_NAMES}
    layer1 = {s: {k.split("layers.1.")[1] for k in v if "layers.1." in k and "norm" in k} for s, v in keys.items()}
    assert layer1["span"] == {"post_attention_layernorm.weight", "post_feedforward_layernorm.weight"}
    assert "model.layers.0.input_layernorm.weight" in keys["span"]
    assert layer1["pre"] == {"input_layernorm.weight", "pre_feedforward_layernorm.weight"}
    assert layer1["post"] == layer1["deepnorm"] == layer1["span"]
    assert len(layer1["peri"]) == 4
    assert layer1["hybrid"] == {
        "pre_feedforward_layernorm.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "self_attn.v_norm.weight",
    }
    for scheme, has_final in dict(span=False, pre=True, post=False, deepnorm=False, peri=True, hybrid=True).items():
        assert ("model.norm.weight" in keys[scheme]) == has_final, scheme


def test_scheme_init_gains_and_embeddings():
    cfg = tiny_config(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=500,
    )
    span = SpanNormForCausalLM(cfg)
    b = (8 * 2) ** -0.25
    v = span.model.layers[0].self_attn.v_proj.weight
    assert v.std().item() == pytest.approx(b * math.sqrt(2 / (256 + 256)), rel=0.05)
    q = span.model.layers[0].self_attn.q_proj.weight  # queries and keys: Xavier with gain 1
    assert q.std().item() == pytest.approx(math.sqrt(2 / (256 + 256)), rel=0.05)
    down = span.model.layers[1].mlp.down_proj.weight
    assert down.std().item() == pytest.approx(b * math.sqrt(2 / (512 + 256)), rel=0.05)
    assert span.model.embed_tokens.weight[1:].std().item() == pytest.approx(1.0, rel=0.05)
    assert span.model.embed_tokens.weight[0].abs().sum() == 0  # padding row
    pre = SpanNormForCausalLM(SpanNormConfig(**{**cfg.to_dict(), "norm_scheme": "pre", "residual_scale": None}))
    assert pre.model.layers[0].self_attn.v_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert pre.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    plain = SpanNormForCausalLM(SpanNormConfig(**{**cfg.to_dict(), "branch_init_gain": None}))
    assert plain.model.layers[0].self_attn.v_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    moe = SpanNormForCausalLM(moe_config(hidden_size=256, num_attention_heads=4, moe_intermediate_size=128))
    experts = moe.model.layers[2].mlp.experts
    b3 = (8 * 3) ** -0.25
    assert experts.down_proj.std().item() == pytest.approx(b3 * math.sqrt(2 / (256 + 128)), rel=0.05)


def greedy_without_cache(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
    return seq


@pytest.mark.parametrize("scheme,kind", [("span", "dense"), ("span", "moe"), ("pre", "dense"), ("hybrid", "moe")])
def test_cached_greedy_generation_equals_full_recomputation(scheme, kind):
    model = build(scheme, kind)
    prompt = ids(1, 5)
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == 17
    assert_same_greedy_tokens(model, generated[0], greedy_without_cache(model, prompt, 12)[0], 5, "cache")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_left_padded_batch_generation_equals_per_sequence(kind):
    model = build("span", kind)
    prompts = [ids(1, n, seed=n)[0] for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, do_sample=False)
        got = torch.cat([p, together[row, width:]])
        assert_same_greedy_tokens(model, got, alone[0], len(p), f"row {row}")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_sequences_do_not_attend_across_documents(impl):
    """Training-style packing: per-document position_ids, no cache (as in Llama, a cache disables the detection)."""
    model = build("pre", attn_implementation=impl)
    a, b = ids(1, 6, seed=3), ids(1, 4, seed=4)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits[:, :6], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 6:], model(b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_attention_implementations_agree(kind):
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding in one row
    outputs = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        torch.manual_seed(0)
        config = (moe_config if kind == "moe" else tiny_config)(attn_implementation=impl)
        model = SpanNormForCausalLM(config).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            outputs[impl] = model(x, attention_mask=mask).logits
    valid = mask.bool()
    for impl in ("sdpa", "flex_attention"):
        torch.testing.assert_close(outputs[impl][valid], outputs["eager"][valid], rtol=1e-5, atol=1e-5)


def test_set_attn_implementation_switches_backend():
    model = build("span")
    x = ids()
    reference = model(x).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-5)


def test_experts_implementations_agree():
    x = ids(2, 9)
    results = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        torch.manual_seed(0)
        model = SpanNormForCausalLM(moe_config(experts_implementation=impl)).train()
        assert model.config._experts_implementation == impl
        out = model(x, labels=x)
        out.loss.backward()
        results[impl] = (out.logits.detach(), model.model.layers[2].mlp.experts.gate_up_proj.grad)
    for impl in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(results[impl][0], results["eager"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[impl][1], results["eager"][1], rtol=1e-4, atol=1e-6)


def test_experts_skip_the_expert_parallel_sentinel():
    """Under expert parallelism transformers routes a token's slot that belongs to another rank's experts to index
    num_experts; the experts (Qwen3-MoE's, reused) skip it, as if its weight were 0."""
    experts = build("span", "moe", experts_implementation="eager").model.layers[2].mlp.experts
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1], [2, 4], [4, 3], [1, 2], [3, 0]])  # 4 == num_experts: the sentinel
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    kept = index != 4
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, index, weights), experts(hidden, index * kept, weights * kept))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = build("span", kind).train()
    x = ids()

    def grads():
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    for enable in (model.gradient_checkpointing_enable, model.activation_checkpointing_enable):
        enable()
        assert model.is_activation_checkpointing
        checkpointed = grads()
        for name, grad in reference.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        model.activation_checkpointing_disable()


def test_deprecated_past_key_values_matches_cache():
    model = build("span")
    x = ids(1, 8)
    prefix, last = x[:, :7], x[:, 7:]
    results = []
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        model(prefix, cache=cache)
        results.append(model(last, **{name: cache}).logits)
    full = model(x).logits[:, -1:]
    torch.testing.assert_close(results[0], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1], results[0])


def test_static_cache_generation_matches_dynamic():
    model = build("span")
    prompt = ids(1, 5)
    dynamic = model.generate(prompt, max_new_tokens=6, do_sample=False)
    static = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert_same_greedy_tokens(model, static[0], dynamic[0], 5, "static cache")


def test_logits_to_keep():
    model = build("span")
    x = ids()
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    scheme = "pre" if kind == "dense" else "deepnorm"  # tied embeddings need a scheme that starts them small
    model = build(scheme, kind, tie_word_embeddings=(kind == "dense"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SpanNormForCausalLM
    assert loaded.config.norm_scheme == scheme
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    x = ids()
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert AutoModel.from_pretrained(tmp_path).__class__.__name__ == "SpanNormModel"


def test_save_writes_auto_map_and_code(tmp_path):
    build("span").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "spannorm"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_spannorm.SpanNormConfig",
        "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM",
        "AutoModel": "modeling_spannorm.SpanNormModel",
        "AutoModelForSequenceClassification": "modeling_spannorm.SpanNormForSequenceClassification",
    }
    assert (tmp_path / "configuration_spannorm.py").exists() and (tmp_path / "modeling_spannorm.py").exists()
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_remote_code_folder_loads_without_the_package(tmp_path, kind):
    torch.set_num_threads(1)  # as the fresh process, so both run the same float computation
    model = build("span", kind)
    model.save_pretrained(tmp_path / "model")
    prompt = ids(1, 5)[0].tolist()
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert generate_in_fresh_process(tmp_path / "model", prompt, tmp_path) == expected


INVALID = [
    ("hidden_size", dict(hidden_size=30)),  # 4 heads do not divide 30
    ("num_key_value_heads", dict(num_key_value_heads=3)),
    ("norm_scheme", dict(norm_scheme="sandwich")),
    ("num_experts_per_tok", dict(num_experts=4, num_experts_per_tok=5)),
    ("num_hidden_layers", dict(num_hidden_layers=0)),
    ("vocab_size", dict(vocab_size=-3)),
    ("intermediate_size", dict(intermediate_size=0)),
    ("num_experts", dict(num_experts=-1)),
    ("residual_scale", dict(residual_scale=-1.0)),
    ("residual_scale", dict(norm_scheme="pre", residual_scale=2.0)),
    ("branch_init_gain", dict(branch_init_gain="big")),
    ("rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("head_dim", dict(head_dim=7)),
    ("first_k_dense_layers", dict(num_experts=4, first_k_dense_layers=9)),
    ("attention_dropout", dict(attention_dropout=1.5)),
    ("attention_dropout", dict(attention_dropout="x")),
    ("hidden_act", dict(hidden_act="nope")),
    ("router_aux_loss_coef", dict(num_experts=4, router_aux_loss_coef="x")),
    ("router_aux_loss_coef", dict(num_experts=4, router_aux_loss_coef=-0.1)),
    ("moe_intermediate_size", dict(num_experts=4, moe_intermediate_size=0)),
    *[
        ("tie_word_embeddings", dict(norm_scheme=s, tie_word_embeddings=True))
        for s in ("span", "post", "deepnorm", "peri")
    ],
]


@pytest.mark.parametrize("field,kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_is_an_error_naming_the_field_and_value(field, kwargs):
    message = config_error(**kwargs)
    if field == "hidden_size":
        field = "num_attention_heads"  # the message names the field that fails to divide
    value = kwargs.get(field, kwargs.get("hidden_size"))
    assert field in message and str(value) in message, message


def test_invalid_values_name_what_is_allowed():
    message = config_error(hidden_act="nope")
    assert re.search(r"'hidden_act'.*must be one of .*\bgelu\b.*\bsilu\b.*got nope", message), message
    message = config_error(tie_word_embeddings=True)
    assert "tie_word_embeddings=False or norm_scheme 'pre'/'hybrid'" in message
    message = config_error(attention_dropout="x")
    assert "'attention_dropout'" in message and "expected float" in message
    for scheme in ("pre", "hybrid"):  # embeddings N(0, initializer_range): tying is fine
        assert tiny_config(norm_scheme=scheme, tie_word_embeddings=True).tie_word_embeddings


def test_unknown_keys_warn_with_the_closest_field(caplog, tmp_path):
    with caplog.at_level("WARNING"):
        config = tiny_config(num_hidden_layer=12)
    assert "unknown key 'num_hidden_layer'" in caplog.text and "did you mean num_hidden_layers?" in caplog.text
    assert config.num_hidden_layers == 3  # the typo builds nothing (and is dropped)
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiny_config(colour="blue")
    assert "unknown key 'colour'" in caplog.text and "did you mean" not in caplog.text


def test_configs_saved_by_transformers_load_without_unknown_key_warnings(caplog, tmp_path):
    """Keys transformers writes or converts itself (legacy rope and dtype names, generation settings, special token
    ids, bookkeeping) are not the user's typos."""
    saved = {
        **tiny_config().to_dict(),
        "torch_dtype": "float32",
        "rope_theta": 10000.0,
        "max_length": 20,
        "sep_token_id": 3,
        "_name_or_path": "x",
        "use_bfloat16": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        SpanNormConfig.from_pretrained(tmp_path)
        SpanNormForCausalLM(tiny_config()).save_pretrained(tmp_path / "model")
        AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert "unknown key" not in caplog.text


def test_config_edited_after_construction_is_validated_when_the_model_is_built():
    with pytest.raises(StrictDataclassError, match="norm_scheme"):  # a field is checked on every assignment
        SpanNormConfig.from_dict(tiny_config().to_dict(), norm_scheme="bogus")
    config = tiny_config()
    config.num_hidden_layers = 4  # a valid edit
    config.num_key_value_heads = 3  # a cross-field rule, checked when the model is built
    with pytest.raises(StrictDataclassError, match="num_key_value_heads=3"):
        AutoModelForCausalLM.from_config(config)


def test_invalid_config_json_is_rejected_on_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "spannorm", "norm_scheme": "middle"}))
    with pytest.raises(StrictDataclassError, match="norm_scheme.*middle"):
        SpanNormConfig.from_json_file(path)
    config = tiny_config()
    config.num_key_value_heads = 3
    with pytest.raises(StrictDataclassError, match="num_key_value_heads=3"):  # transformers validates on save too
        config.save_pretrained(tmp_path / "saved")


def test_presets_load(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "configuration")
    names = sorted(os.listdir(root))
    assert {"spannorm-tiny.json", "spannorm-small.json", "spannorm-125m.json", "spannorm-1b.json"} <= set(names)
    for name in names:
        config = SpanNormConfig.from_json_file(os.path.join(root, name))
        assert config.norm_scheme == "span"
    tiny = SpanNormConfig.from_json_file(os.path.join(root, "spannorm-tiny.json"))
    model = AutoModelForCausalLM.from_config(tiny)
    assert isinstance(model, SpanNormForCausalLM)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_registration_is_idempotent():
    import importlib

    importlib.reload(spannorm_hf)
    assert AutoModelForCausalLM.from_config(tiny_config()).__class__.__name__ == "SpanNormForCausalLM"


def test_sequence_classification_head():
    model = SpanNormForSequenceClassification(tiny_config(num_labels=3)).eval()
    x = ids()
    out = model(x, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_bf16_forward_on_cpu(kind):
    reference = build("span", kind)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    out = model(ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.float(), reference(ids()).logits, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_torch_compile_dense_forward():
    model = build("span")
    x = ids()
    reference = model(x).logits
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    torch.testing.assert_close(compiled(x).logits, reference, rtol=1e-4, atol=1e-4)
