"""Training never goes on silently on garbage, and its fallbacks say what they did. Config validation: absurd sizes
are refused, naming the field, before anything is written, and unknown keys are not saved. Tiny models, CPU fp32."""

import json
import subprocess
import sys

import pytest

from spannorm_hf import SpanNormConfig, SpanNormForCausalLM

from helpers import ROOT, argv, assert_one_error_line, config_error, subprocess_env, tiny_config


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 10**12),
        ("hidden_size", 10**9),
        ("intermediate_size", 10**9),
        ("num_hidden_layers", 10**6),
        ("num_attention_heads", 10**6),
        ("max_position_embeddings", 10**12),
        ("num_experts", 10**9),
    ],
)
def test_absurd_config_sizes_are_refused_naming_the_field(field, value):
    message = config_error(**{field: value})
    assert f"field '{field}'" in message and "far above any published model" in message and str(value) in message


def test_an_absurd_vocab_size_is_refused_before_anything_is_written(files, tmp_path):
    """vocab_size 10**12 asked the tokenizer trainer for 72 TB: it aborted in Rust (exit 134, no message) and left
    the output folder's marker behind. A fresh process, because the old code kills the process it runs in."""
    config = {**json.loads((files / "dense.json").read_text()), "vocab_size": 10**12}
    (tmp_path / "huge.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"),
               *argv(files, out, config=str(tmp_path / "huge.json"), tokenizer=None)]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_error_line(done.stderr, "field 'vocab_size'", "1000000000000")
    assert not out.exists()


def test_unknown_config_keys_are_warned_about_and_not_saved(tmp_path, caplog):
    """A typo key was warned about with a good suggestion, then kept in every config saved from that one (the
    export included). Keys transformers writes itself (a quantized checkpoint's quantization_config) stay."""
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    saved = {**tiny_config().to_dict(), "num_hidden_layer": 8, "quantization_config": quantization}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        config = SpanNormConfig.from_json_file(tmp_path / "config.json")
    assert "unknown key 'num_hidden_layer' is ignored and not saved; did you mean num_hidden_layers?" in caplog.text
    assert "quantization_config" not in caplog.text
    SpanNormForCausalLM(config).save_pretrained(tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "num_hidden_layer" not in exported and exported["num_hidden_layers"] == 3
    assert exported["quantization_config"] == quantization
