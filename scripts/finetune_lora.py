"""LoRA fine-tuning of a SpanNorm checkpoint (the `spannorm-finetune` command, run from a clone); see
spannorm_hf.integrations.finetune."""

import sys

from spannorm_hf.integrations.finetune import main

if __name__ == "__main__":
    sys.exit(main())
