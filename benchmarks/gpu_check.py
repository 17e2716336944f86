"""The GPU check of issue 6, run by benchmarks/gpu_check.sh (read its header first): SpanNorm vs Llama at the 1B preset.

bf16 training steps (forward + backward + fused AdamW) with FlashAttention (flash-attn if importable, else PyTorch
SDPA restricted to its flash backend; the output says which ran), model FLOPs utilisation from counted FLOPs, peak
memory, decode tokens/s from a KV cache at batch 1 and 8, and, if time is left, static-cache `generate` with
transformers' compiled decode step. `--dry-run` runs every step on CPU at the tiny preset so the script is known to
work before a GPU is lent.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig

from spannorm_hf import SpanNormConfig
from spannorm_hf.files import atomic_write_text

from benchmark import Contender, build, interleaved, matmul_params, paired_ratio, synchronize

ROOT = Path(__file__).resolve().parent.parent
H200_BF16_DENSE_TFLOPS = 989.0  # datasheet, dense (no sparsity); the measured matmul ceiling is printed beside it
MIN_TRANSFORMERS = (5, 24)


def train_flops(config, batch: int, seq: int) -> float:
    """FLOPs of one training step, counted: 2 per multiply-add of every Linear (LM head included, the embedding
    lookup not), plus causal attention's QK^T and AV (half the square), times 3 for forward + backward."""
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = config.head_dim or h // heads
    kv = config.num_key_value_heads * head_dim
    linear = layers * (h * heads * head_dim + 2 * h * kv + heads * head_dim * h + 3 * h * config.intermediate_size)
    linear += h * config.vocab_size
    attention = layers * 2 * 2 * heads * head_dim * seq / 2  # per token: QK^T + AV, 2 FLOPs each, causal half
    return 3 * batch * seq * (2 * linear + attention)


def matmul_ceiling_tflops(device: torch.device, n: int) -> float:
    """bf16 n^3 matmul rate on random data, mean of 10 after 3 warm-ups: the practical peak MFU is judged by."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def pick_attention(device: torch.device) -> tuple[str, contextlib.AbstractContextManager, str]:
    """flash-attn 2 if importable; else SDPA limited to its flash backend (checked on a GQA causal call first)."""
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2", contextlib.nullcontext(), f"flash-attn {flash_attn.__version__}"
    except ImportError:
        pass
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 4, 16, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 16, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "sdpa", sdpa_kernel(SDPBackend.FLASH_ATTENTION), "SDPA, flash backend only (flash-attn not importable)"
    except RuntimeError as err:
        why = str(err).splitlines()[0][:160]
        return "sdpa", contextlib.nullcontext(), f"SDPA, default backend choice (its flash backend refused: {why})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, same steps: proves the script runs")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "runs" / "gpu_check")))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip optional parts past this many seconds")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, in one place: the 1B preset at its real shapes on the GPU, the tiny preset at toy
    shapes on the dry run, so that every step runs on CPU in minutes."""

    dry_run: bool
    device: torch.device
    preset: str
    batch: int
    seq: int
    prompt_len: int
    new_tokens: int
    rounds: int
    matmul_n: int

    @classmethod
    def of(cls, dry_run: bool) -> "Plan":
        """The plan for a GPU run, or for a dry run on CPU."""
        if dry_run:
            return cls(True, torch.device("cpu"), "spannorm-tiny.json", 2, 64, 8, 8, 3, 512)
        return cls(False, torch.device("cuda"), "spannorm-1b.json", 4, 2048, 128, 64, 6, 8192)


@dataclasses.dataclass
class Timings:
    """Per contender: seconds per training step and per decode (by batch size, 1 and 8), over interleaved rounds;
    peak training memory in bytes."""

    train: dict[str, list[float]]
    memory: dict[str, int]
    decode: dict[int, dict[str, list[float]]]


