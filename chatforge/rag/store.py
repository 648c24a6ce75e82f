"""A collection on disk: ROOT/NAME/index.sqlite (documents, chunks with their vectors, an FTS5
index) and ROOT/NAME/vectors.npz (the dense matrix the default vector store searches).

SQLite is the truth. Each file is ingested in one transaction (old chunks out, new chunks and
their FTS rows in, the generation counter bumped), so a crash or kill -9 mid-file leaves the
collection as it was before that file. The vector store is an index derived from the vectors
kept in SQLite: `MatrixStore` rebuilds its matrix file (written atomically) whenever the
generation it was built at is not the collection's. A vector database would stand in behind the
same `VectorStore` interface (see docs/rag.md): chunk ids are never reused, so it can be synced
by upserting new ids and deleting vanished ones."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes
from chatforge.rag.chunk import chunk_blocks
from chatforge.rag.embed import Embedder
from chatforge.rag.extract import extract

ROOT_ENV = "CHATFORGE_RAG_ROOT"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
  sha256 TEXT NOT NULL, n_chunks INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id INTEGER NOT NULL REFERENCES documents(id),
  ord INTEGER NOT NULL, heading TEXT NOT NULL, text TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(heading, text, tokenize='porter unicode61');
"""


def default_root() -> Path:
    """Where collections live: $CHATFORGE_RAG_ROOT, else ~/.chatforge/rag."""
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".chatforge" / "rag").expanduser()


@dataclass(frozen=True)
class StoredChunk:
    id: int
    source: str  # the document's key (a file's absolute path)
    name: str  # what a citation shows (the file name)
    heading: str
    text: str


