"""GRPO: advantages, the clipped loss and the k3 KL against hand-computed values; reward functions;
world problems; a toy task whose reward really rises; rollouts through the calculator (the policy is
trained on what it wrote, never on a tool's result); end-to-end `rl` runs from a world."""

import json
import math

import pytest
import torch
from test_tools_runner import USER, ScriptedGPT, calc_policy, tok  # noqa: F401 (tok: a fixture)
from test_tools_runner import registry as tools_registry

from chatforge.align.problems import (
    load_problems,
    refusal_problems,
    speedrun_problems,
    split_validation,
    tool_problems,
    world_problems,
)
from chatforge.align.rewards import (
    calculator_verified,
    exact_answer,
    get_reward,
    last_number,
    number_match,
)
from chatforge.align.rl import (
    BestCheckpoint,
    RLConfig,
    cmd_rl,
    group_advantages,
    grpo,
    grpo_loss,
    k3_kl,
    sample_answers,
    update_rows,
)
from chatforge.chat_format import render_conversation
from chatforge.checkpoint import load_model, save_model
from chatforge.conversations import refusal_eval_requests, split_people
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import RLOptions, parse
from chatforge.tokenizer import Tokenizer
from chatforge.world import build_world, write_world

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    texts = ["Where was Alice born? Alice was born in Valdren.", "What is 12 plus 30? 12 + 30 = 42."] * 30
    t = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=t.vocab_size, seq_len=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    path = tmp_path_factory.mktemp("rl") / "sft"
    save_model(path, GPT(cfg), t.to_json(), {"stage": "sft"})
    return path


# ---- the math, by hand -----------------------------------------------------------------------------


def test_group_advantages_match_hand_computation():
    adv = group_advantages(
        torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), 4, eps=0.0
    )
    s = math.sqrt(1 / 3)  # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert adv[4:8].tolist() == [0.0] * 4  # all equal: nothing to learn, and no division by zero (0 / eps)
    s3 = math.sqrt(2 / 3)  # group 3: mean 2, deviations 1, -1, 0, 0
    assert adv[8:].tolist() == pytest.approx([1 / s3, -1 / s3, 0.0, 0.0])
    assert group_advantages(torch.zeros(4), 2, eps=1e-4).abs().max() == 0
    with pytest.raises(ChatforgeError):
        group_advantages(torch.zeros(5), 2)


