"""The one way untrusted text (a retrieved page, an email, a file) enters a prompt: a delimited
document block inside a user message, or a `tool` message. Spotlighting (defenses.py) and the
injection probes both read this format, so retrieval can put its passages in with `document_block`."""

from __future__ import annotations

import re
from collections.abc import Callable

# zero-width, bidi-control and Unicode tag characters: text a reader of the rendered page never sees
INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]")
DOCUMENT_OPEN, DOCUMENT_CLOSE = "<document", "</document>"
DOCUMENT_PATTERN = re.compile(r"(<document[^>\n]*>\n?)(.*?)(\n?</document>)", re.DOTALL)


def document_block(text: str, source: str = "") -> str:
    """`<document source="...">` text `</document>`; a closing tag inside the text is defused."""
    safe = text.replace(DOCUMENT_CLOSE, "</ document>")
    head = f'<document source="{source}">' if source else "<document>"
    return f"{head}\n{safe}\n{DOCUMENT_CLOSE}"


def question_with_documents(question: str, documents: list[str], sources: list[str] | None = None) -> dict:
    """A user message: the documents as blocks, then the question about them."""
    names = sources or [""] * len(documents)
    blocks = [document_block(d, s) for d, s in zip(documents, names, strict=True)]
    return {"role": "user", "content": "\n".join(blocks) + "\n" + question}


def has_untrusted(messages: list[dict]) -> bool:
    """Whether any message carries untrusted content: a tool result or a document block."""
    for m in messages:
        if m["role"] == "tool":
            return True
        if m["role"] == "user" and DOCUMENT_PATTERN.search(m.get("content") or ""):
            return True
    return False


def map_untrusted(messages: list[dict], fn: Callable[[str], str]) -> list[dict]:
    """The messages with `fn` applied to every piece of untrusted content (tool results, document blocks)."""

    def in_blocks(g: re.Match) -> str:
        return g.group(1) + fn(g.group(2)) + g.group(3)

    out = []
    for m in messages:
        if m["role"] == "tool" and m.get("content"):
            m = dict(m, content=fn(m["content"]))
        elif m["role"] == "user" and m.get("content"):
            m = dict(m, content=DOCUMENT_PATTERN.sub(in_blocks, m["content"]))
        out.append(m)
    return out
