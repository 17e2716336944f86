"""The model under torch.compile, which is also how each block's add+norm N(a x + f) gets fused into one kernel: the
model itself only ever calls a plain RMSNorm module on a sum (see test_serving.py)."""

import pytest
import torch
from transformers import CompileConfig

from spannorm_hf import SpanNormForCausalLM

from helpers import assert_same_greedy_tokens, tiny_config

pytestmark = pytest.mark.slow  # torch.compile builds C++ kernels: seconds per test


def test_compiled_training_step_matches_eager():
    """A whole-model torch.compile traces the model in one graph (fusing each add+norm) and trains like eager.
    `aot_eager` keeps this fast: it runs dynamo and AOT autograd, the parts our code can break; inductor's code
    generation runs in the bench's compile section and on the GPU check."""
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
