"""Pretraining: arguments and the loop (`trainer`), data loading and packing (`data`), tokenizer training
(`tokenizer`), the embedded corpus (`corpus`) and per-block statistics (`diagnostics`)."""
