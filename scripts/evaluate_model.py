"""Perplexity and lm-evaluation-harness scores (the `spannorm-evaluate` command); see
spannorm_hf.integrations.evaluation. Not named evaluate.py: run as a script, this folder comes first on sys.path,
and a file named evaluate.py would shadow the `evaluate` library that lm-eval imports."""

import sys

from spannorm_hf.integrations.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
