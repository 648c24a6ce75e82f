"""Blocks -> chunks that follow the document's structure.

A chunk never spans two headings (nor two jsonl records): each section's paragraphs are packed, whole sentences at a
time, into chunks of at most `max_chars`; the next chunk of the same section starts with the last
sentences of the one before (up to `overlap_chars`), so a fact cut at a boundary is whole in one
of them. A single sentence longer than a chunk is cut at words."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from chatforge.errors import ChatforgeError
from chatforge.rag.extract import Block

MAX_CHARS = 600  # about 150 word pieces: MiniLM reads only 256 (1000 left 30% of Python-docs chunks cut)
OVERLAP_CHARS = 120
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


@dataclass(frozen=True)
class Chunk:
    heading: str
    text: str


def _units(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph as sentences, each at most max_chars (long ones cut at words)."""
    out = []
    for sentence in _SENTENCE_END.split(paragraph):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(sentence[:cut])
            sentence = sentence[cut:].lstrip()
        if sentence:
            out.append(sentence)
    return out


def _join(units: list[tuple[int, str]]) -> str:
    """Sentences of one paragraph joined by a space, paragraphs by a newline."""
    parts = []
    for i, (para, text) in enumerate(units):
        sep = "" if i == 0 else (" " if para == units[i - 1][0] else "\n")
        parts.append(sep + text)
    return "".join(parts)


def _pack(paragraphs: list[str], max_chars: int, overlap_chars: int) -> list[str]:
    units = [(p, u) for p, para in enumerate(paragraphs) for u in _units(para, max_chars)]
    chunks, current, size, fresh = [], [], 0, 0  # fresh: units in `current` not in the previous chunk
    for unit in units:
        if current and size + 1 + len(unit[1]) > max_chars:
            chunks.append(_join(current))
            tail, tail_size = [], 0
            for old in reversed(current):
                if tail_size + len(old[1]) + 1 > overlap_chars or len(tail) + 1 >= len(current):
                    break
                tail.insert(0, old)
                tail_size += len(old[1]) + 1
            if tail_size + 1 + len(unit[1]) > max_chars:
                tail, tail_size = [], 0
            current, size, fresh = tail, tail_size, 0
        current.append(unit)
        size += len(unit[1]) + (1 if len(current) > 1 else 0)
        fresh += 1
    if current and fresh:
        chunks.append(_join(current))
    return chunks


def chunk_blocks(
    blocks: list[Block], max_chars: int = MAX_CHARS, overlap_chars: int = OVERLAP_CHARS
) -> list[Chunk]:
    """Chunks of at most `max_chars`, one heading each, overlapping by up to `overlap_chars`."""
    if max_chars < 50 or not 0 <= overlap_chars < max_chars // 2:
        raise ChatforgeError(
            f"chunk size {max_chars} / overlap {overlap_chars}: use a size >= 50 and an overlap below half of it"
        )
    out = []
    for (heading, _), group in itertools.groupby(blocks, key=lambda b: (b.heading, b.record)):
        out += [Chunk(heading, t) for t in _pack([b.text for b in group], max_chars, overlap_chars)]
    return out
