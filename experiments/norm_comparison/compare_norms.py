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
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from grids import GRIDS, Grid, RunSpec
from report import unigram_loss, write_report
from run import _append, load_bytes, read_records, split_data, train_one, val_batches
from verdicts import missing_runs


def run_grid(
    grid: Grid,
    out_dir: Path,
    data: str | os.PathLike | None = None,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> Path:
    """Run every not-yet-recorded run of `grid` into `out_dir/runs.jsonl`, then write the report.

    The runs the grid's verdict still needs go first, then the rest in the grid's order. `shard=(i, n)` takes every
    n-th of them starting at i, so n processes can share a grid (and the cores)."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is invalid: need 0 <= index < count")
    tokens, fingerprint = load_bytes(data)
    train, val = split_data(tokens, grid)
    val = val_batches(val, grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "runs.jsonl"
    done = {}
    for rec in read_records(path):
        if rec["shape"] != grid.shape() or rec.get("data") != fingerprint:
            raise ValueError(
                f"{path} holds runs of another grid or data (run {rec['key']!r}: grid {rec['grid']!r}, data "
                f"{rec.get('data')!r}); pass a fresh --out to start a new comparison"
            )
        done[rec["key"]] = rec
    needed = missing_runs(list(done.values()), grid.verdict, unigram_loss(train, val))
    todo = pending(grid, done, needed)[index::count]
    log(
        f"[compare] grid {grid.name!r}: {len(grid.runs())} runs, {len(done)} already in {path}, "
        f"{len(todo)} to go in shard {index}/{count}"
    )
    planned = {spec.key for spec in grid.runs()}
    unplanned = [key for key in needed if key not in planned]
    if unplanned:
        log(f"[compare] the verdict needs {len(unplanned)} runs this grid does not plan: {', '.join(unplanned)}")
    t0 = time.time()
    for i, spec in enumerate(todo, 1):
        record = train_one(spec, grid, train, val)
        record["data"] = fingerprint
        _append(path, record)
        eta = (time.time() - t0) / i * (len(todo) - i)
        val_loss = record["val_loss"]
        shown = f"{val_loss:.3f}" if val_loss is not None else "nan"
        log(
            f"[compare] {i}/{len(todo)} {spec.key}: val {shown}{' DIVERGED' if record['diverged'] else ''} "
            f"({record['seconds']:.0f}s, eta {eta / 60:.0f} min)"
        )
    write_report(out_dir, grid, data)
    return out_dir


def pending(grid: Grid, done: dict[str, dict], needed: tuple[str, ...] = ()) -> list[RunSpec]:
    """The grid's runs not in `done`: those in `needed` first (in the grid's order), then the rest."""
    first = set(needed)
    return sorted((spec for spec in grid.runs() if spec.key not in done), key=lambda spec: spec.key not in first)


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
