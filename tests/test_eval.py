"""Evaluation: bpb against hand computations, MC scoring with rigged models, loaders (fixtures and the
real shared files when present), GSM8K answer extraction, WorldQA scoring, the runner and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.checkpoint import save_model
from chatforge.errors import ChatforgeError
from chatforge.eval import (
    GSM8K,
    BitsPerByte,
    EvalContext,
    MCExample,
    MultipleChoice,
    TaskResult,
    WorldQA,
    bits_per_byte,
    cmd_eval,
    contains_answer,
    evaluate,
    extract_answer,
    forward_qas,
    load_gsm8k,
    load_mc,
    load_qa_file,
    results_markdown,
    reverse_qas,
    run_tasks,
    score_choices,
    write_results,
)
from chatforge.eval.base import generate_greedy
from chatforge.eval.bpb import pack_rows
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import EvalOptions, parse
from chatforge.tokenizer import Tokenizer
from chatforge.world import QA, build_world, load_world, write_world

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_cfg(vocab_size: int, seq_len: int = 64) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)


class Bigram(nn.Module):
    """A rigged model with GPT's call signature: the next-token logits are table[current token]."""

    def __init__(self, table: torch.Tensor, seq_len: int = 64) -> None:
        super().__init__()
        self.cfg = tiny_cfg(table.size(0), seq_len)
        self.table = nn.Parameter(table.clone().float())

    def forward(self, idx, targets=None, *, cache=None, loss_reduction="mean", **kw):
        logits = self.table[idx]
        if targets is None:
            return logits
        V = logits.size(-1)
        return F.cross_entropy(
            logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


def prefer(vocab_size: int, ids: list[int], boost: float = 5.0) -> Bigram:
    """Rigged to put `boost` extra logit on `ids`, whatever came before."""
    bias = torch.zeros(vocab_size)
    bias[ids] = boost
    return Bigram(bias.expand(vocab_size, vocab_size))


class Scripted(nn.Module):
    """Greedy generation from this model yields `script` (its last token repeated after that)."""

    def __init__(self, vocab_size: int, script: list[int], seq_len: int = 128) -> None:
        super().__init__()
        self.cfg = tiny_cfg(vocab_size, seq_len)
        self.script = script
        self.step = 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, *, cache=None, **kw):
        B, T = idx.shape
        self.step = 0 if T > 1 else self.step + 1  # a prefill starts a new reply
        if cache is not None:
            cache.pos += T
        logits = torch.zeros(B, T, self.cfg.vocab_size)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        return logits


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("world") / "world"
    write_world(build_world(3, 12, 2), d, paraphrases=2)
    return d


@pytest.fixture(scope="module")
def tok(world_dir) -> Tokenizer:
    texts = [json.loads(line)["text"] for line in open(world_dir / "pretrain.jsonl", encoding="utf-8")]
    extra = ["the cat and the dog went to the market with the other animals. " * 3] * 5
    return Tokenizer.train(texts + extra, 400)


def ctx_for(model, tok, **kw) -> EvalContext:
    return EvalContext(model, tok, "cpu", **kw)


# ---- bits per byte ---------------------------------------------------------------------------


def test_bits_per_byte_matches_hand_computation():
    torch.manual_seed(0)
    table = torch.randn(5, 5)
    model = Bigram(table)
    token_bytes = torch.tensor([0, 1, 2, 3, 1])  # id 0 is a special token: no bytes
    x = torch.tensor([[0, 1, 2, 3], [4, 3, 0, 2]])
    y = torch.tensor([[1, 2, 3, 0], [3, 0, 4, -1]])
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    model.train()
    loss, bpb = bits_per_byte(model, batches, token_bytes, "cpu")
    assert model.training  # mode restored

    nats, n, nats_b, n_bytes = 0.0, 0, 0.0, 0
    for xs, ys in zip(x.tolist(), y.tolist(), strict=True):
        for a, b in zip(xs, ys, strict=True):
            if b < 0:
                continue
            row = table[a].tolist()
            nll = math.log(sum(math.exp(v) for v in row)) - row[b]
            nats += nll
            n += 1
            if token_bytes[b] > 0:
                nats_b += nll
                n_bytes += int(token_bytes[b])
    assert loss == pytest.approx(nats / n, rel=1e-6)
    assert bpb == pytest.approx(nats_b / math.log(2) / n_bytes, rel=1e-6)


