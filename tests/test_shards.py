"""Token shards (writer, index) and the training / eval loaders, with a toy byte encoder."""

import json
import random

import numpy as np
import pytest
import torch

from chatforge.data.shards import (
    TokenLoader,
    iter_eval_batches,
    num_rows,
    read_index,
    row_starts,
    write_shards,
)
from chatforge.errors import ChatforgeError

BOS, VOCAB = 1, 256


def encode(texts):
    # ids 3..252: never BOS, so BOS positions in a shard are exactly document starts
    return [[3 + (b % 250) for b in t.encode()] for t in texts]


def make_docs(n, seed=0, lo=1, hi=60):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "café", "über", "näive", "x", "data", "12", "—"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write(tmp_path, docs, name="shards", **kw):
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("progress", False)
    out = tmp_path / name
    index = write_shards(docs, encode, bos_id=BOS, vocab_size=VOCAB, out_dir=out, **kw)
    return out, index


def split_tokens(out, index, split):
    dt = np.dtype(index["dtype"])
    parts = [np.fromfile(out / sh["file"], dtype=dt) for sh in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dt)


def cut_docs(tokens):
    """Split a token stream at BOS into documents (each a tuple, BOS included)."""
    pos = np.flatnonzero(tokens == BOS).tolist() + [len(tokens)]
    assert not len(tokens) or pos[0] == 0
    return [tuple(tokens[a:b].tolist()) for a, b in zip(pos, pos[1:], strict=False)]


# ----------------------------------------------------------------------------- writer


def test_round_trip_and_totals(tmp_path):
    docs = make_docs(80)
    out, index = write(tmp_path, docs, chunk_docs=7)
    assert read_index(out) == index
    assert index["dtype"] == "uint16" and index["bos_id"] == BOS and index["vocab_size"] == VOCAB
    expected = [tuple([BOS] + ids) for ids in encode(docs)]
    got = {s: cut_docs(split_tokens(out, index, s)) for s in ("train", "val")}
    assert sorted(got["train"] + got["val"]) == sorted(expected)
    assert got["train"] and got["val"]
    # within a split, documents keep corpus order
    for s in ("train", "val"):
        pos = [expected.index(d) for d in got[s]]
        assert pos == sorted(pos)
    total_bytes = 0
    for s in ("train", "val"):
        sp = index["splits"][s]
        assert sp["docs"] == len(got[s]) == sum(sh["docs"] for sh in sp["shards"])
        assert sp["tokens"] == sum(map(len, got[s])) == sum(sh["tokens"] for sh in sp["shards"])
        for sh in sp["shards"]:
            assert (out / sh["file"]).stat().st_size == 2 * sh["tokens"]
        total_bytes += sp["bytes"]
    assert total_bytes == sum(len(d.encode()) for d in docs)
    assert total_bytes > sum(len(d) for d in docs)  # non-ASCII text: bytes, not characters
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_shard_rollover(tmp_path):
    docs = make_docs(60, lo=2, hi=8)
    out, index = write(tmp_path, docs, shard_tokens=100)
    _, whole = write(tmp_path, docs, name="whole", shard_tokens=10**9, progress=True)
    for s in ("train", "val"):
        shards = index["splits"][s]["shards"]
        assert [sh["file"] for sh in shards] == [f"{s}_{i:05d}.bin" for i in range(len(shards))]
        for sh in shards[:-1]:
            arr = np.fromfile(out / sh["file"], dtype=np.uint16)
            last_doc = len(arr) - np.flatnonzero(arr == BOS)[-1]
            # closed as soon as it reached shard_tokens, never splitting a document
            assert arr[0] == BOS and sh["tokens"] >= 100 and sh["tokens"] - last_doc < 100
        np.testing.assert_array_equal(split_tokens(out, index, s), split_tokens(tmp_path / "whole", whole, s))
    assert len(index["splits"]["train"]["shards"]) >= 3
    # rows never straddle two shards: the loader's rows are the union of per-shard rows
    per_shard = [
        row_starts(np.fromfile(out / sh["file"], dtype=np.uint16), BOS, 8)
        for sh in index["splits"]["train"]["shards"]
    ]
    loader = TokenLoader(out, "train", 1, 8, shuffle=False)
    assert loader.num_rows == sum(map(len, per_shard))
    first_of_2nd = np.fromfile(out / "train_00001.bin", dtype=np.uint16)[per_shard[1][0] :][:9]
    x, y = [loader.next_batch() for _ in range(len(per_shard[0]) + 1)][-1]
    assert x[0].tolist() == first_of_2nd[:8].tolist() and y[0, -1] == first_of_2nd[8]


