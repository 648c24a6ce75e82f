"""Thinking strategies: the spec syntax and its errors, answer extraction, voting, tree search on a
scripted toy problem, the Game-of-24 solver and step labels, and every strategy on a tiny random
model with its tokens counted against what the engine generated."""

import math
import random
from fractions import Fraction

import pytest
import torch

from chatforge import engine, think
from chatforge.align.reward import RewardModel
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tasks import (
    Game24,
    Problem,
    WorldSteps,
    _fmt,
    _key,
    _moves,
    _step_result,
    eval_expression,
    solutions,
    solvable,
)
from chatforge.think import (
    Thinker,
    ThinkSpec,
    extract_answer,
    majority_vote,
    parse_request_think,
    parse_spec,
    tree_search,
)
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the dial ------------------------------------------------------------------------------------


def test_spec_syntax_reads_back():
    assert parse_spec("direct") == ThinkSpec("direct")
    assert parse_spec("CoT") == ThinkSpec("cot")
    assert parse_spec("8") == ThinkSpec("vote", 8)
    assert parse_spec("vote:8") == ThinkSpec("vote", 8)
    assert parse_spec("best-of:4:prm") == ThinkSpec("best-of", 4, "prm")
    assert parse_spec("best-of:4") == ThinkSpec("best-of", 4, "orm")
    assert parse_spec("tree:b5d3") == ThinkSpec("tree", 5, "prm", 3)
    for text in ("direct", "cot", "vote:8", "best-of:4:oracle", "tree:b5d3"):
        assert str(parse_spec(text)) == text
    assert parse_request_think({"strategy": "vote", "n": 3}) == ThinkSpec("vote", 3)
    assert parse_request_think({"strategy": "tree", "n": 2, "depth": 4}) == ThinkSpec("tree", 2, "prm", 4)


@pytest.mark.parametrize(
    "text, says",
    [
        ("ponder", "unknown thinking strategy"),
        ("vote:0", "at least 1"),
        ("vote:-3", "at least 1"),
        ("0", "at least 1"),
        ("best-of:x:orm", "whole number"),
        ("best-of:4:judge", "unknown verifier"),
        ("tree:5x3", "tree:bBdD"),
        ("tree:b0d3", "at least 1"),
    ],
)
def test_bad_specs_are_one_line_naming_the_fix(text, says):
    with pytest.raises(ChatforgeError, match=says) as e:
        parse_spec(text)
    assert "\n" not in str(e.value) and "e.g." in str(e.value) or "write" in str(e.value)


def test_request_think_must_be_a_string_or_object():
    with pytest.raises(ChatforgeError, match='"think" must be'):
        parse_request_think([1, 2])


# ---- answers and votes ---------------------------------------------------------------------------


def test_answer_extraction():
    g, w = Game24(), WorldSteps()
    assert g.extract("4 * 6 = 24 (left: 24)\nAnswer: (4 *  6) * (1 * 1) = 24") == "(4 * 6) * (1 * 1)"
    assert g.extract("4 * 6 = 24 (left: 24)") is None
    assert w.extract("1. Ben is 34 + 7 = 41.\nAnswer: 104") == "104"
    assert w.extract("Answer: about -5 years") == "-5"
    assert extract_answer("so the total is 1,234 apples") == "1234"
    assert extract_answer("Answer: Paris") == "Paris"
    assert extract_answer("no idea") is None


def test_majority_vote_and_deterministic_tie_break():
    assert majority_vote(["3", "5", "5", None, "3", "5"]) == ("5", 1)
    # a tie goes to the answer seen first, whatever the counts' order
    assert majority_vote(["7", "9", "9", "7"]) == ("7", 0)
    assert majority_vote([None, "9", "7", "7", "9"]) == ("9", 1)
    assert majority_vote([None, None]) == (None, -1)


# ---- tree search ---------------------------------------------------------------------------------


