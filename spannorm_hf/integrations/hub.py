"""SpanNorm checkpoints in and out of the Hugging Face Hub.

In: `load_checkpoint` accepts a local folder or a Hub id and fails early, naming the problem, when it is not a
SpanNorm checkpoint. It never runs code from the folder: this package's classes are registered with transformers'
auto classes, so its own `auto_map` is never followed, and a config.json or tokenizer_config.json asking for any
other code (`auto_map`) is refused, naming the file, before transformers could ask "run the custom code? [y/N]".
Every tokenizer the commands load goes through `load_tokenizer`, which does the same.

Out: `build_hub_folder` writes what a Hub repo needs (safetensors shards, config with `auto_map`, both remote-code
files, tokenizer, generation config, a model card rendered from `model_cards/spannorm.md`), `upload_hub_folder`
sends it with `huggingface_hub`, and `CheckpointPusher` uploads training checkpoints in the background without ever
raising into the training loop.

What goes up is an allowlist (`HUB_FILES`), never "the folder": a folder may be a training run's (`--output-dir RUN
--overwrite`), whose optimizer state, metrics, TensorBoard events and train_state.json are no one else's business.
The card's free-text fields (training details, evaluation task names) are escaped (`card_text`): the card is
public markdown with YAML front matter, and those fields come from files a user may have been handed.
"""

import fnmatch
import html
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.tokenization_auto import get_tokenizer_config

from ..cli import ArgumentParser, InputError, command, read_json_object
from ..configuration_spannorm import AUTO_MAP, SCALED_SCHEMES, SpanNormConfig
from ..files import atomic_output_dir, hold_outputs, naming_disk_full, read_output_marker
from ..modeling_spannorm import SpanNormForCausalLM
from ..parameters import parameter_counts

logger = logging.getLogger(__name__)

# top-level model_cards/ is a link to this folder, which ships inside the wheel
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "spannorm.md"
TRAINING_DETAILS_FILE = "training_details.json"  # a flat JSON object; fine-tuning and training write it
# Every file a SpanNorm Hub repo holds, and all that publishing or pushing ever uploads (fnmatch patterns on paths
# relative to the folder, matched level by level): the card; config and generation config; safetensors weights, one
# file or shards with their index; the two remote-code files that config.json's auto_map names; the tokenizer
# (transformers 5 saves tokenizer.json, tokenizer_config.json and chat templates; a slow tokenizer its vocabulary
# under one of the usual names and added_tokens.json).
HUB_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "configuration_spannorm.py",
    "modeling_spannorm.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)

# The model card's sentence for each of the config's NORM_SCHEME_NAMES (prose; tests check that none is missing).
SCHEME_DESCRIPTIONS = {
    "span": "SpanNorm, y = N(a x + Attn(x)), x' = N(a x + FFN(y)): the skip from the block input spans the whole "
    "block and the aggregated output is normalized (arXiv 2601.22580)",
    "pre": "Pre-LN, x' = h + FFN(N(h)) with h = x + Attn(N(x)) (Xiong et al. 2020, arXiv 2002.04745)",
    "post": "Post-LN, h = N(x + Attn(x)), x' = N(h + FFN(h)) (Vaswani et al. 2017)",
    "deepnorm": "DeepNorm, Post-LN with a scaled skip and scaled branch init (DeepNet, arXiv 2203.00555)",
    "peri": "Peri-LN, norms before and after each sublayer (arXiv 2502.02732)",
    "hybrid": "HybridNorm, QKV-norm attention and a Pre-LN FFN (arXiv 2503.04598)",
}


# ----------------------------------------------------------------------------------------------- reading checkpoints


def check_repo_id(repo_id: str) -> str:
    """A Hub repo id must be `namespace/name` here: a bare name would land in whichever account the token owns."""
    message = f"repo id {repo_id!r} must be 'namespace/name' (for example your-username/spannorm-small)"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(message)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InputError(f"{message}: {error}") from None
    return repo_id


