"""Helpers the test modules share: tiny checkpoints and tokenizers, tiny training runs, script runners, and
assertions. Fixtures live in conftest.py; test modules import from here, never from each other."""

import functools
import json
import os
import runpy
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub.errors import StrictDataclassError

from spannorm_hf import SpanNormConfig, SpanNormForCausalLM
from spannorm_hf.cli import one_line
from spannorm_hf.training.corpus import read_default_corpus
from spannorm_hf.training.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_layers=1)


def tiny_config(**overrides) -> SpanNormConfig:
    return SpanNormConfig(**{**TINY, **overrides})


def moe_config(**overrides) -> SpanNormConfig:
    return tiny_config(**{**MOE, **overrides})


def config_error(**overrides) -> str:
    """The error `tiny_config(**overrides)` raises: transformers' strict-dataclass error, as every transformers config
    raises, on one line as the command-line tools print it."""
    with pytest.raises(StrictDataclassError) as raised:
        tiny_config(**overrides)
    return one_line(raised.value)


SCRIPTS = ROOT / "scripts"


@functools.cache
def tiny_tokenizer():
    return train_tokenizer(read_default_corpus().splitlines()[:3000], vocab_size=300)


def save_tiny_checkpoint(path: Path, kind: str = "dense", seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny SpanNorm model + the tiny tokenizer, saved like a training checkpoint."""
    tokenizer = tiny_tokenizer()
    factory = moe_config if kind == "moe" else tiny_config
    config = factory(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    SpanNormForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_script(name: str, argv: list[str], monkeypatch) -> int:
    """Run scripts/NAME.py in this process, as `python scripts/NAME.py ARGV` would; its exit status."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return exit_info.value.code


@contextmanager
def clean_accelerate_state():
    """Accelerate keeps process-wide singletons: every in-process run starts from a clean slate. One thread:
    these models are tiny, and on a busy 2-core machine two threads make each op several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def make_train_files(root: Path) -> Path:
    """A small text file, a trained 300-token tokenizer and tiny dense / MoE configs."""
    paragraphs = read_default_corpus()[:60_000].split("\n\n")
    (root / "data.txt").write_text("\n\n".join(paragraphs))
    train_tokenizer(paragraphs, vocab_size=300).save_pretrained(root / "tok")
    sizes = dict(vocab_size=300, max_position_embeddings=64)
    tiny_config(**sizes).to_json_file(root / "dense.json")
    moe_config(**sizes, router_aux_loss_coef=1.0).to_json_file(root / "moe.json")
    moe_config(**sizes, router_aux_loss_coef=0.0).to_json_file(root / "moe-noaux.json")
    tiny_config(**{**sizes, "hidden_size": 48}).to_json_file(root / "wider.json")
    return root


def argv(files: Path, output: Path, config: str = "dense.json", **overrides) -> list[str]:
    """Command line of a tiny run; overrides use argument names (None drops an option)."""
    options = dict(
        config=str(files / config),
        output=str(output),
        data=str(files / "data.txt"),
        tokenizer=str(files / "tok"),
        seq_len=32,
        batch_size=4,
        max_steps=12,
        log_every=1,
        eval_every=6,
        eval_batches=2,
        diag_every=4,
        save_every=6,
        warmup_steps=2,
        lr=3e-3,
        val_size=0.05,
    )
    options.update(overrides)
    out = []
    for key, value in options.items():
        if value is None:
            continue
        out.append(f"--{key.replace('_', '-')}")
        if value is not True:
            out.append(str(value))
    return out


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(output: Path) -> dict[int, float]:
    """Per-step training loss; the last record of a step wins (a resumed run rewrites later steps)."""
    return {r["step"]: r["loss"] for r in records(output) if "loss" in r}


def checkpoint_names(output: Path) -> list[str]:
    root = output / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def subprocess_env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same kernels as this process: identical numbers
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def assert_one_error_line(err: str, *fragments: str) -> str:
    """stderr holds exactly one `error:` line (the last), containing every fragment, and no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


CODE_FILES = ("configuration_spannorm.py", "modeling_spannorm.py")


# Two computations of the same logits (cached vs recomputed, batched vs alone, compiled vs eager) differ by float32
# rounding, ~1e-6 for these tiny models' logits (|logit| < 10: a few ulps of 1e-6 each, summed over <= 64-term dot
# products). A greedy choice whose top-2 logit gap is above NEAR_TIE cannot flip by that much; below it, it may.
NEAR_TIE = 1e-4


def assert_same_greedy_tokens(model, got: torch.Tensor, expected: torch.Tensor, start: int, what: str = "") -> None:
    """Greedy token sequences (1-D: prompt + generated) from two computations are equal, or equal up to a choice that
    was a near-tie in `expected`'s own logits (recomputed without a cache): bit-exact equality of argmaxes of
    differently rounded logits is not a property of the code."""
    if torch.equal(got, expected):
        return
    length = min(len(got), len(expected))
    first = next((i for i in range(start, length) if got[i] != expected[i]), length)
    assert first < len(expected), f"{what}: {got.tolist()} vs {expected.tolist()}"
    with torch.no_grad():
        logits = model(expected[None, :first], use_cache=False).logits[0, -1].float()
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap < NEAR_TIE, f"{what}: greedy tokens differ at position {first} where the top-2 logit gap is {gap:.2e}"


def finished_run_folder(path):
    """A folder as scripts/train.py leaves a finished run: its ownership marker, checkpoints, metrics, TensorBoard
    events and the exported model's config.json. Returns {relative path: bytes} of every file, to compare later."""
    from spannorm_hf.files import claim_output_dir

    claim_output_dir(path, "training-run", flag="--output")
    for name, data in {
        "checkpoints/step-00000004/model.safetensors": b"weights",
        "metrics.jsonl": b'{"step": 1, "loss": 5.0}\n',
        "tensorboard/events.out.tfevents.1": b"events",
        "config.json": b'{"model_type": "spannorm"}',
        "model.safetensors": b"exported",
    }.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return snapshot(path)


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# The first lines of every fresh-process script: the installed package is blocked, so only the folder's own code
# (remote code) can load the model, as on a machine without spannorm-hf.
PREAMBLE = textwrap.dedent(
    """
    import json, sys
    sys.modules["spannorm_hf"] = None  # block the installed package: only the folder's code may load
    try:
        import spannorm_hf
        raise SystemExit("spannorm_hf is importable")
    except ImportError:
        pass
    import torch
    torch.set_num_threads(1)
    """
)


def run_without_package(
    script: str, args: list[str], scratch: Path, pythonpath: str = "", timeout: int = 600
) -> tuple[dict, str]:
    """Run PREAMBLE + `script` in a fresh, offline Python where spannorm_hf cannot be imported (stdin closed, so
    any interactive prompt fails; `pythonpath` may put another transformers first). Returns the JSON object it
    printed last, and everything it wrote to stdout and stderr."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(scratch / "modules"),
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-c", PREAMBLE + textwrap.dedent(script), *args],
        cwd=scratch,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout + result.stderr


GENERATE_WITHOUT_PACKAGE = """
from transformers import AutoModel, AutoModelForCausalLM
path, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(base).__name__ == "SpanNormModel"
out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
print(json.dumps(out[0].tolist()))
"""


def generate_in_fresh_process(folder: Path, prompt: list[int], scratch: Path) -> list[int]:
    """Greedy ids from `folder` loaded through remote code by a fresh Python without the package."""
    return run_without_package(GENERATE_WITHOUT_PACKAGE, [str(folder), json.dumps(prompt)], scratch)[0]
