"""The one tokenizer wrapper every stage uses, and its special tokens.

- `Tokenizer` wraps a HF `tokenizers.Tokenizer` (byte-level BPE): training, load/save,
  plain-text encode/decode, exact byte round-trips, and per-token byte lengths for
  bits-per-byte. It also loads any HF `tokenizer.json` (imported models such as SmolLM2).
- `SPECIAL_TOKENS`: the BOS, the ChatML turn tags and the tool-call tags, ids 0..6.
- Tokenizer evaluation: bytes per token, comparison table against reference tokenizers.

How conversations become ids (ChatML) is chat_format.py.

Why special tokens are never produced from plain text: a user (or a web page in a
pretraining corpus) typing "<|im_end|>" must not be able to close a turn or forge a
tool call. Only the chat renderer inserts special ids, by id.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text

SPECIAL_TOKENS = [
    "<|endoftext|>",  # BOS / document separator: starts every document
    "<|im_start|>",  # ChatML turn start
    "<|im_end|>",  # ChatML turn end (the assistant's stop token)
    "<tool_call>",
    "</tool_call>",
    "<think>",  # reserved for reasoning traces
    "</think>",
]
BOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Imported tokenizers use other names for their beginning-of-sequence token.
BOS_CANDIDATES = ["<|endoftext|>", "<s>", "<|begin_of_text|>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # all bytes + specials + at least one merge

# GPT-4's split pattern, except digits are split one per pre-token (GPT-4 groups up to 3):
# single digits make every number tokenize the same way, which helps arithmetic.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"""  # contractions, words, ONE digit
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # punctuation, newlines, spaces
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable unicode character table used by ByteLevel BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


_ESCAPED_RUN = re.compile("([\udc80-\udcff]+)")  # invalid UTF-8 bytes under surrogateescape


LONG_TEXT = 4096  # characters; longer texts are encoded without holding the GIL