def test_bits_per_byte_without_bytes_is_an_error():
    model = Bigram(torch.zeros(3, 3))
    x = torch.tensor([[1, 2]])
    with pytest.raises(ChatforgeError, match="no predicted bytes"):
        bits_per_byte(model, [(x, torch.full_like(x, -1))], torch.tensor([0, 1, 1]), "cpu")


def test_pack_rows_predicts_every_token_once():
    x, y = pack_rows([[0, 5, 6, 7], [0, 8, 9]], seq_len=3)
    assert y[y >= 0].tolist() == [5, 6, 7, 0, 8, 9]
    assert x.tolist() == [[0, 5, 6], [7, 0, 8]]


def test_bpb_task_packs_texts_and_matches_hand_computation(tok):
    torch.manual_seed(1)
    V = tok.vocab_size
    table = torch.randn(V, V)
    texts = ["Port Vesk is a city by the sea.", "the cat and the dog", "Ambermoor, 1975."]
    res = run_tasks(ctx_for(Bigram(table, seq_len=8), tok, batch_size=3), [BitsPerByte(texts)])[0]

    stream = [t for s in texts for t in [tok.bos_id, *tok.encode(s)]]
    nbytes = tok.token_byte_lengths()
    logp = F.log_softmax(table, dim=-1)
    nats = sum(-float(logp[a, b]) for a, b in zip(stream[:-1], stream[1:], strict=True) if nbytes[b] > 0)
    total = sum(nbytes[b] for b in stream[1:])
    assert res.metric == "bpb" and res.n == 3
    assert res.value == pytest.approx(nats / math.log(2) / total, rel=1e-5)
    assert res.extra["tokens"] == len(stream) - 1


# ---- multiple choice -------------------------------------------------------------------------


def test_mc_picks_what_the_rigged_model_prefers(tok):
    ex = [MCExample("Question: Which animal barks?\nAnswer:", ["cat", "dog"], gold=1)]
    cat, dog = tok.encode(" cat"), tok.encode(" dog")
    assert not set(cat) & set(dog)
    right = MultipleChoice(ex, "mc").run(ctx_for(prefer(tok.vocab_size, dog), tok))
    wrong = MultipleChoice(ex, "mc").run(ctx_for(prefer(tok.vocab_size, cat), tok))
    assert (right.value, right.extra["accuracy_norm"]) == (1.0, 1.0)
    assert (wrong.value, wrong.extra["accuracy_norm"]) == (0.0, 0.0)
    assert wrong.details[0]["prediction"] == 0 and wrong.details[0]["gold"] == 1
    assert right.extra["chance"] == 0.5


def test_length_normalisation_changes_the_pick(tok):
    short, long_ = "a", "the the the"
    ids_s, ids_l = tok.encode(" " + short), tok.encode(" " + long_)
    # the constructed case: fewer tokens for the short choice, but more tokens per byte
    assert len(ids_s) < len(ids_l) and len(ids_l) / len(" " + long_) < len(ids_s) / len(" " + short)
    uniform = Bigram(torch.zeros(tok.vocab_size, tok.vocab_size))
    res = MultipleChoice([MCExample("Question: q\nAnswer:", [short, long_], 1)], "mc").run(
        ctx_for(uniform, tok)
    )
    assert res.value == 0.0  # raw sum prefers the choice with fewer tokens
    assert res.extra["accuracy_norm"] == 1.0
    logV = math.log(tok.vocab_size)
    assert res.details[0]["logprobs"] == pytest.approx([-len(ids_s) * logV, -len(ids_l) * logV], abs=1e-3)