def test_rewrite_removes_stale_shards(tmp_path):
    out, index = write(tmp_path, make_docs(60, lo=2, hi=8), shard_tokens=100)
    assert (out / "train_00002.bin").exists()
    out, index = write(tmp_path, make_docs(10, lo=2, hi=8))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["index.json"] + [sh["file"] for s in ("train", "val") for sh in index["splits"][s]["shards"]]
    )


def test_split_is_deterministic_and_order_free(tmp_path):
    docs = make_docs(100, seed=3)
    out1, i1 = write(tmp_path, docs, name="a", val_fraction=0.3)
    out2, i2 = write(tmp_path, docs[::-1], name="b", val_fraction=0.3, chunk_docs=5)
    val1 = set(cut_docs(split_tokens(out1, i1, "val")))
    val2 = set(cut_docs(split_tokens(out2, i2, "val")))
    assert val1 == val2 and 10 <= len(val1) <= 50
    # at least one val document: when the hash gives none, the last document goes to val
    out3, i3 = write(tmp_path, ["first doc", "second doc"], name="c", val_fraction=0.0)
    assert cut_docs(split_tokens(out3, i3, "val")) == [tuple([BOS] + encode(["second doc"])[0])]
    assert i3["splits"]["train"]["docs"] == 1
    _, i4 = write(tmp_path, ["only doc", ""], name="d", val_fraction=0.0)
    assert i4["splits"]["val"]["docs"] == 0 and i4["splits"]["train"]["docs"] == 1


def test_uint32_for_large_vocab(tmp_path):
    def enc(texts):
        return [[66000 + b for b in t.encode()] for t in texts]

    docs = make_docs(20, lo=30, hi=40)
    out = tmp_path / "big"
    index = write_shards(docs, enc, bos_id=BOS, vocab_size=70000, out_dir=out, progress=False)
    assert index["dtype"] == "uint32"
    got = []
    for s in ("train", "val"):
        for sh in index["splits"][s]["shards"]:
            assert (out / sh["file"]).stat().st_size == 4 * sh["tokens"]
        got += cut_docs(split_tokens(out, index, s))
    assert sorted(got) == sorted(tuple([BOS] + ids) for ids in enc(docs))
    x, y = TokenLoader(out, "train", 2, 16, shuffle=False).next_batch()
    assert x.dtype == torch.int64 and x[0, 0] == BOS and int(x.max()) >= 66000
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_writer_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="no documents to write"):
        write(tmp_path, [])
    with pytest.raises(ChatforgeError, match="no documents to write"):
        write(tmp_path, ["", ""])
    with pytest.raises(ChatforgeError, match="token id 300"):
        write_shards(
            ["a"], lambda t: [[300]], bos_id=1, vocab_size=256, out_dir=tmp_path / "v", progress=False
        )
    assert not (tmp_path / "v" / "index.json").exists()
    assert not list((tmp_path / "v").iterdir())  # no temp files left behind
    with pytest.raises(ChatforgeError, match="bos_id"):
        write_shards(["a"], encode, bos_id=256, vocab_size=256, out_dir=tmp_path / "w", progress=False)


def test_read_index_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="run `chatforge data` first"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match="corrupt"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "chatforge-shards", "version": 1}))
    with pytest.raises(ChatforgeError, match="corrupt"):
        read_index(tmp_path)
    with pytest.raises(ChatforgeError, match="run `chatforge data` first"):
        TokenLoader(tmp_path / "nope", "train", 1, 8)


def test_truncated_shard_is_reported(tmp_path):
    out, index = write(tmp_path, make_docs(30))
    f = out / index["splits"]["train"]["shards"][0]["file"]
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ChatforgeError, match="missing or not"):
        TokenLoader(out, "train", 1, 8)