def _is_repo_id(name: str) -> bool:
    try:
        check_repo_id(name)
    except ValueError:
        return False
    return not name.startswith((".", "~"))


def read_checkpoint_config(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """The config.json dict of a SpanNorm checkpoint (local folder or Hub id); a clear error for anything else."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"checkpoint {name!r} is a file; pass the folder that holds config.json")
        if not (path / "config.json").exists():
            from .adapters import is_adapter_folder  # adapters builds on this module

            if is_adapter_folder(path):
                raise InputError(
                    f"{name!r} is a LoRA adapter folder, not a model checkpoint; merge it first "
                    "(spannorm-finetune --model ADAPTER --merge DIR) or pass its base"
                )
            raise FileNotFoundError(
                f"checkpoint folder {name!r} has no config.json: not a saved model (see save_pretrained)"
            )
        config = read_json_object(path / "config.json", what="checkpoint config")
    elif _is_repo_id(name):
        try:
            config, _ = PreTrainedConfig.get_config_dict(name, revision=revision, token=token)
        except OSError as error:
            raise FileNotFoundError(
                f"checkpoint {name!r} is not a local folder and could not be read from the Hub: {error}"
            ) from error
    else:
        raise FileNotFoundError(f"checkpoint {name!r} not found: no such folder, and not a Hub id 'namespace/name'")
    model_type = config.get("model_type")
    if model_type != SpanNormConfig.model_type:
        raise InputError(
            f"{name!r} is a {model_type!r} checkpoint, not a SpanNorm one "
            f"(its config.json must have model_type {SpanNormConfig.model_type!r})"
        )
    refuse_custom_code(config, str(path / "config.json") if path.exists() else f"config.json of {name!r}")
    return config


def refuse_custom_code(settings: dict[str, Any], file: str) -> None:
    """`InputError` naming `file` (a config.json or tokenizer_config.json) when its `auto_map` asks for classes
    other than this package's own: transformers would import them from `.py` files beside it, after asking y/N in a
    terminal. This package's own entries (`repo--` prefixed or not) are safe to keep: its registered classes win
    over the folder's copies."""
    auto_map = settings.get("auto_map")
    if isinstance(auto_map, dict):
        auto_map = {name: ref for name, ref in auto_map.items() if AUTO_MAP.get(name) != str(ref).split("--")[-1]}
    if auto_map:
        raise InputError(
            f"{file} asks to run code from its folder (auto_map {json.dumps(auto_map)}); spannorm commands never run "
            "a folder's code: use a folder without custom code, or delete 'auto_map' from that file if the standard "
            "classes read it (a SpanNorm model and a tokenizer.json tokenizer need none)"
        )


def check_tokenizer_code(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> None:
    """`refuse_custom_code` for the tokenizer of a folder or Hub id (its tokenizer_config.json, if any)."""
    file = Path(name_or_path).expanduser() / "tokenizer_config.json"
    if not file.parent.exists():  # a Hub id
        settings = get_tokenizer_config(name_or_path, revision=revision, token=token)
        refuse_custom_code(settings, f"tokenizer_config.json of {str(name_or_path)!r}")
    elif file.is_file():
        refuse_custom_code(read_json_object(file, what="tokenizer settings"), str(file))


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` that never runs, nor asks to run, code from the folder: custom code is refused
    by `check_tokenizer_code`, and `trust_remote_code=False` keeps transformers from ever asking."""
    check_tokenizer_code(name_or_path, revision=revision, token=token)
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, token=token, trust_remote_code=False)


def load_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    token: str | None = None,
) -> tuple[SpanNormForCausalLM, PreTrainedTokenizerBase]:
    """Model and tokenizer of a SpanNorm checkpoint, local folder or Hub id; no code from the folder is run."""
    read_checkpoint_config(name_or_path, revision=revision, token=token)
    try:  # before the weights, which may take minutes to load
        tokenizer = load_tokenizer(name_or_path, revision=revision, token=token)
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(
            f"checkpoint {str(name_or_path)!r} has no usable tokenizer (save one next to the weights with "
            f"tokenizer.save_pretrained): {error}"
        ) from error
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, revision=revision, token=token, trust_remote_code=False
    )
    return model, tokenizer


# ------------------------------------------------------------------------------------------------- writing folders


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike, context: int) -> None:
    """`save_pretrained` with `model_max_length` = the model's context, which a tokenizer trained here (or borrowed)
    does not know: pipelines, lm-eval and TRL truncate to it. The tokenizer object itself is left as it was."""
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = context
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = previous


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit} ({count:,})"
    return f"{count:,}"


def eval_results_from_json(results: dict[str, Any]) -> list[EvalResult]:
    """Model-index entries from `spannorm-evaluate --output` JSON (perplexity and lm-eval metrics)."""
    entries = []
    ppl = results.get("perplexity")
    if ppl:
        entries.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=ppl["dataset"],
                dataset_name=ppl["dataset"],
                metric_type="perplexity",
                metric_value=float(ppl["perplexity"]),
                metric_args={"max_length": ppl["max_length"], "stride": ppl["stride"]},
            )
        )
    for task, info in results.get("lm_eval", {}).items():
        for metric, value in info["metrics"].items():
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=info.get("dataset") or task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=float(value),
                    source_name="lm-evaluation-harness",
                    source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                )
            )
    return entries


def _underscores(run: re.Match) -> str:
    before, after = run.string[run.start() - 1 : run.start()], run.string[run.end() : run.end() + 1]
    return run[0] if before.isalnum() and after.isalnum() else run[0].replace("_", r"\_")


def card_text(value: Any) -> str:
    """`value` as inert text in one markdown table cell of the card: on one line (no new rows, headings or front
    matter), HTML-escaped (no tags), and markdown's inline syntax backslash-escaped (no links, images, code or
    emphasis; an `_` inside a word is left alone, as markdown never reads it as emphasis). A list is joined."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value)) or "none"
    text = html.escape(" ".join(str(value).split()), quote=False)
    return re.sub(r"_+", _underscores, re.sub(r"[\\`*\[\]|~]", r"\\\g<0>", text))


def render_model_card(
    config: SpanNormConfig,
    repo_id: str,
    *,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
    training_details: dict[str, Any] | None = None,
    template: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """The Hub model card: metadata (license, library, tags, pipeline, datasets, model-index) and the body."""
    if not Path(template).is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} not found")
    name = repo_id.split("/")[-1]
    moe = config.num_experts > 0
    tags = ["spannorm", f"norm-scheme-{config.norm_scheme}", "moe" if moe else "dense", "causal-lm", "custom_code"]
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=list(datasets) or None,
        model_name=name,
        eval_results=list(eval_results) or None,
    )
    counts = parameter_counts(config)
    if config.norm_scheme in SCALED_SCHEMES:
        gain = "plain init" if config.branch_gain is None else f"{config.branch_gain:.4g}"
        skip_and_gain = f"{config.skip_scale:.4g} / {gain}"
    else:
        skip_and_gain = "not used by this scheme"
    if moe:
        sparse = config.num_hidden_layers - config.first_k_dense_layers
        experts = f"{config.num_experts}, top-{config.num_experts_per_tok}, in {sparse} of {config.num_hidden_layers}"
        feed_forward = f"MoE, expert width {config.moe_intermediate_size}"
        if config.first_k_dense_layers:
            feed_forward += f"; first {config.first_k_dense_layers} layer(s) dense, width {config.intermediate_size}"
    else:
        experts, feed_forward = "none (dense)", f"SwiGLU, width {config.intermediate_size}"
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=card_text(name),
        repo_id=repo_id,
        norm_scheme=config.norm_scheme,
        scheme_description=SCHEME_DESCRIPTIONS[config.norm_scheme],
        skip_and_gain=skip_and_gain,
        width_rule="none" if config.mup_base_width is None else f"muP from width {config.mup_base_width}",
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        num_experts=config.num_experts,
        feed_forward=feed_forward,
        experts=experts,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        total_params=_human(counts.total),
        active_params=_human(counts.active),
        training_details={card_text(key): card_text(value) for key, value in (training_details or {}).items()},
        eval_results=[
            {
                "task": card_text(result.dataset_name),
                "metric": card_text(result.metric_type),
                "value": f"{result.metric_value:.4g}",
                "source": card_text(result.source_name or ""),
            }
            for result in eval_results
        ],
    )


