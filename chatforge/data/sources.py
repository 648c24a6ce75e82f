"""Raw text in: one entry point for every kind of corpus.

`iter_documents(source)` turns a text file, a folder, a .jsonl or .parquet file, a world
folder or an `hf:NAME` dataset into one stream of document strings, so every stage after it
(cleaning, tokenizer training, sharding) reads text the same way whatever it came from.
Everything streams: a multi-gigabyte parquet file or a streamed HF dataset never sits in
memory whole.

Errors in the source itself (a missing path, an unsupported file, a missing column, no
`datasets` package) are raised when iter_documents is called; errors inside the data (a bad
JSON line) are raised when the stream reaches them, naming the file and line.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.fileio import read_jsonl

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# `datasets` builders that read local files (given with data_files=) instead of the Hub
HF_LOCAL_BUILDERS = ("json", "parquet", "text", "csv")


def iter_documents(
    source: str | os.PathLike,
    *,
    field: str = "text",
    split: str = "train",
    max_doc_chars: int = 8000,
    limit: int | None = None,
    data_files: str | list[str] | None = None,
) -> Iterator[str]:
    """Stream the documents of one source.

    source: a .txt/.md file (split into documents of whole paragraphs, up to max_doc_chars
    each), a .jsonl/.jsonl.gz or .parquet file (the string in `field` of each row), a folder
    (all of those inside it, recursively, in sorted order), a world folder (manifest.json +
    pretrain.jsonl: its `text` field), or `hf:NAME[:CONFIG]`, a Hugging Face dataset
    streamed from the Hub (`hf:json`/`hf:parquet`/`hf:text` read local `data_files`).
    Rows whose field is null are skipped. `limit` caps the number of documents.
    """
    if max_doc_chars < 1:
        raise ChatforgeError(f"max_doc_chars must be at least 1, got {max_doc_chars}")
    if limit is not None and limit < 0:
        raise ChatforgeError(f"limit must be 0 or more, got {limit}")
    source = os.fspath(source)
    if source.startswith("hf:"):
        docs = _iter_hf(source, field=field, split=split, data_files=data_files)
    else:
        if data_files is not None:
            raise ChatforgeError(f"data_files only applies to hf: sources, not to {source}")
        path = Path(source).expanduser()
        if not path.exists():
            raise ChatforgeError(f"no such file or folder: {source}")
        if path.is_dir():
            files = _folder_files(path, field)
            if not files:
                kinds = "/".join(SUPPORTED_SUFFIXES)
                raise ChatforgeError(f"folder {source} has no {kinds} files to read")
            # the first file is opened (and checked) now, the others as the stream reaches them
            first = _iter_file(files[0][0], files[0][1], max_doc_chars)
            rest = (_iter_file(p, f, max_doc_chars) for p, f in files[1:])
            docs = itertools.chain(first, itertools.chain.from_iterable(rest))
        else:
            docs = _iter_file(path, field, max_doc_chars)
    return itertools.islice(docs, limit)


def iter_many(sources: Iterable[str | os.PathLike], *, limit: int | None = None, **kw) -> Iterator[str]:
    """Chain the documents of several sources (same keywords as iter_documents).

    `limit` caps the total across all sources. Every source is checked before any is read,
    so a typo in the last path fails at once, not after hours of work on the first.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    streams = [iter_documents(s, **kw) for s in sources]
    if not streams:
        raise ChatforgeError("no data sources given: pass at least one path, folder or hf:NAME")
    if limit is not None and limit < 0:
        raise ChatforgeError(f"limit must be 0 or more, got {limit}")
    return itertools.islice(itertools.chain.from_iterable(streams), limit)


# ----------------------------------------------------------------------------- local files


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _is_world(folder: Path) -> bool:
    # written by chatforge.world.write_world; detected by its files so this module needs no import of it
    return (folder / "manifest.json").is_file() and (folder / "pretrain.jsonl").is_file()


def _folder_files(folder: Path, field: str) -> list[tuple[Path, str]]:
    """(file, field) pairs to read from a folder, depth first in sorted order; hidden entries skipped."""
    if _is_world(folder):
        return [(folder / "pretrain.jsonl", "text")]  # only the pretraining text, not the SFT/eval files
    found: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += _folder_files(entry, field)
        elif _kind(entry) is not None:
            found.append((entry, field))
    return found


