"""SpanNorm vs transformers' Llama and Qwen3-MoE, side by side: `python scripts/bench.py [--quick] [--sections ...]`;
`--help` lists options. The logic and what each number means: spannorm_hf/benchmark.py."""

from spannorm_hf.benchmark import main

if __name__ == "__main__":
    main()