def build_hub_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Write a complete Hub folder for `repo_id` (atomically). `card_kwargs` go to `render_model_card`.
    `output_dir` must be new, empty or an earlier Hub folder (see `spannorm_hf.files`), unless `overwrite`."""
    check_repo_id(repo_id)
    card = render_model_card(model.config, repo_id, **card_kwargs)
    with atomic_output_dir(output_dir, "hub-folder", flag="--output-dir", overwrite=overwrite) as staging:
        with naming_disk_full(staging):
            model.save_pretrained(staging, max_shard_size=max_shard_size)  # weights, config + auto_map, code files
            save_tokenizer(tokenizer, staging, model.config.max_position_embeddings)
            card.save(staging / "README.md")
        stray = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
        stray = [name for name in stray if not is_hub_file(name)]
        if stray:  # e.g. a slow tokenizer that keeps its vocabulary under an unusual name
            raise InputError(
                f"the Hub folder would hold {stray[0]!r}, which is not one of the model files a Hub repo may hold "
                "(HUB_FILES in spannorm_hf/integrations/hub.py); nothing was written: if it is a tokenizer file, "
                "save the tokenizer as a fast one (tokenizer.json)"
            )
    return Path(output_dir).expanduser().resolve()


def is_hub_file(name: str) -> bool:
    """Whether the relative path `name` is one of `HUB_FILES` (each pattern matches as many folder levels as it has)."""
    return any(fnmatch.fnmatchcase(name, p) and name.count("/") == p.count("/") for p in HUB_FILES)


def hub_files(folder: str | os.PathLike) -> list[str]:
    """The files an upload of `folder` sends, relative and sorted: the allowlisted ones among those the last
    `build_hub_folder` wrote there (its ownership marker lists them, so stale shards of an earlier build or a
    training run's own files stay behind), or among all its files when no build marked it."""
    root = Path(folder)
    marker = read_output_marker(root)
    if marker is not None and marker["kind"] == "hub-folder":
        names = [str(name) for name in marker.get("files", [])]
    else:
        names = [p.relative_to(root).as_posix() for p in root.rglob("*")]
    return sorted(name for name in names if is_hub_file(name) and (root / name).is_file())


# ------------------------------------------------------------------------------------------------------- uploading


def is_network_failure(error: BaseException) -> bool:
    """No answer from the server at all (offline mode, refused connection, DNS, timeout), as opposed to an error
    the server sent back."""
    if isinstance(error, HfHubHTTPError):
        return False
    return isinstance(error, (HTTPError, ConnectionError, TimeoutError))


def upload_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload SpanNorm model",
) -> str:
    """create_repo + (create_branch) + one commit of `hub_files(folder)`; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(check_repo_id(repo_id), private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return commit_hub_files(api, folder, repo_id, revision, commit_message)


def commit_hub_files(api: HfApi, folder: str | os.PathLike, repo_id: str, revision: str | None, message: str) -> str:
    """One commit of exactly `hub_files(folder)` to `revision` of `repo_id`; returns the commit URL."""
    root = Path(folder)
    files = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=root / name) for name in hub_files(root)]
    return api.create_commit(repo_id, files, commit_message=message, revision=revision).commit_url


class CheckpointPusher:
    """Upload training checkpoints to `repo_id` in the background, one commit per save, without ever raising into
    the training loop: with no token, no network or a server error it logs one warning and training goes on.

    `push(folder, commit_message)` commits a checkpoint folder to its own branch (default: the folder's name, e.g.
    `checkpoint-500`, loadable with `from_pretrained(repo_id, revision="checkpoint-500")`) and returns at once with
    a `Future` (or None when pushing is off); `finish(final_folder)` commits the final model to `main` and waits
    for every upload. Only the model files of `HUB_FILES` go up (never optimizer, scheduler or RNG state). A model
    card is written into a folder that holds a SpanNorm config.json and no README.md. Uploads run one at a time, in
    order, on huggingface_hub's background worker (`HfApi.run_as_future`); keep a folder until its future is done.
    """

    def __init__(self, repo_id: str, private: bool = False, token: str | None = None):
        self.repo_id = check_repo_id(repo_id)  # a typo should stop the run before training, not after
        self.private = private
        self.token = token or get_token()
        self.futures: list[Future] = []
        self._api = HfApi(token=self.token)
        self._repo_ready = False
        self._warned = False
        self.enabled = self.token is not None
        if not self.enabled:
            self._warn(f"no Hugging Face token (set HF_TOKEN or run `hf auth login`): not pushing to {repo_id}")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("%s; training goes on (further push problems are logged at debug level)", message)
        else:
            logger.debug(message)

    def _upload(self, folder: str, branch: str, commit_message: str) -> str:
        if not self._repo_ready:
            self._api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._repo_ready = True
        if branch != "main":
            self._api.create_branch(self.repo_id, branch=branch, exist_ok=True)
        return commit_hub_files(self._api, folder, self.repo_id, branch, commit_message)

    def _on_done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            kind = "no network" if is_network_failure(error) else "upload failed"
            self._warn(f"pushing to {self.repo_id}: {kind}: {error}")

    def _write_card(self, folder: Path) -> None:
        config_path = folder / "config.json"
        if (folder / "README.md").exists() or not config_path.exists():
            return
        config = SpanNormConfig.from_json_file(config_path)
        details_path = folder / TRAINING_DETAILS_FILE
        details = json.loads(details_path.read_text()) if details_path.exists() else None
        render_model_card(config, self.repo_id, training_details=details).save(folder / "README.md")

    def push(self, folder: str | os.PathLike, commit_message: str, branch: str | None = None) -> Future | None:
        """Queue one commit of `folder` to `branch` (default: the folder's name); returns immediately."""
        if not self.enabled:
            return None
        try:
            folder = Path(folder).resolve()
            self._write_card(folder)
            future = self._api.run_as_future(self._upload, str(folder), branch or folder.name, commit_message)
        except Exception as error:  # never into the training loop
            self._warn(f"pushing {folder} to {self.repo_id} failed: {error}")
            return None
        future.add_done_callback(self._on_done)
        self.futures.append(future)
        return future

    def finish(self, final_folder: str | os.PathLike, commit_message: str = "Upload final model") -> str | None:
        """Commit the final model to `main`, wait for every queued upload; the commit URL, or None on failure."""
        final = self.push(final_folder, commit_message, branch="main")
        wait(self.futures)
        if final is None or final.exception() is not None:
            return None
        return final.result()


# ------------------------------------------------------------------------------------------------------------- CLI


@dataclass
class PublishArguments:
    """The options of `spannorm-publish`."""

    model: str = field(metadata={"help": "checkpoint folder (save_pretrained output with a tokenizer)"})
    repo_id: str = field(metadata={"help": "namespace/name on the Hub"})
    private: bool = field(default=False, metadata={"help": "create the repo private"})
    revision: str | None = field(
        default=None, metadata={"help": "branch to commit to (created if missing); default main"}
    )
    dry_run: bool = field(default=False, metadata={"help": "build the folder and list it, upload nothing"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where to build the Hub folder (default: MODEL-hub next to MODEL)"}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "write into an --output-dir this command did not create (only the files it writes are replaced)"
        },
    )
    license: str = field(default="apache-2.0", metadata={"help": "Hub license id for the card"})
    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": "training dataset Hub id (repeatable: --dataset A --dataset B, or --dataset A B)",
            "action": "extend",
        },
    )
    eval_results: str | None = field(
        default=None, metadata={"help": "JSON written by spannorm-evaluate --output (model-index)"}
    )
    training_details: str | None = field(
        default=None,
        metadata={"help": f"JSON object for the card's training table (default: MODEL/{TRAINING_DETAILS_FILE})"},
    )
    commit_message: str = field(default="Upload SpanNorm model", metadata={"help": "message of the Hub commit"})
    max_shard_size: str = field(default="2GB", metadata={"help": "largest safetensors shard, e.g. 500MB or 5GB"})

    def __post_init__(self):
        check_repo_id(self.repo_id)


