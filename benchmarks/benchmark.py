"""Side-by-side speed and memory of SpanNorm against transformers' own Llama (dense) and Qwen3-MoE (MoE).

Why it is built this way: speed ratios between two models are only meaningful when everything else is equal and
the machine's noise hits both alike. So every contender runs in one process, on the same inputs, dtype, device and
thread count, built from configs with the same matmul parameters (only norm gain vectors differ; the table prints
the totals). After a warm-up the contenders' repeats are interleaved in rotating order (A B C, B C A, ...), so a
neighbour process that slows the machine for a while slows every contender. Each ratio is the median over rounds
of the ratio *within* a round, printed with its inter-quartile range: that range is the noise floor of the run.
Clocks: on CUDA wall time after a synchronize; on CPU the process's CPU time (summed over threads if --threads > 1),
because on a shared machine wall time mostly measures the other processes.

What is measured, per contender:
- training step: forward + backward + AdamW step (+ zero_grad) on a [batch, seq] batch of random tokens;
- prefill: a no-grad forward over [batch, seq] that fills a KV cache (last-token logits, as `generate` does);
- decode: greedy tokens from a KV cache after a prompt, one forward per token (batch 1 and batch 8);
- peak memory of a training step: on CUDA `max_memory_allocated`; on CPU there is no allocator peak counter, so it
  is the bytes of the model's parameters and AdamW state (counted) plus the peak of what the CPU allocator had
  allocated during the step (torch.profiler with `profile_memory=True`, which records every CPU allocation and
  free with the running total). Python objects, the allocator's caching and RSS are not in it.

Cost growth tables (step time vs depth, vs sequence length, MoE step time vs number of experts at fixed active
parameters) and a compile section (torch.compile'd training step, static-cache `generate` eager and compiled, the
fused add+norm path) use the same interleaving.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    CompileConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from spannorm_hf.configuration_spannorm import NORM_SCHEME_NAMES, SpanNormConfig
from spannorm_hf.files import atomic_write_text
from spannorm_hf.modeling_spannorm import SpanNormForCausalLM

WIDTH_RULE = "span + width rule"  # the presets' configuration: span with `mup_base_width`
SECTIONS = ("ratios", "growth", "compile")
DEFAULT_SECTIONS = ("ratios", "growth")  # "compile" spends minutes compiling on a small CPU: ask for it
# Issue 6's targets for SpanNorm / reference: at most this for times and memory, at least this for decode tokens/s.
TARGETS = {
    "dense": {"train": 1.03, "decode_b1": 0.97, "decode_b8": 0.97, "memory": 1.05},
    "moe": {"train": 1.00, "memory": 1.05},
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and workload shapes shared by every contender."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 176  # top-2 of these = the dense MLP's width: equal active FFN parameters
    batch: int = 4
    seq_len: int = 128
    prompt_len: int = 16
    new_tokens: int = 32
    decode_batches: tuple[int, ...] = (1, 8)
    depths: tuple[int, ...] = (2, 4, 8)
    seq_lens: tuple[int, ...] = (64, 128, 256)
    expert_counts: tuple[int, ...] = (4, 8, 16)
    warmup: int = 2
    repeats: int = 7


QUICK = Sizes(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    moe_intermediate_size=32,
    batch=2,
    seq_len=16,
    prompt_len=4,
    new_tokens=4,
    decode_batches=(1, 2),
    depths=(1, 2),
    seq_lens=(8, 16),
    expert_counts=(2, 4),
    warmup=1,
    repeats=3,
)


# ---------------------------------------------------------------------------------------------------------
# Contenders: configs with identical shapes
# ---------------------------------------------------------------------------------------------------------


def _common(sizes: Sizes, layers: int | None = None) -> dict:
    return dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=layers or sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        head_dim=sizes.hidden_size // sizes.num_attention_heads,
        max_position_embeddings=max(sizes.seq_lens + (sizes.seq_len, sizes.prompt_len + sizes.new_tokens)),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )


def _moe(sizes: Sizes, experts: int | None) -> dict:
    return dict(
        num_experts=experts or sizes.num_experts,
        num_experts_per_tok=sizes.num_experts_per_tok,
        moe_intermediate_size=sizes.moe_intermediate_size,
        norm_topk_prob=True,
        output_router_logits=True,  # both train with the load-balancing loss, the same function in both
        router_aux_loss_coef=0.001,
        experts_implementation="grouped_mm",
    )


def llama_config(sizes: Sizes, layers: int | None = None) -> LlamaConfig:
    return LlamaConfig(**_common(sizes, layers))


def qwen3_moe_config(sizes: Sizes, layers: int | None = None, experts: int | None = None) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**_common(sizes, layers), **_moe(sizes, experts), decoder_sparse_step=1, mlp_only_layers=[])


def spannorm_config(
    sizes: Sizes,
    scheme: str = "span",
    layers: int | None = None,
    moe: bool = False,
    experts: int | None = None,
    width_rule: bool = False,
) -> SpanNormConfig:
    """SpanNorm with the reference's shapes. The MoE variant turns on qk_norm: Qwen3-MoE has per-head q/k norms,
    so without them SpanNorm would skip work its reference does. `width_rule`: the presets' `mup_base_width`, set
    to a quarter of the width (at m = 1 the rule is no operation at all)."""
    extra = dict(**_moe(sizes, experts), first_k_dense_layers=0, qk_norm=True) if moe else {}
    rule = {"mup_base_width": sizes.hidden_size // 4} if width_rule else {}
    return SpanNormConfig(**_common(sizes, layers), norm_scheme=scheme, **extra, **rule)


def build(config, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Same seed for every contender; the model class follows the config; weights are made on `device` (a 1B
    model initialised on a GPU takes a second, on the host a minute)."""
    torch.manual_seed(0)
    cls = {SpanNormConfig: SpanNormForCausalLM, LlamaConfig: LlamaForCausalLM, Qwen3MoeConfig: Qwen3MoeForCausalLM}
    with device:
        model = cls[type(config)](config)
    return model.to(dtype=dtype)


