"""Hub publishing: checkpoint checks, model card, the Hub folder (loaded in a fresh process without the package),
uploads against a local fake Hub on 127.0.0.1, and background checkpoint pushing."""

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import EvalResult, ModelCard

from spannorm_hf import NORM_SCHEME_NAMES, SpanNormForCausalLM
from spannorm_hf.files import OUTPUT_MARKER
from spannorm_hf.integrations.hub import (
    SCHEME_DESCRIPTIONS,
    TRAINING_DETAILS_FILE,
    CheckpointPusher,
    build_hub_folder,
    check_repo_id,
    eval_results_from_json,
    load_checkpoint,
    read_checkpoint_config,
    render_model_card,
)
from spannorm_hf.parameters import parameter_counts

from fake_hub import closed_port_url
from helpers import (
    CODE_FILES,
    assert_one_error_line,
    finished_run_folder,
    generate_in_fresh_process,
    moe_config,
    run_script,
    save_tiny_checkpoint,
    snapshot,
    tiny_config,
)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("hub") / "spannorm-moe-tiny", kind="moe")


@pytest.mark.parametrize("repo_id", ["alice/spannorm-small", "org-1/model_v2.1"])
def test_good_repo_ids(repo_id):
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["spannorm-small", "a/b/c", "/name", "alice/", "alice/bad name", "al--ice/x"])
def test_bad_repo_ids_are_rejected(repo_id):
    with pytest.raises(ValueError, match="namespace/name"):
        check_repo_id(repo_id)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_checkpoint_config(tmp_path / "empty")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="'gpt2' checkpoint, not a SpanNorm one"):
        load_checkpoint(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "config.json").write_text("{model_type: spannorm")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path / "gpt2")
    SpanNormForCausalLM(tiny_config()).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
        load_checkpoint(tmp_path / "no-tokenizer")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        read_checkpoint_config(tmp_path / "weights.safetensors")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter folder"):
        read_checkpoint_config(tmp_path / "adapter")


def test_every_norm_scheme_has_a_card_description():
    assert set(SCHEME_DESCRIPTIONS) == set(NORM_SCHEME_NAMES)
    for scheme in NORM_SCHEME_NAMES:
        assert f"norm-scheme-{scheme}" in render_model_card(tiny_config(norm_scheme=scheme), "a/b").content


def test_the_card_names_the_width_rule():
    assert "| Width rule (`mup_base_width`) | none |" in render_model_card(tiny_config(), "a/b").content
    ruled = render_model_card(tiny_config(mup_base_width=16), "a/b").content
    assert "| Width rule (`mup_base_width`) | muP from width 16 |" in ruled


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts(tied):
    dense = tiny_config(tie_word_embeddings=tied, norm_scheme="pre")  # tying needs small initial embeddings
    model = SpanNormForCausalLM(dense)
    counts = parameter_counts(dense)
    assert counts.total == counts.active == counts.local == sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == counts  # a built model and its config count the same
    moe = moe_config(tie_word_embeddings=tied, norm_scheme="pre")
    total, active = parameter_counts(moe).total, parameter_counts(moe).active
    assert total == sum(p.numel() for p in SpanNormForCausalLM(moe).parameters())
    sparse_layers = moe.num_hidden_layers - moe.first_k_dense_layers
    per_expert = 3 * moe.hidden_size * moe.moe_intermediate_size  # gate, up, down
    idle = moe.num_experts - moe.num_experts_per_tok
    assert active == total - sparse_layers * idle * per_expert
    assert parameter_counts(SpanNormForCausalLM(moe)) == parameter_counts(moe)


EVAL_JSON = {
    "perplexity": {"dataset": "held_out.txt", "perplexity": 21.5, "nll": 3.07, "tokens": 900, "max_length": 64,
                   "stride": 32},
    "lm_eval": {"hellaswag": {"metrics": {"acc": 0.31, "acc_norm": 0.35}, "dataset": "Rowan/hellaswag"}},
}  # fmt: skip


def test_model_card_metadata_validates(tmp_path):
    config = moe_config()
    evals = eval_results_from_json(EVAL_JSON)
    details = {"tokens": "2.1B", "learning_rate": 0.004, "target_modules": ["q_proj", "v_proj"]}
    card = render_model_card(
        config, "alice/spannorm-moe", datasets=["alice/pydocs"], eval_results=evals, training_details=details
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)  # parses + validates model-index
    data = loaded.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and data.datasets == ["alice/pydocs"]
    assert {"spannorm", "norm-scheme-span", "moe"} <= set(data.tags)
    assert data.model_name == "spannorm-moe"
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {("held_out.txt", "perplexity"): 21.5, ("hellaswag", "acc"): 0.31, ("hellaswag", "acc_norm"): 0.35}
    assert all(isinstance(r, EvalResult) and r.task_type == "text-generation" for r in data.eval_results)
    total, active = parameter_counts(config).total, parameter_counts(config).active
    text = loaded.text
    assert f"({total:,})" in text and f"({active:,})" in text and active < total
    assert "| Experts | 4, top-2, in 2 of 3 |" in text
    assert "| Norm scheme | `span` |" in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/spannorm-moe", trust_remote_code=True)' in text
    assert (
        "| tokens | 2.1B |" in text
        and "| target_modules | q_proj, v_proj |" in text
        and "| hellaswag | acc_norm | 0.35 | lm-evaluation-harness |" in text
    )
    dense_text = render_model_card(tiny_config(norm_scheme="pre"), "a/b").content
    assert "norm-scheme-pre" in dense_text and "- dense" in dense_text and "model-index" not in dense_text
    assert "No evaluation results were supplied" in dense_text