class VectorStore(Protocol):
    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k (chunk id, cosine similarity) nearest to the unit vector `query`, best first."""
        ...


class Collection:
    """One collection folder; open with `Collection.open` (or `create=True` to make it)."""

    def __init__(self, folder: Path, conn: sqlite3.Connection) -> None:
        self.folder, self.conn = folder, conn
        self.name = folder.name

    @classmethod
    def open(cls, name: str, root: str | os.PathLike | None = None, *, create_with: str | None = None) -> Collection:
        """Open collection `name` under `root`; with `create_with` (an embedding model name) make it if absent."""
        check_name(name)
        root = Path(root).expanduser() if root is not None else default_root()
        folder = root / name
        if not (folder / "index.sqlite").is_file():
            if create_with is None:
                known = ", ".join(list_collections(root)) or "none yet"
                raise ChatforgeError(
                    f"no collection {name!r} in {root} (collections: {known}); create it with "
                    f"`chatforge rag add --collection {name} FILES...`"
                )
            folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(folder / "index.sqlite", timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        if create_with is not None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('embedding', ?)", (create_with,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        return cls(folder, conn)

    def close(self) -> None:
        self.conn.close()

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    @property
    def embedding(self) -> str:
        return self.meta("embedding")

    @property
    def generation(self) -> int:
        return int(self.meta("generation") or 0)

    def check_embedding(self, name: str) -> None:
        if name != self.embedding:
            raise ChatforgeError(
                f"collection {self.name!r} was built with the embedding model {self.embedding}, not "
                f"{name}; pass --embedding {self.embedding} (or re-add its files to a new collection)"
            )

    # ---- writing -------------------------------------------------------------------------
    def ingest(
        self, source: str, name: str, data: bytes, embedder: Embedder,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[str, int]:  # fmt: skip
        """Add or replace one document; ("added" | "replaced" | "unchanged", chunks). One transaction:
        `progress(i)` is called after each chunk is written inside it."""
        self.check_embedding(embedder.name)
        sha = hashlib.sha256(data).hexdigest()
        old = self.conn.execute("SELECT id, sha256 FROM documents WHERE source = ?", (source,)).fetchone()
        if old is not None and old[1] == sha:
            return "unchanged", 0
        chunks = chunk_blocks(extract(name, data))
        if not chunks:
            raise ChatforgeError(f"{name}: no text found in it; check the file")
        vecs = embedder.embed([f"{c.heading}\n{c.text}" if c.heading else c.text for c in chunks])
        with self._transaction():
            if old is not None:
                self._delete_document(old[0])
            doc = self.conn.execute(
                "INSERT INTO documents (source, name, sha256, n_chunks, added) VALUES (?, ?, ?, ?, ?)",
                (source, name, sha, len(chunks), time.time()),
            ).lastrowid
            for i, (c, v) in enumerate(zip(chunks, vecs, strict=True)):
                cid = self.conn.execute(
                    "INSERT INTO chunks (doc_id, ord, heading, text, embedding) VALUES (?, ?, ?, ?, ?)",
                    (doc, i, c.heading, c.text, v.astype(np.float32).tobytes()),
                ).lastrowid
                self.conn.execute("INSERT INTO chunks_fts (rowid, heading, text) VALUES (?, ?, ?)", (cid, c.heading, c.text))
                if progress is not None:
                    progress(i)
            self._bump()
        return ("replaced" if old is not None else "added"), len(chunks)

    def remove(self, source: str) -> bool:
        """Delete a document and its chunks; False when the collection has no such document."""
        row = self.conn.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
        if row is None:
            return False
        with self._transaction():
            self._delete_document(row[0])
            self._bump()
        return True

    def _delete_document(self, doc_id: int) -> None:
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        self.conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
        self.conn.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed whole, or rolled back (a killed process leaves none)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- reading -------------------------------------------------------------------------
    def documents(self) -> list[dict]:
        rows = self.conn.execute("SELECT id, source, name, sha256, n_chunks, added FROM documents ORDER BY source")
        return [dict(zip(("id", "source", "name", "sha256", "chunks", "added"), r, strict=True)) for r in rows]

    def n_chunks(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def chunks(self, ids: list[int]) -> list[StoredChunk]:
        """The chunks with these ids, in the order given (ids not found are left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT c.id, d.source, d.name, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id "
            f"WHERE c.id IN ({marks})", ids,
        ).fetchall()  # fmt: skip
        by_id = {r[0]: StoredChunk(*r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        """FTS5's own BM25 ranking of the query's words (any of them): (chunk id, -bm25), best first."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            raise ChatforgeError("the query has no words to search for; ask something")
        match = " OR ".join('"' + w + '"' for w in dict.fromkeys(words))
        rows = self.conn.execute(
            "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
            (match, k),
        ).fetchall()
        return [(r[0], -r[1]) for r in rows]

    def vector_store(self) -> VectorStore:
        return MatrixStore.for_collection(self)


class MatrixStore:
    """The embedded default: every vector in one float32 matrix (vectors.npz), searched by a matrix
    product. Exact; a few ms for 10^5 chunks of 384 numbers. Rebuilt from SQLite when stale."""

    def __init__(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        self.ids, self.matrix = ids, matrix

    @classmethod
    def for_collection(cls, coll: Collection) -> MatrixStore:
        path, generation = coll.folder / "vectors.npz", coll.generation
        try:
            with np.load(path) as f:
                if int(f["generation"]) == generation:
                    return cls(f["ids"], f["matrix"])
        except (OSError, KeyError, ValueError):
            pass  # absent or torn: rebuilt below
        rows = coll.conn.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.stack([np.frombuffer(r[1], np.float32) for r in rows]) if rows else np.zeros((0, 1), np.float32)
        buf = io.BytesIO()
        np.savez(buf, ids=ids, matrix=matrix, generation=np.int64(generation))
        atomic_write_bytes(path, buf.getvalue())
        return cls(ids, matrix)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if len(self.ids) == 0:
            return []
        scores = self.matrix @ query.astype(np.float32)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(self.ids[i]), float(scores[i])) for i in top]


def check_name(name: str) -> None:
    """A collection name is one folder name: no path separators, no leading dot."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ChatforgeError(f"collection name {name!r}: use letters, digits, '_', '-', '.' (up to 64)")


def collection_exists(name: str, root: str | os.PathLike | None = None) -> bool:
    check_name(name)
    root = Path(root).expanduser() if root is not None else default_root()
    return (root / name / "index.sqlite").is_file()


def list_collections(root: str | os.PathLike | None = None) -> list[str]:
    root = Path(root).expanduser() if root is not None else default_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "index.sqlite").is_file())
