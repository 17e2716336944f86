"""Issue 20 ("Trust, round two"), items 1, 4 and 5: a hostile but realistic user against a training run's output
folder and its resume. Two runs into one folder, a hand-edited and resealed train_state.json, and a start that fails
after writing something must neither lose what is there nor leave a folder that refuses the rerun."""

import shutil
from pathlib import Path

import pytest

from spannorm_hf.training.checkpointing import write_manifest
from spannorm_hf.training.trainer import main, parse_args, train

from helpers import argv, assert_one_error_line, clean_accelerate_state, snapshot

# Runs train in this process: accelerate's singletons are reset around every test.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ------------------------------------------------------------------- item 4: train_state.json is validated on resume


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with clean_accelerate_state():
        train(parse_args(argv(files, out, max_steps=4, save_every=2, eval_every=2)))
    return out


@pytest.mark.parametrize(
    "original, edited, message",
    [
        ('"step": 4', '"step": -5', "Validation error for field 'step': ValueError: must be >= 1, got -5"),
        ('"step": 4', '"step": "abc"', "field 'step': TypeError: Field 'step' expected int, got str (value: 'abc')"),
        ('"step": 4', '"step": 1e400', "field 'step': TypeError: Field 'step' expected int, got float (value: inf)"),
        # a valid-looking step that is not the checkpoint's: resuming would drop the step-4 records
        ('"step": 4', '"step": 3', "field 'step' is 3, but the checkpoint is step-00000004"),
        ('"tokens": 512', '"tokens": -1', "Validation error for field 'tokens': ValueError: must be >= 0, got -1"),
        ('"last_epoch": 4', '"last_epoch": "4"', "field 'scheduler.last_epoch' must be an integer >= 0, got '4'"),
    ],
)
def test_resume_refuses_a_resealed_train_state_naming_the_field(
    files, finished_run, tmp_path, capsys, original, edited, message
):
    """train_state.json edited and the manifest resealed to match: resuming is refused with one line naming the
    file and the field, and nothing in the run folder changes (every metrics record is kept)."""
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    checkpoint = out / "checkpoints" / "step-00000004"
    state = checkpoint / "train_state.json"
    text = state.read_text()
    assert text.count(original) == 1
    state.write_text(text.replace(original, edited))
    write_manifest(checkpoint)
    before = snapshot(out)
    assert main([*argv(files, out, max_steps=4, save_every=2, eval_every=2), "--resume", "latest"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{state} is not a valid training state: ", message)
    assert snapshot(out) == before


# ------------------------------------------------------------------------ item 5: a failed start does not stick


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr_scheduler", "bogus", "--lr-scheduler must be one of linear, cosine, cosine_with_restarts,"),
        # a transformers schedule, but one that needs settings this command does not pass
        ("lr_scheduler", "cosine_with_min_lr", "got 'cosine_with_min_lr'"),
        ("attn_implementation", "bogus", "--attn-implementation 'bogus': Specified `attn_implementation=\"bogus\"`"),
        ("adam_beta1", 1.5, "--adam-beta1 must be in [0, 1), got 1.5"),
        ("weight_decay", -0.1, "--weight-decay must be >= 0, got -0.1"),
    ],
)
def test_a_bad_argument_is_refused_before_anything_is_written(files, tmp_path, capsys, option, value, message):
    """No --tokenizer: the run would train one and write it into --output first."""
    out = tmp_path / "run"
    assert main(argv(files, out, tokenizer=None, **{option: value})) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()
