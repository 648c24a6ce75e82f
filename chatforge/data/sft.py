"""The SFT batch loader: conversations packed whole into rows, loss only on the assistant's tokens.

Each conversation is rendered once (`render_conversation`: ChatML ids starting with BOS, and a
mask that is 1 only on assistant tokens). Rows hold T+1 tokens; conversations are packed into
them whole by greedy first-fit in a shuffled order, and the rest of a row is padding. For a row
`r` with targets `t` (the token where its mask is 1, else -1; padding -1):

    x = r[:-1]          y = t[1:]

so the loss (cross-entropy with ignore_index=-1) is only on predicting assistant tokens, and
each conversation still sees all of its own context. Conversations in one row can attend to
the ones packed before them (no document masking, as in pretraining); each starts with its own
BOS, which the model has learned as "a new document begins".

A conversation longer than T+1 tokens is cut to T+1 (counted in `n_truncated`; the caller
reports it). Rows are repacked every epoch from a permutation seeded by (seed, epoch); ranks
follow the same global-cursor rule as `TokenLoader`: rank r takes rows [c + r*B, c + (r+1)*B)
of the epoch and the cursor c advances by B*world_size, so 2 ranks of B see exactly what one
process of 2B sees, and `state_dict()` resumes exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from chatforge.chat_format import render_conversation
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer


class _Rendered:
    """Every conversation rendered once and cut to T+1 tokens: ids and loss targets per conversation."""

    def __init__(self, conversations: list[list[dict]], tok: Tokenizer, seq_len: int):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ChatforgeError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        if not isinstance(conversations, list) or not conversations:
            raise ChatforgeError("no SFT conversations given; build them with `chatforge.conversations`")
        self.seq_len = seq_len
        self.pad_id = tok.bos_id if tok.bos_id is not None else 0
        cap = seq_len + 1
        self.ids: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []  # the token where its mask is 1, else -1
        self.n_truncated = 0
        digest = hashlib.sha256()
        for i, conv in enumerate(conversations):
            try:
                ids, mask = render_conversation(tok, conv)
            except ChatforgeError as e:
                raise ChatforgeError(f"conversation {i}: {e}") from None
            if len(ids) > cap:
                self.n_truncated += 1
                ids, mask = ids[:cap], mask[:cap]
            a = np.asarray(ids, dtype=np.int64)
            t = np.where(np.asarray(mask, dtype=bool), a, -1)
            self.ids.append(a)
            self.targets.append(t)
            digest.update(t.tobytes())
            digest.update(b"|")
        self.lengths = np.array([len(a) for a in self.ids], dtype=np.int64)
        self.tokens = int(self.lengths.sum())
        # Only positions 1.. are ever a target (x = row[:-1], y = targets[1:]).
        self.n_trained = sum(int((t[1:] >= 0).sum()) for t in self.targets)
        if self.n_trained == 0:
            raise ChatforgeError(
                "no conversation has an assistant token within the context — "
                "give conversations with assistant replies, or raise seq_len"
            )
        self.fingerprint = digest.hexdigest()[:16]

    def gather(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        T, n = self.seq_len, len(rows)
        buf = np.full((n, T + 1), self.pad_id, dtype=np.int64)
        tgt = np.full((n, T + 1), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            pos = 0
            for c in row:
                L = len(self.ids[c])
                buf[i, pos : pos + L] = self.ids[c]
                tgt[i, pos : pos + L] = self.targets[c]
                pos += L
        xt, yt = torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(tgt[:, 1:].copy())
        if device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()  # lets the copy overlap with compute
            return xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)
        if device.type != "cpu":
            return xt.to(device), yt.to(device)
        return xt, yt


def pack_rows(
    lengths: list[int] | np.ndarray, order: list[int] | np.ndarray, capacity: int
) -> list[list[int]]:
    """Greedy first-fit: each conversation (taken in `order`) goes into the first row that still
    has room for it, else a new row. Returns the conversation indices of each row, in row order.

    A segment tree over "room left" finds the first row with room in O(log n), so packing
    100k conversations takes well under a second. Every length must be <= capacity.
    """
    n = len(order)
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    # Leaves: room left in row i (rows not yet opened have full capacity, so the first-fit row
    # for a conversation that fits nowhere is exactly the next new row). Inner nodes: max.
    tree = [capacity] * (2 * size)  # a list: scalar indexing is several times faster than numpy
    rows: list[list[int]] = []
    for c in order:
        L = int(lengths[c])
        if L > capacity:
            raise ChatforgeError(f"conversation {c} has {L} tokens, more than the row capacity {capacity}")
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= L
            node = 2 * node if tree[2 * node] >= L else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(int(c))
        tree[node] -= L
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
    return rows


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ChatforgeError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ChatforgeError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")


class SFTLoader:
    """Endless (x, y) int64 batches of shape (batch_size, seq_len) of packed conversations, resumable exactly."""

    def __init__(
        self,
        conversations: list[list[dict]],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        _check_rank(batch_size, rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ChatforgeError(f"seed must be an integer >= 0, got {seed!r}")
        self.data = _Rendered(conversations, tokenizer, seq_len)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.device = torch.device(device)
        # Any packing needs at least ceil(tokens / (T+1)) rows; requiring that many to fill one
        # global batch guarantees every epoch's packing does, whatever its order.
        need = batch_size * world_size
        if self.min_rows < need:
            raise ChatforgeError(
                f"{len(conversations)} conversations ({self.data.tokens:,} tokens) fill only about "
                f"{self.min_rows} rows of {seq_len + 1} tokens, fewer than the {need} of one batch of "
                f"{batch_size} x {world_size} rank(s) — lower the batch size or seq_len, or add conversations"
            )
        self.epoch = 0
        self.cursor = 0  # rows consumed in this epoch by all ranks together
        self._rows: list[list[int]] | None = None
        self._rows_epoch = -1

    # ---------------------------------------------------------------- facts
    @property
    def n_truncated(self) -> int:
        """Conversations longer than seq_len+1 tokens, cut to fit (report it to the user)."""
        return self.data.n_truncated

    @property
    def n_conversations(self) -> int:
        return len(self.data.ids)

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens of all conversations (after truncation), padding excluded."""
        return self.data.tokens

    @property
    def trained_tokens_per_epoch(self) -> int:
        """Target positions (assistant tokens) per epoch: what the loss is averaged over."""
        return self.data.n_trained

    @property
    def min_rows(self) -> int:
        """A lower bound on the rows of any epoch's packing."""
        return -(-self.data.tokens // (self.seq_len + 1))

    @property
    def num_rows(self) -> int:
        """Rows in the current epoch's packing (varies slightly with the epoch's order)."""
        return len(self.epoch_rows())

    def batches_per_epoch(self) -> int:
        """Full global batches in the current epoch (the rows left over are skipped this epoch)."""
        return self.num_rows // (self.batch_size * self.world_size)

    # ---------------------------------------------------------------- batches
    def epoch_rows(self) -> list[list[int]]:
        """The current epoch's packing: the conversation indices of each row (do not modify)."""
        if self._rows_epoch != self.epoch:
            n = len(self.data.ids)
            order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._rows = pack_rows(self.data.lengths, order, self.seq_len + 1)
            self._rows_epoch = self.epoch
        return self._rows  # type: ignore[return-value]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, W = self.batch_size, self.world_size
        if len(self.epoch_rows()) - self.cursor < B * W:
            self.epoch, self.cursor = self.epoch + 1, 0
        rows = self.epoch_rows()
        lo = self.cursor + self.rank * B
        self.cursor += B * W
        return self.data.gather(rows[lo : lo + B], self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ---------------------------------------------------------------- resume
    def _fingerprint(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "n_conversations": len(self.data.ids),
            "tokens": self.data.tokens,
            "data_hash": self.data.fingerprint,
        }

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle}
        return state | self._fingerprint()

    def load_state_dict(self, d: dict) -> None:
        fp = self._fingerprint()
        got = {k: d.get(k) for k in fp}
        if got != fp:
            raise ChatforgeError(
                f"SFT loader state does not match these conversations (saved {got}, now {fp}) — "
                "resume with the same conversations, tokenizer and seq_len, or start a fresh run"
            )
        try:
            epoch, cursor = int(d["epoch"]), int(d["cursor"])
            seed, shuffle = int(d["seed"]), bool(d["shuffle"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChatforgeError(f"SFT loader state is incomplete ({e}); start a fresh run") from None
        if epoch < 0 or cursor < 0 or seed < 0:
            raise ChatforgeError(
                f"SFT loader state has an invalid epoch/cursor/seed ({epoch}, {cursor}, {seed})"
            )
        old = (self.epoch, self.cursor, self.seed, self.shuffle)
        self.epoch, self.cursor, self.seed, self.shuffle = epoch, cursor, seed, shuffle
        self._rows_epoch = -1
        if cursor > self.num_rows:  # the packing of that epoch has fewer rows: not our state
            n = self.num_rows
            self.epoch, self.cursor, self.seed, self.shuffle = old
            self._rows_epoch = -1
            raise ChatforgeError(f"SFT loader state cursor {cursor} is past the {n} rows of epoch {epoch}")


def iter_sft_eval_batches(
    conversations: list[list[dict]],
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One fixed pass over held-out conversations for a loss: packed first-fit in their given
    order (no shuffle), rows grouped into batches of batch_size (the last may be shorter),
    batch k going to rank k % world_size. `max_batches` caps the batches of all ranks
    together, so the conversations evaluated do not depend on world_size."""
    _check_rank(batch_size, rank, world_size)
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ChatforgeError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    data = _Rendered(conversations, tokenizer, seq_len)
    rows = pack_rows(data.lengths, np.arange(len(data.ids)), seq_len + 1)
    dev = torch.device(device)
    n_batches = -(-len(rows) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    # Checks and rendering run at call time; the pass itself is lazy.
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(rank, n_batches, world_size):
            yield data.gather(rows[k * batch_size : (k + 1) * batch_size], dev)

    return batches()
