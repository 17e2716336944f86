"""LoRA fine-tuning of a SpanNorm checkpoint; see spannorm_hf.finetune."""

import sys

from spannorm_hf.finetune import main

if __name__ == "__main__":
    sys.exit(main())
