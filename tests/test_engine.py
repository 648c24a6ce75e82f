import copy

import pytest
import torch

from chatforge.engine import BatchDecoder, Row, generate, generate_batch, stream_batch, token_budgets
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.quant import decode_layout

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

V = 300
# different lengths, so the batch is left-padded (up to 9 padding tokens on row 1)
PROMPTS = [[5, 17, 3, 42, 9, 11, 200], [1, 2], [7, 8, 9, 10], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def tiny(scale: float = 6.0) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, seq_len=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    with torch.no_grad():  # GPT-2 init gives near-uniform logits; larger weights give peaked, varied outputs
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny()


def one_by_one(model, n, seeds=None, **kw):
    return [
        generate_batch(model, [p], n, seeds=None if seeds is None else seeds[i], **kw)[0]
        for i, p in enumerate(PROMPTS)
    ]


def test_batched_equals_one_by_one_greedy(model):
    batched = generate_batch(model, PROMPTS, 12)
    assert batched == one_by_one(model, 12)
    assert all(len(r) == 12 for r in batched)
    assert len({tuple(r) for r in batched}) == len(PROMPTS)  # the rows really differ


@pytest.mark.parametrize("kw", [{}, {"top_k": 20}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.8}])
def test_batched_equals_one_by_one_sampled(model, kw):
    batched = generate_batch(model, PROMPTS, 12, temperature=1.0, seeds=3, **kw)
    assert batched == one_by_one(model, 12, seeds=[3, 4, 5, 6], temperature=1.0, **kw)
    # a list of seeds is the same as the int form; other seeds give other samples; not just greedy
    assert batched == generate_batch(model, PROMPTS, 12, temperature=1.0, seeds=[3, 4, 5, 6], **kw)
    assert batched != generate_batch(model, PROMPTS, 12, temperature=1.0, seeds=10, **kw)
    assert batched != generate_batch(model, PROMPTS, 12)


def test_greedy_with_cache_equals_full_recompute(model):
    batched = generate_batch(model, PROMPTS, 15)
    with torch.no_grad():
        for prompt, new in zip(PROMPTS, batched, strict=True):
            ids = list(prompt)
            for _ in range(15):  # no cache, no padding: the whole sequence again each step
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            assert new == ids[len(prompt) :]


def test_stop_ids_stop_each_row_independently(model):
    free = generate_batch(model, PROMPTS, 12)
    stops = {free[0][3], free[2][6]}

    def cut(row):
        for i, t in enumerate(row):
            if t in stops:
                return row[: i + 1]
        return row

    expected = [cut(r) for r in free]
    assert len({len(r) for r in expected}) > 1  # rows stop at different steps
    assert generate_batch(model, PROMPTS, 12, stop_ids=stops) == expected
    assert generate_batch(model, PROMPTS, 5) == [r[:5] for r in free]  # max_new_tokens respected


def test_finished_rows_leave_the_batch(model):
    free = generate_batch(model, PROMPTS, 10)
    stop = free[1][0]  # row 1 ends at its first token
    assert stop not in free[0][:4] + free[2][:4] + free[3][:4]
    shapes = []
    hook = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        out = generate_batch(model, PROMPTS, 4, stop_ids=[stop])
    finally:
        hook.remove()
    assert out[1] == [stop] and [len(r) for r in out] == [4, 1, 4, 4]
    # one prefill, then one length-1 step per new token for the rows still running; none after the last
    assert shapes == [(4, 11), (3, 1), (3, 1), (3, 1)]


def test_streaming_matches_and_interleaves(model):
    kw = {"temperature": 1.0, "top_k": 30, "seeds": 1, "stop_ids": [7, 8]}
    events = list(stream_batch(model, PROMPTS, 9, **kw))
    rows: list[list[int]] = [[] for _ in PROMPTS]
    for r, t in events:
        rows[r].append(t)
    assert rows == generate_batch(model, PROMPTS, 9, **kw)
    assert [r for r, _ in events[:4]] == [0, 1, 2, 3]  # one event per row per step, as produced


def test_a_row_the_caller_finishes_leaves_and_the_others_go_on(model):
    kw = {"temperature": 1.0, "top_k": 30, "seeds": 1}
    full = generate_batch(model, PROMPTS, 6, **kw)
    finished: set[int] = set()
    rows: list[list[int]] = [[] for _ in PROMPTS]
    shapes = []
    hook = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        for r, t in stream_batch(model, PROMPTS, 6, finished=finished, **kw):
            rows[r].append(t)
            if r == 1 and len(rows[1]) == 2:
                finished.add(1)  # e.g. a stop the caller found in the decoded text
    finally:
        hook.remove()
    assert rows[1] == full[1][:2]  # nothing after the caller finished it
    assert [rows[i] for i in (0, 2, 3)] == [full[i] for i in (0, 2, 3)]  # seeded rows do not notice
    assert shapes == [(4, 11), (4, 1), (3, 1), (3, 1), (3, 1), (3, 1)]  # no forward for row 1 after


def test_single_generate_is_the_batched_engine(model):
    for i, p in enumerate(PROMPTS):
        assert (
            list(generate(model, p, 8, temperature=1.0, top_p=0.9, seed=5 + i))
            == generate_batch(model, PROMPTS, 8, temperature=1.0, top_p=0.9, seeds=5)[i]
        )


