"""Token shards on disk and the pretraining data loader.

Writer: documents -> token ids (BOS before every document) -> raw `train_NNNNN.bin` /
`val_NNNNN.bin` files of uint16 (or uint32 for vocabularies over 65,536), plus an
`index.json` written last. Raw arrays are the simplest format that numpy can memmap,
so a loader reads any slice without parsing and without loading a shard into RAM.

Loader: a shard is cut into rows of T+1 tokens (x = row[:-1], y = row[1:]). Every row
starts on a document boundary (or continues a document longer than a row), so the model
rarely sees a document from its middle. Rows are shuffled per epoch with a seed, and a
global cursor counts rows consumed by all ranks, so a DDP run with world_size W and
batch B consumes exactly the rows of a single process with batch W*B, and a saved
(epoch, cursor) resumes the exact stream.

This module knows nothing about the tokenizer class: it takes an `encode_batch`
callable and plain ints, so it can be tested with a toy encoder.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^(train|val)_\d{5}\.bin$")
_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 16, 4096  # token ids checked when a shard is opened: 16 blocks of 4,096


def _dtype_for(vocab_size: int) -> np.dtype:
    # uint16 halves disk and page-cache use for the common case of vocabularies up to 65,536.
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _is_val(text_bytes: bytes, val_fraction: float) -> bool:
    # A hash of the text (not the document's position) decides the split, so reordering the
    # corpus, or a duplicate document, never leaks a val document into train.
    h = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "big")
    return h / 2.0**64 < val_fraction


# ----------------------------------------------------------------------------- writer


class _SplitWriter:
    """Appends documents of one split to shard files, rolling over after `shard_tokens`.

    A document is never split across shards (a shard may exceed shard_tokens by less than
    one document), so every shard starts with BOS and the loader wastes nothing at its head.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.docs = self.bytes = 0
        self._f = None
        self._tmp: Path | None = None
        self._cur_tokens = self._cur_docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._cur_tokens = self._cur_docs = 0

    def _close(self) -> None:
        if self._f is None:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"file": name, "tokens": self._cur_tokens, "docs": self._cur_docs})
        self._f = self._tmp = None

    def add(self, tokens: np.ndarray, lens: np.ndarray, nbytes: int) -> None:
        """Append documents given as one flat array (BOS included) and their lengths."""
        self.tokens += int(tokens.size)
        self.docs += int(lens.size)
        self.bytes += nbytes
        ends = np.cumsum(lens)
        doc, tok = 0, 0
        while doc < lens.size:
            if self._f is None:
                self._open()
            room = self.shard_tokens - self._cur_tokens
            # First document whose end fills the shard: write up to it, then roll over.
            j = int(np.searchsorted(ends, tok + room, side="left"))
            full = j < lens.size
            last = j if full else lens.size - 1
            end = int(ends[last])
            self._f.write(tokens[tok:end].tobytes())
            self._cur_tokens += end - tok
            self._cur_docs += last + 1 - doc
            doc, tok = last + 1, end
            if full:
                self._close()

    def finish(self) -> dict:
        self._close()
        return {"shards": self.shards, "tokens": self.tokens, "docs": self.docs, "bytes": self.bytes}

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._tmp.unlink(missing_ok=True)
            self._f = self._tmp = None