def test_clipped_loss_matches_hand_computation():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    # ratios: row 0 [1.5, 0.9, 1.0 (masked)], row 1 [0.6, 1.1, 1.0]
    new = torch.log(torch.tensor([[0.75, 0.45, 0.5], [0.3, 0.55, 0.5]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    # row 0 (A=2):  token 1: min(1.5*2, 1.2*2) = 2.4; token 2: min(0.9*2, 0.9*2) = 1.8 -> mean -(2.4+1.8)/2 = -2.1
    # row 1 (A=-1): min(0.6*-1, 0.8*-1) = -0.8; min(1.1*-1, 1.1*-1) = -1.1; min(-1, -1) = -1 -> mean (0.8+1.1+1)/3
    expected = (-2.1 + (0.8 + 1.1 + 1.0) / 3) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # 1.5 and 0.6 are outside [0.8, 1.2]
    # the gradient flows only through unclipped terms: d loss / d logp = -A * ratio / n_tokens / rows
    new.requires_grad_(True)
    grpo_loss(new, old, adv, mask, clip_eps=0.2)[0].backward()
    g = new.grad
    assert g[0, 0] == 0 and g[1, 0] == 0 and g[0, 2] == 0  # clipped, clipped, masked
    assert float(g[0, 1]) == pytest.approx(-2 * 0.9 / 2 / 2) and float(g[1, 2]) == pytest.approx(
        1 * 1.0 / 3 / 2
    )


def test_k3_kl_and_the_kl_term():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    kl = k3_kl(logp, ref)
    assert kl[0, 0] == pytest.approx(0.5 - math.log(0.5) - 1) and kl[0, 1] == 0  # r = 0.5: r - log r - 1
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()
    mask = torch.ones(1, 2)
    base, _ = grpo_loss(logp, logp, torch.tensor([1.0]), mask)
    with_kl, stats = grpo_loss(logp, logp, torch.tensor([1.0]), mask, ref_logps=ref, kl_beta=0.1)
    assert float(with_kl - base) == pytest.approx(0.1 * float(kl.mean()), abs=1e-6)
    assert stats["kl"] == pytest.approx(float(kl.mean()))


def test_update_rows_keep_what_teaches_and_one_answer_per_tied_group_for_the_kl():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # mixed, tied, tied
    assert update_rows(rewards, 4, keep_tied=False) == ([0, 1, 2, 3], [1.0] * 4)
    assert update_rows(rewards, 4, keep_tied=True) == ([0, 1, 2, 3, 4, 8], [1.0] * 4 + [4.0, 4.0])
    assert update_rows(torch.ones(4), 2, keep_tied=False) == ([0], [0.0])  # nothing to learn: one idle row
    # without the KL a tied group adds 0 to the loss: the kept rows give the same loss, scaled by N / kept
    torch.manual_seed(0)
    logp, old = torch.randn(12, 5), torch.randn(12, 5)
    mask, adv = torch.ones(12, 5), group_advantages(rewards, 4)
    full, _ = grpo_loss(logp, old, adv, mask)
    rows, weights = update_rows(rewards, 4, keep_tied=False)
    kept, _ = grpo_loss(logp[rows], old[rows], adv[rows], mask[rows], weights=torch.tensor(weights))
    assert float(kept) * len(rows) / 12 == pytest.approx(float(full), abs=1e-6)


# ---- rewards and problems -----------------------------------------------------------------------------


def test_reward_functions():
    ex = {"answer": "Port Vesk"}
    assert exact_answer([], "She was born in Port Vesk.", ex) == 1.0
    assert exact_answer([], "She was born in Port Veskland.", ex) == 0.0  # a whole phrase, not a prefix
    num = {"answer": "42", "expression": "12 + 30"}
    assert exact_answer([], "12 + 30 = 42.", num) == 1.0 and exact_answer([], "42 is 12 + 30", num) == 1.0
    assert number_match([], "The answer is 1,234.", {"answer": "1234"}) == 1.0
    assert last_number("no digits") is None and number_match([], "none", num) == 0.0
    assert calculator_verified([], "= 42", num) == 1.0 and calculator_verified([], "= 41", num) == 0.0
    assert (
        calculator_verified([], "= 42", {"answer": "42", "expression": "12 + 31"}) == 0.0
    )  # gold recomputed
    assert exact_answer([], "Ada turned 37 in 1974.", {"answer": "37"}) == 1.0  # stated, not the last number
    assert exact_answer([], "Ada was born in 1937.", {"answer": "37"}) == 0.0  # a whole number only
    assert number_match([], "42 is 12 + 30", num) == 0.0  # the strict rule: the last number
    with pytest.raises(ChatforgeError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(ChatforgeError, match="'answer'"):
        exact_answer([], "x", {})
    # a refusal problem: right when the reply refuses exactly when it should
    harmful, harmless = {"refuse": True}, {"refuse": False}
    assert exact_answer([], "Sorry, but I can't help with that.", harmful) == 1.0
    assert exact_answer([], "Sure. Open the task manager and choose End task.", harmful) == 0.0
    assert exact_answer([], "Sure. Open the task manager and choose End task.", harmless) == 1.0
    assert exact_answer([], "Sorry, that is something I won't help with.", harmless) == 0.0


def test_refusal_problems_ask_training_requests_without_tools(tmp_path):
    problems = refusal_problems(40, seed=2)
    assert [p["refuse"] for p in problems] == [True, False] * 20 and not any(p["tools"] for p in problems)
    held_disallowed, held_benign = refusal_eval_requests()
    asked = {p["messages"][0]["content"] for p in problems}
    assert asked.isdisjoint(held_disallowed + held_benign)  # the evaluation's requests stay unseen
    assert refusal_problems(40, seed=2) == problems and refusal_problems(40, seed=3) != problems
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems[:2]))
    assert load_problems(path) == problems[:2]
    path.write_text(json.dumps({"question": "Hi?", "refuse": "yes"}) + "\n")
    with pytest.raises(ChatforgeError, match="'refuse' must be true or false"):
        load_problems(path)


def test_world_problems_are_checkable(tmp_path):
    world = build_world(0, 40, 4)
    people, _ = split_people(world)
    problems = world_problems(world, people, seed=1)
    arith = [p for p in problems if p["kind"] == "arithmetic"]
    facts = [p for p in problems if p["kind"] != "arithmetic"]
    assert len(arith) == len(facts) > 0
    for p in arith:  # the calculator agrees with the stored answer
        assert calculator_verified(p["messages"], f"= {p['answer']}", p) == 1.0
    for p in facts:
        person = world.person(p["person_id"])
        assert person.name in p["messages"][0]["content"]
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"question": "Where?", "answer": "Here"}) + "\n" + '{"answer": 1}\n')
    with pytest.raises(ChatforgeError, match="line 2: a problem needs"):
        load_problems(path)
    path.write_text(json.dumps({"question": "2 + 2?", "answer": 4, "tools": False}) + "\n")
    assert load_problems(path)[0]["tools"] is False  # asked without the calculator (a rollout's `shown`)
    path.write_text(json.dumps({"question": "2 + 2?", "tools": "no"}) + "\n")
    with pytest.raises(ChatforgeError, match="'tools' must be true or false"):
        load_problems(path)