@pytest.mark.slow
def test_publish_dry_run_folder_loads_without_the_package(moe_checkpoint, tmp_path, monkeypatch, capsys, no_token):
    out = tmp_path / "hub-folder"
    (moe_checkpoint / TRAINING_DETAILS_FILE).write_text(json.dumps({"optimizer_steps": 1234}))
    argv = ["--model", str(moe_checkpoint), "--repo-id", "alice/spannorm-moe-tiny", "--dry-run"]
    assert run_script("publish.py", [*argv, "--output-dir", str(out)], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "Not uploaded (--dry-run)" in printed and "alice/spannorm-moe-tiny@main" in printed
    names = {p.name for p in out.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        *CODE_FILES,
    }
    assert expected <= names and all(name in printed for name in expected)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spannorm.SpanNormForCausalLM"
    card = ModelCard.load(out / "README.md")
    assert "moe" in card.data.tags and "| optimizer_steps | 1234 |" in card.text  # MODEL/training_details.json

    torch.set_num_threads(1)  # as the fresh process, so both run the same float computation
    model, tokenizer = load_checkpoint(moe_checkpoint)
    prompt = tokenizer("import os")["input_ids"]
    expected_ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert generate_in_fresh_process(out, prompt, tmp_path) == expected_ids


def test_publish_without_token_or_network_exits_zero(moe_checkpoint, tmp_path, capsys, monkeypatch, hub_at):
    from spannorm_hf.integrations.hub import publish_main

    hub_at(closed_port_url())
    argv = ["--model", str(moe_checkpoint), "--repo-id", "alice/x", "--output-dir", str(tmp_path / "out")]
    assert publish_main(argv) == 0
    captured = capsys.readouterr()
    assert "no network" in captured.err and "Connection refused" in captured.err
    assert (tmp_path / "out" / "model.safetensors").exists()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert publish_main(argv) == 0  # rebuilds the same folder in place
    assert "no Hugging Face token" in capsys.readouterr().out
    assert publish_main([*argv[:3], "not-namespaced"]) == 2
    assert "namespace/name" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert publish_main([*argv[:4], "--output-dir", str(tmp_path / "precious"), "--dry-run"]) == 2
    assert "refusing to write a Hub folder into it" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_publish_never_writes_into_a_training_run(moe_checkpoint, tmp_path, capsys):
    """`--output-dir runs/r` (a training run) is refused before any work and the run is left as it was; with
    --overwrite only the Hub folder's own files are replaced, and the run's checkpoints and metrics stay."""
    from spannorm_hf.integrations.hub import publish_main

    run = tmp_path / "runs" / "r"
    before = finished_run_folder(run)
    argv = ["--model", str(moe_checkpoint), "--repo-id", "alice/x", "--output-dir", str(run), "--dry-run"]
    assert publish_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {str(run)!r} holds a training run") and "--overwrite" in err
    assert snapshot(run) == before
    assert publish_main([*argv, "--overwrite"]) == 0
    after = snapshot(run)
    for name in ("checkpoints/step-00000004/model.safetensors", "metrics.jsonl", "tensorboard/events.out.tfevents.1"):
        assert after[name] == before[name]
    assert after["config.json"] != before["config.json"] and "README.md" in after


def test_publish_uploads_one_commit_or_reports_the_server_error(moe_checkpoint, tmp_path, capsys, hub_at, fake_hub):
    from spannorm_hf.integrations.hub import publish_main

    hub_at(fake_hub.url)
    out = tmp_path / "out"
    argv = ["--model", str(moe_checkpoint), "--repo-id", "alice/spannorm-moe-tiny", "--output-dir", str(out)]
    assert publish_main([*argv, "--private", "--revision", "v0.1", "--commit-message", "First upload"]) == 0
    assert "Uploaded: " in capsys.readouterr().out
    assert fake_hub.created == {"name": "spannorm-moe-tiny", "organization": "alice", "visibility": "private"}
    assert ("POST", "/api/models/alice/spannorm-moe-tiny/branch/v0.1") in fake_hub.calls
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v0.1" and commit["message"] == "First upload"
    assert set(commit["files"]) == {p.name for p in out.iterdir()} - {OUTPUT_MARKER}  # the marker stays local
    assert commit["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()

    refusal = 'You don\'t have the rights to create a model under the namespace "alice"'
    fake_hub.fail = (403, {"error": refusal})
    assert publish_main(argv) == 1
    assert refusal in capsys.readouterr().err


def test_push_to_hub_writes_the_same_code_files(moe_checkpoint, tmp_path, hub_at, fake_hub):
    hub_at(fake_hub.url)
    model, tokenizer = load_checkpoint(moe_checkpoint)
    model.push_to_hub("alice/pushed")
    assert ("HEAD", "/alice/pushed/resolve/main/README.md") in fake_hub.calls  # it looked for a card here
    (pushed,) = fake_hub.commits
    folder = build_hub_folder(model, tokenizer, tmp_path / "folder", "alice/pushed")
    for name in CODE_FILES:
        assert pushed["files"][name] == (folder / name).read_bytes(), name
    pushed_config = json.loads(pushed["files"]["config.json"])
    assert pushed_config["auto_map"] == json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"model.safetensors", "generation_config.json"} <= set(pushed["files"])


TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "optimizer.safetensors", "train_state.json")


