"""The tools_on / tools_off evaluation (eval/tools.py), `chatforge eval --tools-file`, and the speedrun with
data.tool_use=true reaching the report's tool table.

The model in the scoring tests is test_tools_runner's ScriptedGPT: a GPT whose forward spells a scripted
reply for each prompt, through the real engine, runner, parser, registry and calculator."""

from __future__ import annotations

import json

import pytest
import torch
from test_tools_runner import ScriptedGPT, call

from chatforge.chat_format import render_prompt, tool_signature
from chatforge.checkpoint import save_model
from chatforge.config import get_preset
from chatforge.conversations import ToolProblem, build_sft_data, write_sft_data
from chatforge.errors import ChatforgeError
from chatforge.eval.base import EvalContext
from chatforge.eval.run import cmd_eval, evaluate
from chatforge.eval.tools import (
    KINDS,
    ToolUse,
    has_number,
    load_tool_problems,
    tool_tasks,
)
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import EvalOptions, parse
from chatforge.speedrun import speedrun
from chatforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer
from chatforge.tools.builtin import calculator_registry
from chatforge.tools.calculator import CALCULATOR_TOOL
from chatforge.world import QA, build_world

CORPUS = [
    "The answer is 42. Let me compute that with the calculator tool. It is 35629407.",
    '{"name": "calculator", "arguments": {"expression": "48213 * 739"}} tool call result',
    "In what year did Ann Lee turn 37? How old did Bo Ng turn in 1990? Ann Lee was born in Port Vesk.",
    "Hello there, how are you? I am fine, thanks. Numbers: 0 1 2 3 4 5 6 7 8 9.",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, 400)


def P(question: str, answer: str, kind: str) -> ToolProblem:
    return ToolProblem(question, answer, kind, "")


PROBLEMS = [
    P("What is 48213 * 739?", "35629407", "arithmetic"),
    P("What is 1234 + 8766?", "10000", "arithmetic"),
    P("In what year did Ann Lee turn 37?", "1974", "word"),
    P("How old did Bo Ng turn in 1990?", "37", "word"),
    P("How old did Cy Po turn in 2000?", "37", "word_seen"),
    P("In what year did Di Wu turn 50?", "2001", "word_seen"),
]
FACTS = [
    QA("Where was Ann Lee born?", "Port Vesk", "birth_city", 1),
    QA("What is Bo Ng's job?", "baker", "job", 2),
    QA("Who is Cy Po's mother?", "Ann Lee", "mother", 3),
]
# question -> (replies with the calculator shown, one per tool result seen so far; the reply without tools)
SCRIPT = {
    # called right: correct with tools; a near miss without
    "What is 48213 * 739?": (
        ["Let me compute. " + call("calculator", expression="48213 * 739"), "It is {r}."],
        "It is 35629400.",
    ),
    # called with a wrong expression (9999): wrong with tools; right without
    "What is 1234 + 8766?": (
        ["" + call("calculator", expression="1234 + 8765"), "It is {r}."],
        "It is 10000.",
    ),
    # no call, answers the birth year: "37" and "1937" are there, the gold 1974 is not
    "In what year did Ann Lee turn 37?": (["Ann Lee turned 37 in 1937."], "Ann Lee turned 37 in 1937."),
    # right both ways, with a call when tools are shown
    "How old did Bo Ng turn in 1990?": (
        [
            "Bo Ng was born in 1953. " + call("calculator", expression="1990 - 1953"),
            "Bo Ng turned {r} in 1990.",
        ],
        "Bo Ng turned 37 in 1990.",
    ),
    # right with the call; without it, only "1937" (which holds 37 but is not 37) and "37.5"
    "How old did Cy Po turn in 2000?": (
        [call("calculator", expression="2000 - 1963"), "Cy Po turned {r}."],
        "Cy Po was born in 1937, or 37.5 years before.",
    ),
    # a malformed call (counts as a call), then no answer; without tools it writes a call anyway
    "In what year did Di Wu turn 50?": (
        [
            TOOL_CALL_OPEN + '{"name": "calculator", "arguments": "1951 + 50"}' + TOOL_CALL_CLOSE,
            "I do not know.",
        ],
        call("calculator", expression="1951 + 50"),
    ),
    # fact questions (tools shown only): no call; a needless call, still right; no call, wrong
    "Where was Ann Lee born?": (["Ann Lee was born in Port Vesk."], ""),
    "What is Bo Ng's job?": ([call("calculator", expression="1 + 1"), "Bo Ng is a baker."], ""),
    "Who is Cy Po's mother?": (["I am not sure."], ""),
}


