"""Reward model and DPO: the losses against hand-computed values, answer-only log-probs, a reward
model that learns a rigged pair (and judges a win rate by it), and tiny end-to-end runs that write
loadable run folders."""

import json
import math

import pytest
import torch
from test_tools_runner import ScriptedGPT

from chatforge.align import encode_answer, final_hidden, sequence_logps
from chatforge.align.dpo import cmd_dpo, dpo_loss, pair_logps
from chatforge.align.prefs import encode_prefs, load_prefs, world_prefs, write_prefs
from chatforge.align.reward import (
    RewardModel,
    best_of_n,
    bt_loss,
    cmd_reward,
    cmd_winrate,
    load_reward_model,
    pair_rewards,
    save_reward_model,
    score,
    win_rate,
)
from chatforge.align.rewards import get_reward
from chatforge.checkpoint import load_model, read_config, save_model
from chatforge.conversations import split_people
from chatforge.device import cpu_has_native_bf16
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import chatml_template  # noqa: E402
from chatforge.options import DPOOptions, RewardOptions, WinrateOptions
from chatforge.options import parse as parse_options
from chatforge.tokenizer import Tokenizer
from chatforge.world import build_world

# a real template (rendered for every prompt since runs use their stored one), ChatML as chatforge's
CHATML = chatml_template("<|endoftext|>")


def nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """World comparisons, a tokenizer that knows their words, and a tiny random 'SFT' run folder."""
    root = tmp_path_factory.mktemp("align")
    world = build_world(0, 40, 4)
    people, _ = split_people(world)
    rows = world_prefs(world, people, seed=0, per_person=1, n_arithmetic=6, n_refusal=4)
    write_prefs(root / "prefs.jsonl", rows)
    texts = [
        r["messages"][-1]["content"] + " " + r["chosen"]["content"] + " " + r["rejected"]["content"]
        for r in rows
    ]
    tok = Tokenizer.train(texts * 3, 400)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    save_model(root / "sft", GPT(cfg), tok.to_json(), {"stage": "sft", "chat_template": CHATML})
    return root, tok


def parse(options: type, *argv):
    return parse_options(options, list(argv))


# ---- the losses, by hand ----------------------------------------------------------------------------


def test_dpo_loss_and_rewards_match_hand_computation():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # chosen rewards 0.5 * (pc - rc) = [0.25, 0]; rejected 0.5 * (pr - rr) = [-0.25, 0.25]
    assert chosen.tolist() == pytest.approx([0.25, 0.0])
    assert rejected.tolist() == pytest.approx([-0.25, 0.25])
    # logits = chosen - rejected = [0.5, -0.25]
    assert float(loss) == pytest.approx((nll_sigmoid(0.5) + nll_sigmoid(-0.25)) / 2, abs=1e-6)
    # identical policy and reference: loss log 2, rewards 0
    loss, chosen, _ = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2)) and chosen.abs().max() == 0


def test_bt_loss_matches_hand_computation():
    loss = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(loss) == pytest.approx((nll_sigmoid(1.0) + nll_sigmoid(-1.0)) / 2, abs=1e-6)


def test_answer_logps_cover_only_the_final_answer(setup):
    root, tok = setup
    model, _, _ = load_model(root / "sft")
    prompt = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    ids, mask, truncated = encode_answer(tok, prompt, "6.", 96)
    assert not truncated and ids[-1] == tok.special_id("<|im_end|>")
    n_answer = len(tok.encode("6.")) + 1  # content + <|im_end|>; the earlier "4." is not in the mask
    assert mask == [0] * (len(ids) - n_answer) + [1] * n_answer
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
        by_hand = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids)) if mask[t])
        got = float(sequence_logps(model, [ids, ids[:5]], [mask, [0, 0, 0, 1, 1]], "cpu")[0])
    assert got == pytest.approx(by_hand, abs=1e-4)  # padding a shorter row beside it changes nothing
    short_ids, short_mask, truncated = encode_answer(tok, prompt, "6. " * 100, 40)
    assert truncated and len(short_ids) == 40 and sum(short_mask) == 20  # half the room stays with the prompt
    h = final_hidden(model, torch.tensor([ids]))
    assert h.shape == (1, len(ids), model.cfg.n_embd)
    assert torch.allclose(model.lm_head(h), model(torch.tensor([ids])), atol=1e-5)  # forward minus lm_head