def refusal(dry_run: bool) -> str | None:
    """Why this machine cannot run the check (an old transformers, or no GPU without --dry-run), said before any
    device time is spent; None when it can."""
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        return (
            f"transformers {transformers.__version__} is older than {MIN_TRANSFORMERS}: carry the wheel (see "
            "benchmarks/gpu_check.sh --fetch-wheels)"
        )
    if not dry_run and not torch.cuda.is_available():
        return "no CUDA device here; use --dry-run to check the script on CPU"
    return None


def model_configs(plan: Plan, attn_impl: str) -> tuple[SpanNormConfig, LlamaConfig]:
    """The preset's SpanNorm config and a Llama config with the same shapes, both on the chosen attention, so the
    two differ only in the norms."""
    span_config = SpanNormConfig.from_json_file(ROOT / "configuration" / plan.preset)
    span_config.max_position_embeddings = max(plan.seq, plan.prompt_len + plan.new_tokens)
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    )
    llama_config = LlamaConfig(
        **{k: getattr(span_config, k) for k in fields}, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    for config in (span_config, llama_config):
        config._attn_implementation = attn_impl
    return span_config, llama_config


def header_lines(plan: Plan, where: str, attn_note: str) -> list[str]:
    """The report's title and the machine line: what ran where, printed before the first measurement."""
    header = [
        f"# GPU check: SpanNorm vs Llama, {plan.preset} shapes, bf16",
        "",
        f"{where}; torch {torch.__version__}; transformers {transformers.__version__}; python "
        f"{sys.version.split()[0]}; attention: {attn_note}",
    ]
    if plan.dry_run:
        header.append("\nDRY RUN: tiny model on CPU, 3 rounds; the numbers only show that every step runs.")
    return header


def build_contenders(span_config: SpanNormConfig, llama_config: LlamaConfig, device: torch.device) -> list[Contender]:
    """Llama first (the reference of every ratio), then SpanNorm, in bf16, checked to share every weight matrix
    shape; on CUDA with fused AdamW."""
    contenders = [
        Contender("llama", build(llama_config, device, torch.bfloat16)),
        Contender("span", build(span_config, device, torch.bfloat16)),
    ]
    for c in contenders:
        assert matmul_params(c.model) == matmul_params(contenders[0].model), c.name
        if device.type == "cuda":
            c.optimizer = torch.optim.AdamW(c.model.parameters(), lr=1e-4, fused=True)
    return contenders


def measure(contenders: list[Contender], plan: Plan, vocab_size: int) -> Timings:
    """The required measurements: training steps, peak training memory, and KV-cache decode at batch 1 and 8,
    interleaved so that both models see the same machine state."""
    ids = torch.randint(3, vocab_size, (plan.batch, plan.seq), device=plan.device)
    train = interleaved(contenders, lambda c: c.train_step(ids), warmup=2, repeats=plan.rounds)
    memory = {c.name: c.peak_train_bytes(ids) for c in contenders}
    decode = {}
    for b in (1, 8):
        prompt = torch.randint(3, vocab_size, (b, plan.prompt_len), device=plan.device)
        decode[b] = interleaved(contenders, lambda c, p=prompt: c.decode(p, plan.new_tokens), warmup=1, repeats=3)
    return Timings(train, memory, decode)


def results_table(
    contenders: list[Contender], plan: Plan, flops: float, ceiling: float, timings: Timings, models: dict
) -> list[str]:
    """The report's main table (step time, ratio vs llama, MFU both ways, memory, decode rates); fills `models`,
    the JSON's per-model numbers, with the same values."""
    lines = [
        "",
        f"Training step: batch {plan.batch} x {plan.seq} tokens, {flops / 1e12:.3g} TFLOP counted per step; MFU "
        f"against the datasheet's {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s and against this card's measured bf16 matmul "
        f"rate ({ceiling:.3g} TFLOP/s). Decode: {plan.new_tokens} greedy tokens from a KV cache after a "
        f"{plan.prompt_len}-token prompt. Medians of {plan.rounds} interleaved rounds; ratios vs llama in the same "
        "rounds.",
        "",
        "| model | step | vs llama | TFLOP/s | MFU (datasheet) | MFU (measured peak) | peak memory | decode b1 "
        "tok/s | decode b8 tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        step = statistics.median(timings.train[c.name])
        tflops = flops / step / 1e12
        ratio = paired_ratio(timings.train, c.name, "llama")
        d1, d8 = (b * plan.new_tokens / statistics.median(timings.decode[b][c.name]) for b in (1, 8))
        memory = timings.memory[c.name]
        lines.append(
            f"| {c.name} | {step * 1e3:.1f} ms | {ratio[0]:.3f}x | {tflops:.3g} | "
            f"{tflops / H200_BF16_DENSE_TFLOPS:.1%} | {tflops / ceiling:.1%} | {memory / 2**20:,.0f} MiB | "
            f"{d1:,.0f} | {d8:,.0f} |"
        )
        models[c.name] = {
            "step_s": step,
            "ratio_vs_llama": ratio[0],
            "tflops": tflops,
            "peak_bytes": memory,
            "decode_b1_tok_s": d1,
            "decode_b8_tok_s": d8,
        }
    return lines


def static_generate(contenders: list[Contender], plan: Plan, vocab_size: int, models: dict) -> list[str]:
    """The optional part, run only while time is left (compiling costs minutes): static-cache `generate` at batch
    1 with transformers' compiled decode step. Prints its lines, adds each rate to `models`, returns the lines."""
    prompt = torch.randint(3, vocab_size, (1, plan.prompt_len), device=plan.device)
    compiled = interleaved(
        contenders, lambda c: c.generate(prompt, plan.new_tokens, compiled=True), warmup=1, repeats=3
    )
    static = ["", "Static-cache generate, batch 1, transformers' compiled decode step:", ""]
    for c in contenders:
        tok_s = plan.new_tokens / statistics.median(compiled[c.name])
        static.append(f"- {c.name}: {tok_s:,.0f} new tokens/s")
        models[c.name]["static_compiled_b1_tok_s"] = tok_s
    print("\n".join(static), flush=True)
    return static


def main(argv=None) -> int:
    """Exit 0 when every model's step time is finite, 1 when not, 2 when this machine cannot run the check."""
    args = parse_args(argv)
    started = time.perf_counter()
    refused = refusal(args.dry_run)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    plan = Plan.of(args.dry_run)
    attn_impl, attn_context, attn_note = pick_attention(plan.device)
    span_config, llama_config = model_configs(plan, attn_impl)
    where = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU (dry run)"
    header = header_lines(plan, where, attn_note)
    print("\n".join(header), flush=True)

    ceiling = matmul_ceiling_tflops(plan.device, plan.matmul_n)
    contenders = build_contenders(span_config, llama_config, plan.device)
    flops = train_flops(span_config, plan.batch, plan.seq)
    result = {
        "device": where,
        "attention": attn_note,
        "preset": plan.preset,
        "batch": plan.batch,
        "seq": plan.seq,
        "matmul_ceiling_tflops": ceiling,
        "train_flops_per_step": flops,
        "models": {},
    }
    with attn_context:
        timings = measure(contenders, plan, span_config.vocab_size)
    lines = results_table(contenders, plan, flops, ceiling, timings, result["models"])
    print("\n".join(lines), flush=True)

    elapsed = time.perf_counter() - started
    if elapsed < args.budget_s / 2:
        lines += static_generate(contenders, plan, span_config.vocab_size, result["models"])
    else:
        lines.append(f"\n(static-cache compiled generate skipped: {elapsed:.0f} s already spent)")
    total = time.perf_counter() - started
    lines.append(f"\nFinished in {total:.0f} s.")
    print(lines[-1].strip())
    for name, text in (("gpu_check.md", "\n".join(header + lines) + "\n"), ("gpu_check.json", json.dumps(result))):
        atomic_write_text(args.out / name, text)  # a rerun never leaves half a file
    if not all(math.isfinite(m["step_s"]) for m in result["models"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
