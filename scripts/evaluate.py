"""Perplexity and lm-evaluation-harness scores; see spannorm_hf.evaluation."""

import sys
from pathlib import Path

# Running this file puts scripts/ first on sys.path, where this file would shadow the `evaluate` library that
# lm-eval imports; drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from spannorm_hf.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
