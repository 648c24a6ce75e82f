"""Stage 2 and the main job: SFT from a base run, the smoke speedrun end to end, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.chat_format import render_conversation
from chatforge.checkpoint import load_model
from chatforge.cli import main
from chatforge.config import apply_overrides, get_preset
from chatforge.conversations import refusal_eval_requests
from chatforge.data.pipeline import train_tokenizer
from chatforge.errors import ChatforgeError
from chatforge.eval.refusal import load_prompts
from chatforge.eval.suite import SAMPLE_PROMPTS, TOOL_SAMPLE_PROMPTS, evaluate_world, world_tasks
from chatforge.rag.open_book import REPEAT_ASKS
from chatforge.redteam.detectors import is_refusal
from chatforge.speedrun import STAGES, _stage_sft_data, _stage_world, speedrun
from chatforge.tokenizer import Tokenizer
from chatforge.train.metrics import read_metrics
from chatforge.train.sft import sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speedrun") / "run"
    speedrun("smoke", out, progress=False)
    return out


def test_speedrun_runs_every_stage_and_writes_the_report(run):
    status = json.loads((run / "stages.json").read_text())
    assert list(status) == [name for name, _, _ in STAGES]
    for path in ["world/manifest.json", "sft_data/sft_train.jsonl", "tokenizer.json", "data/index.json",
                 "base/model.safetensors", "base/loss.png", "sft/model.safetensors", "sft/loss.png",
                 "eval/eval.json", "eval/eval.md", "eval/eval.png", "report.md"]:  # fmt: skip
        assert (run / path).is_file(), path
    report = (run / "report.md").read_text()
    for needle in ["## Pretraining", "## Supervised finetuning", "world_forward", "world_reverse",
                   "reversal curse", "bits per byte", "![evaluation](eval/eval.png)", "knowledge augmentation"]:  # fmt: skip
        assert needle in report, needle
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    tasks = {r["task"]: r for r in evaluation["results"]}
    assert {"world_forward", "world_reverse", "world_forward_seen", "bpb_heldout_bios"} <= set(tasks)
    assert tasks["world_forward"]["n"] == get_preset("smoke").eval.max_examples
    assert len(evaluation["samples"]) >= 1


def test_speedrun_writes_and_asks_the_held_out_refusal_prompts(run):
    sft_data = run / "sft_data"
    disallowed, benign = refusal_eval_requests()
    assert load_prompts(sft_data / "eval_refusal.jsonl") == disallowed
    assert load_prompts(sft_data / "eval_benign.jsonl") == benign
    tasks = {r["task"]: r for r in json.loads((run / "eval" / "eval.json").read_text())["results"]}
    n = get_preset("smoke").eval.max_examples
    assert (tasks["refusal"]["metric"], tasks["refusal"]["n"]) == ("refusal_rate", n)
    assert (tasks["false_refusal"]["metric"], tasks["false_refusal"]["n"]) == ("false_refusal_rate", n)
    assert tasks["arithmetic_small"]["n"] == n
    for r in tasks["refusal"]["details"]:
        assert r["prompt"] in disallowed and r["refused"] == is_refusal(r["prediction"])
    # the training chats (SFT and those mixed into pretraining) ask none of the held-out prompts
    asked = {
        m["content"]
        for name in ("sft_train.jsonl", "sft_val.jsonl", "qa_pretrain.jsonl")
        for line in (sft_data / name).read_text().splitlines()
        for m in json.loads(line)["messages"]
        if m["role"] == "user"
    }
    assert not asked & set(disallowed + benign)
    assert "chatforge" in (sft_data / "qa_pretrain.jsonl").read_text()  # the assistant chats are mixed in
    samples = json.loads((run / "eval" / "eval.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == SAMPLE_PROMPTS and "What is 12 + 7?" in SAMPLE_PROMPTS


def test_speedrun_sft_starts_from_the_base_and_learns(run):
    base, _, _ = load_model(run / "base")
    assistant, meta, _ = load_model(run / "sft")
    assert meta["stage"] == "sft" and meta["base"].endswith("base")
    assert base.cfg == assistant.cfg
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), assistant.parameters(), strict=True))
    summary = json.loads((run / "sft" / "sft_summary.json").read_text())
    assert summary["val_loss_end"] < summary["val_loss_start"]
    # the held-out conversations' loss is the learning check: a logged loss is one 4-row batch's, and
    # which kinds of conversation fill that batch moves it more than 20 steps of learning do
    losses = [r["loss"] for r in read_metrics(run / "sft" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(0 < x < summary["val_loss_start"] + 1 for x in losses)


def test_knowledge_augmentation_uses_only_sft_people(run):
    people = json.loads((run / "sft_data" / "manifest.json").read_text())
    eval_ids = set(people["eval_people"])
    qa = [json.loads(line) for line in (run / "sft_data" / "sft_qa.jsonl").read_text().splitlines()]
    assert qa and not {q["person_id"] for q in qa} & eval_ids
    chats = [
        json.loads(line)["messages"]
        for line in (run / "sft_data" / "qa_pretrain.jsonl").read_text().splitlines()
    ]
    asked = {c[0]["content"] for c in chats}
    forward = [
        json.loads(line) for line in (run / "sft_data" / "eval_forward.jsonl").read_text().splitlines()
    ]
    assert chats and not any(f["question"] in asked for f in forward)
    index = json.loads((run / "data" / "index.json").read_text())
    assert index["conversations"]["count"] == len(chats)


def test_the_world_suite_asks_the_run_folders_questions(run, tmp_path):
    full = [t.name for t in world_tasks(run, tool_use=False)]
    assert full == [
        "world_forward", "world_reverse", "world_forward_seen", "bpb_heldout_bios", "arithmetic_small", "refusal",
        "false_refusal",
    ]  # fmt: skip
    assert [t.name for t in world_tasks(run, tool_use=False, full=False)] == ["world_forward"]
    results = evaluate_world(run / "sft", run, tmp_path / "short", tool_use=False, full=False, max_examples=3)
    written = json.loads((tmp_path / "short" / "eval.json").read_text())
    assert [r.task for r in results] == ["world_forward"] and results[0].n == 3
    assert written["samples"] == [] and written["model"].endswith("sft")
    assert len(json.loads((run / "eval" / "eval.json").read_text())["samples"]) == len(SAMPLE_PROMPTS)


def test_train_tokenizer_gives_the_speedruns_tokenizer(run, tmp_path):
    chats = [run / "sft_data" / "qa_pretrain.jsonl", run / "sft_data" / "sft_train.jsonl"]
    vocab = get_preset("smoke").vocab_size
    tok = train_tokenizer(
        [str(run / "world")], tmp_path / "tok.json", vocab, conversations=chats, progress=False
    )
    assert tok.vocab_size == vocab
    assert (tmp_path / "tok.json").read_text() == (run / "tokenizer.json").read_text()
    without_chats = train_tokenizer([str(run / "world")], tmp_path / "plain.json", vocab, progress=False)
    assert without_chats.to_json() != tok.to_json()


def test_rerun_skips_finished_stages_and_refuses_other_settings(run, capsys):
    before = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    speedrun("smoke", run, progress=False)
    out = capsys.readouterr().out
    assert out.count("done already") == len(STAGES)
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ChatforgeError, match="different settings"):
        speedrun("smoke", run, ["pretrain.max_steps=7"], progress=False)


def test_report_rebuilds_from_the_files(run, tmp_path, capsys):
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert "reversal curse" in (run / "report.md").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_sft_loss_is_only_on_assistant_tokens(run):
    """The SFT objective equals the model's loss on assistant tokens computed by hand."""
    model, _, model_dir = load_model(run / "sft")
    tok = Tokenizer.load(model_dir)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am chatforge."}]  # fmt: skip
    ids, mask = render_conversation(tok, conv)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]])
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(model(x)[0], torch.tensor(ids[1:]), reduction="none")
        expected = per_token[torch.tensor(mask[1:], dtype=torch.bool)].mean()
        assert torch.allclose(model(x, y), expected)


