"""Training state on disk in formats that cannot run code, with a manifest that tells a corrupt checkpoint apart.

A checkpoint folder holds:
- `model.safetensors`: the full model state (FSDP shards are gathered on save and re-sharded on load);
- `optimizer.safetensors` + `optimizer.json`: the optimizer's tensors, and its hyper-parameters and non-tensor
  state, keyed by parameter name;
- `train_state.json`: step, tokens, learning-rate scheduler, gradient scaler, run arguments (validated on resume like
  a config, `TrainState`: a wrong type or range is refused naming the field);
- `rng_state_<rank>.json` (and `stream_state_<rank>.json` when streaming): each process's RNG / stream position;
- `config.json` and the two model code files its `auto_map` names, as in an export, so that
  `AutoModelForCausalLM.from_pretrained(step-N, trust_remote_code=True)` loads it without this package; `tokenizer/`;
- `manifest.json`, written last: every other file's name, size and sha256.

Nothing is ever unpickled: tensors are read with safetensors, everything else with `json`. accelerate's
`save_state` is not used because it pickles the scheduler, the step counter and the RNG state
(`custom_checkpoint_*.pkl`, `random_states_*.pkl`) and unpickles them on load, and under FSDP writes
torch.distributed.checkpoint folders whose `.metadata` is a pickle. A checkpoint whose manifest does not verify,
that holds a pickle-format file, or whose files do not parse is refused with `CheckpointError` naming the file.
So is one whose JSON states do not have the shape of the resuming run's own (`check_like`: the scheduler's, the
optimizer's settings, the data stream's), naming the field, before they are restored.
"""

import base64
import hashlib
import json
import math
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers.dynamic_module_utils import custom_object_save

from ..cli import InputError, one_line
from ..configuration_spannorm import SpanNormConfig
from ..files import (
    LOCK_FILES,
    OUTPUT_MARKER,
    OutputDirError,
    atomic_write_json,
    check_output_dir,
    claim_output_dir,
    naming_disk_full,
)
from ..integrations.hub import load_tokenizer
from ..modeling_spannorm import SpanNormForCausalLM
from .arguments import SetupError, TrainArguments
from .data import StreamRows, tokenizer_fingerprint
from .export import HUB_UPLOADS
from .metrics import METRICS_FILE, TENSORBOARD_DIR

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_VALUES = "optimizer.json"
TRAIN_STATE = "train_state.json"
# File types that are (or may be) pickles: never part of a checkpoint written here, never loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".metadata")


class CheckpointError(InputError):
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


# ---------------------------------------------------------------------------------------------------- train state


