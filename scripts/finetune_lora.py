"""LoRA fine-tuning of a SpanNorm checkpoint; see spannorm_hf.integrations.finetune."""

import sys

from spannorm_hf.integrations.finetune import main

if __name__ == "__main__":
    sys.exit(main())
