"""The SFT loader: packing, assistant-only targets, truncation, exact resume, ranks, eval pass."""

import random

import numpy as np
import pytest
import torch

from chatforge.chat_format import render_conversation
from chatforge.conversations import build_sft_data
from chatforge.data.sft import SFTLoader, iter_sft_eval_batches, pack_rows
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer
from chatforge.world import build_world

T = 160  # longer than every generated conversation under this tokenizer: nothing truncated


@pytest.fixture(scope="module")
def convs():
    return build_sft_data(build_world(seed=5, n_people=40, n_heldout=4), seed=0).train


@pytest.fixture(scope="module")
def tok(convs):
    return Tokenizer.train([m["content"] for c in convs for m in c], vocab_size=800)


def _expected(tok, convs, rows, seq_len):
    """x, y of `rows` built straight from render_conversation, independently of the loader."""
    xs, ys = [], []
    for row in rows:
        ids, tgt = [], []
        for c in row:
            i, m = render_conversation(tok, convs[c], max_len=seq_len + 1)
            ids += i
            tgt += [t if k else -1 for t, k in zip(i, m, strict=True)]
        pad = seq_len + 1 - len(ids)
        assert pad >= 0  # a row never holds more than T+1 tokens
        ids += [tok.bos_id] * pad
        tgt += [-1] * pad
        xs.append(ids[:-1])
        ys.append(tgt[1:])
    return torch.tensor(xs), torch.tensor(ys)


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


# --- packing and targets --------------------------------------------------------------------------


def test_pack_rows_is_first_fit_and_keeps_conversations_whole():
    rng = random.Random(0)
    lengths = [rng.randint(1, 30) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    rows = pack_rows(lengths, order, 40)
    # Naive first-fit, for comparison.
    naive, room = [], []
    for c in order:
        r = next((k for k, left in enumerate(room) if left >= lengths[c]), len(room))
        if r == len(room):
            naive.append([])
            room.append(40)
        naive[r].append(c)
        room[r] -= lengths[c]
    assert rows == naive
    assert sorted(c for r in rows for c in r) == list(range(300))
    assert all(sum(lengths[c] for c in r) <= 40 for r in rows)
    assert len(rows) < 300 * 15.5 / 40 * 1.15  # packing is tight (mean length 15.5)
    with pytest.raises(ChatforgeError, match="more than the row capacity"):
        pack_rows([41], [0], 40)


def test_batches_equal_rows_built_from_render_conversation(convs, tok):
    loader = SFTLoader(convs, tok, batch_size=4, seq_len=T, seed=3)
    rows = loader.epoch_rows()
    assert sorted(c for r in rows for c in r) == list(range(len(convs)))  # each conversation once, whole
    for b in range(loader.batches_per_epoch()):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
        ex, ey = _expected(tok, convs, rows[4 * b : 4 * b + 4], T)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert loader.epoch == 0


def test_targets_are_assistant_tokens_only(convs, tok):
    loader = SFTLoader(convs, tok, batch_size=2, seq_len=T, shuffle=False)
    x, y = loader.next_batch()
    row = loader.epoch_rows()[0]
    ids, mask = [], []
    for c in row:
        i, m = render_conversation(tok, convs[c])
        ids += i
        mask += m
    n = len(ids)
    assert n <= T + 1
    keep = torch.tensor(mask[1:], dtype=torch.bool)
    assert torch.equal(y[0, : n - 1] >= 0, keep)  # -1 exactly where the next token is not assistant
    assert torch.equal(y[0, : n - 1][keep], torch.tensor(ids[1:])[keep])
    assert (y[0, n - 1 :] == -1).all() and (x[0, n:] == tok.bos_id).all()  # padding
    assert 0 < loader.trained_tokens_per_epoch < loader.tokens_per_epoch


def test_truncation_is_counted_and_cuts_to_one_full_row(convs, tok):
    # One cut inside the user turn (no assistant token survives), one inside the assistant's reply.
    cut_user = [
        {"role": "user", "content": "tell me a long story " * 60},
        {"role": "assistant", "content": "No."},
    ]
    cut_reply = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Once upon a time " * 60},
    ]
    data = convs[:30] + [cut_user, cut_reply]
    assert all(len(render_conversation(tok, c)[0]) <= T + 1 for c in convs)
    assert SFTLoader(convs[:30], tok, batch_size=2, seq_len=T).n_truncated == 0
    for k, n_targets in ((30, 0), (31, None)):
        loader = SFTLoader(data, tok, batch_size=1, seq_len=T, seed=0)  # B=1: every row is served
        assert loader.n_truncated == 2
        row = next(r for r in loader.epoch_rows() if k in r)
        assert row == [k]  # a truncated conversation fills its row alone
        ex, ey = _expected(tok, data, [row], T)
        assert (ex[0] != tok.bos_id).sum() == T - 1  # a full row, no padding: only x[0] is BOS
        targets = int(ey.ge(0).sum())
        assert targets == 0 if n_targets == 0 else targets > 50
        batches = _take(loader, loader.batches_per_epoch())
        assert any(torch.equal(x[0], ex[0]) and torch.equal(y[0], ey[0]) for x, y in batches)


# --- epochs, resume, ranks ------------------------------------------------------------------------