def test_tree_search_backtracks_to_the_optimal_path():
    """A toy tree: 'a' looks best at the first level but every child of it is a dead end (value -inf,
    pruned), so the search must come back to 'b', whose path b -> y -> goal is the only solution."""
    children = {
        (): ["a", "b", "c"],
        ("a",): ["x1", "x2"],
        ("b",): ["y", "z"],
        ("c",): ["w"],
        ("b", "y"): ["goal"],
    }
    value_of = {"a": 0.9, "b": 0.6, "c": 0.1, "y": 0.8, "z": 0.2, "w": 0.05, "goal": 1.0}
    calls = []

    def propose(states):
        calls.append(list(states))
        return [children.get(s, []) for s in states]

    def value(states):
        return [value_of.get(s[-1], -math.inf) for s in states]

    nodes = tree_search(propose, value, lambda s: s[-1] == "goal", breadth=1, depth=4, prune_below=0.0)
    assert nodes[0].steps == ("b", "y", "goal") and nodes[0].done
    assert calls[0] == [()] and calls[1] == [("a",)] and calls[2] == [("b",)]  # a, dead end, back to b


def test_tree_search_keeps_the_beam_breadth_and_batches_each_level():
    widths = []

    def propose(states):
        widths.append(len(states))
        return [[f"{len(s)}{i}" for i in range(3)] for s in states]

    nodes = tree_search(
        propose, lambda ss: [float(s[-1][-1]) for s in ss], lambda s: False, breadth=2, depth=3
    )
    assert widths == [1, 2, 2]
    assert nodes[0].steps == ("02", "12", "22")


def test_searches_in_lockstep_find_what_each_finds_alone():
    from chatforge.think import run_lockstep, search_steps

    def propose(states):
        return [[f"{len(s)}{(len(s) + i) % 4}" for i in range(3)] for s in states]

    def value_for(offset):
        return lambda states: [((int(s[-1][-1]) + offset) % 4) / 4 for s in states]

    done = lambda s: len(s) == 3  # noqa: E731
    alone = [tree_search(propose, value_for(k), done, breadth=2, depth=3) for k in range(3)]
    calls = []

    def propose_many(ids, asks):
        calls.append(ids)
        return [propose(states) for states in asks]

    together = run_lockstep(
        [search_steps(done, 2, 3) for _ in range(3)],
        propose_many,
        lambda ids, asks: [value_for(i)(states) for i, states in zip(ids, asks, strict=True)],
    )
    assert [[n.steps for n in r] for r in together] == [[n.steps for n in r] for r in alone]
    assert calls == [[0, 1, 2]] * 3  # one proposer call per level for all three searches


# ---- the tasks -----------------------------------------------------------------------------------


def test_game24_solver_and_checker():
    assert solvable((Fraction(4), Fraction(6))) and not solvable((Fraction(1), Fraction(1)))
    sols = solutions([1, 5, 5, 5])  # needs a fraction: 5 * (5 - 1/5)
    g = Game24()
    p = Problem("game24", "1 5 5 5", "", {"numbers": [1, 5, 5, 5]})
    assert sols and all(g.step_labels(p, s) == [True] * 4 for s in sols)
    assert any("1/5" in step for s in sols for step in s)
    assert all(g.check(p, g.extract(s[-1])) for s in sols)
    assert not g.check(p, "5 * 5 - 1 + 5") and not g.check(p, "(5 + 5 + 5) + 9")
    assert eval_expression("2 ** 3") is None and eval_expression("1 / 0") is None
    assert solutions([1, 1, 1, 1]) == []


def test_game24_puzzles_load_by_rank(tmp_path):
    csv = tmp_path / "24.csv"
    csv.write_text("Rank,Puzzles,AMT (s)\n1,1 1 4 6,4.4\n2,1 1 11 11,4.41\n3,4 4 10 10,5\n")
    ps = Game24().load(csv, (2, 3))
    assert [p.data["rank"] for p in ps] == [2, 3]
    assert all(Game24().check(p, p.answer.split("=")[0]) for p in ps)
    with pytest.raises(ChatforgeError, match="24.csv"):
        Game24().load(tmp_path / "missing.csv", (1, 2))


