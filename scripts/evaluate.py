"""Perplexity and lm-evaluation-harness scores; see spannorm_hf.integrations.evaluation."""

import sys
from pathlib import Path

# Running this file puts scripts/ first on sys.path, where this file would shadow the `evaluate` library that
# lm-eval imports; drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from spannorm_hf.integrations.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
