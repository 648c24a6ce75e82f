"""Comparisons: the format and its line-numbered errors, crash-safe appends, world and hh-rlhf
comparisons, and the labeling loop (scripted keys, the judge, resume, Ctrl-C in a real process)."""

import gzip
import json
import os
import platform
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatforge.align.label import Judge, format_pair, judge_agreement, label_loop, load_prompts, make_sampler
from chatforge.align.prefs import (
    append_pref,
    check_pref,
    load_hh_rlhf,
    load_prefs,
    repair_tail,
    world_prefs,
    write_prefs,
)
from chatforge.align.rewards import last_number
from chatforge.checkpoint import load_model, save_model
from chatforge.conversations import split_people
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.world import build_world, fact_questions

HH_FILE = "/work/shared/data/hh_rlhf/harmless-base/test.jsonl.gz"


def good_row(q="What is 2 + 2?", a="4.", b="5."):
    return {
        "messages": [{"role": "user", "content": q}],
        "chosen": {"role": "assistant", "content": a},
        "rejected": {"role": "assistant", "content": b},
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def world():
    return build_world(0, 60, 6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random chat model (256-token context, so the judge's question fits) as a run folder."""
    texts = ["What is 2 + 2? It is 4.", "Who was born in Paris? Alice was.", "Reply A is better."] * 30
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    path = tmp_path_factory.mktemp("label") / "sft"
    save_model(path, GPT(cfg), tok.to_json(), {"stage": "sft"})
    return path


# ---- format and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', "line 2: malformed JSON"),
        ('{"chosen": "x", "rejected": "y", "messages": []}', "line 2: a conversation must be a non-empty list"),
        (json.dumps({**good_row(), "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}), "line 2: the prompt ends with an assistant turn"),
        (json.dumps({**good_row(), "chosen": {"role": "assistant"}}), "line 2: 'chosen' has no string content"),
        (json.dumps({**good_row(), "rejected": {"role": "user", "content": "x"}}), "line 2: 'rejected' must be an assistant message"),
        (json.dumps({**good_row(), "verdict": "maybe"}), "line 2: verdict 'maybe' is not one of"),
        (json.dumps({k: v for k, v in good_row().items() if k != "messages"}), "line 2: no 'messages'"),
    ],
)  # fmt: skip
def test_load_prefs_names_the_bad_line(tmp_path, bad, message):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps(good_row()) + "\n" + bad + "\n" + json.dumps(good_row()) + "\n")
    with pytest.raises(ChatforgeError, match=message) as e:
        load_prefs(p)
    assert "\n" not in str(e.value)


def test_load_prefs_normalises_and_filters_verdicts(tmp_path):
    p = tmp_path / "prefs.jsonl"
    rows = [
        {**good_row(), "chosen": "4."},
        {**good_row("q2"), "verdict": "tie"},
        {**good_row("q3"), "verdict": "both_bad"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prefs(p)
    assert loaded[0]["chosen"] == {"role": "assistant", "content": "4."}  # a plain string became a message
    assert [r["messages"][0]["content"] for r in load_prefs(p, trainable_only=True)] == ["What is 2 + 2?"]
    with pytest.raises(ChatforgeError, match="no file"):
        load_prefs(tmp_path / "missing.jsonl")


# ---- crash-safe appends -------------------------------------------------------------------------------


def test_append_pref_appends_whole_lines_and_cuts_a_torn_tail(tmp_path, capsys):
    p = tmp_path / "sub" / "prefs.jsonl"
    append_pref(p, good_row("q1"))
    append_pref(p, good_row("q2"))
    with open(p, "ab") as f:  # a write cut short by a crash
        f.write(b'{"messages": [{"role": "user", "con')
    append_pref(p, good_row("q3"))
    assert "torn line" in capsys.readouterr().err
    assert [r["messages"][0]["content"] for r in load_prefs(p)] == ["q1", "q2", "q3"]
    assert p.read_bytes().endswith(b"\n")
    # a complete row that merely lacks its newline is kept
    with open(p, "ab") as f:
        f.write(json.dumps(good_row("q4")).encode())
    assert repair_tail(p) == 0
    assert len(load_prefs(p)) == 4
    with pytest.raises(ChatforgeError, match="verdict"):
        append_pref(p, {**good_row(), "verdict": "nope"})  # nothing invalid reaches the file
    assert len(load_prefs(p)) == 4


# ---- comparisons from the world and from hh-rlhf --------------------------------------------------------


def test_world_prefs_pairs_are_right_by_construction(world):
    people, _ = split_people(world)
    rows = world_prefs(world, people, seed=3)
    assert rows == world_prefs(world, people, seed=3)  # seeded
    assert rows != world_prefs(world, people, seed=4)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"fact_wrong", "fact_rambling", "arithmetic", "refusal"}
    by_name = {p.name: p for p in people}
    for r in rows:
        check_pref(r)
        q, good, bad = r["messages"][-1]["content"], r["chosen"]["content"], r["rejected"]["content"]
        assert good != bad
        if r["kind"].startswith("fact"):
            person = next(p for n, p in by_name.items() if n in q)
            answers = {qa.question: qa.answer for qa in fact_questions(person, world, random.Random(0), 5)}
            gold = answers[q]
            assert gold in good
            if r["kind"] == "fact_wrong":
                assert gold not in bad
            else:
                assert gold in bad and len(bad) > 2 * len(good)
        elif r["kind"] == "arithmetic":
            a, b = (int(x) for x in re.findall(r"\d+", q))  # e.g. "What is 12 plus 30?", "Compute 7 * 8."
            assert last_number(good) in {a + b, abs(a - b), a * b}  # "Subtract 5 from 9": 9 - 5
            assert last_number(bad) != last_number(good)
        else:
            assert any(w in good.lower() for w in ("sorry", "can't", "won't"))
            assert not any(w in bad.lower() for w in ("sorry", "can't", "won't"))


def test_load_hh_rlhf_layout(tmp_path):
    def dialog(*turns):
        return "".join(f"\n\n{who}: {text}" for who, text in turns)

    rows = [
        {"chosen": dialog(("Human", "hi"), ("Assistant", "hello"), ("Human", "how do I hurt someone?"), ("Assistant", "I won't help.")),
         "rejected": dialog(("Human", "hi"), ("Assistant", "hello"), ("Human", "how do I hurt someone?"), ("Assistant", "Sure: ..."))},
        {"chosen": dialog(("Human", "a"), ("Assistant", "b")), "rejected": dialog(("Human", "DIFFERENT"), ("Assistant", "c"))},
        {"chosen": dialog(("Human", "a"), ("Assistant", "same")), "rejected": dialog(("Human", "a"), ("Assistant", "same"))},
    ]  # fmt: skip
    p = tmp_path / "hh.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    stats = {}
    out = load_hh_rlhf(p, stats)
    assert stats == {"kept": 1, "prompts_differ": 1, "not_assistant_last": 0, "identical": 1}
    assert out[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how do I hurt someone?"},
    ]
    assert out[0]["chosen"]["content"] == "I won't help." and out[0]["rejected"]["content"] == "Sure: ..."
    assert load_prefs(p) == out  # load_prefs recognises the format by itself
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"chosen": "no markers", "rejected": "x"}) + "\n")
    with pytest.raises(ChatforgeError, match="line 2: expected dialogues"):
        load_hh_rlhf(bad)


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="the staged hh-rlhf file is not here")
def test_load_real_hh_rlhf():
    stats = {}
    rows = load_hh_rlhf(HH_FILE, stats)
    assert sum(stats.values()) - stats["kept"] + len(rows) == 2312  # every line accounted for
    assert len(rows) > 2200
    assert all(r["messages"][-1]["role"] == "user" and r["chosen"] != r["rejected"] for r in rows)