def test_epochs_repack_from_a_seeded_permutation(convs, tok):
    a = SFTLoader(convs, tok, batch_size=2, seq_len=T, seed=1)
    b = SFTLoader(convs, tok, batch_size=2, seq_len=T, seed=1)
    n = a.batches_per_epoch()
    ra = a.epoch_rows()
    assert _same(_take(a, n + 2), _take(b, n + 2))
    assert a.epoch == 1 and a.epoch_rows() != ra
    c = SFTLoader(convs, tok, batch_size=2, seq_len=T, seed=2)
    assert c.epoch_rows() != ra
    assert SFTLoader(convs, tok, batch_size=2, seq_len=T, shuffle=False).epoch_rows()[0][0] == 0


def test_resume_is_exact_across_an_epoch_boundary(convs, tok):
    ref = SFTLoader(convs, tok, batch_size=3, seq_len=T, seed=7)
    n = ref.batches_per_epoch()
    k, m = n - 2, 6  # save near the end of epoch 0, continue into epoch 1
    whole = _take(ref, k + m)
    first = SFTLoader(convs, tok, batch_size=3, seq_len=T, seed=7)
    _take(first, k)
    state = first.state_dict()
    resumed = SFTLoader(convs, tok, batch_size=3, seq_len=T, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    assert _same(_take(resumed, m), whole[k:])
    assert resumed.epoch == 1
    with pytest.raises(ChatforgeError, match="does not match"):
        SFTLoader(convs[:-1], tok, batch_size=3, seq_len=T).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="does not match"):
        SFTLoader(convs, tok, batch_size=3, seq_len=T + 1).load_state_dict(state)
    bad = SFTLoader(convs, tok, batch_size=3, seq_len=T)
    with pytest.raises(ChatforgeError, match="past the"):
        bad.load_state_dict(state | {"cursor": 10**6})
    assert bad.cursor == 0 and bad.epoch == 0  # a rejected state leaves the loader as it was


def test_two_ranks_of_b_equal_one_process_of_2b(convs, tok):
    one = SFTLoader(convs, tok, batch_size=4, seq_len=T, seed=2)
    r0 = SFTLoader(convs, tok, batch_size=2, seq_len=T, seed=2, rank=0, world_size=2)
    r1 = SFTLoader(convs, tok, batch_size=2, seq_len=T, seed=2, rank=1, world_size=2)
    steps = one.batches_per_epoch() + 3  # across the epoch boundary
    for _ in range(steps):
        x, y = one.next_batch()
        (x0, y0), (x1, y1) = r0.next_batch(), r1.next_batch()
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    assert one.epoch == r0.epoch == r1.epoch == 1


# --- errors ---------------------------------------------------------------------------------------


def test_bad_input_raises(convs, tok):
    few = convs[:3]
    with pytest.raises(ChatforgeError, match="fewer than the 8"):
        SFTLoader(few, tok, batch_size=4, seq_len=T, world_size=2)
    cut = [[{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]] * 10
    with pytest.raises(ChatforgeError, match="no conversation has an assistant token"):
        SFTLoader(cut, tok, batch_size=1, seq_len=16)
    with pytest.raises(ChatforgeError, match="no SFT conversations"):
        SFTLoader([], tok, batch_size=1, seq_len=T)
    with pytest.raises(ChatforgeError, match="conversation 1: .*no assistant turn"):
        SFTLoader([convs[0], [{"role": "user", "content": "hi"}]], tok, batch_size=1, seq_len=T)
    with pytest.raises(ChatforgeError, match="rank"):
        SFTLoader(convs, tok, batch_size=1, seq_len=T, rank=2, world_size=2)
    with pytest.raises(ChatforgeError, match="batch_size"):
        SFTLoader(convs, tok, batch_size=0, seq_len=T)
    with pytest.raises(ChatforgeError, match="seq_len"):
        SFTLoader(convs, tok, batch_size=1, seq_len=0)


# --- evaluation pass ------------------------------------------------------------------------------


def test_eval_batches_are_fixed_cover_everything_and_split_over_ranks(convs, tok):
    val = convs[:40]
    full = list(iter_sft_eval_batches(val, tok, 3, T))
    again = list(iter_sft_eval_batches(val, tok, 3, T))
    assert _same(full, again)
    trained = sum(sum(render_conversation(tok, c)[1]) for c in val)  # every assistant token, once
    assert sum(int((y >= 0).sum()) for _, y in full) == trained
    rows = pack_rows([len(render_conversation(tok, c)[0]) for c in val], np.arange(len(val)), T + 1)
    assert sum(len(x) for x, _ in full) == len(rows)
    ex, ey = _expected(tok, val, rows[:3], T)
    assert torch.equal(full[0][0], ex) and torch.equal(full[0][1], ey)
    r0 = list(iter_sft_eval_batches(val, tok, 3, T, rank=0, world_size=2))
    r1 = list(iter_sft_eval_batches(val, tok, 3, T, rank=1, world_size=2))
    assert _same(full[0::2], r0) and _same(full[1::2], r1)
    capped = list(iter_sft_eval_batches(val, tok, 3, T, max_batches=2))
    assert _same(capped, full[:2])
    with pytest.raises(ChatforgeError, match="max_batches"):
        iter_sft_eval_batches(val, tok, 3, T, max_batches=0)