def test_mc_scores_do_not_depend_on_batching(tok):
    torch.manual_seed(0)
    model = GPT(tiny_cfg(tok.vocab_size)).eval()
    examples = [
        MCExample("Question: Where was she born?\nAnswer:", ["Port Vesk", "Ambermoor", "a"], 0),
        MCExample("The cat", ["and the dog went to the market", "sat"], 1),
    ]
    one = score_choices(model, tok, examples, batch_size=1)
    many = score_choices(model, tok, examples, batch_size=5)
    assert [len(s) for s in one] == [3, 2]
    for a, b in zip(one, many, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # by hand: log p(choice tokens | BOS + context) from one unpadded forward pass
    ctx_ids = [tok.bos_id, *tok.encode(examples[1].context)]
    cont = tok.encode(" " + examples[1].choices[0])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx_ids + cont[:-1]]))[0], dim=-1)
    want = sum(float(logp[len(ctx_ids) - 1 + k, t]) for k, t in enumerate(cont))
    assert one[1][0] == pytest.approx(want, abs=1e-4)


def test_mc_truncates_long_contexts(tok):
    model = Bigram(torch.zeros(tok.vocab_size, tok.vocab_size), seq_len=8)
    ex = [MCExample("word " * 50, ["cat", "the the the"], 0)]
    scores = score_choices(model, tok, ex)  # 50+ tokens of context in a window of 8
    assert scores[0][0] == pytest.approx(-math.log(tok.vocab_size), abs=1e-4)


# ---- multiple-choice loaders -----------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_load_arc_layouts(tmp_path):
    foundry = jsonl(
        tmp_path / "arc.jsonl", [{"query": "Question: Why?", "choices": ["a", "b", "c"], "gold": 2}]
    )
    [ex] = load_mc(foundry)
    assert ex.context == "Question: Why?\nAnswer:" and ex.gold == 2 and ex.choices == ["a", "b", "c"]
    hf = {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    ai2 = {
        "question": {"stem": "How?", "choices": [{"text": "p", "label": "1"}, {"text": "q", "label": "2"}]}
    }
    ai2["answerKey"] = "1"
    a, b = load_mc(jsonl(tmp_path / "arc_hf.jsonl", [hf, ai2]))
    assert (a.context, a.choices, a.gold) == ("Question: Why?\nAnswer:", ["x", "y"], 1)
    assert (b.context, b.choices, b.gold) == ("Question: How?\nAnswer:", ["p", "q"], 0)


def test_load_hellaswag_layouts(tmp_path):
    row = {
        "activity_label": "Baking",
        "ctx": "A man mixes flour. he",
        "endings": ["e0", "e1 [step] x", "e2", "e3"],
    }
    [ex] = load_mc(jsonl(tmp_path / "hs.jsonl", [{**row, "label": "1"}]))
    assert ex.context == "Baking: A man mixes flour. he" and ex.gold == 1 and ex.choices[1] == "e1 x"
    txt = write(tmp_path / "hs.txt", "Ctx one: a b\n2\nw\nx\ny\nz\nCtx two\n0\np\nq\nr\ns\n")
    a, b = load_mc(txt)
    assert (a.context, a.gold, a.choices) == ("Ctx one: a b", 2, ["w", "x", "y", "z"])
    assert (b.context, b.gold) == ("Ctx two", 0)
    with pytest.raises(ChatforgeError, match="line 8: expected the gold label"):
        load_mc(write(tmp_path / "bad.txt", "c\n1\na\nb\nc\nd\nc2\nX\na\nb\nc\nd\n"))


def test_load_mmlu_layouts(tmp_path, tok):
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "1+1?", "choices": ["2", "5"], "answer": "A"},
    ]
    a, b = load_mc(jsonl(tmp_path / "mmlu.jsonl", rows))
    assert (a.gold, b.gold, a.context) == (1, 0, "Question: 2+2?\nAnswer:")
    folder = tmp_path / "test"
    folder.mkdir()
    write(folder / "algebra_test.csv", 'question,choice0,choice1,choice2,choice3,answer\n"x, y?",a,b,c,d,3\n')
    write(
        folder / "history_test.csv", "Who?,a,b,c,d,B\nWhen?,a,b,c,d,A\n"
    )  # the original: no header, letters
    exs = load_mc(folder)
    assert [(e.group, e.gold) for e in exs] == [("algebra", 3), ("history", 1), ("history", 0)]
    assert exs[0].context == "Question: x, y?\nAnswer:"
    res = MultipleChoice(exs, "mc").run(ctx_for(Bigram(torch.zeros(tok.vocab_size, tok.vocab_size)), tok))
    assert set(res.groups) == {"algebra", "history"} and res.groups["history"]["n"] == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n\n{"query": "Q", "choices": ["a", "b"], "gold": 0\n',
            "line 3",
        ),
        (
            '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q", "choices": ["a", "b"], "gold": 7}\n',
            "line 2",
        ),
        ('{"foo": 1}\n', "line 1: unknown multiple-choice layout"),
        (
            '{"question": "Q", "choices": ["a"], "answer": 0}\n',
            "line 1: 'choices' must be a list of at least two",
        ),
    ],
)
def test_malformed_mc_lines_name_the_line(tmp_path, bad, match):
    path = write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(ChatforgeError, match=match) as e:
        load_mc(path)
    assert "bad.jsonl" in str(e.value)


