"""Pretraining data through `datasets`: local text / jsonl / parquet files or a Hub dataset, tokenized and
packed into fixed-length rows.

Packing puts an EOS after every document and restarts `position_ids` at 0 where a document (or a row) starts.
transformers reads those resets as document boundaries: FlashAttention runs varlen kernels, and sdpa / eager /
flex get a block-diagonal causal mask, so attention never crosses documents. The first token of a document is
not a training target (nothing before it in its document predicts it).

Plain-text files are split into documents at blank lines; a jsonl / parquet row (its text column) is one
document. With no data at all, the embedded corpus (`spannorm_hf.training.corpus.DEFAULT_CORPUS`) is used.
Tokenizing and packing go through `Dataset.map` with a fingerprint of (data, tokenizer, sequence length), so a
second run on the same data reuses the cached result.
"""

import bz2
import codecs
import glob
import gzip
import hashlib
import itertools
import json
import lzma
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from ..cli import InputError
from ..integrations.hub import load_tokenizer
from .corpus import DEFAULT_CORPUS
from .tokenizer import train_tokenizer

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "json", ".json": "json"}
BUILDERS[".parquet"] = "parquet"
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
PACK_VERSION = "pack-v1"  # bump when the packing format changes, to invalidate caches
NEWLINE = b"\n"
SCAN_CHUNK = 1 << 20  # bytes read at a time when checking a data file
TOKENIZER_TRAIN_CHARS = 200_000_000  # enough text for a BPE vocabulary; more only costs time


class DataError(InputError):
    """Bad training data, found before any work is done."""


def _plain_name(path: str) -> str:
    """The lower-cased name without its compression suffix (data.jsonl.gz -> data.jsonl)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return name


def _builder_for(path: str) -> str:
    builder = BUILDERS.get(Path(_plain_name(path)).suffix)
    if builder is None:
        raise DataError(
            f"data file {path!r}: unknown type; use one of {sorted(BUILDERS)} (optionally .gz, .bz2 or .xz)"
        )
    return builder


def _looks_local(spec: str) -> bool:
    if any(ch in spec for ch in "*?[") or os.path.exists(spec) or spec.startswith((".", "/", "~")):
        return True
    return Path(_plain_name(spec)).suffix in BUILDERS


def _open_decompressed(path: str) -> BinaryIO:
    """The file's bytes, decompressed as its suffix says (.gz, .bz2, .xz); .zst is refused (no stdlib decoder)."""
    name = path.lower()
    if name.endswith(".zst"):
        raise DataError(
            f"data file {path!r}: .zst is not supported (the standard library has no zstd decoder); "
            "decompress it (zstd -d) or recompress it as .gz, .bz2 or .xz"
        )
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        if name.endswith(suffix):
            return opener(path, "rb")
    return open(path, "rb")


def _check_json_line(path: str, raw: bytes, number: int) -> None:
    if not raw.strip():
        return  # blank lines are skipped by the json builder
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else err.reason
        raise DataError(f"data file {path!r} line {number} is not valid JSON ({reason}); fix or remove it") from None
    if not isinstance(value, dict):
        raise DataError(
            f"data file {path!r} line {number} is a JSON {type(value).__name__}, not a record; "
            'each line must be an object such as {"text": "..."}'
        )


def _is_json_document(head: bytes) -> bool:
    """A .json file holding one JSON document (an array, or an object spread over lines), not JSON lines."""
    text = head.lstrip()
    if text.startswith(b"["):
        return True
    first_line = text.split(b"\n", 1)[0]
    try:
        json.loads(first_line)
    except ValueError:
        return text.startswith(b"{")
    return False


