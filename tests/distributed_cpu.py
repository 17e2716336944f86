"""Switch an Accelerator to FSDP2 on CPU (gloo), for tests on machines without GPUs.

accelerate 1.15 only enables FSDP for accelerator devices: on CPU a `distributed_type: FSDP` config silently
runs DDP. torch itself shards on CPU, so after the Accelerator is built (by `accelerate launch` with
ACCELERATE_USE_CPU=1 or `debug_launcher`) this sets the FSDP2 plugin on the shared state by hand. It mirrors
scripts/accelerate/fsdp2.yaml. Never used on the GPU path, where the YAML alone does this.
"""

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def use_fsdp2_on_cpu(accelerator: Accelerator) -> Accelerator:
    """Make `accelerator` prepare models with FSDP2 (layer-wise auto wrap from `_no_split_modules`,
    sharded state dict). Call before `prepare`."""
    if accelerator.device.type != "cpu" or accelerator.num_processes < 2:
        raise RuntimeError("use_fsdp2_on_cpu is for multi-process CPU runs only (use the fsdp2.yaml config on GPUs)")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",
        reshard_after_forward=True,
    )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # AcceleratorState copies PartialState's fields whenever it is re-created: switch both.
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # not "cpu:0": FSDP2 builds its device mesh from the device type
    accelerator.state.fsdp_plugin = plugin
    return accelerator
