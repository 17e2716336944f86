"""Data of the `spannorm_tiny_choice` lm-eval task, found next to this file, so the task runs from any working
directory (a `data_files` path in the YAML would be relative to the working directory)."""

from pathlib import Path

from datasets import DatasetDict, load_dataset

DATA = Path(__file__).resolve().with_name("spannorm_tiny_choice.jsonl")


def load(**metadata) -> DatasetDict:
    """lm-eval's `custom_dataset` hook; it passes the task's metadata, which this local file does not need."""
    return load_dataset("json", data_files={"test": str(DATA)})