# ---- reward model ---------------------------------------------------------------------------------------


def test_reward_model_learns_a_rigged_pair(setup, tmp_path):
    root, tok = setup
    q = [{"role": "user", "content": "Where was Alice born?"}]
    good, bad = "Alice was born in Valdren.", "I like turtles and boats very much."
    write_prefs(tmp_path / "rigged.jsonl", [{"messages": q, "chosen": good, "rejected": bad}] * 4)
    args = parse(RewardOptions, "--model", root / "sft", "--data", tmp_path / "rigged.jsonl",
                 "--out", tmp_path / "rm", "--steps", 8, "--lr", 3e-3, "--batch-size", 2,
                 "--val-fraction", 0, "--no-progress", "--device", "cpu")  # fmt: skip
    cmd_reward(args)
    rm, rtok = load_reward_model(tmp_path / "rm")
    r_good, r_bad = score(rm, rtok, [[*q, {"role": "assistant", "content": a}] for a in (good, bad)])
    assert r_good > r_bad + 0.5
    meta = read_config(tmp_path / "rm")
    assert meta["stage"] == "reward" and meta["chat_template"] == CHATML  # the base's chat format kept
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "rm" / "reward.png").stat().st_size > 1000
    # the reward model as an RL reward, and best-of-n
    reward = get_reward(f"rm:{tmp_path / 'rm'}")
    assert reward(q, good, {}) == pytest.approx(r_good, abs=1e-5)
    policy, _, _ = load_model(root / "sft")
    best = best_of_n(policy, rm, rtok, q, 4, max_new_tokens=8, seed=0)
    assert best["reward"] == max(r for _, r in best["candidates"]) and len(best["candidates"]) == 4
    with pytest.raises(ChatforgeError, match="not a reward model"):
        load_reward_model(root / "sft")
    # the reward model as a judge: one model always gives the chosen answer, the other the rejected
    good_bot = ScriptedGPT(rtok, lambda turns: good, seq_len=96)
    bad_bot = ScriptedGPT(rtok, lambda turns: bad, seq_len=96)
    res = win_rate(rm, rtok, good_bot, bad_bot, [q] * 3, max_new_tokens=24, temperature=0.0)
    assert (res["win_rate"], res["wins"], res["n"]) == (1.0, 3, 3) and res["examples"][0]["model"] == good
    assert res["mean_reward_model"] == pytest.approx(r_good, abs=1e-4)
    res = win_rate(rm, rtok, bad_bot, bad_bot, [q] * 2, max_new_tokens=24, temperature=0.0)
    assert (res["win_rate"], res["ties"]) == (0.5, 2)  # the same answers: ties count half


def test_fresh_reward_is_the_answers_log_likelihood_and_old_heads_load(setup, tmp_path):
    """Step 0: head at zero, likelihood_weight 1, so the reward is the mean log-prob of the answer's
    tokens under the trunk (DPO's summed log-prob / tokens); a head file from before the term loads
    with weight 0."""
    root, tok = setup
    gpt, _, _ = load_model(root / "sft")
    rm = RewardModel(gpt).eval()
    rows = load_prefs(root / "prefs.jsonl")[:4]
    convs = [[*r["messages"], r["chosen"]] for r in rows]
    encoded = [encode_answer(tok, c[:-1], c[-1], gpt.cfg.seq_len) for c in convs]
    with torch.no_grad():
        expected = sequence_logps(gpt, [e[0] for e in encoded], [e[1] for e in encoded], "cpu")
    n_tokens = [sum(e[1]) for e in encoded]
    mean = [lp / n for lp, n in zip(expected.tolist(), n_tokens, strict=True)]
    assert score(rm, tok, convs) == pytest.approx(mean, abs=1e-4)
    assert all(x < 0 for x in expected.tolist())
    # a head file with no likelihood_weight (saved before the term existed): the head alone scores
    with torch.no_grad():
        rm.head.bias.fill_(0.25)
    save_reward_model(tmp_path / "rm", rm, tok, {})
    head_path = tmp_path / "rm" / "reward_head.safetensors"
    from safetensors.torch import load_file, save_file

    old = load_file(str(head_path))
    assert old["likelihood_weight"].item() == 1.0
    save_file({k: v for k, v in old.items() if k != "likelihood_weight"}, str(head_path))
    old_rm, _ = load_reward_model(tmp_path / "rm")
    assert old_rm.likelihood_weight.item() == 0.0
    assert score(old_rm, tok, convs) == pytest.approx([0.25] * 4, abs=1e-6)


