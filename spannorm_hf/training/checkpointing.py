"""Training state on disk in formats that cannot run code, with a manifest that tells a corrupt checkpoint apart.

A checkpoint folder holds:
- `model.safetensors`: the full model state (FSDP shards are gathered on save and re-sharded on load);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's tensors, and its hyper-parameters and non-tensor
  state, keyed by parameter name;
- `train_state.json`: step, tokens, learning-rate scheduler, gradient scaler, run arguments;
- `rng_state_<rank>.json` (and `stream_state_<rank>.json` when streaming): each process's RNG / stream position;
- `config.json`, `tokenizer/`;
- `manifest.json`, written last: every other file's name, size and sha256.

Nothing is ever unpickled: tensors are read with safetensors, everything else with `json`. accelerate's
`save_state` is not used because it pickles the scheduler, the step counter and the RNG state
(`custom_checkpoint_*.pkl`, `random_states_*.pkl`) and unpickles them on load, and under FSDP writes
torch.distributed.checkpoint folders whose `.metadata` is a pickle. A checkpoint whose manifest does not verify,
that holds a pickle-format file, or whose files do not parse is refused with `CheckpointError` naming the file.
"""

import base64
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..files import atomic_write_json, naming_disk_full

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_VALUES = "optimizer.json"
TRAIN_STATE = "train_state.json"
# File types that are (or may be) pickles: never part of a checkpoint written here, never loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".metadata")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not in this format; the message names the file."""


# ------------------------------------------------------------------------------------------------------- manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_manifest(folder: Path) -> None:
    """The last step of a save: name, size and sha256 of every file in the checkpoint."""
    entries = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in _files(folder)
        if name != MANIFEST
    }
    with naming_disk_full(folder / MANIFEST):
        atomic_write_json(folder / MANIFEST, {"format": 1, "files": entries})


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError, naming the file, unless every file of `folder` is the one its manifest lists."""
    for name in _files(folder):
        if name.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{folder / name} is a pickle-format file: checkpoints written by spannorm train never hold one, "
                "and resuming never loads one (this checkpoint was not written by this version of spannorm train)"
            )
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete or was written by an older version")
    try:
        entries = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from err
    for name, (size, digest) in sorted(expected.items()):
        file = folder / name
        if ".." in Path(name).parts or not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{file} is truncated or changed: {file.stat().st_size} bytes, the manifest says {size}"
            )
        if sha256_of(file) != digest:
            raise CheckpointError(f"{file} is corrupt: its sha256 differs from the manifest's")
    extra = [name for name in _files(folder) if name != MANIFEST and name not in expected]
    if extra:
        raise CheckpointError(
            f"{folder / extra[0]} is not listed in {MANIFEST}: the checkpoint was changed after saving"
        )


# ---------------------------------------------------------------------------------------------------- reading files


def read_json(path: Path) -> Any:
    """JSON from a checkpoint file; CheckpointError naming the file if it does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or unreadable: {err}") from err


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy
    seen, own = set(), {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        own[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    with naming_disk_full(path):
        save_file(own, path, metadata={"format": "pt"})


def _write_json(value: Any, path: Path) -> None:
    with naming_disk_full(path):
        path.write_text(json.dumps(value, indent=1))


# ------------------------------------------------------------------------------------------------------ RNG state


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states, as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], path: Path) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not hold a valid RNG state: {err}") from err


# ------------------------------------------------------------------------------------------- model and optimizer

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_model_and_optimizer(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    """Gather the full model and optimizer state (a collective: every process calls it) and write it from the
    main process as safetensors + JSON."""
    module = accelerator.unwrap_model(model)
    optim = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    model_state = get_model_state_dict(module, options=FULL)
    optim_state = get_optimizer_state_dict(module, optim, options=FULL)
    if not accelerator.is_main_process:
        return
    _write_tensors(model_state, folder / MODEL_FILE)
    tensors, values = {}, {}
    for param, state in optim_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value
            else:
                values.setdefault(param, {})[key] = value
    _write_tensors(tensors, folder / OPTIMIZER_TENSORS)
    _write_json({"state": values, "param_groups": optim_state["param_groups"]}, folder / OPTIMIZER_VALUES)


def load_model_and_optimizer(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    """Every process reads the full state and keeps its own shard (FSDP) or all of it."""
    module = accelerator.unwrap_model(model)
    optim = getattr(optimizer, "optimizer", optimizer)
    model_state = read_tensors(folder / MODEL_FILE)
    tensors = read_tensors(folder / OPTIMIZER_TENSORS)
    values = read_json(folder / OPTIMIZER_VALUES)
    try:
        state: dict[str, dict[str, Any]] = {p: dict(v) for p, v in values["state"].items()}
        for name, tensor in tensors.items():
            param, key = name.rsplit("/", 1)
            state.setdefault(param, {})[key] = tensor
        groups = [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
            for group in values["param_groups"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder / OPTIMIZER_VALUES} is not a valid optimizer state: {err}") from err
    options = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(module, model_state, options=options)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder / MODEL_FILE} does not fit the model: {err}") from err
    try:
        set_optimizer_state_dict(module, optim, {"state": state, "param_groups": groups}, options=options)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder / OPTIMIZER_TENSORS} does not fit the optimizer: {err}") from err


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.json"


def save_process_state(folder: Path, rank: int) -> None:
    _write_json(rng_state(), rng_file(folder, rank))


def load_process_state(folder: Path, rank: int) -> None:
    path = rng_file(folder, rank)
    set_rng_state(read_json(path), path)