def test_step_labels_mark_the_first_wrong_step():
    rng = random.Random(0)
    for task, problems in ((Game24(), None), (WorldSteps(), WorldSteps().make(5, 0))):
        if problems is None:
            problems = [
                Problem("game24", q, "", {"numbers": [int(x) for x in q.split()]})
                for q in ("1 1 4 6", "3 3 8 8")
            ]
        for p in problems:
            trace = task.traces(p, rng, 1)[0]
            assert task.step_labels(p, trace) == [True] * len(trace)
            for i in range(len(trace)):
                wrong = task.wrong_step(p, trace, i, rng)
                labels = task.step_labels(p, [*trace[:i], wrong, *trace[i + 1 :]])
                assert labels == [True] * i + [False] + [None] * (len(trace) - i - 1), (trace, i, wrong)


def test_game24_wrong_answer_line_is_a_near_miss():
    """A made-up wrong answer differs from the right one in one operator or number, so a verifier
    learns to check the expression, not its look."""
    g, rng = Game24(), random.Random(0)
    for q in ("1 1 4 6", "3 3 8 8", "4 4 6 8"):
        p = Problem("game24", q, "", {"numbers": [int(x) for x in q.split()]})
        for trace in g.traces(p, rng, 5):
            wrong = g.wrong_step(p, trace, 3, rng)
            right = trace[3]
            assert wrong.startswith("Answer: ") and not g.check(p, g.extract(wrong))
            assert len(wrong.split()) == len(right.split())
            assert sum(a != b for a, b in zip(wrong.split(), right.split(), strict=True)) == 1


def test_game24_wrong_steps_cover_the_slips_a_model_makes():
    """Dead ends, miscounted results, misstated lists of what is left and operands that are not
    there all come out, and every one is labelled wrong."""
    g, rng = Game24(), random.Random(1)
    seen = set()
    for q in ("1 1 4 6", "3 3 8 8", "4 4 6 8", "2 5 7 11"):
        p = Problem("game24", q, "", {"numbers": [int(x) for x in q.split()]})
        for trace in g.traces(p, rng, 4):
            for i in range(3):
                wrong = g.wrong_step(p, trace, i, rng)
                assert g.step_labels(p, [*trace[:i], wrong]) == [True] * i + [False]
                a, op, b, _, r, left = wrong.replace("(left: ", "").rstrip(")").split(" ", 5)
                nums = _key(p.data["numbers"])
                for s in trace[:i]:
                    nums = _step_result(nums, s)
                move = [m for m in _moves(nums) if (_fmt(m[0]), m[1], _fmt(m[2])) == (a, op, b)]
                if not move:
                    seen.add("operand")
                elif _fmt(move[0][3]) != r:
                    seen.add("result")
                elif left != " ".join(_fmt(x) for x in move[0][4]):
                    seen.add("left")
                else:
                    seen.add("dead end")
    assert seen == {"operand", "result", "left", "dead end"}


def test_verifier_pairs_branch_from_several_references():
    from chatforge.think import verifier_pairs

    g = Game24()
    p = Problem("game24", "4 4 6 8", "", {"numbers": [4, 4, 6, 8]})
    one = verifier_pairs(g, [p], random.Random(0), True, refs=1)
    four = verifier_pairs(g, [p], random.Random(0), True, refs=4)
    assert len(one) == 4 and len(four) == 16
    assert len({r["chosen"]["content"] for r in four if r["chosen"]["content"].count("\n") == 3}) == 4
    for r in four:
        steps = r["rejected"]["content"].split("\n")
        assert g.step_labels(p, steps)[-1] is False and all(g.step_labels(p, steps)[:-1])


# ---- strategies on a tiny random model -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    g = Game24()
    problems = [
        Problem("game24", q, "", {"numbers": [int(x) for x in q.split()]}) for q in ("1 1 4 6", "2 3 4 5")
    ]
    texts = ["\n".join(s) for p in problems for s in solutions(p.data["numbers"], limit=20)]
    tok = Tokenizer.train(texts * 2 + ["Make 24 from 1 2 3. Think step by step."], 320)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=160, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = GPT(cfg).eval()
    torch.manual_seed(1)
    prm = RewardModel(GPT(cfg)).eval()
    with torch.no_grad():
        prm.head.weight.normal_()  # a random but fixed verifier
    return g, problems[0], tok, model, prm


