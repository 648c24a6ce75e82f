"""`chatforge rag add|remove|list|search|world`: collections from the command line."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.options import (
    RagAddOptions,
    RagListOptions,
    RagRemoveOptions,
    RagSearchOptions,
    RagWorldOptions,
)
from chatforge.rag.answer import source_label
from chatforge.rag.embed import Embedder, get_embedder
from chatforge.rag.extract import FORMATS, file_format
from chatforge.rag.retrieve import retrieve
from chatforge.rag.store import Collection, collection_exists, list_collections
from chatforge.world import ATTRIBUTES, fact_questions, load_world, reverse_questions

QUESTIONS_FILE = "questions.jsonl"


def expand_files(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, name shown in citations) for each path; a folder gives its files of known formats,
    named from the folder on (`docs/guide/intro.md`). A missing path is an error before any work."""
    out = []
    for arg in paths:
        p = Path(arg).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                try:
                    file_format(f.name)
                except ChatforgeError:
                    continue
                if f.is_file():
                    out.append((f, str(f.relative_to(p.parent))))
        elif p.exists():
            out.append((p, p.name))
        else:
            raise ChatforgeError(f"no file or folder at {p}: check the path")
    if not out:
        raise ChatforgeError(f"no files to add (formats: {', '.join(FORMATS)})")
    return out


def add_files(coll: Collection, files: list[tuple[Path, str]], embedder: Embedder, log=print) -> dict:
    """Ingest each file in its own transaction; a file that fails is one line in `log` and the rest
    still land. Returns counts, failures and the chunks-per-second rate."""
    return add_documents(coll, [(str(path.resolve()), name, path.read_bytes) for path, name in files], embedder, log)


def add_documents(
    coll: Collection, items: list[tuple[str, str, Callable[[], bytes]]], embedder: Embedder, log=print
) -> dict:
    """What `add_files` does for (source key, name shown in citations, reader of the bytes): the
    server's uploads come here too. Besides the counts, "files" says what happened to each one:
    {"name", "outcome", "chunks"} or {"name", "error"}."""
    counts = {"added": 0, "replaced": 0, "unchanged": 0, "failed": 0, "chunks": 0}
    outcomes: list[dict] = []
    start = time.perf_counter()
    for source, name, read in items:
        try:
            outcome, n = coll.ingest(source, name, read(), embedder)
        except ChatforgeError as e:
            error = str(e) if str(e).startswith(name) else f"{name}: {e}"
        except OSError as e:
            error = f"{name}: cannot read it ({e.strerror or e})"
        else:
            counts[outcome] += 1
            counts["chunks"] += n
            outcomes.append({"name": name, "outcome": outcome, "chunks": n})
            continue
        log(f"chatforge: skipped {error}")
        counts["failed"] += 1
        outcomes.append({"name": name, "error": error})
    seconds = time.perf_counter() - start
    counts["seconds"] = round(seconds, 3)
    counts["chunks_per_s"] = round(counts["chunks"] / seconds, 1) if counts["chunks"] else 0.0
    counts["files"] = outcomes
    return counts


def cmd_rag_add(opts: RagAddOptions) -> None:
    files = expand_files(opts.files)
    if not collection_exists(opts.collection, opts.root):
        get_embedder(opts.embedding)  # a missing extra is said before an empty collection is made
    coll = Collection.open(opts.collection, opts.root, create_with=opts.embedding)
    try:
        embedder = get_embedder(coll.embedding)
        counts = add_files(coll, files, embedder, log=lambda line: print(line, file=sys.stderr))
        total = coll.n_chunks()
    finally:
        coll.close()
    print(
        f"{opts.collection}: {counts['added']} added, {counts['replaced']} replaced, {counts['unchanged']} "
        f"unchanged, {counts['failed']} failed; {counts['chunks']} chunks in {counts['seconds']:.1f} s "
        f"({counts['chunks_per_s']} chunks/s); {total} chunks in the collection"
    )
    if counts["failed"]:
        rest = "; the rest were" if counts["failed"] < len(files) else ""
        raise ChatforgeError(f"{counts['failed']} of {len(files)} files were not added (named above){rest}")


