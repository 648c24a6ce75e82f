"""Raw text -> token shards: read sources, normalise, deduplicate, tokenize, write shards.

This is `chatforge data`; the speedrun calls it too. What cleaning removed is stored in
the shard index (`clean` section) and printed, so a user sees what happened to the corpus.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from chatforge.data.clean import clean_documents, normalize_whitespace
from chatforge.data.shards import read_index, write_shards
from chatforge.data.sources import iter_many
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.tokenizer import Tokenizer, load_conversations, render_conversation


def build_shards(
    sources: list[str],
    tokenizer_path: Path,
    out_dir: Path,
    *,
    field: str = "text",
    near_dup_threshold: float | None = 0.8,
    val_fraction: float = 0.02,
    max_docs: int | None = None,
    conversations: list[str | Path] = (),  # type: ignore[assignment]
    progress: bool = True,
) -> dict:
    """Text sources are cleaned and tokenized; `conversations` (jsonl of OpenAI messages) are
    rendered in ChatML with their special tokens and trained on whole (mid-training data)."""
    out_dir = Path(out_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
    docs = (normalize_whitespace(t) for t in iter_many(list(sources), field=field, limit=max_docs))
    kept, stats = clean_documents(docs, near_dup_threshold=near_dup_threshold)
    print(stats.summary())
    if not kept:
        raise ChatforgeError(
            f"no documents left after cleaning {', '.join(map(str, sources))}: is the corpus empty?"
        )
    rendered = []
    for path in conversations:
        for conv in load_conversations(path):
            ids, _ = render_conversation(tokenizer, conv)
            rendered.append(ids[1:] if ids and ids[0] == tokenizer.bos_id else ids)  # the writer adds BOS
    if rendered:
        print(f"{len(rendered):,} conversations rendered in ChatML")
    write_shards(
        [*kept, *rendered],
        tokenizer.encode_batch,
        bos_id=tokenizer.bos_id,
        vocab_size=tokenizer.vocab_size,
        out_dir=out_dir,
        val_fraction=val_fraction,
        progress=progress,
    )
    tok_path = Path(tokenizer_path)
    tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    if tok_file.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(tok_file, out_dir / ".tokenizer.json.tmp")
        (out_dir / ".tokenizer.json.tmp").replace(out_dir / "tokenizer.json")
    index = read_index(out_dir)
    index["clean"] = {"sources": [str(s) for s in sources], **stats.__dict__}
    index["conversations"] = {"files": [str(c) for c in conversations], "count": len(rendered)}
    atomic_write_json(out_dir / "index.json", index)
    return index