def counting_engine(monkeypatch):
    """Count the tokens the engine streams, independently of the thinker's own count."""
    seen = {"tokens": 0, "prompt": 0}
    real = engine.stream_batch

    def stream(model, prompts, max_new_tokens, **kw):
        seen["prompt"] += sum(len(p) for p in prompts)
        for event in real(model, prompts, max_new_tokens, **kw):
            seen["tokens"] += 1
            yield event

    monkeypatch.setattr(engine, "stream_batch", stream)
    return seen


@pytest.mark.parametrize(
    "spec", ["direct", "cot", "vote:3", "best-of:3:prm", "best-of:3:oracle", "tree:b2d2"]
)
def test_strategies_run_and_count_what_the_engine_generated(tiny, monkeypatch, spec):
    g, p, tok, model, prm = tiny
    seen = counting_engine(monkeypatch)
    th = Thinker(
        model,
        tok,
        prm=prm,
        extract=g.extract,
        check=lambda a: g.check(p, a),
        max_new_tokens=24,
        step_tokens=8,
    )
    r = think.think(th, parse_spec(spec), g.prompt(p, False), g.prompt(p, True))
    assert r.strategy == spec and isinstance(r.text, str)
    assert r.generated_tokens == seen["tokens"] > 0
    assert r.prompt_tokens == seen["prompt"]
    if spec in ("direct", "cot"):
        assert r.generated_tokens <= 24
    if spec.startswith("vote"):
        assert r.generated_tokens <= 3 * 24
    if "prm" in spec or spec.startswith("tree"):
        assert r.verifier_tokens > 0 and r.candidates
    again = think.think(
        Thinker(model, tok, prm=prm, extract=g.extract, check=lambda a: g.check(p, a), max_new_tokens=24, step_tokens=8),
        parse_spec(spec), g.prompt(p, False), g.prompt(p, True),
    )  # fmt: skip
    assert (again.text, again.generated_tokens) == (r.text, r.generated_tokens)  # seeded: deterministic


def test_a_prm_strategy_without_a_prm_names_the_fix(tiny):
    g, p, tok, model, _ = tiny
    th = Thinker(model, tok, max_new_tokens=8)
    for spec in ("best-of:2:prm", "tree:b2d2"):
        with pytest.raises(ChatforgeError, match="--prm RUN .*chatforge prefs prm"):
            think.think(th, parse_spec(spec), g.prompt(p, True))
    with pytest.raises(ChatforgeError, match="--orm RUN"):
        think.think(th, parse_spec("best-of:2:orm"), g.prompt(p, True))
    with pytest.raises(ChatforgeError, match="exact checker"):
        think.think(th, parse_spec("best-of:2:oracle"), g.prompt(p, True))


def test_oracle_best_of_is_pass_at_k(tiny):
    """With a checker that accepts one particular sample, best-of:oracle picks it wherever it is."""
    g, p, tok, model, _ = tiny
    th = Thinker(model, tok, max_new_tokens=12)
    samples = Thinker(model, tok, max_new_tokens=12).sample(g.prompt(p, True), 4)
    target = samples[2].text
    th.extract = lambda text: text
    th.check = lambda a: a == target and samples[0].text != target
    r = think.think(th, parse_spec("best-of:4:oracle"), g.prompt(p, True))
    assert r.text == target or samples[0].text == target


# ---- verifiers -----------------------------------------------------------------------------------


def test_verifier_pairs_put_the_first_wrong_step_below_the_right_one():
    from chatforge.think import verifier_pairs

    task = WorldSteps()
    problems = task.make(6, 0)
    own = [
        ["1. nonsense\nAnswer: 3", task._trace(p)[0] + "\nAnswer: 1"] for p in problems
    ]  # two wrong traces each
    rows = verifier_pairs(task, problems, random.Random(0), True, own)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"program_step", "own_step"}
    for r in rows:
        p = next(p for p in problems if task.prompt(p, True) == r["messages"])
        good, bad = r["chosen"]["content"].split("\n"), r["rejected"]["content"].split("\n")
        assert len(good) == len(bad)
        assert task.step_labels(p, good) == [True] * len(good)
        assert task.step_labels(p, bad)[-1] is False and all(task.step_labels(p, bad)[:-1])
    outcome = verifier_pairs(task, problems, random.Random(0), False, own)
    assert {r["kind"] for r in outcome} == {"program_answer", "own_answer"}
    for r in outcome:
        p = next(p for p in problems if task.prompt(p, True) == r["messages"])
        assert task.check(p, task.extract(r["chosen"]["content"]))
        assert not task.check(p, task.extract(r["rejected"]["content"]))