def checkpoint_folder(root: Path, name: str) -> Path:
    """A model folder with the training state a Trainer or scripts/train.py checkpoint keeps beside it."""
    folder = save_tiny_checkpoint(root / name)
    for state in TRAINING_STATE:
        (folder / state).write_bytes(b"state")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_checkpoint_pusher_commits_each_save_in_the_background(tmp_path, hub_at, fake_hub):
    hub_at(fake_hub.url)
    pusher = CheckpointPusher("alice/run")
    fake_hub.gate.clear()  # the Hub is slow: commits wait
    first = pusher.push(checkpoint_folder(tmp_path, "checkpoint-100"), "step 100")
    assert first is not None and not first.done()  # push returned while the upload is still running
    second = pusher.push(checkpoint_folder(tmp_path, "checkpoint-200"), "step 200")
    fake_hub.gate.set()
    url = pusher.finish(checkpoint_folder(tmp_path, "final"), "final model")
    assert first.done() and second.done() and url and url.startswith(fake_hub.url)
    assert [(c["revision"], c["message"]) for c in fake_hub.commits] == [
        ("checkpoint-100", "step 100"),
        ("checkpoint-200", "step 200"),
        ("main", "final model"),
    ]
    for commit in fake_hub.commits:
        files = set(commit["files"])
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", *CODE_FILES} <= files
        assert not files & {*TRAINING_STATE, "trainer_state.json"}  # model files only (HUB_FILES)
    assert "alice/run" in fake_hub.commits[0]["files"]["README.md"].decode()
    branches = [path for _, path in fake_hub.calls if "/branch/" in path]
    assert branches == ["/api/models/alice/run/branch/checkpoint-100", "/api/models/alice/run/branch/checkpoint-200"]


def test_checkpoint_pusher_without_token_or_network_warns_once(tmp_path, hub_at, caplog, monkeypatch):
    folder = checkpoint_folder(tmp_path, "checkpoint-1")
    hub_at(closed_port_url())
    with caplog.at_level(logging.WARNING, logger="spannorm_hf.integrations.hub"):
        offline = CheckpointPusher("alice/run")
        futures = [offline.push(folder, f"save {i}") for i in range(3)]
        assert offline.finish(folder) is None
    assert all(f is not None and f.exception() is not None for f in futures)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no network" in warnings[0] and "training goes on" in warnings[0]

    caplog.clear()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with caplog.at_level(logging.WARNING, logger="spannorm_hf.integrations.hub"):
        tokenless = CheckpointPusher("alice/run")
        assert tokenless.push(folder, "save") is None and tokenless.finish(folder) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no Hugging Face token" in warnings[0]
    with pytest.raises(ValueError, match="namespace/name"):
        CheckpointPusher("run")  # a bad repo id stops the run before training starts


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--repo-id", "alice/x"], ["the following arguments are required: --model"]),
        (["--model", "MISSING", "--repo-id", "alice/x"], ["MISSING", "not found"]),
        (["--model", "ADAPTER", "--repo-id", "alice/x"], ["is a LoRA adapter folder", "merge it first"]),
        (["--model", "CKPT", "--repo-id", "x"], ["repo id 'x' must be 'namespace/name'"]),
        (["--model", "CKPT", "--repo-id", "alice/x", "--eval-results", "NOT_JSON"], ["--eval-results", "not a read"]),
    ],
)
def test_publish_bad_input_is_one_line(moe_checkpoint, tmp_path, monkeypatch, capsys, no_token, argv, fragments):

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "bad.json").write_text("{oops")
    paths = {
        "MISSING": str(tmp_path / "MISSING"),
        "ADAPTER": str(tmp_path / "adapter"),
        "CKPT": str(moe_checkpoint),
        "NOT_JSON": str(tmp_path / "bad.json"),
    }
    argv = [paths.get(a, a) for a in argv]
    assert run_script("publish.py", [*argv, "--output-dir", str(tmp_path / "out"), "--dry-run"], monkeypatch) == 2
    assert_one_error_line(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out").exists()
