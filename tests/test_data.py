"""Data loading, validation, packing and batching for pretraining (spannorm_hf.training.data)."""

import bz2
import gzip
import json
import lzma

import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

from spannorm_hf import SpanNormForCausalLM
from spannorm_hf.training import data
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

from helpers import tiny_config

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
        ("nul.txt", b"text\x00\x01\x02 more", "NUL byte"),
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


# ------------------------------------------------------------------------------ bad data anywhere in a file


LINE = "A line of plain documentation text, long enough to fill the file quickly.\n"
HEAD = LINE * 2000  # ~150 KB of good text: every defect below sits past the first 64 KiB
BAD_LINE = HEAD.count("\n") + 1  # the line number of whatever follows HEAD


def jsonl_head() -> str:
    return "".join(json.dumps({"text": f"record {i} " + "x" * 60}) + "\n" for i in range(2000))


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "late-latin.txt",
            HEAD.encode() + b"caf\xe9\n",
            f"not UTF-8 text (invalid continuation byte at line {BAD_LINE}",
        ),
        ("late-nul.txt", HEAD.encode() + b"ok\x00\n", f"NUL byte (line {BAD_LINE}, byte {len(HEAD) + 2})"),
        ("cut-char.txt", HEAD.encode() + "é".encode()[:1], "ends inside a multi-byte character"),
        ("late-bad.jsonl", (jsonl_head() + '{"text": "unclosed\n').encode(), "line 2001 is not valid JSON"),
        ("late-list.jsonl", (jsonl_head() + '["text"]\n').encode(), "line 2001 is a JSON list, not a record"),
        ("lines.json", (jsonl_head() + "{oops}\n").encode(), "line 2001 is not valid JSON"),
        ("late-latin.txt.gz", gzip.compress(HEAD.encode() + b"\xff\n"), f"at line {BAD_LINE}"),
        ("truncated.txt.gz", gzip.compress(HEAD.encode() * 4)[:-100], "is truncated"),
        ("truncated.jsonl.bz2", bz2.compress(jsonl_head().encode())[:-50], "is truncated"),
        ("truncated.txt.xz", lzma.compress(HEAD.encode())[:-50], "is truncated"),
        ("not-gzip.txt.gz", b"plain text pretending to be gzip\n" * 10, "cannot be read (BadGzipFile"),
        ("late-bad.jsonl.xz", lzma.compress((jsonl_head() + "{,}\n").encode()), "line 2001 is not valid JSON"),
        ("data.txt.zst", b"(\xb5/\xfd" + b"\x00" * 20, ".zst is not supported"),
        ("blank.txt.bz2", bz2.compress(b"\n \n\t\n"), "holds no text"),
    ],
)
def test_bad_data_anywhere_in_a_file_is_named_with_its_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_documents([str(path)])
    text = str(err.value)
    assert message in text and repr(str(path)) in text and "\n" not in text


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_data_check_reads_in_chunks_without_false_alarms_or_wrong_lines(tmp_path, monkeypatch, chunk):
    """Tiny read chunks cut multi-byte characters and JSON lines at every possible place."""
    monkeypatch.setattr(data, "SCAN_CHUNK", chunk)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["café", "naïve ☃", "日本"]))
    data.check_data_file(str(good))
    bad = tmp_path / "bad.txt"
    bad.write_bytes("é\nü\n".encode() + b"\xff")
    with pytest.raises(DataError, match="at line 3, byte 6"):
        data.check_data_file(str(bad))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "é"}\n{"text": "ü"}\n{"text": \n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        data.check_data_file(str(bad_json))


def test_bz2_xz_and_json_documents_load(tmp_path):
    (tmp_path / "a.txt.bz2").write_bytes(bz2.compress(b"first\n\nsecond\n"))
    (tmp_path / "b.txt.xz").write_bytes(lzma.compress(b"third\n"))
    assert load_documents([str(tmp_path / "a.txt.bz2"), str(tmp_path / "b.txt.xz")])["text"] == [
        "first",
        "second\n",
        "third\n",
    ]
    (tmp_path / "rows.json").write_text(json.dumps([{"text": t} for t in DOCS]))  # one JSON document, not lines
    assert load_documents([str(tmp_path / "rows.json")])["text"] == DOCS
    (tmp_path / "cut.json").write_text(json.dumps([{"text": t} for t in DOCS])[:-10])
    with pytest.raises(DataError, match=r"cut.json'\] could not be parsed as json"):
        load_documents([str(tmp_path / "cut.json")])


def test_truncated_parquet_is_named(tmp_path):
    pq.write_table(pa.table({"text": DOCS * 100}), tmp_path / "whole.parquet")
    whole = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.parquet' is a truncated parquet file"):
        load_documents([str(tmp_path / "cut.parquet")])
    (tmp_path / "bad-footer.parquet").write_bytes(whole[:4] + b"\x00" * (len(whole) - 8) + b"PAR1")
    with pytest.raises(DataError, match="bad-footer.parquet' is not a readable parquet file"):
        load_documents([str(tmp_path / "bad-footer.parquet")])