class Tokenizer:
    """A thin wrapper over a HF `tokenizers.Tokenizer`, with chatforge's conventions."""

    def __init__(self, inner: HFTokenizer, *, add_bos: bool = True, chat: dict | None = None):
        self._tok = inner
        # Whether a document / prompt starts with bos_id. Chatforge's own models always do;
        # an imported model says in its config (SmolLM2's template adds nothing first).
        self.add_bos = add_bos
        # An imported model's own chat template and the token ids it names (chat_format.py renders
        # with it); None for chatforge's own models, which speak ChatML.
        chat = chat or {}
        self.chat_template: str | None = chat.get("chat_template") or None
        self.chat_bos_id: int | None = chat.get("bos_token_id")
        self.chat_eos_id: int | None = chat.get("eos_token_id")
        # Special-token strings inside text are encoded as ordinary text (see module doc).
        self._tok.encode_special_tokens = True
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        self._added = {t.content: i for i, t in added.items()}
        self._special_ids = {i for i, t in added.items() if t.special}
        self._byte_level = _is_byte_level(inner)
        self._bos_id = next((i for s in BOS_CANDIDATES if (i := self._tok.token_to_id(s)) is not None), None)
        self._id_bytes: list[bytes] | None = None  # lazily built id -> raw bytes table
        self._byte_ids: list[int | None] | None = None  # lazily built byte -> single-byte token id

    # ---------------------------------------------------------------- training / io
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE on `texts`; special tokens get ids 0..6, then the 256 bytes."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ChatforgeError(
                f"vocab_size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)"
            )
        tok = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        )
        seen = {"texts": 0, "chars": 0}

        def checked() -> Iterator[str]:
            for text in texts:
                if not isinstance(text, str):
                    raise ChatforgeError(
                        f"tokenizer training texts must be strings, got {type(text).__name__}"
                    )
                seen["texts"] += 1
                seen["chars"] += len(text)
                yield text

        tok.train_from_iterator(checked(), trainer=trainer)
        if seen["chars"] == 0:
            raise ChatforgeError("the tokenizer training corpus is empty: give it some text to learn from")
        for i, s in enumerate(SPECIAL_TOKENS):  # the layout the rest of chatforge relies on
            assert tok.token_to_id(s) == i, f"special token {s} got id {tok.token_to_id(s)}, expected {i}"
        if tok.get_vocab_size() < vocab_size:  # BPE stops when no pair occurs min_frequency times
            print(
                f"note: trained {tok.get_vocab_size():,} tokens of the {vocab_size:,} asked: the corpus has "
                f"no more merges seen at least {min_frequency} times (give more text for a larger vocabulary)",
                file=sys.stderr,
            )
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` file, or a folder (e.g. a run folder) that contains one.

        A run folder's config.json may say `"add_bos_token": false` (imported models whose chat
        template starts with no BOS); the tokenizer then leaves it out of prompts and documents.
        Its `chat_template` (an imported model's own) and token ids travel with the tokenizer."""
        p = Path(path)
        meta: dict = {}
        if p.is_dir():
            meta = _run_chat_meta(p)
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ChatforgeError(
                f"no tokenizer at {p}: train one with `chatforge tokenizer` or check the path"
            )
        try:
            inner = HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON / unknown fields
            raise ChatforgeError(f"{p} is not a valid HF tokenizer.json ({str(e).splitlines()[0]})") from e
        return cls(inner, add_bos=meta.get("add_bos_token", True) is not False, chat=meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` atomically; `path` is the file, or a folder to put it in."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, self.to_json())
        return p

    def to_json(self) -> str:
        """The tokenizer.json text (what save writes; checkpoints embed it)."""
        return self._tok.to_str(pretty=True)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Plain text → ids. Special-token strings in `text` are ordinary text; no BOS is added."""
        if len(text) > LONG_TEXT:  # the batch encoder lets go of the GIL (a server's threads go on)
            return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like `encode` for many texts, on the Rust side's parallel batch encoder."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """ids → text; special tokens appear as their strings, broken UTF-8 as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Arbitrary bytes (even invalid UTF-8) → ids such that `decode_bytes` gives them back exactly."""
        if not self._byte_level:
            try:
                return self.encode(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ChatforgeError(
                    "this tokenizer is not byte-level, so it can only encode valid UTF-8 text"
                ) from e
        # Invalid bytes become U+DC80..U+DCFF under surrogateescape; valid runs between them are
        # encoded normally, and each stray byte maps to its single-byte token.
        parts = _ESCAPED_RUN.split(data.decode("utf-8", errors="surrogateescape"))
        byte_ids = self._single_byte_ids()
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if part:
                    ids.extend(self.encode(part))
                continue
            for ch in part:
                b = ord(ch) - 0xDC00
                if byte_ids[b] is None:
                    raise ChatforgeError(f"this tokenizer has no token for byte 0x{b:02x}")
                ids.append(byte_ids[b])
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """ids → the exact raw bytes they stand for (special tokens as their UTF-8 strings)."""
        table = self._bytes_table()
        try:
            return b"".join(table[i] for i in ids)
        except (IndexError, TypeError) as e:
            raise ChatforgeError(f"token id out of range for a vocabulary of {len(table)}") from e

    # ---------------------------------------------------------------- vocabulary facts
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """The document-start token: <|endoftext|>, else <s>, else <|begin_of_text|>, else None."""
        return self._bos_id

    def start_ids(self) -> list[int]:
        """What a prompt or document starts with: [bos_id], or [] when this model adds none."""
        return [self._bos_id] if self.add_bos and self._bos_id is not None else []

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    def special_id(self, token: str) -> int:
        """The id of an added/special token such as "<|im_end|>"."""
        i = self._added.get(token)
        if i is None:
            raise ChatforgeError(f"this tokenizer has no special token {token!r}")
        return i

    def has_special(self, token: str) -> bool:
        return token in self._added

    def id_to_token(self, i: int) -> str:
        t = self._tok.id_to_token(i)
        if t is None:
            raise ChatforgeError(f"token id {i} is not in this tokenizer's vocabulary of {self.vocab_size}")
        return t

    def token_byte_lengths(self) -> list[int]:
        """Raw bytes each id decodes to (0 for special tokens): bits-per-byte divides by their sum."""
        return [0 if i in self._special_ids else len(b) for i, b in enumerate(self._bytes_table())]

    @property
    def inner(self) -> HFTokenizer:
        """The wrapped HF tokenizer (for export; do not change its settings)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, specials={len(self._added)})"

    # ---------------------------------------------------------------- internals
    def _bytes_table(self) -> list[bytes]:
        if self._id_bytes is None:
            n = max(
                self.vocab_size, max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
            )
            table: list[bytes] = []
            u2b = unicode_to_bytes()
            added_ids = set(self._added.values())
            for i in range(n):
                t = self._tok.id_to_token(i)
                if t is None:
                    table.append(b"")
                elif i in added_ids:  # added tokens are stored verbatim, not byte-mapped
                    table.append(t.encode())
                elif not self._byte_level:  # best effort for e.g. SentencePiece-style vocabularies
                    table.append(self._tok.decode([i]).encode())
                else:
                    try:
                        table.append(bytes(u2b[c] for c in t))
                    except KeyError:  # same fallback as the Rust ByteLevel decoder
                        table.append(t.encode())
            self._id_bytes = table
        return self._id_bytes

    def _single_byte_ids(self) -> list[int | None]:
        if self._byte_ids is None:
            b2u = bytes_to_unicode()
            self._byte_ids = [self._tok.token_to_id(b2u[b]) for b in range(256)]
        return self._byte_ids


