"""Pretrain a SpanNorm model (the `spannorm-train` command, run from a clone): `python scripts/train.py ...` (one
process) or `accelerate launch [--config_file scripts/accelerate/<name>.yaml] scripts/train.py ...`; `--help` lists
options."""

import sys

from spannorm_hf.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