def _flatten(id_lists: list, bos_id: int, vocab_size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[[ids], ...] -> (flat array with BOS before each document, per-document lengths)."""
    lens = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lens.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = int(flat.max()) if flat.max() >= vocab_size else int(flat.min())
        raise ChatforgeError(
            f"the tokenizer produced token id {bad}, outside the vocabulary [0, {vocab_size}) — "
            "pass the tokenizer's real vocab_size"
        )
    lens += 1  # the BOS
    out = np.empty(int(lens.sum()), dtype=dtype)
    starts = np.cumsum(lens) - lens
    keep = np.ones(out.size, dtype=bool)
    keep[starts] = False
    out[starts] = bos_id
    out[keep] = flat
    return out, lens


def write_shards(
    docs: Iterable[str | list[int]],
    encode_batch: Callable[[list[str]], list[list[int]]],
    *,
    bos_id: int,
    vocab_size: int,
    out_dir,
    val_fraction: float = 0.02,
    shard_tokens: int = 50_000_000,
    chunk_docs: int = 2048,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Tokenize `docs` into train/val shards under `out_dir`; returns the index (also written).

    A document is a string, or a list of token ids already tokenized (e.g. a rendered
    conversation with its special tokens; BOS is still prepended here).
    Empty ones are skipped. Documents go to val when a blake2b hash of their text falls
    under `val_fraction`; with >= 2 documents and none hashed to val, the last one goes to val.
    """
    from tqdm import tqdm

    if not 0 < vocab_size <= 2**32:
        raise ChatforgeError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    if not 0 <= bos_id < vocab_size:
        raise ChatforgeError(f"bos_id {bos_id} is outside the vocabulary [0, {vocab_size})")
    if not 0.0 <= val_fraction < 1.0:
        raise ChatforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or chunk_docs < 1:
        raise ChatforgeError("shard_tokens and chunk_docs must be at least 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"shard folder {out} exists and is not a folder — pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    # Remove the old index first: shards are about to be replaced, and an old index over new
    # shards would be a silently wrong dataset if this run is killed.
    (out / INDEX_NAME).unlink(missing_ok=True)

    dtype = _dtype_for(vocab_size)
    writers = {s: _SplitWriter(out, s, dtype, shard_tokens) for s in SPLITS}

    def flush(items: list[tuple[str, list, int]]) -> None:
        for split in SPLITS:
            group = [it for it in items if it[0] == split]
            if group:
                arr, lens = _flatten([g[1] for g in group], bos_id, vocab_size, dtype)
                writers[split].add(arr, lens, sum(g[2] for g in group))

    # One document is held back so that, at the end, it can go to val if the hash sent none.
    pending: tuple[str, list, int] | None = None
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        it = iter(docs)
        while chunk := list(itertools.islice(it, chunk_docs)):
            texts, pretokenized = [], []
            for d in chunk:
                if isinstance(d, str):
                    if d:
                        texts.append(d)
                elif isinstance(d, list) and all(isinstance(t, int) for t in d):
                    if d:
                        pretokenized.append(d)
                else:
                    raise ChatforgeError(
                        f"documents must be strings or lists of token ids, got {type(d).__name__}"
                    )
            if not texts and not pretokenized:
                continue
            id_lists = encode_batch(texts) if texts else []
            if len(id_lists) != len(texts):
                raise ChatforgeError(
                    f"encode_batch returned {len(id_lists)} results for {len(texts)} documents"
                )
            items = []
            for text, ids in zip(texts, id_lists, strict=True):
                b = text.encode("utf-8", errors="surrogatepass")
                items.append(("val" if _is_val(b, val_fraction) else "train", ids, len(b)))
            for ids in pretokenized:  # e.g. rendered conversations: no text, so no bytes counted
                key = np.asarray(ids, dtype=np.int64).tobytes()
                items.append(("val" if _is_val(key, val_fraction) else "train", ids, 0))
            if pending is not None:
                items.insert(0, pending)
            pending = items.pop()
            flush(items)
            bar.update(len(texts) + len(pretokenized))
            done = writers["train"].tokens + writers["val"].tokens
            bar.set_postfix_str(f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
        if pending is None:
            raise ChatforgeError("no documents to write — is the corpus empty?")
        if writers["val"].docs == 0 and writers["train"].docs >= 1:
            pending = ("val", pending[1], pending[2])
        flush([pending])
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    index = {
        "format": "chatforge-shards",
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": int(vocab_size),
        "bos_id": int(bos_id),
        "splits": splits,
        **(extra or {}),  # what the caller wants recorded (cleaning stats, sources), written in the same file
    }
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2))
    # Shards of an earlier, larger run in the same folder are not part of this dataset.
    listed = {sh["file"] for s in splits.values() for sh in s["shards"]}
    for p in out.iterdir():
        if _SHARD_RE.match(p.name) and p.name not in listed:
            p.unlink()
    return index


def read_index(shard_dir) -> dict:
    """Load and check `index.json` of a shard folder."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise ChatforgeError(f"no {INDEX_NAME} in {shard_dir} — run `chatforge data` first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != "chatforge-shards" or index.get("version") != FORMAT_VERSION:
            raise ValueError("unknown format or version")
        np.dtype(index["dtype"])
        if not 0 <= int(index["bos_id"]) < int(index["vocab_size"]):
            raise ValueError(f"bos_id {index['bos_id']} outside the vocabulary of {index['vocab_size']}")
        for s in SPLITS:
            sp = index["splits"][s]
            int(sp["tokens"]), int(sp["docs"]), int(sp["bytes"])
            for sh in sp["shards"]:
                str(sh["file"]), int(sh["tokens"]), int(sh["docs"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChatforgeError(
            f"{path} is corrupt or from another version ({e}) — run `chatforge data` again"
        ) from None
    return index


# ----------------------------------------------------------------------------- rows


def row_starts(tokens: np.ndarray, bos_id: int, seq_len: int) -> np.ndarray:
    """Start offsets of the rows of one shard (see module doc for the rule).

    The first row starts at the first BOS. After a row at s, the next starts at the last BOS p
    with s < p <= s + T — the document cut by the row's end starts the next row and is seen
    whole — or at s + T when there is none (a long document continues). Rows that would run
    past the shard's end are dropped.
    """
    T, n = seq_len, len(tokens)
    bos = np.flatnonzero(np.asarray(tokens) == bos_id).tolist()
    starts: list[int] = []
    if not bos:
        return np.zeros(0, dtype=np.int64)
    s = bos[0]
    # Sequential by nature (each start depends on the previous); bisect on a list keeps it ~1 us/row.
    while s + T + 1 <= n:
        starts.append(s)
        i = bisect.bisect_right(bos, s + T) - 1
        s = bos[i] if bos[i] > s else s + T
    return np.asarray(starts, dtype=np.int64)


class _Split:
    """The memmapped shards of one split and the (shard, start) of every row."""

    def __init__(self, shard_dir, split: str, seq_len: int):
        if seq_len < 1:
            raise ChatforgeError(f"seq_len must be at least 1, got {seq_len}")
        index = read_index(shard_dir)
        if split not in index["splits"]:
            raise ChatforgeError(f"unknown split {split!r}; the shards have {', '.join(index['splits'])}")
        info = index["splits"][split]
        dtype = np.dtype(index["dtype"])
        self.split, self.seq_len, self.bos_id = split, seq_len, int(index["bos_id"])
        self.vocab_size = int(index["vocab_size"])
        self.files: list[Path] = []
        self.tokens = int(info["tokens"])
        self.arrays: list[np.ndarray] = []
        shard_ids, starts = [], []
        for k, sh in enumerate(info["shards"]):
            path = Path(shard_dir) / sh["file"]
            want = int(sh["tokens"]) * dtype.itemsize
            if not path.is_file() or path.stat().st_size != want:
                raise ChatforgeError(
                    f"shard {path} is missing or not {want} bytes as {INDEX_NAME} says — "
                    "run `chatforge data` again"
                )
            arr = np.memmap(path, dtype=dtype, mode="r") if want else np.zeros(0, dtype=dtype)
            self._check_sample(arr, path)
            self.arrays.append(arr)
            self.files.append(path)
            st = row_starts(arr, self.bos_id, seq_len)
            starts.append(st)
            shard_ids.append(np.full(st.size, k, dtype=np.int32))
        self.row_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self.row_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.num_rows = int(self.row_start.size)

    def _check_sample(self, arr: np.ndarray, path: Path) -> None:
        """Token ids in a few blocks spread over the shard must be in the vocabulary: a damaged shard
        is refused when opened, cheaply (gather checks every batch it draws)."""
        starts = np.unique(np.linspace(0, max(0, arr.size - _SAMPLE_BLOCK), _SAMPLE_BLOCKS).astype(np.int64))
        for s in starts.tolist():
            block = arr[s : s + _SAMPLE_BLOCK]
            if block.size and int(block.max()) >= self.vocab_size:
                self._bad_id(path, s + int(block.argmax()), int(block.max()))

    def _bad_id(self, path: Path, pos: int, token: int) -> NoReturn:
        raise ChatforgeError(
            f"shard {path} holds token id {token} at position {pos:,}, outside the vocabulary of "
            f"{self.vocab_size} in {INDEX_NAME}: the shard is damaged — run `chatforge data` again"
        )

    def too_small(self, rows_needed: int, what: str) -> ChatforgeError:
        return ChatforgeError(
            f"the {self.split} split has {self.tokens:,} tokens = {self.num_rows} rows of "
            f"{self.seq_len + 1} tokens, fewer than the {rows_needed} needed for {what} — "
            "lower seq_len / device_batch_size (--set seq_len=... --set device_batch_size=...) or use a larger corpus"
        )

    def gather(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        x = np.empty((len(rows), T), dtype=np.int64)
        y = np.empty((len(rows), T), dtype=np.int64)
        for i, r in enumerate(rows):
            s = int(self.row_start[r])
            seg = self.arrays[self.row_shard[r]][s : s + T + 1]
            x[i] = seg[:-1]
            y[i] = seg[1:]
        if len(rows) and max(int(x.max()), int(y[:, -1].max())) >= self.vocab_size:  # one pass, cheap
            i = int(np.argmax(np.maximum(x.max(axis=1), y[:, -1]) >= self.vocab_size))
            r, row = rows[i], np.append(x[i], y[i, -1])
            self._bad_id(
                self.files[self.row_shard[r]], int(self.row_start[r]) + int(row.argmax()), int(row.max())
            )
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute.
            xt, yt = xt.pin_memory(), yt.pin_memory()
            return xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)
        if device.type != "cpu":
            return xt.to(device), yt.to(device)
        return xt, yt


def num_rows(shard_dir, split: str, seq_len: int) -> int:
    """How many rows of seq_len+1 tokens the split yields (one epoch, all ranks together)."""
    return _Split(shard_dir, split, seq_len).num_rows


# ----------------------------------------------------------------------------- loaders


class TokenLoader:
    """Endless (x, y) batches of shape (batch_size, seq_len) for pretraining, resumable exactly."""

    def __init__(
        self,
        shard_dir,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1:
            raise ChatforgeError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ChatforgeError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        if seed < 0:
            raise ChatforgeError(f"seed must be >= 0, got {seed}")
        self.data = _Split(shard_dir, split, seq_len)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.device = torch.device(device)
        if self.data.num_rows < batch_size * world_size:
            raise self.data.too_small(
                batch_size * world_size, f"one batch of {batch_size} x {world_size} rank(s)"
            )
        self.epoch = 0
        self.cursor = 0  # rows consumed in this epoch by all ranks together
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def num_rows(self) -> int:
        return self.data.num_rows

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = self.data.num_rows
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, W = self.batch_size, self.world_size
        if self.data.num_rows - self.cursor < B * W:
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._epoch_order()
        lo = self.cursor + self.rank * B
        rows = order[lo : lo + B]
        self.cursor += B * W
        return self.data.gather(rows, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _fingerprint(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "split_tokens": self.data.tokens,
            "num_rows": self.data.num_rows,
        }

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle}
        return state | self._fingerprint()

    def load_state_dict(self, d: dict) -> None:
        fp = self._fingerprint()
        got = {k: d.get(k) for k in fp}
        if got != fp:
            raise ChatforgeError(
                f"loader state does not match these shards (saved {got}, now {fp}) — "
                "resume with the same shards and seq_len, or start a fresh run"
            )
        epoch, cursor = int(d["epoch"]), int(d["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.data.num_rows:
            raise ChatforgeError(f"loader state has an invalid epoch/cursor ({epoch}, {cursor})")
        self.epoch, self.cursor = epoch, cursor
        self.seed, self.shuffle = int(d["seed"]), bool(d["shuffle"])
        self._order_epoch = -1


def iter_eval_batches(
    shard_dir,
    split: str,
    batch_size: int,
    seq_len: int,
    *,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One fixed, unshuffled pass over a split for evaluation.

    Rows are grouped into batches of batch_size in order (the last one may be shorter);
    batch k goes to rank k % world_size. `max_batches` caps the batches of all ranks
    together, so the set of rows evaluated does not depend on world_size.
    """
    if batch_size < 1:
        raise ChatforgeError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ChatforgeError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    data = _Split(shard_dir, split, seq_len)
    if data.num_rows == 0:
        raise data.too_small(1, "evaluation")
    dev = torch.device(device)
    n_batches = -(-data.num_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    # Checks above run at call time; the pass itself is lazy.
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(rank, n_batches, world_size):
            rows = np.arange(k * batch_size, min((k + 1) * batch_size, data.num_rows))
            yield data.gather(rows, dev)

    return batches()