def publish_parser() -> ArgumentParser:
    """The parser of `spannorm-publish`, built from `PublishArguments`."""
    return ArgumentParser(
        PublishArguments,
        description="Build a Hub folder (weights, config + auto_map, remote code, tokenizer, model card) from a "
        "SpanNorm checkpoint folder and upload it.",
    )


@command
def publish_main(argv: Sequence[str] | None = None) -> int:
    """`spannorm-publish` / `scripts/publish.py`: 0 when uploaded, dry-run, or skipped for want of a token or a
    network; 1 when the server refused the upload (its message is printed); 2 for bad input."""
    (args,) = publish_parser().parse_args_into_dataclasses(argv)
    model_dir = Path(args.model).expanduser().resolve()
    details_path = Path(args.training_details or model_dir / TRAINING_DETAILS_FILE)
    details = None
    if args.training_details or details_path.exists():
        details = read_json_object(details_path, what="--training-details")
    evals = []
    if args.eval_results:
        evals = eval_results_from_json(read_json_object(args.eval_results, what="--eval-results"))
    output = Path(args.output_dir) if args.output_dir else model_dir.with_name(model_dir.name + "-hub")
    with hold_outputs([(output, "hub-folder", "--output-dir")], overwrite=args.overwrite):  # to the upload's end
        return _build_and_upload(args, model_dir, output, details, evals)