def test_prefs_prm_trains_a_process_reward_model(tmp_path):
    from chatforge.align.reward import load_reward_model
    from chatforge.checkpoint import read_config, save_model
    from chatforge.cli import parse_command, run_command

    task = WorldSteps()
    texts = ["\n".join(task._trace(p)) + " " + p.question for p in task.make(40, 101)]
    tok = Tokenizer.train(texts, 400)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=160, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    save_model(tmp_path / "sft", GPT(cfg), tok.to_json(), {"stage": "sft"})
    out = tmp_path / "prm"
    argv = ["prefs", "prm", "--model", tmp_path / "sft", "--task", "world", "--problems", 6, "--samples", 2]
    run_command(*parse_command([*argv, "--out", out, "--steps", 3, "--batch-size", 4, "--no-progress"]))
    assert read_config(out)["reward_kind"] == "process"
    rm, _ = load_reward_model(out)
    assert isinstance(rm, RewardModel)
    assert sum(1 for _ in open(out / "verifier_pairs.jsonl")) >= 6 * 3
    with pytest.raises(ChatforgeError, match="801-900"):
        run_command(
            *parse_command(["prefs", "prm", "--model", tmp_path / "sft", "--ranks", "700-850", "--out", out])
        )
    with pytest.raises(ChatforgeError, match="--refs must be at least 1, got 0"):
        run_command(*parse_command([*argv, "--refs", 0, "--out", tmp_path / "prm0"]))


# ---- the dial in chat ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny):
    from chatforge.checkpoint import save_model

    _, _, tok, model, _ = tiny
    root = tmp_path_factory.mktemp("think_run")
    save_model(root / "sft", model, tok.to_json(), {"stage": "sft"})
    return root / "sft"


def test_chat_think_prints_the_answer_and_the_tokens_spent(tiny_run, capsys):
    from chatforge.cli import parse_command, run_command

    argv = [
        "chat",
        "--model",
        tiny_run,
        "-p",
        "Make 24 from 1 1 4 6.",
        "--device",
        "cpu",
        "--max-new-tokens",
        16,
    ]
    run_command(*parse_command([*argv, "--think", "vote:3"]))
    out, err = capsys.readouterr()
    assert "think vote:3:" in err and "tokens generated" in err
    spent = int(err.split("think vote:3: ")[1].split(" tokens")[0])
    assert 3 <= spent <= 3 * 16 and out.strip() != ""


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--think", "vote:0"], "at least 1"),
        (["--think", "best-of:2:prm"], "--prm RUN"),
        (["--think", "tree:b2d2"], "--prm RUN"),
        (["--think", "best-of:2:orm"], "--orm RUN"),
        (["--think", "mull"], "unknown thinking strategy"),
        (["--think", "vote:2", "--tools", "calculator"], "drop --tools"),
    ],
)
def test_chat_think_bad_input_is_one_line(tiny_run, extra, says):
    from chatforge.cli import parse_command, run_command

    argv = ["chat", "--model", tiny_run, "-p", "hi", "--device", "cpu", *extra]
    with pytest.raises(ChatforgeError, match=says):
        run_command(*parse_command(argv))


def test_chat_think_refuses_an_outcome_model_as_the_prm(tiny_run, tmp_path):
    from chatforge.align.reward import save_reward_model
    from chatforge.checkpoint import load_run
    from chatforge.cli import parse_command, run_command

    run = load_run(tiny_run)
    save_reward_model(tmp_path / "orm", RewardModel(run.model), run.tokenizer, {"reward_kind": "outcome"})
    argv = ["chat", "--model", tiny_run, "-p", "hi", "--device", "cpu", "--think", "best-of:2:prm"]
    with pytest.raises(ChatforgeError, match="outcome reward model; give a `chatforge prefs prm` run"):
        run_command(*parse_command([*argv, "--prm", tmp_path / "orm"]))


