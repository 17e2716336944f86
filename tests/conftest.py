"""Fixtures every test module may use. Helpers (tiny configs, checkpoints, runners, assertions) are in helpers.py."""

import pytest
import torch

from fake_hub import fake_hub, hub_at, no_token  # noqa: F401  (fixtures for the hub and training tests)
from helpers import clean_accelerate_state, make_train_files, save_tiny_checkpoint


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0, and any change it makes to torch's thread count is undone after it."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide singletons reset around the test (modules that train in-process use it)."""
    with clean_accelerate_state():
        yield


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A small text file, a trained tokenizer and tiny dense / MoE configs for training runs (read-only)."""
    return make_train_files(tmp_path_factory.mktemp("train-files"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny dense checkpoint with its tokenizer, saved like a training export (one per module)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """`checkpoint` loaded the way the CLIs load it."""
    from spannorm_hf.integrations.generation import load_model

    return load_model(checkpoint, device="cpu")