def test_bad_mmlu_csv_row(tmp_path):
    with pytest.raises(ChatforgeError, match="line 3: answer 'E'"):
        load_mc(write(tmp_path / "x.csv", "question,c0,c1,answer\nQ,a,b,1\nQ,a,b,E\n"))


@pytest.mark.parametrize(
    "rel",
    ["arc/arc_easy.jsonl", "arc/arc_challenge.jsonl", "mmlu/dev", "hellaswag/hellaswag_val_full.txt.bz2"],
)
def test_real_mc_files_load(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not present")
    examples = load_mc(path)
    assert len(examples) >= 1
    assert all(0 <= e.gold < len(e.choices) and e.context for e in examples)


# ---- GSM8K -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("so she pays 1000 + 234.\n#### 1,234", "1234"),
        ("The answer is 7.", "7"),
        ("no digits here", None),
        ("first 3 then 12.0", "12"),
        ("#### -5 apples, 9 pears", "-5"),
        ("#### $2.50", "2.5"),
        ("#### none; but 8 earlier", "8"),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_gsm8k_loader_and_task(tmp_path, tok):
    path = jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "Natalia sold 48 clips.", "answer": "48+24 = 72\n#### 72"},
            {"question": "Q2", "answer": "#### 5"},
        ],
    )
    problems = load_gsm8k(path)
    assert [p.answer for p in problems] == ["72", "5"]
    script = tok.encode("So #### 72") + [tok.special_id("<|im_end|>")]
    res = GSM8K(problems, max_new_tokens=20).run(ctx_for(Scripted(tok.vocab_size, script), tok))
    assert res.value == 0.5 and res.n == 2
    assert [d["correct"] for d in res.details] == [True, False]
    assert res.details[0]["prediction"] == "So #### 72" and res.details[1]["extracted"] == "72"
    with pytest.raises(ChatforgeError, match="line 2: the answer must end with '#### <number>'"):
        load_gsm8k(
            jsonl(
                tmp_path / "bad.jsonl",
                [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "7"}],
            )
        )


def test_real_gsm8k_loads():
    path = SHARED / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    problems = load_gsm8k(path)
    assert len(problems) >= 1 and problems[0].answer == "72"


