"""Named depth rules for `residual_scale` and `branch_init_gain` (issue 10): the numbers the config docstring
documents, what a built model uses, a save/reload round trip that keeps the name, and the errors."""

import json
import math

import pytest
from huggingface_hub.errors import StrictDataclassError

from spannorm_hf import SpanNormConfig, SpanNormForCausalLM
from spannorm_hf.cli import one_line

# The values the SpanNormConfig docstring documents, written out (not recomputed from the rule table).
DOCUMENTED_SKIP = {
    ("deepnet", 6): 1.861,
    ("deepnet", 48): 3.130,
    ("depth_mup", 6): 3.464,
    ("depth_mup", 48): 9.798,
    ("completep", 6): 12.0,
    ("completep", 48): 96.0,
}
DOCUMENTED_GAIN = {("deepnet", 6): 0.3799, ("deepnet", 48): 0.2259}


def config(**kwargs) -> SpanNormConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    return SpanNormConfig(**{**base, **kwargs})


@pytest.mark.parametrize("rule,layers", sorted(DOCUMENTED_SKIP))
@pytest.mark.parametrize("scheme", ["span", "deepnorm"])
def test_residual_scale_rules_give_the_documented_numbers(rule, layers, scheme):
    cfg = config(num_hidden_layers=layers, residual_scale=rule, norm_scheme=scheme)
    assert cfg.skip_scale == pytest.approx(DOCUMENTED_SKIP[(rule, layers)], abs=1e-3)


@pytest.mark.parametrize("rule,layers", sorted(DOCUMENTED_GAIN))
def test_branch_init_gain_rule_gives_the_documented_numbers(rule, layers):
    assert config(num_hidden_layers=layers, branch_init_gain=rule).branch_gain == pytest.approx(
        DOCUMENTED_GAIN[(rule, layers)], abs=1e-4
    )


@pytest.mark.parametrize("layers", [6, 48])
def test_auto_is_deepnet(layers):
    """Every config saved before the depth study holds "auto": it must keep meaning DeepNet's pair."""
    auto, named = (
        config(num_hidden_layers=layers, residual_scale="auto", branch_init_gain="auto"),
        config(num_hidden_layers=layers, residual_scale="deepnet", branch_init_gain="deepnet"),
    )
    assert auto.skip_scale == named.skip_scale == (2 * layers) ** 0.25  # same computation
    assert auto.branch_gain == named.branch_gain


@pytest.mark.parametrize("scheme,rule", [("span", "completep"), ("deepnorm", "auto"), ("pre", "auto")])
def test_default_skip_scale_is_resolved_and_saved_by_name(tmp_path, scheme, rule):
    """Not given, `residual_scale` becomes the scheme's rule at construction and is saved by name, so a checkpoint
    keeps its `a` if the default ever changes again; a config.json without the key gets today's default."""
    cfg = config(num_hidden_layers=6, norm_scheme=scheme)
    assert cfg.residual_scale == rule
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["residual_scale"] == rule
    assert SpanNormConfig.from_pretrained(tmp_path).skip_scale == cfg.skip_scale
    del saved["residual_scale"]
    assert SpanNormConfig.from_dict(saved).residual_scale == rule


@pytest.mark.parametrize("rule,a", [("auto", 24**0.25), ("depth_mup", 24**0.5)])
def test_a_checkpoint_saved_with_an_old_default_loads_unchanged(tmp_path, rule, a):
    """Configs saved before the depth study hold `"auto"` for span (DeepNet's `a`), those saved while depth-muP was
    the default `"depth_mup"`: each keeps its `a`, not today's default."""
    config(num_hidden_layers=12, residual_scale=rule).save_pretrained(tmp_path)
    loaded = SpanNormConfig.from_pretrained(tmp_path)
    assert loaded.residual_scale == rule and loaded.skip_scale == a != SpanNormConfig(num_hidden_layers=12).skip_scale


def test_the_model_uses_the_resolved_rule():
    """Every layer carries the rule's `a`, and the branch weights start at the rule's Xavier gain `b`."""
    hidden, layers = 128, 3
    model = SpanNormForCausalLM(
        config(
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=256,
            residual_scale="completep",
            branch_init_gain="deepnet",
        )
    )
    assert [layer.skip_scale for layer in model.model.layers] == [2.0 * layers] * layers
    v = model.model.layers[0].self_attn.v_proj.weight
    assert v.std().item() == pytest.approx((8 * layers) ** -0.25 * math.sqrt(2 / (2 * hidden)), rel=0.05)
    pre = SpanNormForCausalLM(config(norm_scheme="pre"))
    assert all(layer.skip_scale == 1.0 for layer in pre.model.layers)


@pytest.mark.parametrize("field,rule", [("residual_scale", "depth_mup"), ("residual_scale", "completep")])
def test_saved_config_keeps_the_rule_name(tmp_path, field, rule):
    cfg = config(num_hidden_layers=6, **{field: rule})
    cfg.save_pretrained(tmp_path)
    assert f'"{field}": "{rule}"' in (tmp_path / "config.json").read_text()
    loaded = SpanNormConfig.from_pretrained(tmp_path)
    assert getattr(loaded, field) == rule
    assert loaded.skip_scale == cfg.skip_scale


def test_branch_gain_name_and_none_round_trip(tmp_path):
    for value in ("deepnet", None):
        cfg = config(branch_init_gain=value)
        cfg.save_pretrained(tmp_path)
        assert SpanNormConfig.from_pretrained(tmp_path).branch_init_gain == value


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("residual_scale", "sqrt", "('auto', 'deepnet', 'depth_mup', 'completep')"),
        ("residual_scale", "DeepNet", "('auto', 'deepnet', 'depth_mup', 'completep')"),
        ("branch_init_gain", "completep", "('auto', 'deepnet')"),
    ],
)
def test_a_bad_rule_name_is_an_error_naming_field_value_and_choices(field, value, allowed):
    with pytest.raises(StrictDataclassError) as err:
        config(**{field: value})
    message = one_line(err.value)
    assert f"'{field}'" in message and repr(value) in message and allowed in message, message


def test_a_rule_on_a_scheme_without_skip_scale_is_rejected():
    with pytest.raises(StrictDataclassError, match="residual_scale='depth_mup'.*only the"):
        config(norm_scheme="pre", residual_scale="depth_mup")
    with pytest.raises(StrictDataclassError, match="branch_init_gain='deepnet'.*only the"):
        config(norm_scheme="peri", branch_init_gain="deepnet")
    # None is "the scheme's rule" for residual_scale, but plain init for branch_init_gain: a choice pre cannot take.
    with pytest.raises(StrictDataclassError, match="branch_init_gain=None.*takes 'auto'$"):
        config(norm_scheme="pre", branch_init_gain=None)
    assert config(norm_scheme="pre", residual_scale=None).residual_scale == "auto"