def matmul_params(model: nn.Module) -> int:
    """Parameters of every weight matrix (embeddings, projections, experts, head): what must match exactly."""
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2)


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Workloads: each returns the seconds of its timed region
# ---------------------------------------------------------------------------------------------------------


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA (after a synchronize). On CPU the process's CPU time: on a shared machine wall time also
    counts the slices the scheduler gives other processes, which is most of the noise; CPU time does not."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work before reading a clock (a no-op on CPU); gpu_check uses it too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """A model with its optimizer and the workloads run on it."""

    def __init__(self, name: str, model: PreTrainedModel, lr: float = 1e-4, forward: Callable | None = None):
        self.name = name
        self.model = model
        self.forward = model if forward is None else forward  # a torch.compile'd model in the compile section
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.clock = clock(self.device)

    def _step(self, ids: torch.Tensor) -> None:
        loss = self.forward(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, ids: torch.Tensor) -> float:
        self.model.train()
        synchronize(self.device)
        start = self.clock()
        self._step(ids)
        synchronize(self.device)
        return self.clock() - start

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        self.model.eval()
        synchronize(self.device)
        start = self.clock()
        self.forward(input_ids=ids, use_cache=True, logits_to_keep=1)
        synchronize(self.device)
        return self.clock() - start

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, new_tokens: int) -> float:
        """Greedy decoding from a KV cache; only the per-token forwards are timed (the prompt's prefill is not)."""
        self.model.eval()
        out = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        synchronize(self.device)
        start = self.clock()
        for _ in range(new_tokens):
            out = self.model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        synchronize(self.device)
        return self.clock() - start

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> float:
        """`generate` with cache_implementation="static", eager or with transformers' own compiled decode step."""
        self.model.eval()
        config = None
        if compiled:
            config = CompileConfig(fullgraph=False, dynamic=False)  # mode "reduce-overhead": CUDA graphs
            if self.device.type != "cuda":
                config.mode = "default"
                config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        synchronize(self.device)
        start = self.clock()
        self.model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            compile_config=config,
            disable_compile=not compiled,
        )
        synchronize(self.device)
        return self.clock() - start

    def peak_train_bytes(self, ids: torch.Tensor) -> int:
        """Parameters + AdamW state (resident) plus the peak of what one training step allocates on top."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        resident = _tensor_bytes(list(self.model.parameters()) + state)
        if self.device.type == "cuda":
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._step(ids)
            synchronize(self.device)
            return resident + torch.cuda.max_memory_allocated(self.device) - before
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self._step(ids)
        peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                peak = max(peak, node.extra_fields.total_allocated)
        return resident + peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; keep the bench's output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def interleaved(
    contenders: Sequence[Contender], run: Callable[[Contender], float], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Warm each contender up, then time `repeats` rounds, each round running every contender once in an order
    rotated by one per round. Returns per-contender lists aligned by round."""
    for _ in range(warmup):
        for c in contenders:
            run(c)
    times = {c.name: [] for c in contenders}
    for r in range(repeats):
        for i in range(len(contenders)):
            c = contenders[(i + r) % len(contenders)]
            times[c.name].append(run(c))
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> tuple[float, float, float]:
    """Median and inter-quartile range over rounds of time[name] / time[reference] within each round."""
    ratios = sorted(a / b for a, b in zip(times[name], times[reference], strict=True))
    if len(ratios) < 4:
        return statistics.median(ratios), ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


