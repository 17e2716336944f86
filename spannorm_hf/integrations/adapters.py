"""LoRA adapter folders: recognising one, the fingerprint of the base it was trained on, and loading it onto its
base. Generation and evaluation load adapters through this module without importing the fine-tuning code (PEFT
itself is imported only when an adapter is loaded)."""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..cli import SETTINGS_LIMIT, InputError, read_text
from .hub import load_checkpoint, load_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"  # what makes a folder a PEFT adapter
ADAPTER_BASE_FILE = "spannorm_base.json"  # {"base": where, "fingerprint": base_fingerprint(base)}, written by finetune


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a local PEFT adapter folder (rather than a model checkpoint or a Hub id)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG_FILE).is_file()


def _adapter_file_text(path: Path) -> str:
    """The text of one of an adapter folder's JSON files, read as every settings file is (`cli.read_text`: in
    blocks, up to SETTINGS_LIMIT, UTF-8): an adapter comes as a folder someone hands over."""
    return read_text(path, flag="adapter file", limit=SETTINGS_LIMIT, bigger="its settings are a few KB: re-save it")


def adapter_base(adapter_dir: str | os.PathLike) -> str | None:
    """The base model the adapter names (`base_model_name_or_path` of its adapter_config.json)."""
    config_path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} has no {ADAPTER_CONFIG_FILE}: not a PEFT adapter folder")
    text = _adapter_file_text(config_path)
    try:
        return json.loads(text).get("base_model_name_or_path")
    except (ValueError, AttributeError) as error:  # ValueError: not JSON
        raise InputError(f"{str(config_path)!r} is not a JSON object: {error}; re-save the adapter") from error


def base_fingerprint(model: PreTrainedModel) -> str:
    """A cheap hash of a (plain, un-wrapped) model's weights: names, shapes and the first 256 values of every
    tensor rounded to bf16, so an fp32 and a bf16 load of the same checkpoint agree and two checkpoints differ."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        head = tensor.detach().flatten()[:256].to("cpu", torch.bfloat16)
        digest.update(head.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def read_base_record(adapter_dir: Path) -> dict | None:
    """The adapter's record of its base (`{"base": ..., "fingerprint": ...}`), or None when it has none (an adapter
    made elsewhere). Read before the base loads, so a broken one costs no model load."""
    record_path = adapter_dir / ADAPTER_BASE_FILE
    if not record_path.is_file():
        return None
    text = _adapter_file_text(record_path)
    try:
        record = json.loads(text)
        if not isinstance(record["fingerprint"], str):
            raise TypeError(f"fingerprint is {type(record['fingerprint']).__name__}, not a string")
    except (ValueError, KeyError, TypeError) as error:  # ValueError: not JSON
        raise InputError(
            f"{str(record_path)!r} is not a base record ({type(error).__name__}: {error}); re-save the adapter, or "
            "delete the file to load it with shape checks only"
        ) from error
    return record


def check_adapter_base(adapter_dir: Path, base: str | os.PathLike, model: PreTrainedModel, record: dict | None) -> None:
    """Raise when the adapter's record of its base (`read_base_record`) has another fingerprint than `model`; warn
    when there is none (an adapter made elsewhere: only PEFT's shape checks stand between it and the wrong base)."""
    if record is None:
        logger.warning(
            "adapter %r has no %s: cannot check that %r is the base it was trained on (only the shapes are checked)",
            str(adapter_dir),
            ADAPTER_BASE_FILE,
            str(base),
        )
        return
    recorded = record["fingerprint"]
    found = base_fingerprint(model)
    if recorded != found:
        raise InputError(
            f"adapter {str(adapter_dir)!r} was trained on another base: it records {record.get('base')!r} with "
            f"weight fingerprint {recorded[:12]}, but {str(base)!r} has fingerprint {found[:12]}; "
            "pass the base it was trained on (--model of the fine-tuning run)"
        )


def load_adapter(
    adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "auto"
) -> tuple["PeftModel", PreTrainedTokenizerBase]:
    """The base named in the adapter folder (or `base`) with the adapter attached, in eval mode. Raises
    `InputError` when the adapter was trained on another base (fingerprint or shapes differ)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    named = adapter_base(adapter_dir)  # read even when `base` is given: PEFT reads the file again, unbounded
    base = base or named
    if not base:
        raise InputError(f"adapter {str(adapter_dir)!r} does not name its base model; pass the base explicitly")
    record = read_base_record(adapter_dir)
    model, tokenizer = load_checkpoint(base, dtype=dtype)
    check_adapter_base(adapter_dir, base, model, record)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:  # size mismatch, target modules missing in the base
        raise InputError(
            f"adapter {str(adapter_dir)!r} does not fit base {str(base)!r}: {error}; pass the base it was trained on"
        ) from error
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(adapter_dir)
    return model.eval(), tokenizer
