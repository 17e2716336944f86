"""Two real processes on CPU (gloo): DDP and FSDP2 train the same per-step numbers as one process, an FSDP2
sharded checkpoint resumes exactly, and the FSDP2 export loads with from_pretrained.

accelerate silently falls back to one process or to DDP on CPU (see the design notes), and loss parity cannot
see that, so every run also asserts the world size, the distributed type and, for FSDP2, real sharding."""

import os
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from spannorm_hf.training.trainer import parse_args, train

from distributed_cpu import train_two_processes as launch
from helpers import ROOT, argv, checkpoint_names, clean_accelerate_state, records

# Runs train in this process: accelerate's singletons are reset around every test.
# Two real gloo processes per test; train runs in this process too, so accelerate's singletons are reset.
pytestmark = [pytest.mark.usefixtures("fresh_accelerate_state"), pytest.mark.slow]

METRICS = ("loss", "lr", "val_loss", "block_0/output_rms", "block_2/grad_norm", "block_1/cosine")


def step_metrics(output) -> dict[int, dict]:
    return {r["step"]: r for r in records(output) if "loss" in r}


def assert_same_steps(ours, reference, steps, tol=1e-5) -> None:
    for step in steps:
        for key in METRICS:
            if key in reference[step]:
                assert ours[step][key] == pytest.approx(reference[step][key], abs=tol, rel=tol), (step, key)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """One process, batch 4: the numbers both distributed runs (2 processes x batch 2) must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    with clean_accelerate_state():
        train(parse_args(argv(files, out, max_steps=6, save_every=3, eval_every=3, diag_every=2)))
    return out


def test_ddp_two_processes_match_one_process(files, reference, tmp_path):
    out = tmp_path / "ddp"
    launch(argv(files, out, max_steps=6, save_every=3, eval_every=3, diag_every=2, batch_size=2))
    setup = next(r for r in records(out) if r.get("event") == "setup")
    assert setup["num_processes"] == 2 and setup["distributed_type"] == "MULTI_CPU"
    assert setup["params_sharded"] == 0 and setup["params_local"] == setup["params_total"]
    assert_same_steps(step_metrics(out), step_metrics(reference), range(1, 7))


def test_fsdp2_shards_matches_one_process_resumes_and_exports(files, reference, tmp_path):
    out = tmp_path / "fsdp"
    launch(argv(files, out, max_steps=6, save_every=3, eval_every=3, diag_every=2, batch_size=2), fsdp=True)
    setup = next(r for r in records(out) if r.get("event") == "setup")
    assert setup["num_processes"] == 2 and setup["distributed_type"] == "FSDP"
    n_params = len(list(AutoModelForCausalLM.from_pretrained(reference).parameters()))
    assert setup["params_sharded"] == n_params  # every parameter is a DTensor
    assert 0.4 < setup["params_local"] / setup["params_total"] < 0.6  # rank 0 holds about half
    ours = step_metrics(out)
    assert_same_steps(ours, step_metrics(reference), range(1, 7))

    # the checkpoint holds the gathered full state in safetensors + JSON (no torch.distributed.checkpoint folder,
    # whose .metadata is a pickle), every process's RNG state, and a manifest; resuming from it repeats steps 4-6
    checkpoint = out / "checkpoints" / "step-00000003"
    names = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng_state_0.json", "rng_state_1.json",
            "train_state.json", "manifest.json"} <= names  # fmt: skip
    assert not [name for name in names if name.endswith((".pkl", ".bin", ".pt", ".metadata"))]
    full = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    with safe_open(checkpoint / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(full) and all(
            saved.get_slice(k).get_shape() == list(full[k].shape) for k in full
        )
    resumed = tmp_path / "resumed"
    launch([*argv(files, resumed, max_steps=6, save_every=3, eval_every=3, diag_every=2, batch_size=2),
            "--resume", str(checkpoint)], fsdp=True)  # fmt: skip
    again = step_metrics(resumed)
    assert sorted(again) == [4, 5, 6]
    assert_same_steps(again, ours, [4, 5, 6], tol=1e-6)
    assert checkpoint_names(resumed) == ["step-00000006"]

    # the export gathers a full state dict: it loads and equals the one-process model
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    single = AutoModelForCausalLM.from_pretrained(reference)
    x = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, single(x).logits, atol=1e-4, rtol=1e-4)


def test_accelerate_launch_with_the_ddp_config_runs_two_processes(files, reference, tmp_path):
    """The documented command line, end to end: `accelerate launch --config_file scripts/accelerate/ddp.yaml`."""
    out = tmp_path / "launched"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "scripts/accelerate/ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        str(ROOT / "scripts/train.py"),
        *argv(files, out, max_steps=6, save_every=3, eval_every=3, diag_every=2, batch_size=2),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    setup = next(r for r in records(out) if r.get("event") == "setup")
    assert setup["num_processes"] == 2 and setup["distributed_type"] == "MULTI_CPU"
    assert_same_steps(step_metrics(out), step_metrics(reference), range(1, 7))


@pytest.mark.parametrize(
    "name, distributed_type, machines",
    [("single", "NO", 1), ("ddp", "MULTI_GPU", 1), ("fsdp2", "FSDP", 1), ("multinode-fsdp2", "FSDP", 2)],
)
def test_accelerate_config_files(name, distributed_type, machines):
    config = load_config_from_file(str(ROOT / "scripts" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(distributed_type) and config.num_machines == machines
    if distributed_type == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # taken from the model's _no_split_modules
