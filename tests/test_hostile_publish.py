"""Issue 20 ("Trust, round two"), items 7 and 10: publishing sends model files only, whatever folder it builds in,
and renders the card's free text as inert text; a training checkpoint loads through remote code like an export."""

import copy
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from spannorm_hf.cli import InputError
from spannorm_hf.files import OUTPUT_MARKER
from spannorm_hf.integrations.hub import build_hub_folder, load_checkpoint, publish_main, render_model_card
from spannorm_hf.training.trainer import parse_args, train

from helpers import (
    argv,
    clean_accelerate_state,
    finished_run_folder,
    run_without_package,
    save_tiny_checkpoint,
    snapshot,
    tiny_config,
)

# What a Hub folder of the tiny checkpoint holds: nothing else may be listed or uploaded.
MODEL_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "configuration_spannorm.py",
    "modeling_spannorm.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny")


def add_training_internals(run: Path) -> None:
    """What a real run folder holds beside its model: a checkpoint's optimizer and train state (with the absolute
    config path), RNG state, manifest and tokenizer, and a sharded export's shards and index."""
    step = run / "checkpoints" / "step-00000004"
    state = {"step": 4, "args": {"config": str(run.parent / "secret" / "config.json")}}
    for name, data in {
        "optimizer.safetensors": b"moments",
        "optimizer.json": b'{"state": {}}',
        "train_state.json": json.dumps(state).encode(),
        "rng_state_0.json": b"{}",
        "manifest.json": b"{}",
        "tokenizer/tokenizer.json": b"{}",
    }.items():
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_bytes(data)
    (run / "model-00001-of-00002.safetensors").write_bytes(b"an earlier sharded export")
    (run / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (run / "training_details.json").write_text('{"optimizer_steps": 4}')


def test_publish_lists_and_uploads_only_model_files(checkpoint, tmp_path, capsys, hub_at, fake_hub):
    """Item 7: `--output-dir RUN --overwrite` listed and uploaded the whole run folder (optimizer state,
    metrics.jsonl, TensorBoard events, train_state.json with an absolute path). Now both the listing and the commit
    are the model files this build wrote, each on the allowlist; the run's own files stay, untouched and local."""
    run = tmp_path / "runs" / "r"
    finished_run_folder(run)
    add_training_internals(run)
    before = snapshot(run)
    hub_at(fake_hub.url)
    command = ["--model", str(checkpoint), "--repo-id", "alice/x", "--output-dir", str(run), "--overwrite"]
    assert publish_main(command) == 0
    listing = capsys.readouterr().out.split("Files for alice/x@main:\n")[1]
    listed = {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}
    (commit,) = fake_hub.commits
    assert listed == set(commit["files"]) == MODEL_FILES
    assert all(str(tmp_path).encode() not in data for data in commit["files"].values())  # no local path went up
    after = snapshot(run)
    untouched = set(before) - MODEL_FILES - {OUTPUT_MARKER}  # all of the run's own files, shards and index included
    assert {name: after[name] for name in untouched} == {name: before[name] for name in untouched}


def test_a_build_that_would_hold_another_file_writes_nothing(checkpoint, tmp_path, monkeypatch):
    """Item 7, the staged folder: a tokenizer that saves a file outside the allowlist (here `bpe.codes`) stops the
    build with an error naming it, before anything reaches --output-dir."""
    model, tokenizer = load_checkpoint(checkpoint)

    def save_with_codes(folder):
        tokenizer.save_pretrained(folder)
        (Path(folder) / "bpe.codes").write_text("codes")

    odd = copy.deepcopy(tokenizer)
    monkeypatch.setattr(odd, "save_pretrained", save_with_codes)
    with pytest.raises(InputError, match="'bpe.codes', which is not one of the model files"):
        build_hub_folder(model, odd, tmp_path / "out", "alice/x")
    assert list(tmp_path.iterdir()) == []


class Cells(HTMLParser):
    """Every tag of a rendered markdown fragment, and the text of each table cell."""

    def __init__(self):
        super().__init__()
        self.tags, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self.cells.append("")

    def handle_data(self, data):
        if self.cells:
            self.cells[-1] += data


HOSTILE = (
    "line one\n---\n# heading\n<script>alert(1)</script> | cell ![x](http://e.vil/p.png) [a](http://e.vil) "
    "`c` *b* _i_ ~~s~~ \\"
)


def test_card_free_text_cannot_break_the_card(tmp_path):
    """Item 7: training_details and evaluation task names went raw into the card, so newlines, `---`, `|` and
    `<script>` added rows, headings and HTML. Rendered by a CommonMark renderer with tables (markdown-it-py, which
    transformers installs through typer and rich), each field is now one cell whose text is the field's own text
    (whitespace collapsed), and the only tags are the table's; the YAML front matter reads back unchanged."""
    from markdown_it import MarkdownIt

    details = {"data": HOSTILE, "note\n| injected | row |": ["a|b", "<b>bold</b>"], "optimizer_steps": 4}
    result = EvalResult(
        task_type="text-generation", dataset_type="t", dataset_name=HOSTILE, metric_type="acc_norm", metric_value=0.5
    )
    license = "other\n---\nlicense: mit"
    card = render_model_card(
        tiny_config(), "alice/x", training_details=details, eval_results=[result], license=license, datasets=[HOSTILE]
    )
    reread = ModelCard(card.content)
    assert reread.data.license == license and reread.data.datasets == [HOSTILE]
    assert reread.data.eval_results[0].dataset_name == HOSTILE

    text = reread.text
    training = text.split("## Training details")[1].split("## Evaluation")[0]
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    flat = " ".join(HOSTILE.split())
    for section, cells in (
        (training, ["", "", "data", flat, "note | injected | row |", "a|b, <b>bold</b>", "optimizer_steps", "4"]),
        (evaluation, ["Task", "Metric", "Value", "Source", flat, "acc_norm", "0.5", ""]),
    ):
        parser = Cells()
        parser.feed(MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(section))
        assert set(parser.tags) == {"table", "thead", "tbody", "tr", "th", "td"}, section
        assert [cell.strip() for cell in parser.cells] == cells, section


@pytest.mark.slow  # a tiny training run, then a fresh Python importing transformers
def test_a_training_checkpoint_loads_like_an_export_without_the_package(files, tmp_path):
    """Item 10: `from_pretrained(run/checkpoints/step-N, trust_remote_code=True)` failed (configuration_spannorm.py
    missing, though config.json's auto_map names it). A checkpoint now carries both code files, as the export does:
    where the package cannot be imported, it loads through remote code and gives the export's logits (the same
    weights and code: an identical computation, compared exactly), and its tokenizer loads from `tokenizer/`."""
    run = tmp_path / "run"
    options = dict(max_steps=2, save_every=2, eval_every=2, diag_every=0)
    with clean_accelerate_state():
        train(parse_args(argv(files, run, **options)))
    (step,) = (run / "checkpoints").iterdir()
    found, output = run_without_package(LOAD_CHECKPOINT, [str(step), str(run)], tmp_path)
    assert "custom code" not in output  # no y/N prompt on the way
    assert found["modules"] == ["transformers_modules", "transformers_modules"]
    assert found["same_logits"] and found["same_tokens"]


LOAD_CHECKPOINT = """
from transformers import AutoModelForCausalLM, AutoTokenizer
checkpoint, export = sys.argv[1], sys.argv[2]
models = [AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval() for path in (checkpoint, export)]
tokenizer = AutoTokenizer.from_pretrained(checkpoint, subfolder="tokenizer")
ids = torch.tensor([AutoTokenizer.from_pretrained(export, trust_remote_code=True)("import os")["input_ids"]])
with torch.no_grad():
    logits = [model(ids).logits for model in models]
print(json.dumps({
    "modules": [type(model).__module__.split(".")[0] for model in models],
    "same_logits": torch.equal(*logits),
    "same_tokens": tokenizer("import os")["input_ids"] == ids[0].tolist(),
}))
"""
