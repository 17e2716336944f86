"""spannorm_hf.files: output-folder ownership (never write into a folder another command or the user made),
atomic folder output that replaces only its own files, and a full disk named as such."""

import errno
import json

import pytest

from spannorm_hf.files import (
    OUTPUT_MARKER,
    DiskFullError,
    OutputDirError,
    atomic_output_dir,
    check_output_dir,
    claim_output_dir,
    naming_disk_full,
)


def test_new_empty_or_own_folders_are_accepted_and_others_refused(tmp_path):
    assert check_output_dir(tmp_path / "new", "hub-folder", flag="--output-dir") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking writes nothing
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "hub-folder", flag="--output-dir")
    claim_output_dir(tmp_path / "run", "training-run", flag="--output")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    check_output_dir(tmp_path / "run", "training-run", flag="--output")  # same kind: ours

    with pytest.raises(OutputDirError, match=r"--merge '.*run' holds a training run .* pass --overwrite"):
        check_output_dir(tmp_path / "run", "merged-model", flag="--merge")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "config.json").write_text("{}")  # a config.json alone proves nothing
    with pytest.raises(OutputDirError, match=r"is not empty \(config.json\) and was not created by this command"):
        check_output_dir(tmp_path / "user", "hub-folder", flag="--output-dir")
    (tmp_path / "user" / OUTPUT_MARKER).write_text("not json")  # an unreadable marker is not ours either
    with pytest.raises(OutputDirError):
        check_output_dir(tmp_path / "user", "hub-folder", flag="--output-dir")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputDirError, match="is not a folder"):
        check_output_dir(tmp_path / "a-file", "hub-folder", flag="--output-dir", overwrite=True)


def test_atomic_output_dir_replaces_only_its_own_files(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target, "hub-folder") as staging:
        (staging / "config.json").write_text("1")
        (staging / "old-shard.safetensors").write_text("1")
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "hub-folder" and marker["files"] == ["config.json", "old-shard.safetensors"]
    (target / "notes.txt").write_text("the user's")
    with atomic_output_dir(target, "hub-folder") as staging:  # an earlier output of the same kind: ours
        (staging / "config.json").write_text("2")
    assert (target / "config.json").read_text() == "2"
    assert not (target / "old-shard.safetensors").exists()  # ours, no longer written: removed
    assert (target / "notes.txt").read_text() == "the user's"  # never ours: kept

    with pytest.raises(RuntimeError), atomic_output_dir(target, "hub-folder") as staging:
        (staging / "config.json").write_text("3")
        raise RuntimeError("failed half way")
    assert (target / "config.json").read_text() == "2"  # a failure changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and leaves no staging folder


def test_overwrite_keeps_what_the_command_does_not_write(tmp_path):
    run = claim_output_dir(tmp_path / "run", "training-run", flag="--output")
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.json").write_text("old")
    with pytest.raises(OutputDirError):
        with atomic_output_dir(run, "merged-model", flag="--merge"):
            pass
    assert (run / "config.json").read_text() == "old"
    with atomic_output_dir(run, "merged-model", flag="--merge", overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (run / "config.json").read_text() == "new"
    assert (run / "checkpoints").is_dir() and (run / "metrics.jsonl").read_text() == "{}\n"


def test_a_full_disk_is_named(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*model.safetensors"):
        with naming_disk_full(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError):
        with naming_disk_full(target):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    with pytest.raises(ValueError), naming_disk_full(target):  # anything else passes through unchanged
        raise ValueError("not about space")