def _scan_text(path: str, chunks: Iterable[bytes], json_lines: bool) -> bool:
    """Read the file once, chunk by chunk: raise a `DataError` naming the line of the first byte that is not UTF-8, the
    first NUL byte or (JSON lines) the first line that is not a JSON object. Whether any non-blank text was seen."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen_text = False
    line = 1  # the line the current chunk starts on
    offset = 0  # the file offset (decompressed) of the current chunk
    pending, pending_line = b"", 1  # JSON lines: the unfinished last line and its number
    for chunk in chunks:
        buffered = len(decoder.getstate()[0])  # bytes of a character cut at the previous chunk's end
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            start = max(0, err.start - buffered)
            where = f"line {line + chunk.count(NEWLINE, 0, start)}, byte {offset + start}"
            raise DataError(
                f"data file {path!r} looks binary or is not UTF-8 text ({err.reason} at {where}); "
                "convert text to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        nul = chunk.find(b"\x00")
        if nul >= 0:
            where = f"line {line + chunk.count(NEWLINE, 0, nul)}, byte {offset + nul}"
            raise DataError(f"data file {path!r} looks binary: it contains a NUL byte ({where})")
        seen_text = seen_text or bool(chunk.strip())
        if json_lines:
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for i, raw in enumerate(lines):
                _check_json_line(path, raw, pending_line + i)
            pending_line += len(lines)
        line += chunk.count(b"\n")
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(
            f"data file {path!r} is not UTF-8 text (it ends inside a multi-byte character, line {line}); "
            "the file is probably truncated"
        ) from None
    if json_lines:
        _check_json_line(path, pending, pending_line)
    return seen_text


def _check_parquet(path: str) -> None:
    if path.lower().endswith(COMPRESSIONS):
        raise DataError(f"data file {path!r}: parquet is compressed inside; pass the .parquet file itself")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 4))
        tail = f.read(4)
    if head != b"PAR1":
        raise DataError(f"data file {path!r} is not a parquet file (no PAR1 magic)")
    if tail != b"PAR1":
        raise DataError(f"data file {path!r} is a truncated parquet file (no PAR1 footer); re-download or rewrite it")
    try:
        pq.ParquetFile(path).metadata  # noqa: B018  (reads and checks the footer: schema and row groups)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"data file {path!r} is not a readable parquet file: {err}") from None


def check_data_file(path: str) -> None:
    """Raise a `DataError` naming `path` (and the line, where there is one) if it is missing, empty, truncated,
    not UTF-8 text, binary, or (JSON lines) holds a line that is not a JSON object. Text is read once, in 1 MiB
    chunks, through its decompressor, so the check costs one streaming pass and no memory for big files."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist (or is not a file)")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path!r} is empty")
    builder = _builder_for(path)
    if builder == "parquet":
        _check_parquet(path)
        return
    try:
        with _open_decompressed(path) as stream:
            head = stream.read(SCAN_CHUNK)
            json_lines = builder == "json" and (_plain_name(path).endswith(".jsonl") or not _is_json_document(head))
            chunks = itertools.chain([head], iter(lambda: stream.read(SCAN_CHUNK), b""))
            seen_text = _scan_text(path, chunks, json_lines)
    except EOFError:
        raise DataError(
            f"data file {path!r} is truncated: its compressed stream ends early; re-download or re-compress it"
        ) from None
    except (OSError, lzma.LZMAError, zlib.error) as err:
        raise DataError(
            f"data file {path!r} cannot be read ({type(err).__name__}: {err}); if it is compressed it may be "
            "corrupt: re-download or re-compress it"
        ) from None
    if not seen_text:
        raise DataError(f"data file {path!r} holds no text (only whitespace)")


def resolve_data(specs: list[str] | None) -> tuple[str | None, list[str] | str]:
    """Checked local files as `(builder, paths)`, or `(None, hub_name)` for a Hub dataset name."""
    if not specs:
        return "text", [str(DEFAULT_CORPUS)]
    if len(specs) == 1 and not _looks_local(specs[0]):
        return None, specs[0]
    paths: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(spec)
        matches = sorted(glob.glob(spec)) if any(ch in spec for ch in "*?[") else [spec]
        if not matches:
            raise DataError(f"data pattern {spec!r} matches no file")
        paths += matches
    builders = {_builder_for(p) for p in paths}
    if len(builders) > 1:
        raise DataError(f"data files mix types {sorted(builders)}; pass files of one type")
    for path in paths:
        check_data_file(path)
    return builders.pop(), paths


def load_documents(
    specs: list[str] | None, text_column: str = "text", streaming: bool = False
) -> Dataset | IterableDataset:
    """The documents (one `text` column) of local files, a Hub dataset (`name` or `name:config`), or the
    embedded corpus when `specs` is empty."""
    builder, files = resolve_data(specs)
    if builder is None:
        name, _, subset = files.partition(":")
        try:
            ds = load_dataset(name, subset or None, split="train", streaming=streaming)
        except Exception as err:  # datasets raises many types (offline, not found, auth)
            raise DataError(f"could not load Hub dataset {name!r} (and no such local file): {err}") from err
    else:
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
        except DatasetGenerationError as err:  # e.g. a malformed one-document .json file (not checked line by line)
            reason = " ".join(str(err.__cause__ or err).split())
            raise DataError(f"data file(s) {files} could not be parsed as {builder}: {reason}") from err
    columns = ds.column_names
    if columns is None:  # a stream whose features are not declared: look at its first row
        columns = list(next(iter(ds), {}).keys())
    if text_column not in columns:
        raise DataError(f"text column {text_column!r} not found; the data has columns {columns}")
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds.select_columns(["text"])