def policy(msgs: list[tuple[str, str]]) -> str:
    question = next(c for r, c in msgs if r == "user")
    tools_shown = msgs[0][0] == "system" and tool_signature(CALCULATOR_TOOL) in msgs[0][1]
    with_tools, without = SCRIPT[question]
    if not tools_shown:
        return without
    results = [c for r, c in msgs if r == "tool"]
    return with_tools[len(results)].replace("{r}", results[-1] if results else "")


def run(task, tok, model=None, **kw):
    model = model or ScriptedGPT(tok, policy)
    return task.run(EvalContext(model, tok, "cpu", **{"batch_size": 4, **kw}))


def test_has_number_respects_digit_boundaries():
    assert has_number("Ann Lee turned 37 in 1974.", "37")
    assert has_number("It is 35,629,407.", "35629407") and has_number("37.0 years", "37")
    assert not has_number("born in 1937", "37")
    assert not has_number("1937", "193") and not has_number("37.5", "37") and not has_number("2.37", "37")
    assert not has_number("It is -37.", "37") and has_number("It is -37.", "-37")
    assert has_number("1990-1953=37", "37") and not has_number("1990-1953=37", "-1953")
    assert not has_number("no number here", "37")


def test_the_registry_shows_exactly_what_training_showed(tok):
    assert calculator_registry().schemas() == [CALCULATOR_TOOL]
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    shown = render_prompt(tok, msgs, tools=calculator_registry().schemas())
    assert shown == render_prompt(tok, msgs, tools=[CALCULATOR_TOOL])
    assert calculator_registry().call("calculator", {"expression": "48213 * 739"}).content == "35629407"


def test_tools_on_scores_calls_kinds_and_false_calls(tok):
    r = run(ToolUse(PROBLEMS, "tools_on", True, FACTS), tok)
    assert (r.task, r.metric, r.n) == ("tools_on", "accuracy", 6)
    by_q = {d["prompt"]: d for d in r.details}
    assert [by_q[p.question]["correct"] for p in PROBLEMS] == [True, False, False, True, True, False]
    assert [by_q[p.question]["calls"] for p in PROBLEMS] == [1, 1, 0, 1, 1, 1]
    assert r.value == pytest.approx(3 / 6)
    assert r.groups == {
        "arithmetic": {"value": 0.5, "n": 2, "call_rate": 1.0},
        "word": {"value": 0.5, "n": 2, "call_rate": 0.5},
        "word_seen": {"value": 0.5, "n": 2, "call_rate": 1.0},
    }
    assert r.extra == {
        "call_rate": pytest.approx(5 / 6),
        "false_call_rate": pytest.approx(1 / 3),
        "fact_accuracy": pytest.approx(2 / 3),
        "fact_n": 3,
    }
    assert by_q["What is 1234 + 8766?"]["prediction"] == "It is 9999."  # the calculator really ran
    assert [d["kind"] for d in r.details[6:]] == ["fact"] * 3


def test_tools_off_shows_no_tools_and_counts_calls_written_anyway(tok):
    model = ScriptedGPT(tok, policy)
    r = run(ToolUse(PROBLEMS, "tools_off", False, FACTS), tok, model)
    assert [d["correct"] for d in r.details] == [False, True, False, True, False, False]
    assert r.value == pytest.approx(2 / 6) and r.n == 6  # no fact questions without tools
    assert r.groups["word_seen"] == {"value": 0.0, "n": 2, "call_rate": 0.5}
    assert r.groups["arithmetic"] == {"value": 0.5, "n": 2, "call_rate": 0.0}
    assert r.extra == {"call_rate": pytest.approx(1 / 6)}
    assert all("Tools" not in prompt for prompt in map(tok.decode, model.replies))  # no tool block shown


def test_batch_size_and_subset_do_not_change_answers(tok):
    a = run(ToolUse(PROBLEMS, "tools_on", True, FACTS), tok, batch_size=1)
    b = run(ToolUse(PROBLEMS, "tools_on", True, FACTS), tok, batch_size=16)
    assert a.details == b.details
    c = run(ToolUse(PROBLEMS, "tools_on", True, FACTS), tok, max_examples=2, seed=3)
    assert c.n == 2 and c.extra["fact_n"] == 2  # facts: as many as the problems asked
    for d in c.details[:2]:
        assert d == next(x for x in a.details if x["prompt"] == d["prompt"])