def test_overflow_clamps_rows_and_rejects_full_prompts(model):
    long = list(range(60))
    assert token_budgets(model, [long, [1, 2]], 10) == [4, 10]
    out = generate_batch(model, [long, [1, 2]], 10)
    assert [len(r) for r in out] == [4, 10]  # the long row stops at the context's end
    assert out[1] == generate_batch(model, [[1, 2]], 10)[0]
    with pytest.raises(ChatforgeError, match="context is 64"):
        generate_batch(model, [[1, 2], list(range(64))], 5)
    with pytest.raises(ChatforgeError, match="context"):  # the single-prompt generator stays strict
        list(generate(model, long, 10))


@pytest.mark.parametrize(
    "prompts, kw, match",
    [
        ([[1], []], {}, "prompt 1 is empty"),
        ([[1, V]], {}, "vocabulary"),
        ([1, 2, 3], {}, "list of lists"),
        ([], {}, "non-empty"),
        ([[1], [2]], {"seeds": [1, 2, 3]}, "3 seeds for 2 prompts"),
        ([[1]], {"temperature": -1.0}, "temperature"),
        ([[1]], {"top_k": 0}, "top_k"),
        ([[1]], {"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_inputs_raise_chatforge_errors(model, prompts, kw, match):
    with pytest.raises(ChatforgeError, match=match):
        generate_batch(model, prompts, 3, **kw)


@pytest.mark.parametrize("layout", ["as trained", "decode layout", "decode layout in 2 parts"])
def test_decode_equals_naive_full_forward_greedy_loop(model, layout):
    fast = model
    if layout != "as trained":
        fast = decode_layout(copy.deepcopy(model), parts=2 if "parts" in layout else 1)
    for prompt in PROMPTS[:2]:
        new = list(generate(fast, prompt, 40))
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(40):  # no cache, no last_only, the plain model: everything recomputed each step
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert new == ids[len(prompt) :]


def test_cache_is_allocated_once_and_filled_exactly(model):
    calls = []

    def record(mod, args, kwargs):
        cache = kwargs["cache"]
        calls.append((id(cache), cache.max_len, cache.pos, args[0].size(1)))

    heads = []
    hooks = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        model.lm_head.register_forward_pre_hook(lambda mod, args: heads.append(args[0].size(1))),
    ]
    try:
        out = generate_batch(model, PROMPTS, 9)
    finally:
        for h in hooks:
            h.remove()
    L = max(len(p) for p in PROMPTS)
    assert [len(r) for r in out] == [9] * 4
    assert len({c[0] for c in calls}) == 1  # one cache for the whole call
    assert all(max_len == L + 9 - 1 for _, max_len, _, _ in calls)  # the last token is never fed back
    _, max_len, pos, t = calls[-1]
    assert pos + t == max_len  # filled to the last column, never past it
    assert heads == [1] * 9  # the prefill projects only its last position onto the vocabulary


def test_prompt_plus_new_tokens_at_the_context_edge(model):
    prompt = list(range(1, 51))
    assert len(list(generate(model, prompt, 64 - 50))) == 14  # exactly the context: fine
    with pytest.raises(ChatforgeError, match="exceeds the model's context of 64 tokens"):
        list(generate(model, prompt, 64 - 50 + 1))


def test_batch_decoder_rows_join_and_leave_at_any_step_and_match_generate(model):
    """Rows admitted while others run, a long prompt that moves the rows right, columns that run out
    and move them left, a row removed from the middle: each row's tokens are what it gets alone,
    and the live rows stay in admission order."""
    specs = [  # prompt, budget, sampling: greedy and seeded rows with their own settings
        ([3, 4, 5], 30, {}),
        (list(range(20, 45)), 20, {"temperature": 1.0, "top_k": 20}),
        ([9], 25, {"temperature": 0.8, "top_p": 0.9}),
        (list(range(100, 130)), 12, {}),
    ]
    rows = [
        Row(prompt=p, budget=b, generator=torch.Generator().manual_seed(i) if s else None, **s)
        for i, (p, b, s) in enumerate(specs)
    ]
    decoder = BatchDecoder(model, capacity=3, max_len=48)  # fewer columns than the rows span together
    out: dict[int, list[int]] = {id(r): [] for r in rows}

    def record(events):
        for row, token, finished in events:
            out[id(row)].append(token)
            assert finished == (len(out[id(row)]) == row.budget)  # no stop ids: only the budget ends a row
            assert (row in decoder.rows) != finished

    with torch.inference_mode():
        record(decoder.admit(rows[:1]))
        for _ in range(5):
            record(decoder.step())
        record(decoder.admit(rows[1:3]))  # 25 tokens join a batch written up to column 8: move right
        assert decoder.shifts == 1
        while len(out[id(rows[2])]) < 10:
            record(decoder.step())
        decoder.remove([rows[1]])  # leaves from the middle of the batch, unfinished
        assert decoder.rows == [rows[0], rows[2]]
        record(decoder.admit(rows[3:]))
        while decoder.rows:
            record(decoder.step())
    assert decoder.shifts >= 2  # the columns ran out at least once, so the rows moved left
    for i, (prompt, budget, s) in enumerate(specs):
        alone = generate_batch(model, [prompt], budget, seeds=i if s else None, **s)[0]
        got = out[id(rows[i])]
        assert got == (alone[: len(got)] if i == 1 else alone) and len(got) == (10 if i == 1 else budget)
    with pytest.raises(ChatforgeError, match="free rows"):
        BatchDecoder(model, capacity=1, max_len=48).admit(
            [Row(prompt=[1], budget=2), Row(prompt=[2], budget=2)]
        )
