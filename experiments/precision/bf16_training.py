"""Does training the deep default in bf16 change where it ends? (issue 19, item 4)

SpanNorm's default at L = 48 (CompleteP, a = 2L = 96) adds each block's update to a stream 96 times its size, the
case `bf16_skip.py` says bf16 weights hurt most. This trains that model exactly as the depth grid does (width 128,
200 steps, its best learning rate 1.6e-2, `norm_comparison/run.train_one`) three times on one seed: in fp32, under
bf16 autocast (weights and the residual stream in fp32, matmuls in bf16), and with bf16 parameters (FSDP2's
`MixedPrecisionPolicy(param_dtype=bfloat16)`, one process over gloo: blocks compute with bf16 weights, AdamW keeps
fp32 ones). Each run's validation loss is measured as trained and with its weights in fp32.

    python experiments/precision/bf16_training.py            # about 20 CPU-minutes; resumes where it stopped
    python experiments/precision/bf16_training.py --report-only
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "norm_comparison"))

from spannorm_hf.files import atomic_write_text  # noqa: E402

from grids import GRIDS, RunSpec  # noqa: E402
from run import PRECISIONS, _append, load_bytes, read_records, split_data, train_one, val_batches  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID = GRIDS["depth"]


def report(records: list[dict]) -> str:
    """A markdown table: each precision's validation loss, as trained and in fp32, against the fp32 run's."""
    by = {r.get("precision", "fp32"): r for r in records}
    ref = by.get("fp32", {}).get("val_loss")
    lines = [
        "| training precision | val loss as trained | val loss, weights in fp32 | vs fp32 run | max loss jump | "
        "CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name in PRECISIONS:
        if name not in by:
            lines.append(f"| {name} | not run yet | | | | |")
            continue
        r = by[name]
        fp32 = r.get("val_loss_fp32", r["val_loss"])
        delta = f"{fp32 - ref:+.4f}" if ref is not None and fp32 is not None else "—"
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {fp32:.4f} | {delta} | {r['max_jump']:.3f} | {r['cpu_seconds']:.0f} |"
        )
    spec = records[0] if records else None
    head = (
        f"{spec['arm']}, L = {spec['layers']}, lr {spec['lr']:g}, seed {spec['seed']}, the depth grid's "
        f"{GRID.steps} steps x {GRID.batch_size} x {GRID.seq_len} bytes at width {GRID.width}."
        if spec
        else "No runs yet."
    )
    return "# bf16 training at L = 48\n\n" + head + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", default="span-completep", help="a norm_comparison arm (default: the default)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1.6e-2, help="default: the arm's 200-step best at L = 48")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bf16-training")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    spec = RunSpec(args.arm, args.layers, 0, args.lr, args.seed)
    if not args.report_only:
        tokens, fingerprint = load_bytes(None)
        train, val = split_data(tokens, GRID)
        val = val_batches(val, GRID)
        for precision in PRECISIONS:
            if f"{spec.key}|{precision}" in {r["key"] for r in read_records(path)}:
                continue
            record = train_one(spec, GRID, train, val, precision)
            record["data"] = fingerprint
            record["key"] = f"{spec.key}|{precision}"  # one record per precision in the file
            _append(path, record)
            print(f"[bf16] {precision}: val {record['val_loss']:.4f} ({record['cpu_seconds']:.0f} CPU s)", flush=True)
    records = read_records(path)
    atomic_write_text(args.out / "table.md", report(records))
    print(report(records))


if __name__ == "__main__":
    main()