# ---- world QA --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, gold, ok",
    [
        ("She was born in Port Vesk.", "Port Vesk", True),
        ("She was born in Port Veskland.", "Port Vesk", False),
        ("  PORT   vesk!", "Port Vesk", True),
        ("Born on March 31, 1975.", "March 3, 1975", False),
        ("Born on March 3, 1975.", "March 3, 1975", True),
        ("Her mother is Talira Oskedahl", "Talira Oskedahl.", True),
        ("", "Port Vesk", False),
    ],
)
def test_contains_answer(reply, gold, ok):
    assert contains_answer(reply, gold) is ok


def test_world_qa_end_to_end_with_scripted_reply(tok):
    qas = [
        QA("Where was Ana born?", "Port Vesk", "birth_city", 1),
        QA("Where was Bo born?", "Ambermoor", "birth_city", 2),
        QA("Who employs Ana?", "Port Vesk Shipping", "employer", 1),
    ]
    script = tok.encode("She was born in Port Vesk.") + [tok.special_id("<|im_end|>")]
    res = WorldQA(qas, "world_forward").run(ctx_for(Scripted(tok.vocab_size, script), tok, batch_size=2))
    assert [d["correct"] for d in res.details] == [True, False, False]
    assert res.details[0]["prediction"] == "She was born in Port Vesk."  # stop token removed
    assert res.value == pytest.approx(1 / 3)
    assert res.groups == {"birth_city": {"value": 0.5, "n": 2}, "employer": {"value": 0.0, "n": 1}}


def test_generation_budget_is_clipped_to_the_context():
    model = Scripted(50, [7, 8, 9], seq_len=30)
    prompts = [[1] * 10, [1] * 30, [1] * 25]
    outs = generate_greedy(model, prompts, 50, stop_ids=[3], batch_size=4)
    assert outs[1] is None  # no room left to answer
    assert [len(outs[0]), len(outs[2])] == [20, 5]
    assert outs[2] == [7, 8, 9, 9, 9]
    stopped = generate_greedy(Scripted(50, [7, 3, 9]), [[1, 1]], 10, stop_ids=[3])
    assert stopped == [[7]]  # the stop token ends the reply and is dropped


def test_prompts_that_fill_the_context_are_counted_not_scored(tok):
    qa = QA("Where was Ana born?", "Port Vesk", "birth_city", 1)
    script = tok.encode("Port Vesk") + [tok.special_id("<|im_end|>")]
    res = WorldQA([qa, qa], "w").run(ctx_for(Scripted(tok.vocab_size, script, seq_len=6), tok))
    assert (res.value, res.n, res.skipped) == (None, 0, 2)
    assert res.skip_reason == "longer than the model's 6-token context"
    assert res.details[0]["skipped"] and "correct" not in res.details[0]
    assert res.describe() == "w: nothing scored (n=0, skipped 2: longer than the model's 6-token context)"


def test_gsm8k_scores_only_the_problems_that_fit(tmp_path, tok):
    """A long problem is skipped and said; the accuracy is over the one that fit, not diluted by a 0."""
    short = {"question": "What is 2+3?", "answer": "#### 5"}
    long = {"question": "Natalia sold clips to her friends in April and May " * 6, "answer": "#### 72"}
    problems = load_gsm8k(jsonl(tmp_path / "gsm.jsonl", [short, long]))
    script = tok.encode("#### 5") + [tok.special_id("<|im_end|>")]
    model = Scripted(tok.vocab_size, script, seq_len=40)
    assert len(tok.encode(long["question"])) > 40 > len(tok.encode(short["question"])) + 10
    res = GSM8K(problems, max_new_tokens=8).run(ctx_for(model, tok))
    assert (res.value, res.n, res.skipped) == (1.0, 1, 1)
    assert (
        res.describe() == "gsm8k accuracy = 1.0000 (n=1, skipped 1: longer than the model's 40-token context)"
    )
    table = results_markdown([res])
    assert "| gsm8k | accuracy | 1.0000 | 1 |" in table and "gsm8k: 1 skipped, longer than" in table
    res = GSM8K(problems[1:], max_new_tokens=8).run(ctx_for(model, tok))
    assert (res.value, res.n, res.skipped) == (None, 0, 1)
    assert "| gsm8k | accuracy | – | 0 |" in results_markdown([res])