# ---- learning ---------------------------------------------------------------------------------------------


def test_grpo_raises_the_reward_on_a_toy_task(run_dir, tmp_path):
    """Reward 1 when the answer contains the letter 'e'. The random model's greedy answers never do,
    and about a third of its samples do; GRPO must raise both (seed-checked: 0 -> 1 greedy on seeds 0-4)."""

    def contains_e(messages, text, example):
        return float("e" in text)

    problems = [{"messages": [{"role": "user", "content": f"Say something {i}."}]} for i in range(8)]
    cfg = RLConfig(steps=12, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, warmup_steps=0,
                   eval_every=6, device="cpu", seed=0)  # fmt: skip
    summary = grpo(run_dir, problems, problems[:4], tmp_path / "toy", cfg, contains_e, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert sum(sampled[-4:]) / 4 > sum(sampled[:4]) / 4 + 0.05
    assert summary["val_reward_start"] == 0.0 and summary["val_reward_last"] >= 0.75


def test_the_kl_is_to_the_frozen_starting_model(run_dir, tmp_path):
    """With --kl-beta the KL is measured against a frozen copy of the starting model: zero on the first
    step's one update (the policy is still that model), above zero once the policy has moved, as it
    would never be against the moving policy."""

    def contains_e(messages, text, example):
        return float("e" in text)

    problems = [{"messages": [{"role": "user", "content": f"Say something {i}."}]} for i in range(8)]
    cfg = RLConfig(steps=4, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, warmup_steps=0,
                   eval_every=0, kl_beta=0.1, epochs=1, device="cpu", seed=0)  # fmt: skip
    grpo(run_dir, problems, problems[:4], tmp_path / "kl", cfg, contains_e, progress=False)
    kl = [
        r["kl"]
        for r in map(json.loads, (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines())
        if "kl" in r
    ]
    assert len(kl) == 4 and abs(kl[0]) < 1e-5 and kl[-1] > 1e-3


def test_embed_lr_zero_leaves_the_embeddings_as_they_were(run_dir, tmp_path):
    def contains_e(messages, text, example):
        return float("e" in text)

    problems = [{"messages": [{"role": "user", "content": f"Say something {i}."}]} for i in range(8)]
    cfg = RLConfig(steps=2, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, warmup_steps=0,
                   eval_every=0, embed_lr=0.0, epochs=1, device="cpu", seed=0)  # fmt: skip
    assert cfg.train_config().embed_lr == 0.0 and RLConfig(lr=2e-4).train_config().embed_lr == 2e-4
    grpo(run_dir, problems, problems[:4], tmp_path / "frozen", cfg, contains_e, progress=False)
    before, after = load_model(run_dir)[0].state_dict(), load_model(tmp_path / "frozen")[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any("wte" in k or "embed" in k for k in moved)


def test_grpo_keeps_the_step_that_scores_best_on_validation(run_dir, tmp_path):
    """Training rewards an 'e', validation rewards its absence: as training succeeds validation falls,
    so the run must keep step 0, the starting weights, and not the last step's."""

    def wants(messages, text, example):
        return float(("e" in text) == (example["want"] == "e"))

    train = [
        {"messages": [{"role": "user", "content": f"Say something {i}."}], "want": "e"} for i in range(8)
    ]
    val = [{"messages": [{"role": "user", "content": f"Say nothing {i}."}], "want": "no e"} for i in range(4)]
    cfg = RLConfig(steps=12, prompts_per_step=4, group_size=8, max_new_tokens=8, lr=3e-3, warmup_steps=0,
                   eval_every=6, device="cpu", seed=0)  # fmt: skip
    summary = grpo(run_dir, train, val, tmp_path / "best", cfg, wants, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_reward"]) for r in rows if "val_reward" in r]
    assert [s for s, _ in curve] == [0, 6, 12] and curve[-1][1] < curve[0][1]  # validation fell
    assert summary["best_step"] == 0 and summary["val_best"] == curve[0][1]
    kept, meta, _ = load_model(tmp_path / "best")
    start, _, _ = load_model(run_dir)
    assert meta["best_step"] == 0 and meta["step"] == 12
    assert all(
        torch.equal(a, b)
        for a, b in zip(kept.state_dict().values(), start.state_dict().values(), strict=True)
    )


def test_a_later_checkpoint_must_beat_the_kept_one_by_a_standard_error(run_dir, tmp_path):
    model, _, _ = load_model(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    best = BestCheckpoint(tmp_path / "best", "val_pass1")
    assert best.offer(0, {"val_pass1": 0.5, "val_n": 100}, model, tokenizer, {"stage": "rl"})  # the first
    assert not best.offer(10, {"val_pass1": 0.54, "val_n": 100}, model, tokenizer, {})  # inside 0.05: noise
    assert best.offer(20, {"val_pass1": 0.56, "val_n": 100}, model, tokenizer, {})
    assert (best.step, best.value, best.n) == (20, 0.56, 100) and load_model(tmp_path / "best")[1][
        "step"
    ] == 20
    again = BestCheckpoint(tmp_path / "best", "val_pass1")
    again.restore(best.record())  # a resumed run knows what it kept
    assert again.record() == best.record()


def test_rl_cli_on_world_problems_writes_a_run(run_dir, tmp_path):
    world_dir = tmp_path / "world"
    write_world(build_world(0, 40, 4), world_dir, paraphrases=1, seed=0)
    argv = ["--model", run_dir, "--problems", "world", "--world", world_dir, "--out", tmp_path / "rl",
            "--steps", 2, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 6,
            "--eval-every", 1, "--eval-problems", 8, "--kl-beta", 0.05, "--device", "cpu", "--no-progress"]  # fmt: skip
    cmd_rl(parse(RLOptions, argv))
    out = tmp_path / "rl"
    model, meta, _ = load_model(out)
    assert meta["stage"] == "rl" and meta["reward"] == "exact" and meta["problems"] == "world"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_pass1" in r] == [0, 1, 2]
    assert all(r["kl"] >= 0 for r in rows if "kl" in r)
    assert (out / "rl.png").stat().st_size > 1000 and (out / "rl_pass1.png").stat().st_size > 1000
    summary = json.loads((out / "rl_summary.json").read_text())
    n_val = summary["val_problems"]  # 8 split off, less those too long for the 64-token context
    assert 0 < n_val <= 8 and 0 < summary["heldout_problems"] <= 8
    assert [c["step"] for c in summary["val_curve"]] == [0, 1, 2]
    assert all(c["lo"] <= c["pass1"] <= c["hi"] and c["n"] == n_val for c in summary["val_curve"])
    for when in ("start", "end"):  # held out: asked of the starting model and of the kept one only
        h = summary["heldout"][when]
        assert h["lo"] <= h["pass1"] <= h["hi"] and h["pass1"] == summary[f"heldout_pass1_{when}"]
    assert summary["best_step"] in (0, 1, 2) and meta["best_step"] == summary["best_step"]
    with pytest.raises(ChatforgeError, match="needs --world"):
        cmd_rl(parse(RLOptions, argv[:4] + ["--out", tmp_path / "x"]))
    with pytest.raises(ChatforgeError, match="unknown precision 'fp16'"):
        cmd_rl(parse(RLOptions, [*argv, "--out", tmp_path / "y", "--set", "precision=fp16"]))
    assert not (tmp_path / "y").exists()  # refused before anything was written


# ---- with tools ------------------------------------------------------------------------------------------


def test_tool_rollout_trains_on_what_the_policy_wrote_never_on_the_tool_result(tok):  # noqa: F811
    """The scripted policy calls the calculator for 2**64 and then states the result. The rendered
    turn is exactly SFT's rendering of the same conversation, and the result's tokens in the tool
    message are masked out while the same digits in the policy's answer are trained on."""
    model, reg = ScriptedGPT(tok, calc_policy), tools_registry()
    cfg = RLConfig(max_new_tokens=64, max_calls=2)
    ids, masks, texts = sample_answers(
        model, tok, [USER, USER], cfg, temperature=0.0, seed=None, registry=reg
    )
    result = str(2**64)
    assert texts == [f"It is {result}."] * 2
    conv = USER + [
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2**64"}}}]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": f"It is {result}."},
    ]  # fmt: skip
    want_ids, want_mask = render_conversation(tok, conv, tools=reg.schemas())
    assert ids[0] == want_ids and masks[0] == want_mask
    trained = tok.decode([i for i, m in zip(ids[0], masks[0], strict=True) if m])
    untrained = tok.decode([i for i, m in zip(ids[0], masks[0], strict=True) if not m])
    assert "Let me compute." in trained and "2**64" in trained and trained.count(result) == 1  # the answer
    assert untrained.count(result) == 1  # the tool's result: given, never trained on
    assert "What is 2 to the 64?" in untrained


def test_a_rollout_mixes_questions_with_and_without_the_calculator(tok):  # noqa: F811
    """shown=False asks a question with no tool in the system turn, in the same batch as one that
    shows the calculator; each row is rendered (and so trained on) the way it was asked."""

    def policy(msgs: list[tuple[str, str]]) -> str:
        if any(role == "system" and "calculator" in text for role, text in msgs):
            return calc_policy(msgs)
        return "I cannot compute that in my head."

    model, reg = ScriptedGPT(tok, policy), tools_registry()
    cfg = RLConfig(max_new_tokens=64, max_calls=2)
    ids, masks, texts = sample_answers(
        model, tok, [USER, USER], cfg, temperature=0.0, seed=None, registry=reg, shown=[True, False]
    )
    assert texts == [f"It is {2**64}.", "I cannot compute that in my head."]
    plain = USER + [{"role": "assistant", "content": texts[1]}]
    assert (ids[1], masks[1]) == render_conversation(tok, plain)
    assert "calculator" in tok.decode(ids[0]) and "calculator" not in tok.decode(ids[1])


def test_tool_problems_are_checkable():
    world = build_world(0, 40, 4)
    people, _ = split_people(world)
    problems = tool_problems(world, people, 40, seed=3)
    assert {p["kind"] for p in problems} == {"arithmetic", "word"}
    names = {p.name for p in people}
    for p in problems:
        assert (
            calculator_verified(p["messages"], f"= {p['answer']}", p) == 1.0
        )  # the expression gives the answer
        assert exact_answer(p["messages"], p["final"], p) == 1.0  # the reference sentence states it
        if p["kind"] == "word":
            assert any(n in p["question"] for n in names)
    assert tool_problems(world, people, 40, seed=3) == problems  # seeded
    # the speedrun's mix: facts + sums + calculator problems, never one the evaluation asks
    _, others = split_people(world)
    asked = {problems[0]["question"]}
    cfg = RLConfig(tool_problems=40, eval_problems=30, seed=3, refusal_problems=20)
    train, val, held_out = speedrun_problems(world, people, others, cfg, asked)
    assert {"arithmetic", "word", "refusal", "look_alike"} <= {p["kind"] for p in train}
    assert not any("refuse" in p for p in val + held_out)  # what RL reports on stays facts, sums, tools
    question = lambda ps: {p["messages"][-1]["content"] for p in ps}  # noqa: E731
    person = lambda ps: {p["person_id"] for p in ps if p.get("person_id") is not None}  # noqa: E731
    assert asked.isdisjoint(question(train + val + held_out))
    assert person(train) <= {p.id for p in people}
    # validation and held out: about the two halves of the evaluation people, never one question in two sets
    assert person(val) | person(held_out) <= {p.id for p in others} and person(val).isdisjoint(
        person(held_out)
    )
    assert question(val).isdisjoint(question(held_out)) and question(val).isdisjoint(question(train))
    assert question(train).isdisjoint(question(held_out))
    kinds = [p["kind"] for p in val]  # a third facts, a third small sums, a third calculator problems
    assert (
        25 <= len(val) <= 30
        and kinds.count("word") >= 1
        and sum(k not in ("arithmetic", "word") for k in kinds) == 10
    )
    assert speedrun_problems(world, people, others, cfg, asked)[1] == val  # seeded


def test_split_validation_is_seeded_and_bounded():
    problems = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(50)]
    train, val = split_validation(problems, 20, seed=1)
    assert len(val) == 5 and len(train) == 45  # at most a tenth
    assert sorted(p["messages"][0]["content"] for p in train + val) == sorted(f"q{i}" for i in range(50))
    assert split_validation(problems, 20, seed=1) == (train, val)
    assert split_validation(problems, 3, seed=1)[1] != split_validation(problems, 3, seed=2)[1]
    with pytest.raises(ChatforgeError, match="at least 2 problems"):
        split_validation(problems[:1], 1)


def test_rl_cli_with_tools_writes_a_run(tmp_path):
    """`--problems tools`: calculator problems about SFT people, held out about evaluation people,
    answered through the calculator."""
    world_dir = tmp_path / "world"
    write_world(build_world(0, 40, 4), world_dir, paraphrases=1, seed=0)
    t = Tokenizer.train(["What is 12 * 30? In what year did Ada turn 37? calculator expression"] * 20, 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=t.vocab_size, seq_len=256, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    save_model(tmp_path / "sft", GPT(cfg), t.to_json(), {"stage": "sft"})
    argv = ["--model", tmp_path / "sft", "--problems", "tools", "--world", world_dir, "--out", tmp_path / "rl",
            "--steps", 1, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 6,
            "--eval-every", 1, "--eval-problems", 4, "--tool-problems", 20, "--device", "cpu", "--no-progress"]  # fmt: skip
    cmd_rl(parse(RLOptions, argv))
    _, meta, _ = load_model(tmp_path / "rl")
    assert meta["reward"] == "exact" and meta["problems"] == "tools"
    assert meta["rl"]["tools"] is True and meta["rl"]["tool_problems"] == 20
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_pass1" in r] == [0, 1]