def test_interactive_chat_answers_by_the_strategy(tiny):
    import io

    from chatforge.chat import ChatSession

    _, _, tok, model, _ = tiny
    session = ChatSession(model, tok, out=io.StringIO(), max_new_tokens=12)
    session.thinker = Thinker(model, tok, spec=parse_spec("vote:2"), max_new_tokens=12)
    printed = session.handle("Make 24 from 1 1 4 6.")
    assert "(think vote:2: " in printed and session.thinker.generated > 0
    assert [m["role"] for m in session.conversation()] == ["user", "assistant"]


def _think_curve_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "think_curve.py"
    spec = importlib.util.spec_from_file_location("think_curve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tree_against_vote_counts_each_problem_once_over_seeds():
    bench = _think_curve_bench()
    # 3 seeds of the same 10 problems: the tree is right on problems 0-5 in every seed, the vote on 0-1
    tree = [1] * 6 + [0] * 4
    vote = [1] * 2 + [0] * 8
    per_seed = [{"tree:b2d4": (100.0, tree), "vote:4": (120.0, vote)} for _ in range(3)]
    d = bench.paired_by_problem(per_seed, "tree:b2d4", "vote:4")
    assert d["problems"] == 10 and d["mean_difference"] == pytest.approx(0.4)
    assert (d["problems_better"], d["problems_worse"]) == (4, 0)
    # 4 of 4 differing problems one way: p = 2 / 2^4, not the 2 / 2^12 of 12 pooled answers
    assert d["sign_test_p"] == pytest.approx(0.125)
    assert 0.0 < d["ci95"][0] <= 0.4 <= d["ci95"][1]
    same = bench.paired_by_problem(per_seed, "vote:4", "vote:4")
    assert same["sign_test_p"] == 1.0 and same["ci95"] == [0.0, 0.0]
    points = [
        {"strategy": "tree:b2d4", "family": "tree", "tokens": 100.0, "accuracy": 0.6, "ci95": [0.3, 0.8]},
        {"strategy": "vote:4", "family": "vote", "tokens": 120.0, "accuracy": 0.2, "ci95": [0.05, 0.5]},
    ]
    (row,) = bench.equal_tokens(points, per_seed)
    assert row["vote"] == "vote:4" and row["paired"]["problems_better"] == 4
    assert bench.equal_tokens(points)[0]["paired"] is None


def test_verifier_order_is_read_at_the_largest_n_all_three_ran():
    bench = _think_curve_bench()
    right = {  # per problem, 6 problems: PRM right on 4, ORM on 3, vote on 1; N=8 has no ORM
        "vote:4": [1, 0, 0, 0, 0, 0], "best-of:4:orm": [1, 1, 1, 0, 0, 0], "best-of:4:prm": [1, 1, 1, 1, 0, 0],
        "vote:8": [1, 1, 1, 1, 1, 1], "best-of:8:prm": [1, 1, 1, 1, 1, 1],
    }  # fmt: skip
    per_seed = [{k: (10.0, v) for k, v in right.items()} for _ in range(2)]
    order = bench.verifier_order(bench.aggregate(per_seed), per_seed)
    assert order["n"] == 4 and order["holds"]
    assert (order["prm"], order["orm"], order["vote"]) == pytest.approx((4 / 6, 3 / 6, 1 / 6))
    assert order["orm_vs_vote"]["problems_better"] == 2 and order["prm_vs_orm"]["problems_worse"] == 0
    flipped = [{**s, "vote:4": (10.0, [1, 1, 1, 1, 1, 0])} for s in per_seed]
    assert not bench.verifier_order(bench.aggregate(flipped), flipped)["holds"]
    only_votes = [{"vote:4": s["vote:4"]} for s in per_seed]
    assert bench.verifier_order(bench.aggregate(only_votes), only_votes) is None