def test_missing_benchmark_files_say_where_to_get_them(tmp_path):
    for load, name in ((load_gsm8k, "gsm8k.jsonl"), (load_mc, "arc_easy.jsonl")):
        with pytest.raises(ChatforgeError) as e:
            load(tmp_path / name)
        assert "curl -LO https://" in str(e.value) and "\n" not in str(e.value)


def test_world_question_sets(world_dir):
    world = load_world(world_dir)
    fwd = forward_qas(world)
    assert {qa.person_id for qa in fwd} == {p.id for p in world.visible}
    per_person = [qa for qa in fwd if qa.person_id == world.visible[0].id]
    assert len({qa.attribute for qa in per_person}) == len(per_person)  # one phrasing per attribute
    assert forward_qas(world, seed=0) == fwd  # deterministic
    one = world.visible[0].id
    assert forward_qas(world, [one]) == per_person  # the phrasing does not depend on who else is asked
    rev = reverse_qas(world)
    for qa in rev:
        child = world.child_of(world.person(qa.person_id))
        assert qa.attribute == "child" and qa.answer == child.name and not child.held_out


def test_load_qa_file(tmp_path):
    good = jsonl(
        tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A", "attribute": "job", "person_id": 4}]
    )
    assert load_qa_file(good) == [QA("Q?", "A", "job", 4)]
    bad = write(tmp_path / "bad.jsonl", '{"question": "Q?", "answer": "A"}\n{"question": "Q?"}\n')
    with pytest.raises(ChatforgeError, match="line 2"):
        load_qa_file(bad)


# ---- runner, reporting, CLI ------------------------------------------------------------------


class Constant:
    """The smallest Task: reports a fixed value (the protocol needs only name and run)."""

    name = "constant"

    def run(self, ctx):
        return TaskResult(
            self.name,
            "accuracy",
            0.25,
            4,
            [{"prompt": "p", "gold": "g", "prediction": "x", "correct": False}],
        )


def test_run_tasks_and_write_results(tmp_path, tok):
    ex = [MCExample("Question: Which animal barks?\nAnswer:", ["cat", "dog"], gold=1)] * 3
    ctx = ctx_for(prefer(tok.vocab_size, tok.encode(" dog")), tok)
    results = run_tasks(ctx, [MultipleChoice(ex, "mc:barks"), Constant()])
    out = write_results(results, tmp_path / "out", {"model": "rigged"})
    doc = json.loads((out / "eval.json").read_text())
    assert doc["model"] == "rigged"
    got = {r["task"]: (r["metric"], r["value"], r["n"]) for r in doc["results"]}
    assert got == {"mc:barks": ("accuracy", 1.0, 3), "constant": ("accuracy", 0.25, 4)}
    assert len(doc["results"][0]["details"]) == 3
    md = (out / "eval.md").read_text()
    assert "| mc:barks | accuracy | 1.0000 | 3 |" in md and "| constant | accuracy | 0.2500 | 4 |" in md
    assert "| mc:barks | accuracy_norm | 1.0000 | 3 |" in md
    assert results_markdown(results) in md
    assert not list(out.glob(".*"))  # no temp files left behind


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run") / "run"
    save_model(d, GPT(tiny_cfg(tok.vocab_size, seq_len=96)), tok.to_json(), {"stage": "test", "step": 0})
    return d


