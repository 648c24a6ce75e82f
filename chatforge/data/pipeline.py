"""Raw text -> a tokenizer and token shards: read, normalise, deduplicate, tokenize, write shards.

`build_shards` is `chatforge data`; the speedrun calls it and `train_tokenizer` too. What cleaning removed is stored in
the shard index (`clean` section) and printed, so a user sees what happened to the corpus.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from chatforge.chat_format import conversation_text, load_conversations, render_conversation
from chatforge.data.clean import clean_documents, normalize_whitespace
from chatforge.data.shards import write_shards
from chatforge.data.sources import iter_many
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.options import DataOptions, TokenizerEvalOptions, TokenizerTrainOptions
from chatforge.tokenizer import Tokenizer, compare_tokenizers, format_table, load_reference


def train_tokenizer(
    sources: list[str],
    out_path: Path,
    vocab_size: int,
    *,
    conversations: list[str | Path] = (),  # type: ignore[assignment]
    progress: bool = True,
) -> Tokenizer:
    """BPE trained on the text sources and on the text of the conversations (contents, tool blocks,
    tool-call JSON), so chats tokenize compactly too; saved to `out_path`."""
    chats = (
        piece for path in conversations for c in load_conversations(path) for piece in conversation_text(c)
    )
    tok = Tokenizer.train(
        itertools.chain(iter_many(list(sources)), chats), vocab_size, show_progress=progress
    )
    tok.save(out_path)
    return tok


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
    # the tokenizer goes in first and index.json last (written by write_shards): a folder with an
    # index is complete, and its tokenizer.json is the one its shards were made with
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").unlink(missing_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_json())
    return write_shards(
        [*kept, *rendered], tokenizer.encode_batch, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
        out_dir=out_dir, val_fraction=val_fraction, progress=progress,
        extra={
            "clean": {"sources": [str(s) for s in sources], **stats.__dict__},
            "conversations": {"files": [str(c) for c in conversations], "count": len(rendered)},
        },
    )  # fmt: skip


# ---- `chatforge tokenizer train|eval` and `chatforge data` ------------------------------------


def cmd_tokenizer_train(opts: TokenizerTrainOptions) -> None:
    texts = (normalize_whitespace(t) for t in iter_many(opts.source, field=opts.field, limit=opts.max_docs))
    tok = Tokenizer.train(texts, opts.vocab_size, show_progress=True)
    tok.save(opts.out)
    print(f"tokenizer with {tok.vocab_size} tokens saved to {opts.out}")


def cmd_tokenizer_eval(opts: TokenizerEvalOptions) -> None:
    texts = list(iter_many(opts.source, field=opts.field, limit=opts.max_docs))
    if not texts:
        raise ChatforgeError("no text to evaluate on: the --source is empty")
    named = {"chatforge": Tokenizer.load(opts.tokenizer)}
    for ref in opts.ref:
        named[Path(ref).name] = load_reference(ref)
    print(format_table(compare_tokenizers(named, texts)))


def cmd_data(opts: DataOptions) -> None:
    index = build_shards(
        opts.source,
        opts.tokenizer,
        opts.out,
        field=opts.field,
        near_dup_threshold=None if opts.no_near_dedup else opts.near_dup_threshold,
        val_fraction=opts.val_fraction,
        max_docs=opts.max_docs,
        conversations=opts.conversations,
    )
    print(
        f"shards written to {opts.out}: {index['splits']['train']['tokens']:,} train / {index['splits']['val']['tokens']:,} val tokens"
    )
