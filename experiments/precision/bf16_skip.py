"""How much of a SpanNorm block's update survives bf16, by skip scale `a`.

A SpanNorm block writes x' = N(a x + F) with x of unit RMS, so it changes the stream by about |F| / a: 1% of it for
CompleteP's a = 2L at L = 48. This compares that change computed in float64 with the two bf16 ways a model can
compute it: everything in bf16 (a model loaded with bf16 weights), or the sum in fp32 and only the output rounded to
bf16. (Training with autocast, `--mixed-precision bf16`, keeps the stream in fp32 and loses neither.)

    python experiments/precision/bf16_skip.py
"""

import torch


def rms_norm(s: torch.Tensor) -> torch.Tensor:
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)


def update_error(a: float, branch_rms: float, rows: int = 4096, width: int = 128) -> tuple[float, float]:
    """Relative error of the block's change to the stream: (all bf16, fp32 sum with a bf16 output)."""
    gen = torch.Generator().manual_seed(0)
    x = rms_norm(torch.randn(rows, width, generator=gen)).bfloat16()
    f = (torch.randn(rows, width, generator=gen) * branch_rms).bfloat16()
    exact = rms_norm(a * x.double() + f.double()) - x.double()
    all_bf16 = rms_norm(torch.add(f, x, alpha=a).float()).bfloat16().double() - x.double()
    fp32_sum = rms_norm(torch.add(f.float(), x.float(), alpha=a)).bfloat16().double() - x.double()
    return tuple(((u - exact).norm() / exact.norm()).item() for u in (all_bf16, fp32_sum))


def main() -> None:
    print("| a | rule at L = 48 | branch RMS | update error, all bf16 | fp32 sum, bf16 output |")
    print("|---|---|---|---|---|")
    for a, rule in ((96**0.25, "DeepNet"), (96**0.5, "depth-muP"), (96.0, "CompleteP")):
        for branch_rms in (0.1, 1.0):
            bf16, fp32_sum = update_error(a, branch_rms)
            print(f"| {a:.1f} | {rule} | {branch_rms} | {bf16:.1%} | {fp32_sum:.1%} |")


if __name__ == "__main__":
    main()