def _ids(sizes: Sizes, batch: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, sizes.vocab_size, (batch, length), generator=g).to(device)


def _fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.3f}x ({r[1]:.2f}-{r[2]:.2f})"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def ratio_table(
    family: str, contenders: list[Contender], sizes: Sizes, device: torch.device, report: dict
) -> list[str]:
    """One family (dense or moe): the reference model first, absolute numbers for it, ratios for the others."""
    ref = contenders[0]
    ids = _ids(sizes, sizes.batch, sizes.seq_len, device)
    w, n = sizes.warmup, sizes.repeats
    columns = {
        "train": (interleaved(contenders, lambda c: c.train_step(ids), w, n), "time"),
        "prefill": (interleaved(contenders, lambda c: c.prefill(ids), w, n), "throughput"),
    }
    for b in sizes.decode_batches:
        prompt = _ids(sizes, b, sizes.prompt_len, device, seed=1)
        times = interleaved(contenders, lambda c, p=prompt: c.decode(p, sizes.new_tokens), w, n)
        columns[f"decode_b{b}"] = (times, "throughput")
    memory = {c.name: c.peak_train_bytes(ids) for c in contenders}

    tokens = {"train": ids.numel(), "prefill": ids.numel()}
    tokens.update({f"decode_b{b}": b * sizes.new_tokens for b in sizes.decode_batches})
    header = ["model", "params", "train step", "prefill tok/s"]
    header += [f"decode b{b} tok/s" for b in sizes.decode_batches] + ["peak train memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    row = [f"{ref.name} (reference)", f"{total_params(ref.model) / 1e6:.3f}M"]
    for key, (times, _) in columns.items():
        med = statistics.median(times[ref.name])
        row.append(f"{med * 1e3:.1f} ms" if key == "train" else f"{tokens[key] / med:,.0f}")
    lines.append("| " + " | ".join(row + [_mib(memory[ref.name])]) + " |")
    results = {}
    for c in contenders[1:]:
        if matmul_params(c.model) != matmul_params(ref.model):
            raise AssertionError(
                f"{c.name} has {matmul_params(c.model)} matmul parameters, {ref.name} has "
                f"{matmul_params(ref.model)}: the comparison would not be like for like"
            )
        row, results[c.name] = [c.name, f"{total_params(c.model) / 1e6:.3f}M"], {}
        for key, (times, kind) in columns.items():
            r = paired_ratio(times, c.name, ref.name)
            if kind == "throughput":  # time ratio -> throughput ratio (higher is better)
                r = (1 / r[0], 1 / r[2], 1 / r[1])
            row.append(_fmt_ratio(r))
            results[c.name][key] = r[0]
        results[c.name]["memory"] = memory[c.name] / memory[ref.name]
        row.append(f"{results[c.name]['memory']:.3f}x")
        lines.append("| " + " | ".join(row) + " |")
    report[family] = {
        "reference": ref.name,
        "reference_absolute": {k: statistics.median(t[ref.name]) for k, (t, _) in columns.items()},
        "reference_peak_bytes": memory[ref.name],
        "ratios": results,
    }
    for name in [contenders[1].name] + [c.name for c in contenders if c.name == WIDTH_RULE]:  # the presets' own
        lines += ["", _target_line(family, name, results[name])]
    return lines


def _target_line(family: str, name: str, ratios: dict[str, float]) -> str:
    parts = []
    for key, bound in TARGETS[family].items():
        if key not in ratios:
            continue
        higher_is_better = key.startswith("decode")
        ok = ratios[key] >= bound if higher_is_better else ratios[key] <= bound
        sign = ">=" if higher_is_better else "<="
        parts.append(f"{key} {ratios[key]:.3f} (target {sign} {bound}: {'met' if ok else 'MISSED'})")
    return f"Targets for `{name}`: " + "; ".join(parts)


def run_ratios(sizes: Sizes, device: torch.device, dtype: torch.dtype, report: dict) -> list[str]:
    dense = [Contender("llama", build(llama_config(sizes), device, dtype))]
    dense += [Contender(s, build(spannorm_config(sizes, s), device, dtype)) for s in NORM_SCHEME_NAMES]
    dense += [Contender(WIDTH_RULE, build(spannorm_config(sizes, width_rule=True), device, dtype))]
    dense += [Contender("llama again (A/A)", build(llama_config(sizes), device, dtype))]
    lines = ["## Dense: SpanNormForCausalLM (each norm_scheme) vs LlamaForCausalLM", ""]
    lines += ratio_table("dense", dense, sizes, device, report)
    del dense
    moe = [
        Contender("qwen3-moe", build(qwen3_moe_config(sizes), device, dtype)),
        Contender("span-moe", build(spannorm_config(sizes, "span", moe=True), device, dtype)),
        Contender("qwen3-moe again (A/A)", build(qwen3_moe_config(sizes), device, dtype)),
    ]
    lines += ["", "## MoE: SpanNorm vs Qwen3MoeForCausalLM (grouped_mm experts, qk_norm on both)", ""]
    lines += ratio_table("moe", moe, sizes, device, report)
    return lines


def _growth(
    title: str, axis: str, points: list, build_pair: Callable, run: Callable, sizes: Sizes, linear_fit: bool = False
) -> list[str]:
    """Step time of a SpanNorm/reference pair at each point of one axis, all points interleaved together;
    `linear_fit` adds the least-squares line through SpanNorm's times and its worst relative miss."""
    contenders = []
    for p in points:
        span, ref = build_pair(p)
        contenders += [Contender(f"span@{p}", span), Contender(f"ref@{p}", ref)]
    times = interleaved(contenders, lambda c: run(c, int(c.name.split("@")[1])), sizes.warmup, sizes.repeats)
    base = statistics.median(times[f"span@{points[0]}"])
    lines = [
        f"### {title}",
        "",
        f"| {axis} | SpanNorm step | reference step | SpanNorm / reference | SpanNorm vs {axis}={points[0]} |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        s, r = statistics.median(times[f"span@{p}"]), statistics.median(times[f"ref@{p}"])
        ratio = paired_ratio(times, f"span@{p}", f"ref@{p}")
        lines.append(f"| {p} | {s * 1e3:.1f} ms | {r * 1e3:.1f} ms | {_fmt_ratio(ratio)} | {s / base:.2f}x |")
    if linear_fit and len(points) > 1:
        ys = [statistics.median(times[f"span@{p}"]) for p in points]
        slope, intercept = statistics.linear_regression(points, ys)
        miss = max(abs(intercept + slope * p - y) / y for p, y in zip(points, ys, strict=True))
        lines += [
            "",
            f"Linear fit: {intercept * 1e3:.1f} ms + {slope * 1e3:.1f} ms per {axis[:-1]}; worst miss {miss:.1%}.",
        ]
    return lines + [""]


def run_growth(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[str]:
    ids = {n: _ids(sizes, sizes.batch, n, device) for n in sizes.seq_lens + (sizes.seq_len,)}
    lines = ["## Cost growth (training step, median of interleaved repeats)", ""]
    lines += _growth(
        f"Depth (dense, reference Llama, seq {sizes.seq_len})",
        "layers",
        list(sizes.depths),
        lambda L: (
            build(spannorm_config(sizes, layers=L), device, dtype),
            build(llama_config(sizes, L), device, dtype),
        ),
        lambda c, _: c.train_step(ids[sizes.seq_len]),
        sizes,
        linear_fit=True,
    )
    pair = (build(spannorm_config(sizes), device, dtype), build(llama_config(sizes), device, dtype))
    lines += _growth(
        f"Sequence length (dense, reference Llama, {sizes.num_hidden_layers} layers)",
        "seq",
        list(sizes.seq_lens),
        lambda n: pair,
        lambda c, n: c.train_step(ids[n]),
        sizes,
    )
    lines += _growth(
        f"Experts at fixed active parameters (top-{sizes.num_experts_per_tok}, expert width "
        f"{sizes.moe_intermediate_size}, reference Qwen3-MoE)",
        "experts",
        list(sizes.expert_counts),
        lambda e: (
            build(spannorm_config(sizes, moe=True, experts=e), device, dtype),
            build(qwen3_moe_config(sizes, experts=e), device, dtype),
        ),
        lambda c, _: c.train_step(ids[sizes.seq_len]),
        sizes,
    )
    return lines


def run_compile(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[str]:
    """torch.compile'd training step (which fuses each block's add+norm) and static-cache generate, eager and
    compiled."""
    ids = _ids(sizes, sizes.batch, sizes.seq_len, device)
    models = {"span": build(spannorm_config(sizes), device, dtype), "llama": build(llama_config(sizes), device, dtype)}
    eager = [Contender(f"{k} eager", m) for k, m in models.items()]
    compiled = [Contender(f"{k} compiled", m, forward=torch.compile(m, dynamic=False)) for k, m in models.items()]
    start = time.perf_counter()
    for c in compiled:
        c.train_step(ids)  # compile here, outside the timed rounds
    compile_s = time.perf_counter() - start
    train = interleaved(eager + compiled, lambda c: c.train_step(ids), sizes.warmup, sizes.repeats)
    lines = [
        "## torch.compile (training step)",
        "",
        f"(first calls, which compile, took {compile_s:.0f} s together and are not in the table)",
        "",
        "| contender | step | vs span eager | vs llama same mode |",
        "|---|---|---|---|",
    ]
    for c in eager + compiled:
        med = statistics.median(train[c.name])
        mode = c.name.split(" ", 1)[1]
        peer = f"llama {mode}" if f"llama {mode}" in train else "llama eager"
        lines.append(
            f"| {c.name} | {med * 1e3:.1f} ms | {_fmt_ratio(paired_ratio(train, c.name, 'span eager'))} "
            f"| {_fmt_ratio(paired_ratio(train, c.name, peer))} |"
        )
    prompt = _ids(sizes, 1, sizes.prompt_len, device, seed=1)
    gen = [Contender(k, m) for k, m in models.items()]
    lines += ["", '## Static-cache generate (cache_implementation="static"), batch 1, new tokens/s', ""]
    lines += ["| decode step | llama | span | span / llama |", "|---|---|---|---|"]
    for compiled_mode in (False, True):
        times = interleaved(
            gen, lambda c, m=compiled_mode: c.generate(prompt, sizes.new_tokens, m), sizes.warmup, sizes.repeats
        )
        llama, span = (sizes.new_tokens / statistics.median(times[k]) for k in ("llama", "span"))
        ratio = paired_ratio(times, "llama", "span")  # llama time / span time = span's throughput ratio
        mode = "compiled (transformers' CompileConfig)" if compiled_mode else "eager"
        lines.append(f"| {mode} | {llama:,.0f} | {span:,.0f} | {_fmt_ratio(ratio)} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def machine_line(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
        try:
            model = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            where = model[0].split(":", 1)[1].strip() if model else where
        except OSError:
            pass
        where += f", {os.cpu_count()} cores visible"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"device {device.type} ({where}); dtype {str(dtype).removeprefix('torch.')}; torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"load average {load}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {SECTIONS} (default: %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds), not for numbers")
    p.add_argument("--repeats", type=int, help="timed rounds per measurement (default 7; 3 with --quick)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 on CUDA")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: on a shared machine, "
        "oversubscribed OpenMP threads spin and swamp the differences being measured)",
    )
    p.add_argument("--json", type=Path, help="also write the ratios as JSON here (atomically)")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections {args.sections!r}: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    if args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    sections = args.sections.split(",")
    report = {"machine": machine_line(device, dtype), "sizes": dataclasses.asdict(sizes)}
    print("# SpanNorm speed and memory, side by side\n")
    print(report["machine"])
    print(
        f"\nShapes: hidden {sizes.hidden_size}, {sizes.num_hidden_layers} layers, {sizes.num_attention_heads} heads "
        f"({sizes.num_key_value_heads} kv), MLP {sizes.intermediate_size}, vocab {sizes.vocab_size}; MoE "
        f"{sizes.num_experts} experts top-{sizes.num_experts_per_tok} of width {sizes.moe_intermediate_size}. "
        f"Train/prefill batch {sizes.batch}x{sizes.seq_len}; decode {sizes.new_tokens} tokens after a "
        f"{sizes.prompt_len}-token prompt. {sizes.warmup} warm-up + {sizes.repeats} interleaved rounds.\n"
        "Ratios are SpanNorm / reference, median over rounds (inter-quartile range in brackets): training step "
        "time (lower is better), prefill and decode tokens/s (higher is better), peak training memory. The "
        "'again (A/A)' row is a second copy of the reference model: its distance from 1.000x is this run's noise.\n",
        flush=True,
    )
    started = time.perf_counter()
    if "ratios" in sections:
        print("\n".join(run_ratios(sizes, device, dtype, report)) + "\n", flush=True)
    if "growth" in sections:
        print("\n".join(run_growth(sizes, device, dtype)), flush=True)
    if "compile" in sections:
        print("\n".join(run_compile(sizes, device, dtype)), flush=True)
    report["seconds"] = time.perf_counter() - started
    print(f"Finished in {report['seconds']:.0f} s; {machine_line(device, dtype).rsplit('; ', 1)[1]} at the end.")
    if args.json:
        _write_json(args.json, report)
    return report


def _write_json(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2))
