"""The fused add+norm N(a x + f) against the plain path, and the model under torch.compile."""

import pytest
import torch
from torch import nn
from transformers import CompileConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from spannorm_hf import SpanNormForCausalLM, modeling_spannorm
from spannorm_hf.modeling_spannorm import SpanNormRMSNorm, add_rms_norm, fused_add_rms_norm

from helpers import assert_same_greedy_tokens, tiny_config


def _inputs(shape=(2, 5, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, f = (torch.randn(*shape, generator=g).requires_grad_() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).requires_grad_()
    return x, f, weight


def _value_and_grads(fn, a, x, f, weight):
    out = fn(a, x, f, weight, 1e-6)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    tensors = [x, f, weight] + ([a] if torch.is_tensor(a) else [])
    return out.detach(), torch.autograd.grad((out * probe).sum(), tensors)


@pytest.mark.parametrize("a", [1.0, 2.0**0.5, "learnable"])
def test_compiled_fused_add_norm_matches_the_plain_function(a):
    a = nn.Parameter(torch.tensor(1.3)) if a == "learnable" else a
    x, f, weight = _inputs()
    plain_out, plain_grads = _value_and_grads(add_rms_norm, a, x, f, weight)
    fused_out, fused_grads = _value_and_grads(fused_add_rms_norm(), a, x, f, weight)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_plain_add_norm_is_llama_rmsnorm_of_the_scaled_sum():
    x, f, _ = _inputs()
    norm = SpanNormRMSNorm(32)
    nn.init.normal_(norm.weight)
    reference = LlamaRMSNorm(32)
    reference.load_state_dict(norm.state_dict())
    norm.add_norm_implementation = "plain"
    a = 1.7
    torch.testing.assert_close(norm.add_norm(a, x, f), reference(a * x + f))
    torch.testing.assert_close(add_rms_norm(a, x, f, norm.weight, norm.variance_epsilon), reference(a * x + f))


def test_auto_uses_the_plain_path_on_cpu(monkeypatch):
    def refuse():
        raise AssertionError("the fused path was taken on CPU")

    monkeypatch.setattr(modeling_spannorm, "fused_add_rms_norm", refuse)
    model = SpanNormForCausalLM(tiny_config())
    assert all(m.add_norm_implementation == "auto" for m in model.modules() if isinstance(m, SpanNormRMSNorm))
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    model.set_add_norm_implementation("fused")
    with pytest.raises(AssertionError, match="fused path was taken"):
        model(torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("scheme", ["span", "post", "deepnorm"])
def test_model_fused_and_plain_give_the_same_loss_and_gradients(scheme):
    model = SpanNormForCausalLM(tiny_config(norm_scheme=scheme)).train()
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("plain", "fused"):
        model.set_add_norm_implementation(impl)
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        results[impl] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    for name, grad in results["plain"][1].items():
        torch.testing.assert_close(results["fused"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_add_norm_implementation_is_rejected():
    model = SpanNormForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="'triton'"):
        model.set_add_norm_implementation("triton")


def test_compiled_training_step_matches_eager():
    """A whole-model torch.compile traces the model in one graph (the add+norm takes its plain path, which the
    compiler fuses itself) and trains like eager. `aot_eager` keeps this fast: it runs dynamo and AOT autograd, the
    parts our code can break; inductor's code generation runs in the bench's compile section and on the GPU check."""
    torch.manual_seed(0)
    eager = SpanNormForCausalLM(tiny_config(num_hidden_layers=2)).train()
    torch.manual_seed(0)
    model = SpanNormForCausalLM(tiny_config(num_hidden_layers=2)).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, model)]
    for _ in range(2):
        losses = []
        for forward, optimizer in zip((eager, compiled), optimizers, strict=True):
            loss = forward(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_static_cache_generation_compiles_in_one_graph_and_matches_eager():
    """`generate(cache_implementation="static")` with transformers' compiled decode step (forced on CPU), traced as
    a single graph, gives the eager tokens. `aot_eager` as above: the bench times the inductor version."""
    model = SpanNormForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    prompt = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    config = CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    compiled = model.generate(prompt, compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not take the compiled path"
    assert_same_greedy_tokens(model, compiled[0], eager[0], prompt.shape[1], "compiled decode")