def _iter_file(path: Path, field: str, max_doc_chars: int) -> Iterator[str]:
    kind = _kind(path)
    if kind == "text":
        return _iter_text(path, max_doc_chars)
    if kind == "jsonl":
        return _iter_jsonl(path, field)
    if kind == "parquet":
        return _iter_parquet(path, field)
    raise ChatforgeError(
        f"unsupported file type: {path.name}; chatforge reads {', '.join(SUPPORTED_SUFFIXES)} files, "
        "folders of them, or hf:NAME datasets"
    )


def _not_utf8(path: Path) -> ChatforgeError:
    return ChatforgeError(f"{path} is not UTF-8 text; convert it first, e.g. iconv -f latin1 -t utf-8")


def _iter_text(path: Path, max_chars: int) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n and \r arrive as \n
            yield from _group_paragraphs(_paragraphs(f), max_chars)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated paragraphs, read line by line so a huge file never sits in memory."""
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line.rstrip("\n"))
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def _group_paragraphs(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Pack whole paragraphs into documents of at most max_chars characters."""
    doc: list[str] = []
    size = 0
    for para in paragraphs:
        for piece in _cut(para, max_chars):
            added = len(piece) + (2 if doc else 0)  # 2 for the "\n\n" joining it to the previous one
            if doc and size + added > max_chars:
                yield "\n\n".join(doc)
                doc, size, added = [], 0, len(piece)
            doc.append(piece)
            size += added
    if doc:
        yield "\n\n".join(doc)


def _cut(para: str, max_chars: int) -> Iterator[str]:
    """A paragraph as pieces of at most max_chars: cut between lines, inside a line only as a last resort."""
    if len(para) <= max_chars:
        yield para
        return
    chunk = ""
    for line in para.split("\n"):
        while len(line) > max_chars:
            if chunk:
                yield chunk
                chunk = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if chunk and len(chunk) + 1 + len(line) > max_chars:
            yield chunk
            chunk = line
        else:
            chunk = f"{chunk}\n{line}" if chunk else line
    if chunk:
        yield chunk


def _as_text(value: object, where: str, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ChatforgeError(f"{where}: field {field!r} is {type(value).__name__}, not a string")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, row in read_jsonl(path):
        if field not in row:
            keys = ", ".join(map(repr, row)) or "none"
            raise ChatforgeError(
                f"{path} line {lineno}: no field {field!r}; available keys: {keys} (choose one as the field)"
            )
        text = _as_text(row[field], f"{path} line {lineno}", field)
        if text is not None:
            yield text


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa  # imported here: a text-only run need not pay for pyarrow's import
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ChatforgeError(f"{path}: not a readable parquet file ({e})") from e
    if field not in schema.names:
        raise ChatforgeError(
            f"{path}: no column {field!r}; columns: {', '.join(schema.names)} (choose one as the field)"
        )
    dtype = schema.field(field).type
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)):
        raise ChatforgeError(f"{path}: column {field!r} holds {dtype}, not text; choose a string column")
    return _parquet_rows(path, field)


def _parquet_rows(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        # record batches of the one column we need: memory stays flat whatever the file size
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text


# ----------------------------------------------------------------------------- Hugging Face


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _iter_hf(source: str, *, field: str, split: str, data_files: str | list[str] | None) -> Iterator[str]:
    name, _, config = source[len("hf:") :].partition(":")
    if not name:
        raise ChatforgeError(f"{source!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
    if name in HF_LOCAL_BUILDERS and not data_files:
        raise ChatforgeError(f"{source} reads local files: pass data_files (a path, glob or list of paths)")
    try:
        import datasets
    except ImportError:
        raise ChatforgeError(
            f"reading {source} needs the optional 'datasets' package: pip install 'chatforge[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split, data_files=data_files, streaming=True)
    except Exception as e:  # no network, unknown name/config/split, missing files: all end here
        raise ChatforgeError(
            f"could not load Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}): "
            f"{_one_line(e)}; check the name and split, and the network (hf: streams from the Hub)"
        ) from e
    return _hf_rows(ds, source, field)


def _hf_rows(ds: Iterable[dict], source: str, field: str) -> Iterator[str]:
    rows = iter(ds)
    for n in itertools.count(1):
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a dropped connection or a corrupt shard mid-stream
            raise ChatforgeError(f"reading {source} failed at row {n}: {_one_line(e)}") from e
        if field not in row:
            keys = ", ".join(map(repr, row)) or "none"
            raise ChatforgeError(
                f"{source}: rows have no field {field!r}; available: {keys} (choose one as the field)"
            )
        text = _as_text(row[field], f"{source}, row {n}", field)
        if text is not None:
            yield text