def test_prompts_over_the_context_count_wrong_and_never_crash(tok):
    long_q = "What is " + " + ".join(["12"] * 120) + "?"
    SCRIPT[long_q] = (["never asked"], "never asked")
    big = "What is 10 to the 300?"
    SCRIPT[big] = ([call("calculator", expression="10**300"), "It is {r}."], "It is 1000.")
    problems = [PROBLEMS[0], P(long_q, "1440", "arithmetic"), P(big, "1" + "0" * 300, "arithmetic")]
    model = ScriptedGPT(tok, policy, seq_len=200)
    n_prompt = len(render_prompt(tok, [{"role": "user", "content": long_q}]))
    assert n_prompt >= 200  # the long question does not fit even without tools
    on = run(ToolUse(problems, "tools_on", True), tok, model)
    assert [d["correct"] for d in on.details] == [True, False, False]
    assert on.details[1]["skipped"] == "prompt fills the context"
    assert on.details[2]["skipped"] == "a tool result filled the context" and not on.details[2]["prediction"]
    assert on.details[2]["ended"] == "context" and on.details[0]["ended"] == "stop"
    assert on.extra["skipped"] == 2 and on.value == pytest.approx(1 / 3)
    off = run(ToolUse(problems, "tools_off", False), tok, model)
    assert off.details[1]["skipped"] == "prompt fills the context" and off.extra["skipped"] == 1


def test_eval_tools_file_round_trip_and_errors(tmp_path):
    world = build_world(0, 40, 4)
    data = build_sft_data(world, tool_use=True, convs_per_person=1, n_eval_tools=5)
    write_sft_data(data, tmp_path)
    problems = load_tool_problems(tmp_path / "eval_tools.jsonl")
    assert [p.to_dict() for p in problems] == [p.to_dict() for p in data.eval_tools]
    assert {p.kind for p in problems} == set(KINDS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1+1?", "answer": "2", "kind": "arithmetic"}\n{"question": "x"}\n')
    with pytest.raises(ChatforgeError, match="bad.jsonl line 2"):
        load_tool_problems(bad)
    with pytest.raises(ChatforgeError, match="no problems"):
        ToolUse([], "tools_on", True)


def test_chatforge_eval_tools_file(tmp_path, tok, capsys):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=1, n_embd=16, n_head=2, n_kv_head=1)
    )
    save_model(tmp_path / "run", model, tok.to_json(), {"stage": "test"})
    data = tmp_path / "sft_data"
    data.mkdir()
    (data / "eval_tools.jsonl").write_text("".join(json.dumps(p.to_dict()) + "\n" for p in PROBLEMS))
    (data / "eval_forward.jsonl").write_text("".join(json.dumps(qa.to_dict()) + "\n" for qa in FACTS[:2]))
    results = evaluate(tmp_path / "run", tools_file=data / "eval_tools.jsonl", max_new_tokens=4)
    assert [r.task for r in results] == ["tools_on", "tools_off"]  # the default tasks for a tools file
    assert results[0].n == results[1].n == 6 and results[0].extra["fact_n"] == 2  # facts found beside it
    assert "false_call_rate" not in results[1].extra

    out = tmp_path / "eval"
    argv = [
        "--model",
        str(tmp_path / "run"),
        "--tasks",
        "tools",
        "--tools-file",
        str(data / "eval_tools.jsonl"),
    ]
    cmd_eval(parse(EvalOptions, [*argv, "--max-new-tokens", "4", "--out", str(out)]))
    printed = capsys.readouterr().out
    assert "| tools_on | false_call_rate |" in printed and "| tools_off / word_seen | accuracy |" in printed
    saved = json.loads((out / "eval.json").read_text())
    assert [r["task"] for r in saved["results"]] == ["tools_on", "tools_off"]
    with pytest.raises(ChatforgeError, match="--tools-file"):
        evaluate(tmp_path / "run", ["tools"])
    assert tool_tasks(PROBLEMS, max_new_tokens=9)[0].max_new_tokens == 9


@pytest.mark.usefixtures("one_thread")
def test_speedrun_with_tool_use_reports_the_tools_table(tmp_path):
    out = tmp_path / "run"
    speedrun("smoke", out, ["data.tool_use=true"], progress=False)
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    tasks = {r["task"]: r for r in evaluation["results"]}
    n = get_preset("smoke").eval.max_examples
    assert tasks["tools_on"]["n"] == tasks["tools_off"]["n"] == n
    assert [d["prompt"] for d in tasks["tools_on"]["details"][:n]] == [
        d["prompt"] for d in tasks["tools_off"]["details"]
    ]  # the same problems both ways
    report = (out / "report.md").read_text()
    assert "## Tool use" in report and "![tool use](eval/tools.png)" in report
    assert "| problems | n | accuracy, tools on | accuracy, tools off |" in report
    assert f"| **all** | {n} |" in report
    assert (out / "eval" / "tools.png").stat().st_size > 1000
    # the smoke model's 64-token context cannot hold the tool description and a question: counted wrong
    assert "did not fit the model's context (tools on)" in report
    shown = [s for s in evaluation["samples"] if s.get("tools")]
    assert len(shown) == 2 and all(s["answer"] == "" for s in shown)  # nor can it answer with the calculator
