"""Tests for chatforge.data.sources: every kind of source on tiny fixtures made in tmp_path."""

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.data.sources import iter_documents, iter_many
from chatforge.errors import ChatforgeError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, table, row_group_size=None):
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ----------------------------------------------------------------------------- text files


def test_short_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First paragraph,\ntwo lines.\n\nSecond paragraph.\n", encoding="utf-8")
    assert list(iter_documents(p)) == ["First paragraph,\ntwo lines.\n\nSecond paragraph."]


def test_text_file_splits_into_whole_paragraphs(tmp_path):
    paras = [f"Paragraph {i} " + "word " * (5 + i % 7) for i in range(40)]
    paras = [p.strip() for p in paras]
    p = tmp_path / "big.txt"
    # \r\n line ends and blank lines holding only spaces still separate paragraphs
    p.write_bytes("\r\n  \r\n".join(paras).encode("utf-8") + b"\r\n")
    docs = list(iter_documents(p, max_doc_chars=120))
    assert len(docs) > 5
    assert all(len(d) <= 120 for d in docs)
    # every document is made of whole paragraphs, in order, and nothing is lost
    assert [para for d in docs for para in d.split("\n\n")] == paras
    assert "\r" not in "".join(docs)


def test_long_paragraph_cut_at_lines_then_hard_cut(tmp_path):
    lines = [f"line {i:02d} of a long stanza" for i in range(20)]  # 22 chars each
    long_line = "x" * 130
    p = tmp_path / "poem.md"
    p.write_text("\n".join(lines) + "\n\n" + long_line + "\n", encoding="utf-8")
    docs = list(iter_documents(p, max_doc_chars=50))
    assert all(len(d) <= 50 for d in docs)
    stanza_docs = docs[: len(docs) - 3]
    # the stanza is cut between lines, never inside one
    assert [line for d in stanza_docs for line in d.split("\n")] == lines
    assert docs[-3:] == ["x" * 50, "x" * 50, "x" * 30]  # no line break to cut at: hard cut


def test_non_utf8_text_file(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ChatforgeError, match="not UTF-8"):
        list(iter_documents(p))


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_field_blank_and_null_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"text": "one", "body": "uno"})
        + "\n\n"
        + json.dumps({"text": None, "body": "dos"})
        + "\n"
        + json.dumps({"text": "three", "body": "tres"})
        + "\n",
        encoding="utf-8",
    )
    assert list(iter_documents(p)) == ["one", "three"]
    assert list(iter_documents(p, field="body")) == ["uno", "dos", "tres"]


def test_jsonl_gz(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped ü"}) + "\n")
    assert list(iter_documents(p)) == ["zipped ü"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n', encoding="utf-8")
    it = iter_documents(p)
    assert next(it) == "ok"
    with pytest.raises(ChatforgeError, match=r"bad\.jsonl line 3: malformed JSON"):
        list(it)


def test_jsonl_missing_field_lists_keys(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"content": "b", "id": 7}])
    with pytest.raises(ChatforgeError, match=r"d\.jsonl line 2: no field 'text'.*'content', 'id'"):
        list(iter_documents(p))


def test_jsonl_non_string_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": 42}])
    with pytest.raises(ChatforgeError, match="line 1: field 'text' is int"):
        list(iter_documents(p))


# ----------------------------------------------------------------------------- parquet


def test_parquet_column_in_batches(tmp_path):
    texts = [f"doc {i}" if i % 100 else None for i in range(2500)]  # > one 1024-row batch, some nulls
    table = pa.table({"id": list(range(2500)), "content": texts})
    p = write_parquet(tmp_path / "d.parquet", table, row_group_size=700)
    assert list(iter_documents(p, field="content")) == [t for t in texts if t is not None]