def test_sft_command_errors(run, tmp_path, capsys):
    assert (
        main(
            [
                "sft",
                "--model",
                str(run / "base"),
                "--data",
                str(tmp_path / "none.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such conversations file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    assert main(["sft", "--model", str(run / "base"), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert (
        main(["sft", "--model", str(run / "base"), "--data", str(no_answer), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no assistant turn" in capsys.readouterr().err


def test_sft_cli_trains_and_resumes(run, tmp_path):
    cfg = get_preset("smoke").sft
    cfg.max_steps, cfg.ckpt_every = 6, 3
    out = tmp_path / "sft"
    first = sft(run / "base", run / "sft_data", out, cfg, progress=False)
    assert first["steps"] == 6 and (out / "ckpt").is_dir()
    cfg.max_steps = 9
    again = sft(run / "base", run / "sft_data", out, cfg, resume=True, progress=False)
    assert again["steps"] == 9
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1] == 9


def test_speedrun_rl_stage_sets_the_assistant_beside_the_rl_model(tmp_path, capsys):
    """rl.steps > 0: GRPO with the calculator after the evaluation, then the same tasks on the RL
    model; the report has both columns and the reward / pass@1 plot. Off (rl.steps 0) in smoke."""
    out = tmp_path / "run"
    sets = ["data.tool_use=true", "pretrain.seq_len=192", "sft.seq_len=192", "eval.max_examples=6",
            "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8",
            "rl.eval_every=1", "rl.eval_problems=4", "rl.tool_problems=20"]  # fmt: skip
    status = speedrun("smoke", out, sets, progress=False)
    rl = status["rl"]["result"]
    # eval_problems 4: a third each (one fact question, one small sum, one calculator problem)
    assert rl["steps"] == 2 and rl["val_problems"] == 3 and rl["heldout_problems"] == 4
    assert set(rl["after"]) == set(status["eval"]["result"]) == set(rl["changes"])  # every task, after RL too
    assert all(c["before"] == round(status["eval"]["result"][t], 4) for t, c in rl["changes"].items())
    assert rl["worse"] == [t for t, c in rl["changes"].items() if c["worse"]]
    _, meta, _ = load_model(out / "rl")
    assert meta["stage"] == "rl" and meta["rl"]["tools"] is True and meta["reward"] == "exact"
    report = (out / "report.md").read_text()
    assert "## Reinforcement learning (GRPO, with the calculator)" in report
    assert (
        "| task | assistant (SFT) | after RL | n |" in report
        and "![reinforcement learning](rl/rl.png)" in report
    )
    for png in ("rl.png", "rl_pass1.png"):
        assert (out / "rl" / png).stat().st_size > 1000
    assert "Held-out pass@1" in report and "![pass@1 against step](rl/rl_pass1.png)" in report
    # with tool use, the small sums are asked again with the calculator shown, and labelled so
    samples = json.loads((out / "rl" / "eval" / "eval.json").read_text())["samples"]
    shown = [s for s in samples if s.get("tools") == "calculator"]
    assert [s["prompt"] for s in shown] == TOOL_SAMPLE_PROMPTS and len(samples) == len(SAMPLE_PROMPTS) + 2
    assert f"**{TOOL_SAMPLE_PROMPTS[0]}** (with the calculator) →" in report
    assert "Sample answers of the RL model:" in report
    capsys.readouterr()
    speedrun("smoke", out, sets, progress=False)  # finished: skipped on a rerun, the off stage too
    assert capsys.readouterr().out.count("done already") == len(STAGES)


def test_speedrun_rag_stage_asks_the_held_out_people_closed_book_and_with_retrieval(tmp_path):
    """data.open_book_chats > 0: open-book conversations in SFT (a longer context than pretraining),
    then the rag stage asks every held-out question twice; off (skipped) in the smoke preset."""
    out = tmp_path / "run"
    sets = ["data.open_book_chats=24", "data.open_book_in_pretrain=30", "data.copy_chats_in_pretrain=10",
            "sft.seq_len=768", "sft.device_batch_size=1", "eval.max_examples=4"]  # fmt: skip
    status = speedrun("smoke", out, sets, progress=False)
    kinds = json.loads((out / "sft_data" / "manifest.json").read_text())["counts"]["kinds"]
    assert kinds["open_book"] == 24
    pretrain_chats = (out / "sft_data" / "qa_pretrain.jsonl").read_text().splitlines()
    assert sum('"content": "<documents>' in line for line in pretrain_chats) == 30  # no system turn
    assert sum(any(f'"content": "{ask}' in line for ask in REPEAT_ASKS) for line in pretrain_chats) == 10
    assert load_model(out / "sft")[0].cfg.seq_len == 768  # SFT lengthened the 64-token context
    rag = status["rag"]["result"]
    questions = (out / "rag" / "collections" / "world" / "questions.jsonl").read_text().splitlines()
    assert sum(m["n"] for m in rag["by_kind"].values()) == len(questions) > 0
    assert set(rag["by_kind"]) == {"forward", "reverse"} and set(rag["recall@5"]) == {"bm25", "dense", "fused"}
    assert rag["model"] == "sft" and (out / "rag" / "rag.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Answers from documents (retrieval)" in report and "![answers from documents](rag/rag.png)" in report


def test_the_rag_stage_is_off_without_open_book_chats(run):
    assert "skipped" in json.loads((run / "stages.json").read_text())["rag"]["result"]


def test_sft_data_stage_writes_as_many_refusal_chats_as_the_preset_asks(tmp_path):
    counts = {}
    for n in (0, 37):
        preset = apply_overrides(get_preset("smoke"), [f"data.refusal_chats={n}"])
        _stage_world(preset, tmp_path / str(n), False)
        _stage_sft_data(preset, tmp_path / str(n), False)
        counts[n] = json.loads((tmp_path / str(n) / "sft_data" / "manifest.json").read_text())["counts"]["kinds"]
    assert counts[37]["refusal"] == counts[37]["benign"] == 37
    assert counts[0]["refusal"] == max(16, counts[0]["fact"] // 4)  # 0: a quarter of the fact chats
