"""SpanNorm vs transformers' Llama and Qwen3-MoE, side by side: `python benchmarks/bench.py [--quick] [--sections ...]`;
`--help` lists options. The logic and what each number means: benchmarks/benchmark.py."""

from benchmark import main

if __name__ == "__main__":
    main()