def _at_least(low: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")

    return check


@strict(accept_kwargs=True)
@dataclass
class TrainState:
    """What train_state.json must hold, checked as transformers checks a config (huggingface_hub's strict
    dataclass): a resealed or foreign checkpoint with a wrong type or range is refused, naming the field, before
    anything is restored or written. Keys not listed here pass through unchecked."""

    step: int = validated_field(_at_least(1))  # a checkpoint is saved after a step
    tokens: int = validated_field(_at_least(0))
    num_processes: int = validated_field(_at_least(1))
    tokenizer_fingerprint: str
    args: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None

    def validate_lr(self) -> None:
        """A run resumed without --lr trains at it."""
        lr = self.args.get("lr")
        if type(lr) not in (int, float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"field 'args.lr' must be a finite number > 0, got {lr!r}")

    def validate_scheduler(self) -> None:
        """Its position and peak learning rates set the learning rate of every resumed step."""
        last = self.scheduler.get("last_epoch")
        if type(last) is not int or last < 0:
            raise ValueError(f"field 'scheduler.last_epoch' must be an integer >= 0, got {last!r}")
        lrs = self.scheduler.get("base_lrs")
        if not isinstance(lrs, list) or not all(type(lr) in (int, float) and math.isfinite(lr) for lr in lrs):
            raise ValueError(f"field 'scheduler.base_lrs' must be a list of finite numbers, got {lrs!r}")


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's train_state.json, validated (`TrainState`), and holding the step its folder is named after
    (`step-N`): resuming truncates metrics.jsonl at that step, so a wrong one would delete records it must keep."""
    path = checkpoint / TRAIN_STATE
    state = read_json(path)
    try:
        if not isinstance(state, dict):
            raise TypeError(f"expected a JSON object, got {type(state).__name__}")
        TrainState(**state)
        named = re.fullmatch(r"step-(\d+)", checkpoint.name)
        if named and state["step"] != int(named[1]):
            raise ValueError(f"field 'step' is {state['step']}, but the checkpoint is {checkpoint.name}")
    except (StrictDataclassError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid training state: {one_line(err)}") from err
    return state


# ----------------------------------------------------------------------------------------- restored states (JSON)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inside(field: str, key: str | int) -> str:
    return f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key


def _check_numbers(value: Any, field: str) -> None:
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            _check_numbers(item, _inside(field, key))
    elif type(value) in (int, float) and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"field {field!r} must be a finite number >= 0, got {_shown(value)}")


def check_like(value: Any, like: Any, field: str = "") -> None:
    """Raise ValueError naming the field unless `value`, read from a checkpoint's JSON, has the shape of `like`: the
    same state as this run holds it before restoring (its scheduler's, data stream's, optimizer settings'). Objects
    need the same keys (a restored key may become an attribute: an unknown one could replace any, e.g. a
    scheduler's optimizer; a missing one would silently keep this run's fresh value, e.g. a stream position), lists
    the same length, strings the same text (datasets' names for the stages of a stream), booleans a boolean, and
    numbers (counters, positions, learning rates) must be finite and >= 0, and whole where the run's are. Where the
    run has None (a state not started yet, e.g. datasets' `previous_state`), None or JSON whose numbers are finite
    and >= 0."""
    if isinstance(like, dict):
        if not isinstance(value, dict):
            where = f"field {field!r}" if field else "the file"
            raise ValueError(f"{where} must hold a JSON object, got {_shown(value)}")
        for key in sorted(like.keys() ^ value.keys()):
            problem = "is missing" if key in like else "is not part of this run's state"
            raise ValueError(f"field {_inside(field, key)!r} {problem} (expected: {', '.join(like) or 'none'})")
        for key, expected in like.items():
            check_like(value[key], expected, _inside(field, key))
    elif isinstance(like, list | tuple):
        if not isinstance(value, list) or len(value) != len(like):
            raise ValueError(f"field {field!r} must be a list of {len(like)} values, got {_shown(value)}")
        for index, (item, expected) in enumerate(zip(value, like, strict=True)):
            check_like(item, expected, _inside(field, index))
    elif like is None:
        _check_numbers(value, field)
    elif isinstance(like, bool | str):
        if type(value) is not type(like) or (isinstance(like, str) and value != like):
            expected = repr(like) if isinstance(like, str) else "true or false"
            raise ValueError(f"field {field!r} must be {expected}, as in this run, got {_shown(value)}")
    elif isinstance(like, int):
        if type(value) is not int or value < 0:
            raise ValueError(f"field {field!r} must be an integer >= 0, got {_shown(value)}")
    elif type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"field {field!r} must be a finite number >= 0, got {_shown(value)}")


def check_restorable(path: Path, what: str, value: Any, like: Any, field: str = "") -> None:
    """`check_like` as a CheckpointError naming the file: before a saved state replaces a live one."""
    try:
        check_like(value, like, field)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a valid {what}: {err}") from err


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
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
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


def _settings(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings of each parameter group (lr, betas, eps, ...); torch maps the saved parameter names itself."""
    return [{key: value for key, value in group.items() if key != "params"} for group in param_groups]


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
        check_like(_settings(values["param_groups"]), _settings(optim.param_groups), "param_groups")
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
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # e.g. a parameter name it does not have
        raise CheckpointError(
            f"{folder / OPTIMIZER_VALUES} with {OPTIMIZER_TENSORS} does not fit the optimizer: {one_line(err)}"
        ) from err


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.json"


def save_process_state(folder: Path, rank: int) -> None:
    _write_json(rng_state(), rng_file(folder, rank))


def load_process_state(folder: Path, rank: int) -> None:
    path = rng_file(folder, rank)
    set_rng_state(read_json(path), path)


# ------------------------------------------------------------------------------------------------ run directory

CHECKPOINTS = "checkpoints"
# Config fields that may differ between a checkpoint and the run resuming it (runtime or tokenizer-derived).
RESUME_IGNORED_FIELDS = {
    "transformers_version",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "output_router_logits",
}
# Arguments whose change on resume changes what the resumed steps compute (allowed, with a warning).
RESUME_WATCHED_ARGS = ("seq_len", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_steps", "seed")


def check_output(args: TrainArguments) -> Path:
    """The run directory must be new, empty or a training run (`spannorm_hf.files`), unless --overwrite; read-only."""
    try:
        return check_output_dir(args.output, "training-run", flag="--output", overwrite=args.overwrite)
    except OutputDirError as err:
        raise SetupError(str(err)) from err


def claim_output(output: Path, overwrite: bool) -> None:
    """Create and mark the run directory and prove it is writable (main process, after every check)."""
    try:
        claim_output_dir(output, "training-run", flag="--output", overwrite=overwrite)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SetupError(f"output directory {str(output)!r} is not writable: {err}") from err


def remove_earlier_run(output: Path) -> None:
    """Remove the records an earlier run wrote in `output` (metrics, TensorBoard events, checkpoints, Hub uploads;
    its exported model is replaced by this run's export): what a fresh run over it (allowed by `Checkpointer.find`:
    --overwrite, or --resume latest of a run that never checkpointed) does once its data, tokenizer and model are
    set up and it starts writing its own records, so a start that fails before then loses nothing (main process)."""
    (output / METRICS_FILE).unlink(missing_ok=True)
    for events in (output / TENSORBOARD_DIR).glob("**/events.out.tfevents.*"):
        events.unlink()
    for stale in [*Checkpointer(output).existing(), output / HUB_UPLOADS]:
        shutil.rmtree(stale, ignore_errors=True)


def earlier_run_files(output: Path) -> list[str]:
    """What an earlier run left in `output` (everything but the ownership marker, the lock and empty folders)."""
    if not output.is_dir():
        return []
    empty = [p for p in output.iterdir() if p.is_dir() and not any(p.iterdir())]
    return sorted(p.name for p in output.iterdir() if p.name not in (OUTPUT_MARKER, *LOCK_FILES) and p not in empty)


# --------------------------------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """A run's checkpoints: where they are (`<output>/checkpoints/step-N`), which one a run resumes from (`find`,
    refusing one that does not verify), whether it fits the run (`check_compatible`), and writing (`save`) and
    reading (`load`) one. Saving keeps the newest `keep_last`."""

    def __init__(self, output: Path, keep_last: int = 1):
        self.output, self.keep_last = Path(output), keep_last
        self.root = self.output / CHECKPOINTS

    def existing(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary directories are never listed)."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
        return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))

    def remove_leftovers(self) -> None:
        """Temporary directories of a run killed while saving (main process)."""
        for leftover in self.root.glob(".*-step-*"):
            shutil.rmtree(leftover)

    def find(self, resume: str | None, overwrite: bool = False) -> Path | None:
        """The checkpoint to resume from, or None for a fresh run; a fresh run never starts over an earlier one
        unless --overwrite."""
        output, existing = self.output, self.existing()
        if resume is None and existing and not overwrite:
            raise SetupError(
                f"{output} already holds checkpoints (latest {existing[-1].name}); pass --resume latest to continue "
                "that run, --overwrite to start a new one over it, or choose a new --output"
            )
        if resume is None or (resume == "latest" and not existing):
            leftovers = earlier_run_files(output)
            # a requeued job whose first attempt died before its first checkpoint starts that run again
            unfinished = resume == "latest" and not (output / "config.json").exists()
            if leftovers and not overwrite and not unfinished:
                raise SetupError(
                    f"--output {str(output)!r} holds an earlier run ({', '.join(leftovers[:5])}) with no checkpoint to "
                    "resume from: choose a new --output, or pass --overwrite to replace the files training writes"
                )
            return None
        if resume == "latest":
            return self.latest_valid(existing)
        path = Path(resume)
        if not (path / TRAIN_STATE).is_file() and not (path / MANIFEST).is_file():
            raise SetupError(f"--resume {resume!r} is not a checkpoint directory (no {TRAIN_STATE})")
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            raise SetupError(f"--resume {resume!r}: {err}") from err
        newer = [p.name for p in existing if p.name > path.name]
        if path.resolve().parent == (output / CHECKPOINTS).resolve() and newer:
            raise SetupError(
                f"--resume {resume!r}: {output} holds newer checkpoints {newer}; delete them or use a new --output"
            )
        return path

    @staticmethod
    def latest_valid(existing: list[Path]) -> Path:
        """The newest checkpoint whose manifest verifies; each newer one is skipped with a warning saying why."""
        problems = []
        for path in reversed(existing):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                warnings.warn(f"--resume latest: skipping checkpoint {path.name}: {err}", stacklevel=3)
                problems.append(f"{path.name}: {err}")
                continue
            return path
        raise SetupError(f"--resume latest: no usable checkpoint in {existing[0].parent} ({'; '.join(problems)})")

    @staticmethod
    def check_compatible(checkpoint: Path, config: SpanNormConfig, args: TrainArguments) -> dict:
        """Raise if the checkpoint's model or tokenizer differs; warn if arguments that change what the resumed steps
        compute differ. Returns the checkpoint's train_state.json."""
        try:
            saved, current = SpanNormConfig.from_json_file(checkpoint / "config.json").to_dict(), config.to_dict()
        except (OSError, ValueError, StrictDataclassError) as err:
            raise SetupError(f"cannot resume: {checkpoint / 'config.json'} is not a valid config: {err}") from err
        keys = (saved.keys() | current.keys()) - RESUME_IGNORED_FIELDS
        diff = {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs --config {b!r}" for k, (a, b) in diff.items())
            raise SetupError(f"cannot resume {checkpoint}: the model config differs ({lines})")
        state = read_train_state(checkpoint)
        try:
            changed = {
                k: (state["args"][k], getattr(args, k))
                for k in RESUME_WATCHED_ARGS
                if state["args"][k] != getattr(args, k)
            }
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{checkpoint / TRAIN_STATE} is not a valid training state: {err}") from err
        if changed:
            warnings.warn(f"resuming {checkpoint} with changed arguments (checkpoint, now): {changed}", stacklevel=2)
        if args.tokenizer is not None:
            ours = tokenizer_fingerprint(load_tokenizer(args.tokenizer))
            if ours != state["tokenizer_fingerprint"]:
                raise SetupError(
                    f"cannot resume {checkpoint}: --tokenizer {args.tokenizer!r} is not the run's tokenizer"
                )
        return state

    def save(
        self,
        accelerator: Accelerator,
        step: int,
        state: dict,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SpanNormConfig,
        tokenizer,
        stream: StreamRows | None,
    ) -> Path:
        """Write the training state (see `checkpointing`) into a temporary directory, add the manifest last, and
        rename it into place once complete. `state` is train_state.json (scheduler, step, tokens, arguments)."""
        root = self.root
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            save_model_and_optimizer(accelerator, model, optimizer, tmp)
            save_process_state(tmp, accelerator.process_index)
            if stream is not None:
                state_file = tmp / f"stream_state_{accelerator.process_index}.json"
                with naming_disk_full(state_file):
                    state_file.write_text(json.dumps(stream.state_dict()))
            if accelerator.is_main_process:
                with naming_disk_full(tmp / "config.json"):
                    config.to_json_file(tmp / "config.json")
                    custom_object_save(SpanNormForCausalLM, tmp)  # modeling + configuration_spannorm.py
                with naming_disk_full(tmp / "tokenizer"):
                    tokenizer.save_pretrained(tmp / "tokenizer")
                with naming_disk_full(tmp / TRAIN_STATE):
                    (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=2))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_manifest(tmp)
        except BaseException:
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # a failed save (e.g. a full disk) leaves the older checkpoints alone
            raise
        if accelerator.is_main_process:
            if final.exists():
                stale = root / f".old-step-{step:08d}"
                final.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(final)
            for old in self.existing()[: -self.keep_last]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(
        accelerator: Accelerator,
        checkpoint: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        progress,
        stream: StreamRows | None,
    ) -> None:
        """Restore what `save` wrote into the prepared model, optimizer, scheduler, progress counter and stream;
        never unpickles."""
        load_model_and_optimizer(accelerator, model, optimizer, checkpoint)
        state = read_train_state(checkpoint)
        like = scheduler.state_dict()  # torch skips a None lr_lambdas entry (a plain function's, e.g. the constant
        like["lr_lambdas"] = [None] * len(like["lr_lambdas"])  # schedule's): a resume may change --lr-scheduler
        check_restorable(checkpoint / TRAIN_STATE, "training state", state["scheduler"], like, "scheduler")
        try:
            scheduler.load_state_dict(state["scheduler"])
            progress.load_state_dict(state)
            if accelerator.scaler is not None and state.get("scaler") is not None:
                accelerator.scaler.load_state_dict(state["scaler"])
            saved_processes = int(state["num_processes"])
            if saved_processes < 1:
                raise ValueError(f"num_processes={saved_processes}")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{checkpoint / TRAIN_STATE} is not a valid training state: {err}") from err
        # resumed on more processes than it had, a process the checkpoint has no RNG state for takes another's
        load_process_state(checkpoint, accelerator.process_index % saved_processes)
        if stream is not None:
            path = checkpoint / f"stream_state_{accelerator.process_index}.json"
            saved = read_json(path)
            check_restorable(path, "stream state", saved, stream.state_dict())
            stream.load_state_dict(saved)
