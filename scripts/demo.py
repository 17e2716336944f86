"""Second half of `make demo`: load the exported model in a fresh process through the code saved beside it
(`trust_remote_code=True`; this script never imports spannorm_hf) and print generated text.

    python scripts/demo.py [runs/demo]
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The Python interpreter", "To open a file,", "A dictionary is"]


def main(path: str = "runs/demo") -> None:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    print(f"loaded {type(model).__name__} from {path} (code: {type(model).__module__})")
    metrics = [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in metrics if "val_loss" in r][-1]
    print(f"after {last['step']} steps ({last['tokens']} tokens): validation perplexity {last['val_perplexity']:.1f}")
    torch.manual_seed(0)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2)
        print(f"\n>>> {tokenizer.decode(out[0], skip_special_tokens=True)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
