"""Data loading, validation, packing and batching for pretraining (spannorm_hf.training.data)."""

import gzip
import json

import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.training.corpus import read_default_corpus
from spannorm_hf.training.data import (
    DataError,
    ShuffledRows,
    StreamRows,
    collate,
    load_documents,
    load_or_train_tokenizer,
    pack_documents,
    split_documents,
    split_stream,
    tokenizer_fingerprint,
)
from spannorm_hf.training.tokenizer import train_tokenizer

from conftest import tiny_config

DOCS = ["alpha beta gamma delta", "one two three", "the quick brown fox jumps over the lazy dog", "x y"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(read_default_corpus()[:200_000].split("\n\n"), vocab_size=300)


def test_packing_separates_documents_with_eos_and_restarts_positions(tokenizer):
    seq_len = 8
    rows = pack_documents(Dataset.from_dict({"text": DOCS + ["   "]}), tokenizer, seq_len)
    stream = []
    for doc in DOCS:
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(rows) == len(stream) // seq_len >= 3
    flat = torch.cat([r for r in rows["input_ids"]]).tolist()
    assert flat == stream[: len(rows) * seq_len]  # nothing reordered, the whitespace-only document skipped
    doc_lengths = [len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in DOCS]
    expected_positions = [p for n in doc_lengths for p in range(n)]
    for r, (ids, pos) in enumerate(zip(rows["input_ids"], rows["position_ids"], strict=True)):
        want = expected_positions[r * seq_len : (r + 1) * seq_len]
        head = want.index(0) if 0 in want else seq_len
        assert pos.tolist() == list(range(head)) + want[head:]  # a document cut at the row start restarts at 0
        batch = collate({"input_ids": ids[None], "position_ids": pos[None]})
        assert (batch["labels"] == -100).tolist() == [[p == 0 for p in pos.tolist()]]
        assert (batch["labels"] != -100).any()
        # every EOS is followed by a position-0 token
        eos_at = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
        assert all(pos[i + 1] == 0 for i in eos_at if i + 1 < seq_len)


def test_packed_row_gives_each_document_its_own_logits(tokenizer):
    docs = ["def f(x): return x", "import os and sys"]
    ids = [tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for d in docs]
    seq_len = len(ids[0]) + len(ids[1])
    row = pack_documents(Dataset.from_dict({"text": docs}), tokenizer, seq_len)[0]
    model = SpanNormForCausalLM(tiny_config(vocab_size=300)).eval()
    with torch.no_grad():
        inputs = dict(input_ids=row["input_ids"][None], position_ids=row["position_ids"][None])
        packed = model(**inputs, use_cache=False).logits[0]  # as in training: a cache disables packed masks
        alone = [model(input_ids=torch.tensor([i])).logits[0] for i in ids]
    torch.testing.assert_close(packed[: len(ids[0])], alone[0])
    torch.testing.assert_close(packed[len(ids[0]) :], alone[1])


def test_local_text_jsonl_parquet_and_text_column(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("third\n\nfourth")
    assert load_documents([str(tmp_path / "*.txt*")])["text"] == [
        "first paragraph\nstill first",
        "second paragraph\n",
        "third",
        "fourth",
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    docs = load_documents([str(tmp_path / "d.jsonl")], text_column="body")
    assert docs.column_names == ["text"] and docs["text"] == DOCS
    with pytest.raises(DataError, match="text column 'text' not found.*body"):
        load_documents([str(tmp_path / "d.jsonl")])
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet")
    assert load_documents([str(tmp_path / "e.parquet")])["text"] == DOCS
    stream = load_documents([str(tmp_path / "d.jsonl")], text_column="body", streaming=True)
    assert [row["text"] for row in stream] == DOCS


def test_default_corpus_is_used_without_data():
    docs = load_documents(None)
    assert len(docs) > 10_000 and "Python" in docs[0]["text"] + docs[1]["text"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "is empty"),
        ("blank.jsonl", b"\n \n", "holds no text"),
        ("nul.txt", b"text\x00\x01\x02 more", "NUL bytes"),
        ("latin.txt", b"caf\xe9 \xff\xfe", "not UTF-8"),
        ("zipped.txt.gz", gzip.compress(bytes(range(256)) * 4), "not UTF-8"),
        ("fake.parquet", b"not parquet at all", "not a parquet file"),
        ("data.csv", b"a,b\n1,2\n", "unknown type"),
    ],
)
def test_bad_data_files_are_rejected_by_name(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_documents([str(path)])
    assert name in str(err.value)


def test_bad_data_specs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="matches no file"):
        load_documents([str(tmp_path / "*.txt")])
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match="mix types"):
        load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network retries (read at import time)
    with pytest.raises(DataError, match="could not load Hub dataset 'no-such-user/no-such-set'"):
        load_documents(["no-such-user/no-such-set"])