def test_parquet_missing_column_lists_columns(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", pa.table({"id": [1], "content": ["x"]}))
    # checked when the source is opened, before any reading
    with pytest.raises(ChatforgeError, match="no column 'text'; columns: id, content"):
        iter_documents(p)
    with pytest.raises(ChatforgeError, match="column 'id' holds int64, not text"):
        iter_documents(p, field="id")


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(ChatforgeError, match="not a readable parquet file"):
        iter_documents(p)


# ----------------------------------------------------------------------------- folders and dispatch


def test_folder_recursive_sorted_by_type(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("from a.txt", encoding="utf-8")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "from c.jsonl"}])
    write_parquet(tmp_path / "b" / "deep" / "e.parquet", pa.table({"text": ["from e.parquet"]}))
    (tmp_path / "b" / "d.md").write_text("from d.md", encoding="utf-8")
    (tmp_path / "b" / "notes.csv").write_text("skipped,file", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["from a.txt", "from c.jsonl", "from d.md", "from e.parquet"]


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ChatforgeError, match="has no .txt/.md/.jsonl"):
        iter_documents(tmp_path)


def make_world(folder, texts):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"seed": 0}), encoding="utf-8")
    write_jsonl(folder / "pretrain.jsonl", [{"text": t, "kind": "bio"} for t in texts])
    write_jsonl(folder / "sft.jsonl", [{"messages": []}])  # no "text" field: must not be read
    return folder


def test_world_folder(tmp_path):
    world = make_world(tmp_path / "world", ["bio one", "bio two"])
    assert list(iter_documents(world)) == ["bio one", "bio two"]
    # a world folder nested in a corpus folder is read the same way
    (tmp_path / "z.txt").write_text("after the world", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["bio one", "bio two", "after the world"]


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(ChatforgeError, match="no such file or folder: .*nope.txt"):
        iter_documents(tmp_path / "nope.txt")
    p = tmp_path / "table.csv"
    p.write_text("a,b", encoding="utf-8")
    with pytest.raises(ChatforgeError, match=r"unsupported file type: table\.csv.*\.txt, \.md, \.jsonl"):
        iter_documents(p)


def test_bad_arguments(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(ChatforgeError, match="max_doc_chars"):
        iter_documents(p, max_doc_chars=0)
    with pytest.raises(ChatforgeError, match="limit"):
        iter_documents(p, limit=-1)
    with pytest.raises(ChatforgeError, match="data_files only applies to hf:"):
        iter_documents(p, data_files="x.json")


def test_limit_and_iter_many(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    b = tmp_path / "b.txt"
    b.write_text("b0\n\nb1", encoding="utf-8")
    assert list(iter_documents(a, limit=2)) == ["a0", "a1"]
    assert list(iter_many([a, str(b)], max_doc_chars=2)) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
    assert list(iter_many([a, b], limit=6, max_doc_chars=2)) == ["a0", "a1", "a2", "a3", "a4", "b0"]
    # every source is checked before any is read
    with pytest.raises(ChatforgeError, match="no such file or folder"):
        iter_many([a, tmp_path / "missing.jsonl"])
    with pytest.raises(ChatforgeError, match="no data sources"):
        iter_many([])


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Skip without `datasets`; keep its cache (lock files) out of the home folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_json_local(tmp_path, hf_cache):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "hf one", "n": 1}, {"text": "hf two", "n": 2}])
    assert list(iter_documents("hf:json", data_files=str(p))) == ["hf one", "hf two"]
    with pytest.raises(ChatforgeError, match="rows have no field 'body'; available: 'text', 'n'"):
        list(iter_documents("hf:json", data_files=str(p), field="body"))


def test_hf_parquet_local(tmp_path, hf_cache):
    p = write_parquet(tmp_path / "d.parquet", pa.table({"content": ["pq one", "pq two", "pq three"]}))
    docs = iter_documents("hf:parquet", data_files=[str(p)], field="content", limit=2)
    assert list(docs) == ["pq one", "pq two"]


def test_hf_load_failure_is_one_clear_error(tmp_path, hf_cache):
    with pytest.raises(ChatforgeError, match="could not load Hugging Face dataset 'json'"):
        iter_documents("hf:json", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ChatforgeError, match="reads local files: pass data_files"):
        iter_documents("hf:parquet")
    with pytest.raises(ChatforgeError, match="names no dataset"):
        iter_documents("hf:")


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(
        ChatforgeError, match=r"needs the optional 'datasets' package: pip install 'chatforge\[hf\]'"
    ):
        iter_documents("hf:roneneldan/TinyStories")