def cmd_rag_remove(opts: RagRemoveOptions) -> None:
    coll = Collection.open(opts.collection, opts.root)
    try:
        missing = []
        for arg in opts.files:
            p = Path(arg).expanduser().resolve()
            sources = [d["source"] for d in coll.documents() if d["source"] == str(p) or d["source"].startswith(str(p) + "/")]
            if not sources:
                missing.append(arg)
            for s in sources:
                coll.remove(s)
                print(f"removed {s}")
    finally:
        coll.close()
    if missing:
        raise ChatforgeError(f"not in collection {opts.collection!r}: {', '.join(missing)} (see `chatforge rag list --collection {opts.collection}`)")


def cmd_rag_list(opts: RagListOptions) -> None:
    if opts.collection is None:
        for name in list_collections(opts.root):
            coll = Collection.open(name, opts.root)
            print(f"{name}\t{len(coll.documents())} documents\t{coll.n_chunks()} chunks\t{coll.embedding}")
            coll.close()
        return
    coll = Collection.open(opts.collection, opts.root)
    for d in coll.documents():
        print(f"{d['chunks']}\t{d['sha256'][:12]}\t{d['source']}")
    coll.close()


def cmd_rag_search(opts: RagSearchOptions) -> None:
    coll = Collection.open(opts.collection, opts.root)
    try:
        if opts.embedding is not None:
            coll.check_embedding(opts.embedding)  # before loading a model the collection cannot use
        embedder = None if opts.mode == "bm25" else get_embedder(coll.embedding)
        hits = retrieve(coll, opts.query, opts.k, embedder, opts.mode)
    finally:
        coll.close()
    for i, h in enumerate(hits, 1):
        text = " ".join(h.chunk.text.split())
        print(f"[{i}] {source_label(h)}  ({opts.mode} {h.score:.4f})\n    {text[:300]}{'…' if len(text) > 300 else ''}")


def world_questions(world_dir: str | Path, seed: int = 0) -> list[dict]:
    """Questions about the held-out people: one forward question per attribute, and the reverse
    "Who is X's son?" where the answer is a held-out person whose biography names X as a parent.
    `evidence` is what the source chunk holds (the subject's name and the answer)."""

    world = load_world(world_dir)
    rng = random.Random(f"chatforge-rag-questions:{seed}")
    out = []
    for p in world.held_out:
        for qa in fact_questions(p, world, rng, n_phrasings=1, attributes=ATTRIBUTES):
            out.append({"question": qa.question, "answer": qa.answer, "kind": "forward",
                        "attribute": qa.attribute, "evidence": [p.name, qa.answer]})  # fmt: skip
        parent = world.parent_of(p)
        if parent is not None:
            qa = reverse_questions(parent, world, rng, n_phrasings=1)[0]
            out.append({"question": qa.question, "answer": qa.answer, "kind": "reverse",
                        "attribute": "child", "evidence": [p.name, parent.name]})  # fmt: skip
    return out


def cmd_rag_world(opts: RagWorldOptions) -> None:
    heldout = Path(opts.world) / "heldout.jsonl"
    if not heldout.is_file():
        raise ChatforgeError(f"{opts.world} has no heldout.jsonl; write a world with `chatforge world --out DIR`")
    questions = world_questions(opts.world)
    coll = Collection.open(opts.collection, opts.root, create_with=opts.embedding)
    try:
        counts = add_files(coll, [(heldout, "heldout.jsonl")], get_embedder(coll.embedding))
        folder = coll.folder
    finally:
        coll.close()
    atomic_write_text(folder / QUESTIONS_FILE, "".join(json.dumps(q) + "\n" for q in questions))
    n_rev = sum(q["kind"] == "reverse" for q in questions)
    print(
        f"{opts.collection}: {counts['chunks']} chunks ({counts['chunks_per_s']} chunks/s); "
        f"{len(questions) - n_rev} forward and {n_rev} reverse questions in {folder / QUESTIONS_FILE}"
    )