def test_evaluate_end_to_end(tmp_path, run_dir, world_dir, tok):
    mc = jsonl(
        tmp_path / "arc_tiny.jsonl",
        [{"query": "Question: Which barks?", "choices": ["cat", "dog"], "gold": 1}] * 2,
    )
    gsm = jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}])
    qa = jsonl(
        tmp_path / "eval_forward.jsonl",
        [{"question": "Who?", "answer": "Ana", "attribute": "x", "person_id": 1}],
    )
    results = evaluate(
        run_dir,
        ["bpb", "world_forward", "world_reverse", "qa", "mc", "gsm8k"],
        world_dir=world_dir,
        qa_file=qa,
        mc_files=[mc],
        gsm8k_file=gsm,
        max_examples=3,
        max_new_tokens=8,
        out_dir=tmp_path / "out",
    )
    by = {r.task: r for r in results}
    assert list(by) == ["bpb", "world_forward", "world_reverse", "qa:eval_forward", "mc:arc_tiny", "gsm8k"]
    n_heldout = sum(1 for _ in open(world_dir / "heldout.jsonl"))
    assert by["bpb"].n == min(3, n_heldout)
    # a freshly initialised model predicts nearly uniformly: loss ~ ln(vocab)
    assert by["bpb"].extra["loss_nats"] == pytest.approx(math.log(tok.vocab_size), abs=0.1)
    assert by["world_forward"].n == 3 and by["mc:arc_tiny"].n == 2 and by["gsm8k"].n == 1
    for r in results[1:]:
        assert 0.0 <= r.value <= 1.0
    doc = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["task"] for r in doc["results"]] == list(by)
    assert doc["stage"] == "test"


def test_evaluate_input_errors(run_dir, world_dir):
    with pytest.raises(ChatforgeError, match="unknown task"):
        evaluate(run_dir, ["nope"])
    with pytest.raises(ChatforgeError, match="--world"):
        evaluate(run_dir, ["world_forward"])
    with pytest.raises(ChatforgeError, match="nothing to evaluate"):
        evaluate(run_dir, [])


def test_cmd_eval_prints_the_table(tmp_path, run_dir, world_dir, capsys):
    args = parse(
        EvalOptions,
        ["--model", str(run_dir), "--world", str(world_dir), "--tasks", "bpb,world_reverse"]
        + ["--max-examples", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "o")],
    )
    cmd_eval(args)
    out = capsys.readouterr().out
    assert (
        "| task | metric | value | n |" in out
        and "| bpb | bpb |" in out
        and "| world_reverse | accuracy |" in out
    )
    assert (tmp_path / "o" / "eval.md").is_file()


def test_cmd_eval_shows_a_bar_and_the_skipped_questions(tmp_path, run_dir, tok, capsys):
    """The run folder's model has a 96-token context: the long problem is skipped, the short one scored."""
    gsm = jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2+3?", "answer": "#### 5"},
                                         {"question": "the cat and the dog " * 40, "answer": "#### 1"}])  # fmt: skip
    cmd_eval(parse(EvalOptions, ["--model", str(run_dir), "--gsm8k", str(gsm), "--max-new-tokens", "2"]))
    out, err = capsys.readouterr()
    assert "| gsm8k | accuracy |" in out and "| 1 |" in out
    assert "gsm8k: 1 skipped, longer than the model's 96-token context" in out
    assert "skipped 1: longer than the model's 96-token context" in err
    assert re.search(r"gsm8k: +\d+%.*\| *\d/2 \[", err)  # a bar over the task's two questions
    cmd_eval(parse(EvalOptions, ["--model", str(run_dir), "--gsm8k", str(gsm), "--max-new-tokens", "2",
                                 "--no-progress"]))  # fmt: skip
    assert not re.search(r"\d+/2 ", capsys.readouterr().err)


def test_eval_context_rejects_bad_values(tok):
    with pytest.raises(ChatforgeError, match="max_examples"):
        EvalContext(Bigram(torch.zeros(3, 3)), tok, max_examples=0)