def poke(out, index, split, pos, value):
    """Overwrite one token of a split's first shard, as a damaged disk or a hand edit would."""
    f = out / index["splits"][split]["shards"][0]["file"]
    arr = np.memmap(f, dtype=np.dtype(index["dtype"]), mode="r+")
    arr[pos] = value
    arr.flush()
    return f


def test_ids_outside_the_vocabulary_are_refused_when_opened(tmp_path):
    out, index = write(tmp_path, make_docs(30))
    f = poke(out, index, "train", 5, 9999)  # a small shard is checked whole
    for open_it in (lambda: TokenLoader(out, "train", 1, 8), lambda: iter_eval_batches(out, "train", 1, 8)):
        with pytest.raises(ChatforgeError, match=f"shard {f} holds token id 9999 at position 5, outside"):
            open_it()
    index["bos_id"] = VOCAB  # the index itself: BOS outside the vocabulary
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ChatforgeError, match="bos_id 256 outside the vocabulary"):
        read_index(out)


def test_ids_outside_the_vocabulary_are_refused_when_drawn(tmp_path):
    """Opening samples a few blocks; a bad id elsewhere is caught by the batch that draws it."""
    out, index = write(tmp_path, make_docs(3000, lo=20), val_fraction=0.0, shard_tokens=10**9)
    n = index["splits"]["train"]["tokens"]
    assert n > 16 * 4096 * 2
    pos = 4096 + 100  # between the first two sampled blocks
    tokens = split_tokens(out, index, "train")
    assert tokens[pos] != BOS
    f = poke(out, index, "train", pos, 9999)
    loader = TokenLoader(out, "train", 8, 64, seed=3)  # opens: the damage is not in a sampled block
    with pytest.raises(ChatforgeError, match=f"shard {f} holds token id 9999 at position {pos:,}"):
        for _ in range(loader.num_rows // 8 + 1):  # one epoch reaches every row
            loader.next_batch()
    with pytest.raises(ChatforgeError, match="holds token id 9999"):
        list(iter_eval_batches(out, "train", 8, 64))


# ----------------------------------------------------------------------------- rows


def test_row_starts_rule():
    B = BOS
    # docs at 0 (len 3), 3 (len 2), 5 (len 9), 14 (len 2), 16 (len 4); T = 4
    toks = np.array([B, 5, 5, B, 6, B, 7, 7, 7, 7, 7, 7, 7, 7, B, 8, B, 9, 9, 9], dtype=np.uint16)
    # 0 -> last BOS in (0, 4] is 3 -> last in (3, 7] is 5 -> none in (5, 9]: 9 (continue)
    # -> none in (9, 13]: 13 -> last in (13, 17] is 16 -> 16 + 5 > 20: dropped
    assert row_starts(toks, B, 4).tolist() == [0, 3, 5, 9, 13]
    # leading tokens before the first BOS are skipped; no BOS at all: no rows
    assert row_starts(np.array([7, 7, B, 5, 5, 5, 5]), B, 4).tolist() == [2]
    assert row_starts(np.array([7] * 20), B, 4).tolist() == []
    assert row_starts(np.array([B, 5, 5]), B, 4).tolist() == []


def test_row_properties_mixed_lengths():
    rng = np.random.default_rng(0)
    T = 16
    docs = [rng.integers(3, 250, size=int(n)) for n in rng.choice([1, 3, 8, 15, 16, 40, 90], size=200)]
    toks = np.concatenate([np.concatenate([[BOS], d]) for d in docs])
    bos = np.flatnonzero(toks == BOS)
    starts = row_starts(toks, BOS, T)
    assert starts[-1] + T + 1 <= len(toks) and np.all(np.diff(starts) >= 1)
    for prev, s in zip(starts, starts[1:], strict=False):
        inside = bos[(bos > prev) & (bos <= prev + T)]
        if len(inside):
            assert toks[s] == BOS and s == inside[-1]
        else:  # a long document continues exactly where the previous row's inputs ended
            assert s == prev + T
    # every short document that lies within the covered range is seen whole in some row
    ends = np.append(bos[1:], len(toks))
    for p, e in zip(bos, ends, strict=True):
        if e - p <= T + 1 and e <= starts[-1] + T + 1:
            assert np.any((starts <= p) & (e <= starts + T + 1)), p


def test_long_doc_continues_in_loader(tmp_path):
    T = 8
    long_doc = "q" * (5 * T)  # 41 tokens with BOS
    docs = ["ab", long_doc, "cd", "efg"]
    out, index = write(tmp_path, docs, val_fraction=0.0)
    train = split_tokens(out, index, "train")
    loader = TokenLoader(out, "train", 1, T, shuffle=False)
    xs = [loader.next_batch() for _ in range(num_rows(out, "train", T))]
    assert loader.epoch == 0
    rows = [torch.cat([x[0], y[0, -1:]]).numpy() for x, y in xs]
    p = int(np.flatnonzero(train == BOS)[1])  # the long doc's BOS
    # it starts a row, then continues in rows at +T, +2T, ... that chain without gaps
    starts = [r for r in range(len(train)) if any(np.array_equal(train[r : r + T + 1], row) for row in rows)]
    assert p in starts and p + T in starts and p + 2 * T in starts
    for x, y in xs:
        assert torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------- loader


@pytest.fixture
def corpus(tmp_path):
    out, index = write(tmp_path, make_docs(120, seed=1, lo=1, hi=12), val_fraction=0.2)
    return out, index


def test_loader_rows_match_shards(corpus):
    out, index = corpus
    T, B = 16, 4
    train = split_tokens(out, index, "train")
    assert len(index["splits"]["train"]["shards"]) == 1
    starts = row_starts(train, BOS, T)
    loader = TokenLoader(out, "train", B, T, shuffle=False)
    assert loader.num_rows == len(starts) == num_rows(out, "train", T)
    for b in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        for i in range(B):
            s = starts[b * B + i]
            assert x[i].tolist() == train[s : s + T].tolist()
            assert y[i].tolist() == train[s + 1 : s + T + 1].tolist()
            # every row begins a document, or continues one longer than a row
            j = b * B + i
            assert x[i, 0] == BOS or (j > 0 and s == starts[j - 1] + T)


def test_shuffled_epochs_cover_each_row_once(corpus):
    out, _ = corpus
    loader = TokenLoader(out, "train", 1, 16, seed=5)
    n = loader.num_rows
    first = [tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)]
    second = [tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)]
    ordered = TokenLoader(out, "train", 1, 16, shuffle=False)
    rows = sorted(tuple(ordered.next_batch()[0][0].tolist()) for _ in range(n))
    assert sorted(first) == sorted(second) == rows
    assert first != second and first != sorted(first)  # shuffled, and differently per epoch
    other_seed = TokenLoader(out, "train", 1, 16, seed=6)
    assert [tuple(other_seed.next_batch()[0][0].tolist()) for _ in range(n)] != first


