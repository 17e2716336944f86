"""The small shared tools: embedded corpus, tokenizer training, per-block diagnostics."""

import gzip

import pytest
import torch

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.training.corpus import CORPUS_LICENSE, DEFAULT_CORPUS, read_default_corpus
from spannorm_hf.training.diagnostics import BlockStats, block_grad_norms
from spannorm_hf.training.tokenizer import train_tokenizer

from helpers import tiny_config


def test_embedded_corpus_is_small_licensed_text():
    assert DEFAULT_CORPUS.stat().st_size <= 1_000_000
    assert "Python Software Foundation" in CORPUS_LICENSE.read_text()
    text = read_default_corpus()
    assert len(text) > 3_000_000 and "def " in text
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        assert f.read(100) == text[:100]


def test_trained_tokenizer_round_trips_and_saves(tmp_path):
    tok = train_tokenizer(read_default_corpus().splitlines()[:5000], vocab_size=600)
    assert len(tok) == 600 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x  # ünïcode ✓"
    assert tok.decode(tok(text).input_ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tok(text).input_ids
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["a b c"], vocab_size=100)


def test_block_stats_and_grad_norms_match_manual_computation():
    model = SpanNormForCausalLM(tiny_config(norm_scheme="pre"))
    x = torch.randint(1, 97, (2, 8))
    model(x, output_hidden_states=True)  # transformers installs its own capturing hooks on first use
    hooks_before = dict(model.model.layers[0]._forward_hooks)
    with BlockStats(model) as stats:
        out = model(x, labels=x, output_hidden_states=True)
    out.loss.backward()
    # hidden_states[i] is the input of block i; the input of block i + 1 is block i's output
    for i in range(2):
        h_in, h_out = out.hidden_states[i], out.hidden_states[i + 1]
        assert stats.output_rms[i] == pytest.approx(h_out.pow(2).mean(-1).sqrt().mean().item(), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean().item()
        assert stats.cosine[i] == pytest.approx(cos, rel=1e-5)
    norms = block_grad_norms(model)
    manual = torch.cat([p.grad.flatten() for p in model.model.layers[1].parameters()]).norm().item()
    assert len(norms) == 3 and norms[1] == pytest.approx(manual, rel=1e-5)
    assert dict(model.model.layers[0]._forward_hooks) == hooks_before  # ours removed on exit
