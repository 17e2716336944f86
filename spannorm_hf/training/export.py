"""The end products of a run: the model exported for `from_pretrained` (`export_model`), and snapshots pushed to the
Hub in the background (`push_model`). Anything else a finished run should write next to its model belongs here.
"""

import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from ..files import naming_disk_full
from .metrics import METRICS_FILE
from .run_details import finish_export

HUB_UPLOADS = "hub-uploads"  # model snapshots waiting for their background upload (--push-to-hub)


def export_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, output: Path) -> None:
    """`save_pretrained` of the full model (safetensors, config with auto_map and code, tokenizer,
    generation_config) into the run directory; files are moved in one by one, config.json last."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards (a collective: every rank calls it)
    if accelerator.is_main_process:
        tmp = output / ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with naming_disk_full(tmp / "model.safetensors"):
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
                finish_export(tmp, tokenizer, Path(accelerator.project_dir or output) / METRICS_FILE)  # + card details
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(tmp / name, output / name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def push_model(accelerator: Accelerator, model, tokenizer, output: Path, step: int, pusher, final: bool) -> None:
    """Export the model as it is now into `hub-uploads/step-N` and hand it to the background `CheckpointPusher`
    (model, config + code, tokenizer, card; no optimizer state); the folder is removed once its upload is done.
    Every rank calls this (the export gathers FSDP shards); only the main process holds a pusher."""
    folder = output / HUB_UPLOADS / f"step-{step:08d}"
    export_model(accelerator, model, tokenizer, folder)
    if pusher is None:
        return
    if final:
        pusher.finish(folder, commit_message=f"Final model, step {step}")
        shutil.rmtree(output / HUB_UPLOADS, ignore_errors=True)
        return
    future = pusher.push(folder, commit_message=f"Checkpoint at step {step}")
    if future is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        future.add_done_callback(lambda _: shutil.rmtree(folder, ignore_errors=True))
