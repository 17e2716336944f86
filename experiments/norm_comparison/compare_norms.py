"""Train every norm scheme (and SpanNorm's scaling candidates) with everything else identical, and write a
results directory: runs.jsonl (one line per run, resumable), table.md and PNG plots.

    cd experiments/norm_comparison
    python compare_norms.py                                   # the full grid (about an hour on 2 CPU cores)
    python compare_norms.py --quick                           # a few minutes
    python compare_norms.py --shard 0/2 & python compare_norms.py --shard 1/2   # two cores
    python compare_norms.py --data my.txt --out results/mine
    python compare_norms.py --report-only --out results/compare-full          # redraw table and plots
"""

import argparse
from pathlib import Path

import torch

from compare import GRIDS, run_grid, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="which grid to run (default: full)")
    parser.add_argument("--quick", action="store_true", help="shorthand for --grid quick")
    parser.add_argument("--data", help="a local text file (.gz allowed); default: the embedded Python-docs corpus")
    parser.add_argument("--out", type=Path, help="results directory (default: results/compare-GRID beside this file)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; these models are too small to gain from more"
    )
    parser.add_argument(
        "--shard", default="0/1", help="I/N: run every N-th pending run from I (start N processes to use N cores)"
    )
    parser.add_argument("--report-only", action="store_true", help="only rewrite table.md and plots from the JSONL")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        shard = tuple(int(part) for part in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    grid = GRIDS["quick" if args.quick else args.grid]
    out = args.out or Path(__file__).resolve().parent / "results" / f"compare-{grid.name}"
    torch.set_num_threads(args.threads)
    if args.report_only:
        written = write_report(out, grid, data=args.data)
    else:
        run_grid(grid, out, data=args.data, shard=shard)
        written = sorted(out.iterdir())
    print(f"[compare] results in {out.resolve()}:")
    for path in written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