def test_resume_equals_uninterrupted_across_epoch(corpus):
    out, _ = corpus
    B, T = 3, 16
    ref = TokenLoader(out, "train", B, T, seed=7)
    per_epoch = ref.num_rows // B
    k, m = per_epoch - 2, 6  # save just before the epoch ends, compare across the boundary
    for _ in range(k):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # must survive JSON (checkpoint metadata)
    expected = [ref.next_batch() for _ in range(m)]
    assert ref.epoch == 1 and ref.num_rows % B != 0  # a partial batch's worth of rows is left over
    assert all(x.shape == (B, T) for x, _ in expected)
    # the leftover rows are skipped: the batch after the last full one starts epoch 1 at cursor 0
    start_e1 = TokenLoader(out, "train", B, T, seed=7)
    start_e1.load_state_dict(state | {"epoch": 1, "cursor": 0})
    assert torch.equal(start_e1.next_batch()[0], expected[2][0])
    resumed = TokenLoader(out, "train", B, T, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (resumed.next_batch() for _ in range(m)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    fresh = TokenLoader(out, "train", B, T, seed=7)
    assert not torch.equal(fresh.next_batch()[0], expected[-1][0])


def test_two_ranks_equal_single_process_double_batch(corpus):
    out, _ = corpus
    B, T = 3, 16
    single = TokenLoader(out, "train", 2 * B, T, seed=3)
    ranks = [TokenLoader(out, "train", B, T, rank=r, world_size=2, seed=3) for r in range(2)]
    steps = single.num_rows // (2 * B) + 3  # crosses an epoch boundary
    for _ in range(steps):
        x, y = single.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.epoch == ranks[0].epoch == ranks[1].epoch == 1
    assert single.state_dict()["cursor"] == ranks[0].state_dict()["cursor"]
    # and a single process with batch B taking 2 micro-steps sees the same rows
    accum = TokenLoader(out, "train", B, T, seed=3)
    fresh = TokenLoader(out, "train", 2 * B, T, seed=3)
    for _ in range(3):
        assert torch.equal(fresh.next_batch()[0], torch.cat([accum.next_batch()[0] for _ in range(2)]))


def test_iter_eval_batches(corpus):
    out, _ = corpus
    B, T = 3, 8
    a = list(iter_eval_batches(out, "val", B, T))
    b = list(iter_eval_batches(out, "val", B, T))
    n = num_rows(out, "val", T)
    assert len(a) == -(-n // B) and sum(len(x) for x, _ in a) == n
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    ordered = TokenLoader(out, "val", 1, T, shuffle=False)
    rows = torch.cat([ordered.next_batch()[0] for _ in range(n)])
    assert torch.equal(torch.cat([x for x, _ in a]), rows)
    r0 = list(iter_eval_batches(out, "val", B, T, rank=0, world_size=2))
    r1 = list(iter_eval_batches(out, "val", B, T, rank=1, world_size=2))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(r0, a[0::2], strict=True))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(r1, a[1::2], strict=True))
    assert len(r0) + len(r1) == len(a)
    capped = list(iter_eval_batches(out, "val", B, T, max_batches=2))
    assert len(capped) == 2 and torch.equal(capped[1][0], a[1][0])


def test_loader_errors(corpus):
    out, index = corpus
    tokens = index["splits"]["train"]["tokens"]
    with pytest.raises(ChatforgeError, match=f"{tokens:,} tokens.*seq_len"):
        TokenLoader(out, "train", 64, 512)
    n = num_rows(out, "train", 16)
    TokenLoader(out, "train", n, 16)  # exactly enough rows is fine
    with pytest.raises(ChatforgeError, match="fewer than"):
        TokenLoader(out, "train", n // 2 + 1, 16, world_size=2, rank=1)
    with pytest.raises(ChatforgeError, match="fewer than"):
        iter_eval_batches(out, "val", 1, 10_000)
    with pytest.raises(ChatforgeError, match="unknown split"):
        TokenLoader(out, "test", 1, 16)
    with pytest.raises(ChatforgeError, match="rank"):
        TokenLoader(out, "train", 1, 16, rank=2, world_size=2)
    state = TokenLoader(out, "train", 2, 16).state_dict()
    with pytest.raises(ChatforgeError, match="loader state does not match these shards"):
        TokenLoader(out, "train", 2, 8).load_state_dict(state)
    with pytest.raises(ChatforgeError, match="loader state does not match these shards"):
        TokenLoader(out, "val", 2, 16).load_state_dict(state)


def test_pretokenized_documents_are_written_verbatim(tmp_path):
    """Rendered conversations arrive as token ids (special tokens included): stored after a BOS, as given."""
    convo = [7, 200, 201, 9, 9, 250]
    index = write_shards(
        ["plain text one", convo, "plain text two"], encode, bos_id=BOS, vocab_size=VOCAB,
        out_dir=tmp_path, val_fraction=0.0, progress=False,
    )  # fmt: skip
    stream = np.concatenate(
        [
            np.fromfile(tmp_path / s["file"], dtype=index["dtype"])
            for sp in ("train", "val")
            for s in index["splits"][sp]["shards"]
        ]
    ).tolist()
    assert stream.count(BOS) == 3
    start = stream.index(convo[0])
    assert stream[start - 1] == BOS and stream[start : start + len(convo)] == convo
    assert index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"] == len("plain text one") + len(
        "plain text two"
    )
    with pytest.raises(ChatforgeError, match="strings or lists of token ids"):
        write_shards([3.5], encode, bos_id=BOS, vocab_size=VOCAB, out_dir=tmp_path / "x", progress=False)
