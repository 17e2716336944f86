"""Issue 20 ("Trust, round two"), items 1, 4 and 5: a hostile but realistic user against a training run's output
folder and its resume. Two runs into one folder, a hand-edited and resealed train_state.json, and a start that fails
after writing something must neither lose what is there nor leave a folder that refuses the rerun."""

import pytest

from spannorm_hf.training.trainer import main

from helpers import argv, assert_one_error_line

# Runs train in this process: accelerate's singletons are reset around every test.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