def split_documents(docs: Dataset, val_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out whole documents for validation: `val_size` < 1 is a fraction, >= 1 a count (0: none)."""
    if val_size == 0:
        return docs, None
    n_val = round(val_size * len(docs)) if val_size < 1 else int(val_size)
    if not 1 <= n_val < len(docs):
        raise DataError(
            f"--val-size {val_size} gives {n_val} of {len(docs)} documents for validation; "
            "need at least one document on each side (or --val-size 0)"
        )
    split = docs.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return split["train"], split["test"]


def split_stream(docs: IterableDataset, val_size: float) -> tuple[IterableDataset, Dataset | None]:
    """Streaming: the first `val_size` documents (a count) are the validation split, kept in memory."""
    if val_size == 0:
        return docs, None
    if val_size < 1 or val_size != int(val_size):
        raise DataError(f"--val-size {val_size}: with --streaming it must be a whole number of documents (or 0)")
    val = Dataset.from_list(list(docs.take(int(val_size))))
    return docs.skip(int(val_size)), val


def iter_texts(docs: Dataset | IterableDataset, max_chars: int = TOKENIZER_TRAIN_CHARS) -> Iterator[str]:
    """Document texts up to `max_chars` in total, for tokenizer training."""
    total = 0
    for row in docs:
        yield row["text"]
        total += len(row["text"])
        if total >= max_chars:
            return


def load_or_train_tokenizer(
    path: str | None, docs: Dataset | IterableDataset, vocab_size: int
) -> PreTrainedTokenizerBase:
    """An existing tokenizer (a local dir or Hub id) or a byte-level BPE trained on `docs`."""
    if path is None:
        tokenizer = train_tokenizer(iter_texts(docs), vocab_size=vocab_size)
    else:
        tokenizer = load_tokenizer(path)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {path!r} has no EOS token; packing needs one between documents")
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "raise vocab_size in the config or use a smaller tokenizer"
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of the tokenizer's vocabulary and rules (for cache keys and resume checks)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _pack_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> dict:
    texts = [t.strip() for t in batch["text"] if t and t.strip()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    stream: list[int] = []
    positions: list[int] = []
    for doc in ids:
        doc = [*doc, tokenizer.eos_token_id]
        stream += doc
        positions += range(len(doc))
    rows = len(stream) // seq_len  # the tail of each map batch (< seq_len tokens) is dropped
    input_ids, position_ids = [], []
    for r in range(rows):
        chunk = positions[r * seq_len : (r + 1) * seq_len]
        head = chunk.index(0) if 0 in chunk else seq_len  # a document cut at the row start restarts at 0
        chunk[:head] = range(head)
        input_ids.append(stream[r * seq_len : (r + 1) * seq_len])
        position_ids.append(chunk)
    return {"input_ids": input_ids, "position_ids": position_ids}


def pack_documents(
    docs: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> Dataset | IterableDataset:
    """Rows of `seq_len` tokens (`input_ids`, `position_ids`), documents separated by EOS."""
    kwargs = dict(
        batched=True, batch_size=1000, remove_columns=["text"], fn_kwargs=dict(tokenizer=tokenizer, seq_len=seq_len)
    )
    if isinstance(docs, IterableDataset):
        return docs.map(_pack_batch, **kwargs)
    key = f"{docs._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{seq_len}|{PACK_VERSION}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    packed = docs.map(_pack_batch, new_fingerprint=fingerprint, desc="Tokenizing and packing", **kwargs)
    return packed.with_format("torch")


def require_rows(packed: Dataset, what: str, seq_len: int, need: int = 1) -> None:
    if len(packed) < need:
        raise DataError(
            f"the {what} split packs into {len(packed)} rows of {seq_len} tokens, fewer than the {need} needed; "
            "use more data, a shorter --seq-len, or (validation) a larger --val-size"
        )


def collate(rows: dict) -> dict[str, torch.Tensor]:
    """Model inputs from packed rows: labels are the inputs, minus each document's first token."""
    input_ids = torch.as_tensor(rows["input_ids"], dtype=torch.long)
    position_ids = torch.as_tensor(rows["position_ids"], dtype=torch.long)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class ShuffledRows:
    """Rows of a packed map-style dataset in a seeded, epoch-wise permutation, addressed by global position.

    Position p of the endless stream is row `perm(p // n)[p % n]`: which rows a step reads depends only on the
    step, the batch shape and the seed, so resuming at step k reads exactly what an uninterrupted run would.
    """

    def __init__(self, rows: Dataset, seed: int):
        self.rows, self.seed, self._perms = rows, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(len(self.rows), generator=generator)}
        return self._perms[epoch]

    def take(self, start: int, count: int) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        index = [int(self._perm(p // n)[p % n]) for p in range(start, start + count)]
        return collate(self.rows[index])


class StreamRows:
    """Consecutive packed rows of this process's part of a streaming dataset, with a resumable position."""

    def __init__(self, rows: IterableDataset, rank: int, world_size: int):
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world_size)
        self.epoch, self._it, self._yielded = 0, None, False

    def take(self, count: int) -> dict[str, torch.Tensor]:
        out: list[dict] = []
        while len(out) < count:
            if self._it is None:
                self.rows.set_epoch(self.epoch)
                self._it = iter(self.rows)
            try:
                out.append(next(self._it))
                self._yielded = True
            except StopIteration:
                if not self._yielded:
                    raise DataError(
                        "the streaming dataset packs into no rows; use more data or a shorter --seq-len"
                    ) from None
                self.epoch, self._it, self._yielded = self.epoch + 1, None, False
        return collate({key: [row[key] for row in out] for key in ("input_ids", "position_ids")})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._it, self._yielded = state["epoch"], None, True
        self.rows.set_epoch(self.epoch)
        self.rows.load_state_dict(state["rows"])
