"""The BatchDecoder's KV cache allocated by need: it starts empty, grows with the rows and columns
in use, is freed when the last row leaves, never outgrows its token budget, and every row still
gets exactly the tokens it gets alone."""

from __future__ import annotations

import pytest
import torch

from chatforge.engine import COLUMN_CHUNK, BatchDecoder, Row, generate_batch, kv_bytes_per_token, reservation
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, seq_len=640, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    with torch.no_grad():  # peaked logits: greedy answers differ from prompt to prompt
        for p in m.parameters():
            p.mul_(4.0)
    return m


def alone(model: GPT, row_spec: tuple[list[int], int]) -> list[int]:
    prompt, budget = row_spec
    return generate_batch(model, [prompt], budget)[0]


def test_the_pool_grows_by_need_and_is_freed(model):
    decoder = BatchDecoder(model, capacity=4, max_len=model.cfg.seq_len)
    assert decoder.allocated_tokens == 0 and not any(t.numel() for t in decoder.k + decoder.v)  # nothing yet
    row = Row(prompt=list(range(1, 11)), budget=300)  # runs past one chunk of columns
    out: list[int] = []
    with torch.inference_mode():
        events = decoder.admit([row])
        assert decoder.allocated_tokens == COLUMN_CHUNK  # one row x one chunk, not capacity x max_len
        sizes = set()
        while decoder.rows:
            out += [t for _, t, _ in events]
            sizes.add(decoder.allocated_tokens)
            assert decoder.used_tokens == 10 + len(out) - 1 <= decoder.allocated_tokens
            events = decoder.step()
        out += [t for _, t, _ in events]
    assert sizes == {COLUMN_CHUNK, 2 * COLUMN_CHUNK}  # grew once, by a chunk
    assert decoder.allocated_tokens == 0 and not any(t.numel() for t in decoder.k + decoder.v)  # freed
    assert out == alone(model, (row.prompt, 300))
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 kv heads of 8, fp32


def test_rows_joining_and_leaving_under_a_budget_match_generate(model):
    """Random admissions, removals and steps under a small token budget: the pool never holds more
    than the budget, `fits` refuses what could outgrow it, and every row's tokens are its own."""
    g = torch.Generator().manual_seed(3)
    specs = []
    for _ in range(12):
        n = int(torch.randint(1, 40, (1,), generator=g))
        specs.append(
            (torch.randint(0, 300, (n,), generator=g).tolist(), int(torch.randint(1, 60, (1,), generator=g)))
        )
    budget = 180  # three rows fit only when their longest reservation is <= 60
    decoder = BatchDecoder(model, capacity=3, max_len=model.cfg.seq_len, max_tokens=budget)
    rows = [Row(prompt=p, budget=b) for p, b in specs]
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    removed: set[int] = set()
    budget_waits = 0  # times a row waited with a free row, for the budget alone
    waiting = list(rows)
    with torch.inference_mode():
        while waiting or decoder.rows:
            events = []
            while waiting and decoder.fits(waiting[:1]):
                events += decoder.admit([waiting.pop(0)])
            if waiting and not decoder.rows:
                pytest.fail("a row that fits alone was refused")
            if waiting:
                budget_waits += len(decoder.rows) < decoder.capacity
                with pytest.raises(ChatforgeError, match="do not fit"):
                    decoder.admit(waiting[:1])
            if decoder.rows and int(torch.randint(0, 9, (1,), generator=g)) == 0:  # a client goes away
                gone = decoder.rows[0]
                decoder.remove([gone])
                removed.add(id(gone))
            if decoder.rows:
                events += decoder.step()
            for row, token, _ in events:
                out[id(row)].append(token)
            assert decoder.allocated_tokens <= budget
            assert decoder.reserved_tokens <= budget
    assert removed and budget_waits  # some rows left mid-answer, some waited for the budget
    for row, spec in zip(rows, specs, strict=True):
        ref = alone(model, spec)
        got = out[id(row)]
        assert got == (ref[: len(got)] if id(row) in removed else ref)


def test_a_row_beyond_the_budget_or_context_never_fits(model):
    decoder = BatchDecoder(model, capacity=2, max_len=100, max_tokens=150)
    long = Row(prompt=[1] * 60, budget=41)  # needs 100 columns: fits alone
    assert reservation(long) == 100 and decoder.fits([long])
    assert not decoder.fits([long, Row(prompt=[2], budget=5)])  # two rows share 100 columns: 200 > 150
    assert not decoder.fits([Row(prompt=[1] * 60, budget=42)])  # 101 > max_len
    with pytest.raises(ChatforgeError, match="do not fit"):
        decoder.admit([Row(prompt=[1] * 60, budget=42)])