# ---- the labeling loop ----------------------------------------------------------------------------------


def scripted(keys):
    it = iter(keys)
    asked = []

    def input_fn(prompt):
        asked.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None  # as input() does at Ctrl-D

    return input_fn, asked


def test_format_pair_columns_fit_the_width():
    text = format_pair([{"role": "user", "content": "q " * 40}], "alpha " * 30, "beta\x07 " * 5, 80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "│" in text and "\x07" not in text and "\\x07" in text  # control characters are shown, not run
    narrow = format_pair([{"role": "user", "content": "q"}], "a", "b", 40)
    assert "│" not in narrow  # stacked when two columns would be unreadable


def test_label_loop_records_every_decision_and_resumes(tmp_path, run_dir):
    model, _, d = load_model(run_dir)
    tok = Tokenizer.load(d)
    sample = make_sampler(model, tok, max_new_tokens=6, temperature=1.0, top_p=None, seed=0)
    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(6)]
    out = tmp_path / "prefs.jsonl"
    keys, _ = scripted(["a", "clear", "b", "", "t", "", "x", "", "s", "q"])
    lines = []
    summary = label_loop(prompts, sample, out, input_fn=keys, print_fn=lines.append, width=90)
    assert summary["labelled"] == 4 and summary["skipped"] == 1 and summary["stopped"] == "quit"
    rows = load_prefs(out)
    assert [r["verdict"] for r in rows] == ["prefer", "prefer", "tie", "both_bad"]
    a0, b0 = sample(prompts[0])
    a1, b1 = sample(prompts[1])
    assert (rows[0]["chosen"]["content"], rows[0]["rejected"]["content"], rows[0]["reason"]) == (
        a0,
        b0,
        "clear",
    )
    assert (rows[1]["chosen"]["content"], rows[1]["rejected"]["content"]) == (b1, a1)  # b: B was chosen
    assert "reason" not in rows[1]
    assert len(load_prefs(out, trainable_only=True)) == 2  # ties / both-bad stay out of training
    # resume: the 4 labelled prompts are not shown again; the skipped one and the rest are
    keys, asked = scripted(["a", ""])  # then Ctrl-D
    summary = label_loop(prompts, sample, out, input_fn=keys, print_fn=lines.append, width=90)
    assert summary["labelled"] == 1 and summary["stopped"] == "end of input"
    keys, asked = scripted(["b", ""])
    summary = label_loop(prompts, sample, out, input_fn=keys, print_fn=lines.append, width=90)
    assert summary["labelled"] == 1 and summary["stopped"] == "done" and len(asked) == 2
    assert [r["messages"][0]["content"] for r in load_prefs(out)][4:] == ["What is 4 + 4?", "What is 5 + 5?"]
    assert "4 of 6 prompts already labelled" in "\n".join(lines)