def _build_and_upload(
    args: PublishArguments, model_dir: Path, output: Path, details: dict[str, Any] | None, evals: list[EvalResult]
) -> int:
    """The work of `publish_main`, once its inputs are read and its --output-dir is held."""
    model, tokenizer = load_checkpoint(model_dir)
    folder = build_hub_folder(
        model,
        tokenizer,
        output,
        args.repo_id,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        license=args.license,
        datasets=args.dataset,
        eval_results=evals,
        training_details=details,
    )
    target = f"{args.repo_id}@{args.revision or 'main'}" + (" (private)" if args.private else "")
    print(f"Hub folder: {folder}")
    print(f"Files for {target}:")
    for name in hub_files(folder):
        print(f"  {name:40s} {(folder / name).stat().st_size:>14,d} bytes")
    token = get_token()
    if args.dry_run or token is None:
        why = "--dry-run" if args.dry_run else "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
        print(f"Not uploaded ({why}). Upload later with the same command, without --dry-run.")
        return 0
    try:
        url = upload_hub_folder(
            folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=token,
            commit_message=args.commit_message,
        )
    except Exception as error:
        if is_network_failure(error):
            print(f"Not uploaded: no network ({error}). The folder is ready at {folder}.", file=sys.stderr)
            return 0
        if isinstance(error, HfHubHTTPError):
            print(f"error: upload to {args.repo_id} failed: {error}", file=sys.stderr)
            return 1
        raise
    print(f"Uploaded: {url}")
    return 0