def test_winrate_cli(setup, tmp_path, capsys):
    root, _ = setup
    cmd_reward(parse(RewardOptions, "--model", root / "sft", "--data", root / "prefs.jsonl",
                     "--out", tmp_path / "rm", "--steps", 1, "--no-progress", "--device", "cpu"))  # fmt: skip
    argv = ["--model", root / "sft", "--against", root / "sft", "--rm", tmp_path / "rm", "--prompts",
            root / "prefs.jsonl", "--n", 5, "--max-new-tokens", 8, "--device", "cpu", "--out", tmp_path / "w.json"]  # fmt: skip
    cmd_winrate(parse(WinrateOptions, *argv))
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["n"] == 5 and result["win_rate"] == 0.5 and result["ties"] == 5  # a model against itself
    assert "win rate 0.500 over 5 prompts" in capsys.readouterr().out
    with pytest.raises(ChatforgeError, match="--n must be at least 1"):
        cmd_winrate(parse(WinrateOptions, *argv[:-4], "--n", 0))


def test_reward_with_held_out_accuracy_and_resume(setup, tmp_path):
    root, _ = setup
    base = ["--model", root / "sft", "--data", root / "prefs.jsonl", "--out", tmp_path / "rm",
            "--batch-size", 4, "--val-fraction", 0.2, "--no-progress", "--device", "cpu",
            "--set", "eval_every=2", "--set", "ckpt_every=2"]  # fmt: skip
    cmd_reward(parse(RewardOptions, *base, "--steps", 2))
    with pytest.raises(ChatforgeError, match="already has checkpoints|--resume"):
        cmd_reward(parse(RewardOptions, *base, "--steps", 4))
    cmd_reward(parse(RewardOptions, *base, "--steps", 4, "--resume"))
    summary = json.loads((tmp_path / "rm" / "reward_summary.json").read_text())
    assert summary["val_pairs"] > 0 and 0 <= summary["val_acc_end"] <= 1
    evals = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "val_acc" in r] == [0, 2, 4]


# ---- DPO ----------------------------------------------------------------------------------------------


def test_dpo_end_to_end_writes_a_chat_able_run_and_learns(setup, tmp_path):
    root, tok = setup
    args = parse(DPOOptions, "--model", root / "sft", "--data", root / "prefs.jsonl",
                 "--out", tmp_path / "dpo", "--steps", 6, "--lr", 2e-3, "--batch-size", 4,
                 "--beta", 0.5, "--no-progress", "--device", "cpu", "--set", "eval_every=3")  # fmt: skip
    cmd_dpo(args)
    out = tmp_path / "dpo"
    policy, meta, _ = load_model(out)  # a normal run folder
    assert meta["stage"] == "dpo" and meta["dpo"]["beta"] == 0.5 and meta["chat_template"] == CHATML
    summary = json.loads((out / "dpo_summary.json").read_text())
    assert summary["val_pairs"] > 0 and len(summary["samples"]) > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"val_acc", "val_margin"} <= set(rows[0]) and rows[0][
        "val_margin"
    ] == 0  # policy == reference at 0
    assert (out / "dpo.png").stat().st_size > 1000
    # it learned: on the training comparisons the policy now prefers chosen over rejected more than before
    ref, _, _ = load_model(root / "sft")
    pairs, _ = encode_prefs(tok, load_prefs(root / "prefs.jsonl"), 96)
    with torch.no_grad():
        c0, r0 = pair_logps(ref, pairs, "cpu")
        c1, r1 = pair_logps(policy, pairs, "cpu")
    assert float(((c1 - c0) - (r1 - r0)).mean()) > 0.5