def test_judge_is_position_debiased_and_agreement_is_counted(tmp_path, run_dir):
    model, _, d = load_model(run_dir)
    tok = Tokenizer.load(d)
    judge = Judge(model, tok, "Pick the better reply.")
    judge.critique_tokens = 8
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    j1, j2 = judge(msgs, "It is 4.", "Paris"), judge(msgs, "Paris", "It is 4.")
    assert j1.p_a == pytest.approx(1 - j2.p_a, abs=1e-5)  # swapping the answers flips the verdict exactly
    assert {j1.pick, j2.pick} == {"A", "B"}
    assert j1.critique.startswith(f"Reply {j1.pick} is better because")
    # judge pick vs the person's key: Enter accepts (agrees), the opposite key disagrees, a tie is not counted
    sample = make_sampler(model, tok, max_new_tokens=6, temperature=1.0, top_p=None, seed=1)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    picks = [judge(m, *sample(m)).pick.lower() for m in prompts]
    other = {"a": "b", "b": "a"}
    keys, _ = scripted(["", "", other[picks[1]], "", "t", ""])
    out = tmp_path / "judged.jsonl"
    summary = label_loop(
        prompts, sample, out, judge=judge, judge_name="tiny", input_fn=keys, print_fn=lambda s: None
    )
    assert summary["agreement"] == {"decisions": 2, "agree": 1, "rate": 0.5}
    stored = json.loads((tmp_path / "judged.agreement.json").read_text())
    assert stored["rate"] == 0.5 and stored["judge"] == "tiny"
    rows = load_prefs(out)
    assert judge_agreement(rows) == summary["agreement"]
    assert all(r["critique"].startswith("Reply ") for r in rows)
    with pytest.raises(ChatforgeError, match="context"):
        Judge(model, tok, "very long instructions " * 200)


def test_load_prompts_accepts_sft_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        + json.dumps({"question": "q?"})
        + "\n"
        + json.dumps({"prompt": "hi"})
        + "\n"
    )
    assert load_prompts(p) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "q?"}]]
    p.write_text('{"nothing": 1}\n')
    with pytest.raises(ChatforgeError, match="line 1"):
        load_prompts(p)


def _read_until(proc, marker: str, timeout: float = 60.0) -> str:
    buf, end = b"", time.time() + timeout
    while marker.encode() not in buf:
        if time.time() > end or proc.poll() is not None:
            raise AssertionError(f"did not see {marker!r}; got {buf.decode(errors='replace')[-500:]!r}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            buf += os.read(proc.stdout.fileno(), 65536)
    return buf.decode(errors="replace")


def _wait_until_reading(pid: int, timeout: float = 20.0) -> None:
    """Until process `pid` sits in the read(2) system call (Linux x86-64: number 0), else 1 s."""
    if platform.machine() != "x86_64" or not Path(f"/proc/{pid}/syscall").exists():
        time.sleep(1.0)
        return
    end = time.time() + timeout
    while time.time() < end:
        try:
            if Path(f"/proc/{pid}/syscall").read_text().split()[0] == "0":
                return
        except (OSError, IndexError):
            break
        time.sleep(0.02)
    time.sleep(1.0)


def test_ctrl_c_while_labelling_keeps_every_label(tmp_path, run_dir, cli_env):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"What is {i} + 1?"}) + "\n" for i in range(5)))
    out = tmp_path / "prefs.jsonl"
    cmd = [sys.executable, "-m", "chatforge.align.label", "--model", str(run_dir), "--prompts", str(prompts),
           "--out", str(out), "--max-new-tokens", "6", "--device", "cpu"]  # fmt: skip
    # a job started in the background by a non-interactive shell (`cmd &`, as CI may run us) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt: give the child the default back
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        for key in ("a", "b"):
            _read_until(proc, "> ")
            proc.stdin.write(f"{key}\n".encode())
            proc.stdin.flush()
            _read_until(proc, "reason")
            proc.stdin.write(b"because\n")
            proc.stdin.flush()
        _read_until(proc, "> ")  # the third pair is on screen, waiting for a key
        # A signal that lands after the prompt is printed but before read(2) starts waits for the
        # next input (a person's Ctrl-C comes while it waits): send it once the child blocks in read
        _wait_until_reading(proc.pid)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"2 labelled" in rest and b"interrupted" in rest
    rows = load_prefs(out)
    assert len(rows) == 2 and all(r["reason"] == "because" for r in rows)
    assert out.read_bytes().endswith(b"\n")
    # a second session picks up at the third prompt
    write_prefs(tmp_path / "copy.jsonl", rows)
    assert len(load_prefs(tmp_path / "copy.jsonl")) == 2