def test_validation_split_holds_out_whole_documents():
    docs = Dataset.from_dict({"text": [f"document {i}" for i in range(100)]})
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90 and not set(train["text"]) & set(val["text"])
    assert split_documents(docs, 0.1, seed=0)[1]["text"] == val["text"]  # seeded
    assert len(split_documents(docs, 7, seed=0)[1]) == 7
    assert split_documents(docs, 0, seed=0)[1] is None
    with pytest.raises(DataError, match="--val-size 0.001 gives 0 of 100"):
        split_documents(docs, 0.001, seed=0)
    stream = docs.to_iterable_dataset()
    train_stream, val_stream = split_stream(stream, 5)
    assert val_stream["text"] == [f"document {i}" for i in range(5)]
    assert next(iter(train_stream))["text"] == "document 5"
    with pytest.raises(DataError, match="whole number of documents"):
        split_stream(stream, 0.1)


def test_packing_is_cached_per_data_tokenizer_and_length(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n\n".join(read_default_corpus()[:50_000].split("\n\n")))
    docs = load_documents([str(tmp_path / "c.txt")])
    first = pack_documents(docs, tokenizer, 16)
    again = pack_documents(load_documents([str(tmp_path / "c.txt")]), tokenizer, 16)
    assert first.cache_files and again.cache_files == first.cache_files
    assert again._fingerprint == first._fingerprint
    assert pack_documents(docs, tokenizer, 32)._fingerprint != first._fingerprint
    other = train_tokenizer(["completely different text " * 50], vocab_size=280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert pack_documents(docs, other, 16)._fingerprint != first._fingerprint


def test_tokenizer_is_trained_or_loaded_and_checked(tmp_path, tokenizer):
    docs = Dataset.from_dict({"text": read_default_corpus()[:100_000].split("\n\n")})
    trained = load_or_train_tokenizer(None, docs, vocab_size=320)
    assert len(trained) == 320 and trained.eos_token_id == 2
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_or_train_tokenizer(str(tmp_path / "tok"), docs, vocab_size=512)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    with pytest.raises(DataError, match="tokenizer has 300 tokens but the model's vocab_size is 200"):
        load_or_train_tokenizer(str(tmp_path / "tok"), docs, vocab_size=200)


def test_shuffled_rows_are_a_function_of_position():
    rows = Dataset.from_dict({"input_ids": [[i, i] for i in range(10)], "position_ids": [[0, 1]] * 10})
    rows = rows.with_format("torch")
    a, b = ShuffledRows(rows, seed=3), ShuffledRows(rows, seed=3)
    whole = a.take(0, 25)["input_ids"][:, 0].tolist()
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))  # epochs
    assert whole[:10] != whole[10:20] != list(range(10))
    parts = torch.cat([b.take(s, 5)["input_ids"][:, 0] for s in range(0, 25, 5)]).tolist()
    assert parts == whole
    assert ShuffledRows(rows, seed=4).take(0, 10)["input_ids"][:, 0].tolist() != whole[:10]


def test_stream_rows_resume_where_the_state_was_saved():
    rows = Dataset.from_dict({"input_ids": [[i] * 3 for i in range(7)], "position_ids": [[0, 1, 2]] * 7})
    stream = StreamRows(rows.to_iterable_dataset(num_shards=1), rank=0, world_size=1)
    first = stream.take(3)["input_ids"][:, 0].tolist()
    state = json.loads(json.dumps(stream.state_dict()))
    rest = [stream.take(3)["input_ids"][:, 0].tolist() for _ in range(3)]
    assert first == [0, 1, 2] and rest[0] == [3, 4, 5] and rest[1][:1] == [6] and stream.epoch >= 1
    resumed = StreamRows(rows.to_iterable_dataset(num_shards=1), rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert [resumed.take(3)["input_ids"][:, 0].tolist() for _ in range(3)] == rest
    other_rank = StreamRows(rows.to_iterable_dataset(num_shards=1), rank=1, world_size=2)
    assert other_rank.take(3)["input_ids"][:, 0].tolist() == [1, 3, 5]
