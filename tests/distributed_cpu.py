"""Two real processes on CPU for tests on machines without GPUs: `train_two_processes` trains in 2 forked gloo
workers, and `use_fsdp2_on_cpu` switches an Accelerator to FSDP2.

accelerate 1.15 only enables FSDP for accelerator devices: on CPU a `distributed_type: FSDP` config runs DDP
(the trainer says so). torch itself shards on CPU, so after the Accelerator is built (by `accelerate launch` with
ACCELERATE_USE_CPU=1 or `train_two_processes`) `use_fsdp2_on_cpu` sets the FSDP2 plugin on the shared state by
hand. It mirrors scripts/accelerate/fsdp2.yaml. Never used on the GPU path, where the YAML alone does this.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, PrepareForLaunch, patch_environment
from torch.distributed.fsdp import FSDPModule
from torch.multiprocessing import start_processes

from spannorm_hf.training.trainer import build_accelerator, parse_args, train


def _train_worker(args: list[str], fsdp: bool) -> None:
    torch.set_num_threads(1)
    parsed = parse_args(args)
    accelerator = build_accelerator(parsed, timeout=timedelta(seconds=90))  # a hang fails fast
    if fsdp:
        use_fsdp2_on_cpu(accelerator)
    assert accelerator.num_processes == 2
    result = train(parsed, accelerator)
    if fsdp:
        layers = accelerator.unwrap_model(result.model).model.layers
        assert isinstance(result.model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in layers)
    dist.barrier()
    dist.destroy_process_group()


def train_two_processes(args: list[str], fsdp: bool = False, **environment: str) -> None:
    """A training run (`args`: its command line) in 2 forked gloo workers, asserted to be 2 (and sharded when `fsdp`:
    FSDP2 switched on by `use_fsdp2_on_cpu`). `environment` adds variables as `accelerate launch` sets them from a
    config (e.g. `accelerate_use_fsdp="true"`). As `accelerate.debug_launcher`, except that the rendezvous file may
    vanish: gloo's FileStore deletes it when the workers destroy their process group, which debug_launcher's own
    temporary file does not survive; so each launch gets its own, beside --output."""
    AcceleratorState._reset_state(True)  # the forked workers must not inherit this process's state
    environment = dict(
        world_size=2, master_addr="127.0.0.1", master_port="29500", accelerate_mixed_precision="no", **environment
    )
    rendezvous = args[args.index("--output") + 1] + ".rendezvous"
    environment.update(accelerate_debug_rdv_file=rendezvous, accelerate_use_cpu="yes", gloo_socket_ifname="lo")
    with patch_environment(**environment):
        start_processes(PrepareForLaunch(_train_worker, debug=True), args=(args, fsdp), nprocs=2, start_method="fork")


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