def _run_chat_meta(folder: Path) -> dict:
    """What a run folder's config.json says about its chat format: add_bos_token, chat_template,
    bos_token_id, eos_token_id ({} when absent or unreadable)."""
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    keys = ("add_bos_token", "chat_template", "bos_token_id", "eos_token_id")
    return {k: meta[k] for k in keys if meta.get(k) is not None}


def _is_byte_level(inner: HFTokenizer) -> bool:
    """True when ids map to bytes through the GPT-2 table (ByteLevel decoder somewhere)."""
    decoder = json.loads(inner.to_str()).get("decoder")
    return '"ByteLevel"' in json.dumps(decoder)


# ==================================================================== evaluation


def load_reference(path: str | os.PathLike) -> Tokenizer:
    """A reference tokenizer to compare against: a tokenizer.json (or a folder with one), or a
    GPT-2 style vocab.json + merges.txt pair (a folder holding both, or the path of either)."""
    p = Path(path)
    if not p.exists():
        raise ChatforgeError(f"no reference tokenizer at {p}: check the path")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return Tokenizer.load(p)
        vocab, merges = p / "vocab.json", p / "merges.txt"
    elif p.suffix == ".txt":  # merges.txt, or e.g. gpt2_merges.txt beside gpt2_vocab.json
        vocab, merges = _sibling(p, "merges", "vocab", ".json"), p
    elif p.name == "vocab.json" or (
        p.is_file() and p.suffix == ".json" and not _looks_like_tokenizer_json(p)
    ):
        vocab, merges = p, _sibling(p, "vocab", "merges", ".txt")
    else:
        return Tokenizer.load(p)
    if not (vocab.is_file() and merges.is_file()):
        raise ChatforgeError(
            f"no reference tokenizer at {p}: "
            "give a tokenizer.json, or a folder with vocab.json and merges.txt"
        )
    try:
        inner = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise ChatforgeError(f"could not read {vocab} + {merges} as a BPE ({str(e).splitlines()[0]})") from e
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    # GPT-2's <|endoftext|> sits in vocab.json; register it so it counts as special.
    if inner.token_to_id(BOS) is not None:
        inner.add_special_tokens([BOS])
    return Tokenizer(inner)


def _sibling(p: Path, this: str, other: str, suffix: str) -> Path:
    """The other file of a vocab/merges pair: "gpt2_vocab.json" -> "gpt2_merges.txt"."""
    named = p.with_name(p.stem.replace(this, other) + suffix)
    return named if named.is_file() else p.with_name(other + suffix)


def _looks_like_tokenizer_json(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return True  # let Tokenizer.load report the problem
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict)  # vocab.json maps str -> int


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher = better compression)."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    if n_tokens == 0:
        raise ChatforgeError("no text to measure bytes per token on: give it some non-empty texts")
    return n_bytes / n_tokens


def compare_tokenizers(named: dict[str, Tokenizer], texts: Iterable[str]) -> list[dict[str, Any]]:
    """One row per tokenizer: name, vocab_size, bytes_per_token, tokens (total over `texts`)."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ChatforgeError("no text to compare tokenizers on: give it some non-empty texts")
    rows = []
    for name, tok in named.items():
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        rows.append(
            {
                "name": name,
                "vocab_size": tok.vocab_size,
                "bytes_per_token": n_bytes / max(n_tokens, 1),
                "tokens": n_tokens,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `compare_tokenizers` rows; the last column is tokens relative to the first row."""
    lines = [
        "| tokenizer | vocab size | bytes/token | tokens | vs first |",
        "|---|---:|---:|---:|---:|",
    ]
    base = rows[0]["tokens"] if rows else 0
    for r in rows:
        rel = f"{(r['tokens'] - base) / base:+.1%}" if base else "n/a"
        lines.append(
            f"| {r['name']} | {r['vocab_size']:,} | {r['bytes_per_token']:.3f} | {r['tokens']:,} | {rel} |"
        )
    return "\n".join(lines)
