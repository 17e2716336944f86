"""Text generation from a SpanNorm checkpoint or adapter (the `spannorm-generate` command, run from a clone); see
spannorm_hf.integrations.generation."""

import sys

from spannorm_hf.integrations.generation import main

if __name__ == "__main__":
    sys.exit(main())
