"""Every norm scheme against its equations (README, "Every scheme, one field"), written out here by hand.

The forward pass is recomputed from the same weights with a hand-written RMSNorm and each scheme's equations,
independently of `NORM_SCHEMES` and its block functions, so a norm applied in the wrong place, a missing skip
scale or a swapped pair of norms fails. Norm gains are randomized so that swapping two norms changes the output.
"""

import pytest
import torch

from spannorm_hf import NORM_SCHEME_NAMES, SpanNormForCausalLM

from helpers import moe_config, tiny_config

LAYERS = 3


def rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """RMSNorm by its definition, reading only the module's gain and epsilon."""
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def skip_scale(scheme: str) -> float:
    """The config defaults: CompleteP's a = 2L for span, DeepNet's (2L)^(1/4) for deepnorm, else 1."""
    return {"span": 2.0 * LAYERS, "deepnorm": (2 * LAYERS) ** 0.25}.get(scheme, 1.0)


def block(scheme: str, i: int, layer, x: torch.Tensor, attn) -> torch.Tensor:
    """One decoder block of `scheme`, as the README's table writes it."""
    a, ffn = skip_scale(scheme), layer.mlp
    if scheme == "span":  # y = N_attn(a x + Attn(u)), u = N_in(x) in block 0 only; x' = N_ffn(a x + FFN(y))
        u = rms(x, layer.input_layernorm) if i == 0 else x
        y = rms(a * x + attn(u), layer.post_attention_layernorm)
        return rms(a * x + ffn(y), layer.post_feedforward_layernorm)
    if scheme == "pre":  # h = x + Attn(N1(x)); x' = h + FFN(N2(h))
        h = x + attn(rms(x, layer.input_layernorm))
        return h + ffn(rms(h, layer.pre_feedforward_layernorm))
    if scheme in ("post", "deepnorm"):  # h = N1(a x + Attn(x)); x' = N2(a h + FFN(h)), a = 1 for post
        h = rms(a * x + attn(x), layer.post_attention_layernorm)
        return rms(a * h + ffn(h), layer.post_feedforward_layernorm)
    if scheme == "peri":  # h = x + No1(Attn(N1(x))); x' = h + No2(FFN(N2(h)))
        h = x + rms(attn(rms(x, layer.input_layernorm)), layer.post_attention_layernorm)
        return h + rms(ffn(rms(h, layer.pre_feedforward_layernorm)), layer.post_feedforward_layernorm)
    if scheme == "hybrid":  # h = x + Attn_qkv-norm(x); x' = N(h) + FFN(N(h))
        n = rms(x + attn(x), layer.pre_feedforward_layernorm)
        return n + ffn(n)
    raise AssertionError(f"no equations written for scheme {scheme!r}")


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("scheme", NORM_SCHEME_NAMES)
def test_block_output_equals_the_scheme_equations(scheme, kind):
    config = (moe_config if kind == "moe" else tiny_config)(norm_scheme=scheme, num_hidden_layers=LAYERS)
    config._attn_implementation = "sdpa"  # causal with no mask, as the model's own call below
    model = SpanNormForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    ids = torch.randint(1, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        x = model.model.embed_tokens(ids)
        cos_sin = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
        for i, layer in enumerate(model.model.layers):

            def attn(u, layer=layer):
                return layer.self_attn(u, position_embeddings=cos_sin, attention_mask=None)[0]

            x = block(scheme, i, layer, x, attn)
        if scheme in ("pre", "peri", "hybrid"):  # the schemes whose stream is not normalized end in a final norm
            x = rms(x, model.model.norm)
        expected = model.lm_head(x)
    # Same weights and the same ops in the same order, except RMSNorm written by hand (fp32 rounding of rsqrt vs
    # pow/mean inside transformers' module): a few ulps per norm, far below any wiring mistake (order 1e-1).
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_hidden_states_are_the_embeddings_and_every_block_output():
    model = SpanNormForCausalLM(tiny_config(num_hidden_layers=LAYERS)).eval()
    out = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1  # like Llama