def test_dpo_with_lora_saves_adapter_and_merged_model(setup, tmp_path):
    root, _ = setup
    args = parse(DPOOptions, "--model", root / "sft", "--data", root / "prefs.jsonl",
                 "--out", tmp_path / "lora", "--steps", 2, "--lr", 1e-3, "--batch-size", 2,
                 "--lora-rank", 2, "--no-progress", "--device", "cpu")  # fmt: skip
    cmd_dpo(args)
    out = tmp_path / "lora"
    assert (out / "adapter_model.safetensors").is_file() and (out / "model.safetensors").is_file()
    merged, meta, _ = load_model(out)
    assert meta["lora"]["rank"] == 2
    base, _, _ = load_model(root / "sft")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted projections moved


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    root, _ = setup
    (tmp_path / "ties.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "verdict": "tie"}
        )
        + "\n"
    )
    for argv, msg in [
        (["--data", tmp_path / "ties.jsonl"], "no trainable comparisons"),
        (["--data", tmp_path / "missing.jsonl"], "no file"),
        (["--data", root / "prefs.jsonl", "--beta", 0], "beta must be positive"),
    ]:
        args = parse(DPOOptions, "--model", root / "sft", "--out", tmp_path / "x", "--no-progress", *argv)
        with pytest.raises(ChatforgeError, match=msg):
            cmd_dpo(args)


def test_rpo_alpha_keeps_the_chosen_answers_likely(setup, tmp_path):
    root, tok = setup
    pairs, _ = encode_prefs(tok, load_prefs(root / "prefs.jsonl"), 96)
    chosen_logp = {}
    for alpha in (0.0, 1.0):
        args = parse(DPOOptions, "--model", root / "sft", "--data", root / "prefs.jsonl",
                     "--out", tmp_path / f"a{alpha}", "--steps", 4, "--lr", 2e-3, "--batch-size", 4,
                     "--rpo-alpha", alpha, "--no-progress", "--device", "cpu")  # fmt: skip
        cmd_dpo(args)
        model, meta, _ = load_model(tmp_path / f"a{alpha}")
        assert meta["dpo"]["rpo_alpha"] == alpha
        with torch.no_grad():
            chosen_logp[alpha] = float(pair_logps(model, pairs, "cpu")[0].mean())
    assert chosen_logp[1.0] > chosen_logp[0.0]
    summary = json.loads((tmp_path / "a1.0" / "dpo_summary.json").read_text())
    assert set(summary["val_acc_by_kind"]) <= {"fact_wrong", "fact_rambling", "arithmetic", "refusal"}


def test_preference_trainers_honour_precision(setup, tmp_path):
    root, tok = setup
    base = (
        "--model",
        root / "sft",
        "--data",
        root / "prefs.jsonl",
        "--steps",
        1,
        "--no-progress",
        "--device",
        "cpu",
    )
    for options, command in ((DPOOptions, cmd_dpo), (RewardOptions, cmd_reward)):
        with pytest.raises(ChatforgeError, match="unknown precision 'fp16'"):
            command(parse(options, *base, "--out", tmp_path / "x", "--set", "precision=fp16"))
        assert not (tmp_path / "x").exists()  # refused before anything was written
    pairs, _ = encode_prefs(tok, load_prefs(root / "prefs.jsonl"), 96)
    model, _, _ = load_model(root / "sft")
    if not cpu_has_native_bf16():
        with pytest.raises(ChatforgeError, match="precision bf16"):
            pair_logps(model, pairs, "cpu", "bf16")
        return
    with torch.no_grad():  # bf16 autocast really runs: close to fp32, not equal, returned in fp32
        c32, r32 = pair_logps(model, pairs, "cpu")
        c16, r16 = pair_logps(model, pairs, "cpu", "bf16")
        rm = RewardModel(model)
        w32, _ = pair_rewards(rm, pairs, "cpu")
        w16, _ = pair_rewards(rm, pairs, "cpu", "bf16")
    assert c16.dtype == torch.float32 and w16.dtype == torch.float32
    assert not torch.equal(c32, c16) and torch.allclose(c32, c16, rtol=0.05, atol=1.0)
    assert not torch.equal(w32, w16) and torch.allclose(w32, w16, rtol=0.05, atol=0.1)
