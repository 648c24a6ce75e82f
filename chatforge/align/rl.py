"""Reinforcement learning from a verifiable reward: GRPO (Shao et al. 2024, DeepSeekMath).

    chatforge rl --model runs/sft --problems world --world runs/demo/world --out runs/rl --steps 100

Each step, for P problems: sample a group of G answers per problem (the engine, temperature T),
score each with a reward function (rewards.py), and turn rewards into advantages relative to the
group: A = (r - mean(group)) / (std(group) + eps). A group whose answers all score the same
teaches nothing and gets A = 0. Then a few epochs of the clipped policy-gradient loss over the
answer tokens (PPO's ratio to the policy that sampled them, clipped to [1 - eps, 1 + eps]):

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t

with ratio_t = pi(token_t) / pi_old(token_t) and, when --kl-beta > 0, the k3 estimator of the KL
to the starting model: KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (>= 0, unbiased). It is
what keeps skills the problems never exercise: on the world demo, 60 steps on fact and arithmetic
problems without it took refusals of harmful requests from 96% to 20%; with --kl-beta 0.1, 93%. Token
losses are averaged within each answer, then over answers, as in the GRPO paper. Log-probs are
taken at the sampling temperature, so the ratio is 1 on the first epoch.

Only the rows that teach something are trained on (`update_rows`): a group whose answers all score
the same has advantage 0, so it is left out, or with the KL on one of its answers stands for the
group. With one update per step (epochs 1, one minibatch) the ratio's denominator is the policy's own
detached log-prob, so no separate forward pass is taken for it.

Every eval step greedy answers to validation problems (a split of the training pool, never trained
on) give pass@1 with its 95% Wilson interval (the exact-answer check, when the problems have answers)
and the mean reward, logged and plotted against step (rl.png, rl_pass1.png). The best-scoring model
is kept (`BestCheckpoint`: a later one must beat it by a standard error) and is what the run saves. Held-out problems (about people training never
asked about) are asked only twice: of the starting model and of the kept one (rl_summary.json).

In the training loop (train/loop.py) a GRPO step is a rollout (GRPOStep.begin_step: sample, score,
advantages, old and reference log-probs) and then epochs x minibatches optimizer updates, each the
loss of one minibatch (GRPOStep.loss); the loop does the LR, clipping, checkpoints and logging.

Problems (problems.py): a .jsonl of {"messages": [...]} or {"question": ...}, with "answer" for the
exact checks and "expression" for the calculator check (the world's eval_forward.jsonl works as is),
or `world`: forward fact questions and arithmetic built from a world folder (--world), or `tools`:
calculator problems (3-5 digit arithmetic, word problems). The training problems ask about the SFT
people, the held-out ones about the evaluation people; a held-out or validation question is never
trained on.

With --tools (on for `tools`) every answer is written with the calculator shown and run for real
(tools/runner.py); the finished turn is rendered again with SFT's mask, so the policy is trained on
what it wrote (text, calls) and never on a tool's result.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chatforge import checkpoint as ckpt
from chatforge.align import pad_right, token_logps
from chatforge.align.prefs import batch_indices
from chatforge.align.problems import (
    load_problems,
    split_people_for_validation,
    split_validation,
    tool_problems,
    world_problems,
)
from chatforge.align.rewards import RewardFn, exact_answer, get_reward, score_all
from chatforge.chat_format import render_conversation, render_prompt, turn_end_ids
from chatforge.config import RLConfig, training_config
from chatforge.conversations import split_people
from chatforge.device import autocast, pick_device, single_process
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.eval.base import wilson
from chatforge.fileio import atomic_write_json, save_figure
from chatforge.model.gpt import GPT
from chatforge.options import RLOptions
from chatforge.tokenizer import Tokenizer
from chatforge.tools.builtin import calculator_registry
from chatforge.tools.registry import ToolRegistry
from chatforge.tools.runner import generate_with_tools
from chatforge.train.loop import Stage, run_training
from chatforge.train.metrics import read_metrics
from chatforge.world import load_world

# ---- GRPO, the math --------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group after group (N = P * G).
    std is the sample standard deviation (n - 1), as TRL's GRPOTrainer uses."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ChatforgeError(
            f"need groups of at least 2 answers that divide {rewards.numel()}, got {group_size}"
        )
    r = rewards.float().view(-1, group_size)
    std = r.std(dim=1, keepdim=True)
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv)).view(-1)  # a tied group: exactly 0


def update_rows(rewards: torch.Tensor, group_size: int, keep_tied: bool) -> tuple[list[int], list[float]]:
    """The rows the updates train on, with how many answers each stands for. Every answer of a group
    whose rewards differ (weight 1). A tied group has advantage 0: its only gradient is the KL, so
    with the KL on its first answer stands for all G (an unbiased estimate at 1/G of the cost),
    and without it the group is left out. Never empty: a step of tied groups without the KL keeps
    one row at weight 0, so the step is still one optimizer update."""
    r = rewards.float().view(-1, group_size)
    rows: list[int] = []
    weights: list[float] = []
    for g, tied in enumerate((r.std(dim=1) == 0).tolist()):
        first = g * group_size
        if not tied:
            rows += range(first, first + group_size)
            weights += [1.0] * group_size
        elif keep_tied:
            rows.append(first)
            weights.append(float(group_size))
    return (rows, weights) if rows else ([0], [0.0])


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (Schulman 2020)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective. logps/old_logps/ref_logps/mask: (N, T) over target tokens,
    advantages (N,), weights (N,) how many answers each row stands for (default 1 each: the mean
    over answers). Returns (loss, {"clip_frac", "kl", "ratio"}), stats over masked tokens."""
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = None
    if ref_logps is not None and kl_beta > 0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + kl_beta * kl
    n_tokens = mask.sum(-1).clamp(min=1)
    per_answer = (per_token * mask).sum(-1) / n_tokens
    if weights is None:
        loss = per_answer.mean()
    else:
        loss = (per_answer * weights).sum() / weights.sum().clamp(min=1e-8)
    with torch.no_grad():
        total = mask.sum().clamp(min=1)
        stats = {
            "clip_frac": float((((ratio - 1).abs() > clip_eps).float() * mask).sum() / total),
            "ratio": float((ratio * mask).sum() / total),
            "kl": float((kl * mask).sum() / total) if kl is not None else 0.0,
        }
    return loss, stats


# ---- rollouts and evaluation -----------------------------------------------------------------------


@dataclass
class Rollout:
    ids: list[list[int]]  # prompt + answer, one row per sample, group after group
    masks: list[list[int]]  # 1 on the tokens the policy wrote (never on a tool's result)
    texts: list[str]
    rewards: torch.Tensor  # (N,)
    answer_tokens: int


def _answer_text(tok: Tokenizer, ids: list[int], stops: set[int]) -> str:
    return tok.decode([t for t in ids if t not in stops]).strip()


def _final_text(messages: list[dict]) -> str:
    """What a reward reads after a tool turn: the last assistant message's text."""
    for m in reversed(messages):
        if m["role"] == "assistant" and m.get("content"):
            return m["content"].strip()
    return ""


def sample_answers(
    policy: GPT,
    tok: Tokenizer,
    prompts: list[list[dict]],
    cfg: RLConfig,
    *,
    temperature: float,
    seed: int | None,
    registry: ToolRegistry | None = None,
    shown: Sequence[bool] | None = None,
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """One answer per prompt conversation: (prompt + answer ids, mask of the policy's own tokens,
    the reply text a reward reads). `shown[i]` False asks prompt i without the tools (default: all
    shown), so one rollout can mix questions asked with and without the calculator.

    Without tools: the engine's tokens as sampled. With a tool registry: the turn runs through
    `generate_with_tools` (calls executed, results fed back), then the whole turn is rendered again
    with `render_conversation`, whose mask is SFT's: 1 on assistant text, calls and <|im_end|>, 0 on
    tool results, so the policy is never trained to write a result it was given. Re-encoding the
    decoded text can split a token differently than sampling did; old and new log-probs are both
    taken on the re-rendered ids, so the ratio stays consistent."""
    was = policy.training
    policy.eval()
    try:
        if registry is None:
            stops = turn_end_ids(tok)
            ids = [render_prompt(tok, m) for m in prompts]
            outs = generate_batch(
                policy, ids, cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                seeds=seed, stop_ids=stops,
            )  # fmt: skip
            texts = [_answer_text(tok, o, set(stops)) for o in outs]
            masks = [[0] * len(pr) + [1] * len(o) for pr, o in zip(ids, outs, strict=True)]
            return [pr + o for pr, o in zip(ids, outs, strict=True)], masks, texts
        shown = [True] * len(prompts) if shown is None else list(shown)
        registries = [registry if s else ToolRegistry() for s in shown]
        new = generate_with_tools(
            policy, tok, prompts, registries, max_calls=cfg.max_calls, max_new_tokens=cfg.max_new_tokens,
            temperature=temperature, top_p=cfg.top_p, seed=seed,
        )  # fmt: skip
    finally:
        policy.train(was)
    rendered = [
        render_conversation(tok, m + added, tools=r.schemas() or None, max_len=policy.cfg.seq_len)
        for m, added, r in zip(prompts, new, registries, strict=True)
    ]
    return [r[0] for r in rendered], [r[1] for r in rendered], [_final_text(added) for added in new]


@torch.no_grad()
def rollout(
    policy: GPT,
    tok: Tokenizer,
    problems: list[dict],
    reward: RewardFn,
    cfg: RLConfig,
    seed: int,
    registry: ToolRegistry | None = None,
) -> Rollout:
    """G sampled answers for each problem (seeds seed, seed+1, ... per row), scored."""
    G = cfg.group_size
    prompts = [p["messages"] for p in problems for _ in range(G)]
    shown = [p.get("tools", True) for p in problems for _ in range(G)]
    ids, masks, texts = sample_answers(
        policy, tok, prompts, cfg, temperature=cfg.temperature, seed=seed, registry=registry, shown=shown
    )
    items = [(p["messages"], texts[i * G + j], p) for i, p in enumerate(problems) for j in range(G)]
    rewards = torch.tensor(score_all(reward, items), dtype=torch.float32)
    return Rollout(ids=ids, masks=masks, texts=texts, rewards=rewards, answer_tokens=sum(map(sum, masks)))


@torch.no_grad()
def evaluate_problems(
    policy: GPT,
    tok: Tokenizer,
    problems: list[dict],
    reward: RewardFn,
    cfg: RLConfig,
    batch_size: int = 64,
    registry: ToolRegistry | None = None,
    prefix: str = "val_",
) -> dict:
    """Greedy answers to `problems`: mean reward, and pass@1 with its 95% Wilson interval when they
    have answers (rewards.exact_answer: the reply states the answer, by the rules world QA and the
    tool evaluation score by). Keys start with `prefix`."""
    texts = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        texts += sample_answers(
            policy, tok, [p["messages"] for p in chunk], cfg, temperature=0.0, seed=None, registry=registry,
            shown=[p.get("tools", True) for p in chunk],
        )[2]  # fmt: skip
    items = [(p["messages"], t, p) for p, t in zip(problems, texts, strict=True)]
    out = {f"{prefix}reward": sum(score_all(reward, items)) / len(items), f"{prefix}n": len(items)}
    if all("answer" in p for p in problems):
        k = int(sum(exact_answer(*it) for it in items))
        lo, hi = wilson(k, len(items))
        out |= {f"{prefix}pass1": k / len(items), f"{prefix}pass1_lo": lo, f"{prefix}pass1_hi": hi}
    out[f"{prefix}sample"] = f"{problems[0]['messages'][-1]['content']} -> {texts[0]}"
    return out


@dataclass
class BestCheckpoint:
    """The evaluated model that scores best so far on the validation problems, saved in `folder`.
    A later model replaces it only when it beats it by more than the kept pass@1's standard error
    (sqrt(p (1 - p) / n)): a gain inside the noise of n problems is no reason to move further from
    the starting model, and RL that gains nothing then costs nothing. The finished run is this model."""

    folder: Path
    key: str  # val_pass1, or val_reward for problems without answers (no margin then)
    step: int = -1
    value: float = -math.inf
    n: int = 0  # problems the kept value was measured on

    def margin(self) -> float:
        if self.key != "val_pass1" or self.n < 1 or not 0 <= self.value <= 1:
            return 0.0
        return math.sqrt(self.value * (1 - self.value) / self.n)

    def offer(self, step: int, metrics: dict, model: GPT, tok: Tokenizer, meta: dict) -> bool:
        """Keep this model if it is the first or beats the kept one by the margin; True if kept."""
        value = float(metrics[self.key])
        if self.step >= 0 and value <= self.value + self.margin():
            return False
        ckpt.save_model(self.folder, model, tok.to_json(), {**meta, "step": step})
        self.step, self.value, self.n = step, value, int(metrics.get("val_n", 0))
        return True

    def record(self) -> dict:
        return {"step": self.step, "value": self.value, "n": self.n}

    def restore(self, record: dict | None) -> None:
        if record and (self.folder / "model.safetensors").is_file():
            self.step, self.value, self.n = record["step"], record["value"], record.get("n", 0)


def plot_pass1(curve: list[dict], held_out: dict, best_step: int, png: Path, title: str) -> Path:
    """Validation pass@1 against step with its 95% Wilson band, the kept step marked, and the held-out
    pass@1 before and after (error bars); written atomically."""
    import matplotlib  # slow to import: only a finished run pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [c["step"] for c in curve]
    pct = [[100 * c[k] for c in curve] for k in ("pass1", "lo", "hi")]
    ax.fill_between(steps, pct[1], pct[2], alpha=0.25, label="validation 95% interval")
    ax.plot(steps, pct[0], "o-", ms=3, lw=1, label=f"validation pass@1 (n={curve[0]['n'] if curve else 0})")
    if best_step >= 0:
        ax.axvline(best_step, ls="--", lw=1, color="gray", label=f"kept: step {best_step}")
    if held_out:
        xs = [0, best_step if best_step >= 0 else (steps[-1] if steps else 0)]
        ys = [100 * held_out["start"]["pass1"], 100 * held_out["end"]["pass1"]]
        err = [[y - 100 * h["lo"] for y, h in zip(ys, (held_out["start"], held_out["end"]), strict=True)],
               [100 * h["hi"] - y for y, h in zip(ys, (held_out["start"], held_out["end"]), strict=True)]]  # fmt: skip
        ax.errorbar(
            xs, ys, yerr=err, fmt="s", color="C3", capsize=4, label=f"held-out pass@1 (n={held_out['n']})"
        )
    ax.set(xlabel="step", ylabel="pass@1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png)


# ---- training ------------------------------------------------------------------------------------------


def _fits(
    problems: list[dict], tok: Tokenizer, seq_len: int, what: str, tools: list[dict] | None = None
) -> list[dict]:
    kept = [p for p in problems if len(render_prompt(tok, p["messages"], tools=tools)) < seq_len - 1]
    if not kept:
        raise ChatforgeError(f"no {what} problem fits the model's {seq_len}-token context")
    if len(kept) < len(problems):
        print(
            f"note: {len(problems) - len(kept)} {what} problems are too long for the context and were dropped"
        )
    return kept


def grpo(
    base: Path,
    problems: list[dict],
    val_problems: list[dict],
    out_dir: Path,
    cfg: RLConfig,
    reward: RewardFn | str = "exact",
    *,
    held_out: list[dict] | None = None,
    resume: bool = False,
    progress: bool = True,
    meta_extra: dict | None = None,
) -> dict:
    """GRPO-train the model in `base` on `problems`; every cfg.eval_every steps evaluate on
    `val_problems` and keep the best model (BestCheckpoint), which is what the run saves. `held_out`
    problems, when given, are asked only of the starting model and of the kept one. Returns the
    summary (rl_summary.json): the loop's, the kept step, the validation curve, the held-out before/after."""
    if cfg.group_size < 2:
        raise ChatforgeError(
            f"--group-size must be at least 2 (advantages compare answers), got {cfg.group_size}"
        )
    if cfg.steps < 1 or cfg.prompts_per_step < 1 or cfg.epochs < 1:
        raise ChatforgeError("--steps, --prompts-per-step and --epochs must be at least 1")
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    autocast(torch.device(device), cfg.precision)  # a precision this device cannot run fails here, first
    torch.manual_seed(cfg.seed)
    run = ckpt.load_run(base, device=device)
    policy, tok, base_meta, model_dir = run.model, run.tokenizer, run.meta, run.folder
    reward_name = reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)
    reward_fn = get_reward(reward, device) if isinstance(reward, str) else reward
    registry = calculator_registry() if cfg.tools else None
    schemas = registry.schemas() if registry else None
    held_out = held_out or []
    asked = {p["messages"][-1]["content"] for p in val_problems + held_out}
    problems = [
        p for p in problems if p["messages"][-1]["content"] not in asked
    ]  # a small sum can be in both
    if not problems:
        raise ChatforgeError("every training problem is also a validation or held-out one; give others")
    problems = _fits(problems, tok, policy.cfg.seq_len, "training", schemas)
    val_problems = _sample(_fits(val_problems, tok, policy.cfg.seq_len, "validation", schemas), cfg)
    held_out = _sample(_fits(held_out, tok, policy.cfg.seq_len, "held-out", schemas), cfg) if held_out else []

    def ask(problems: list[dict], prefix: str) -> dict:
        return evaluate_problems(policy, tok, problems, reward_fn, cfg, registry=registry, prefix=prefix)

    held_start = ask(held_out, "heldout_") if held_out else {}  # the starting model, even when resuming
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    policy.train()
    grpo_step = GRPOStep(policy, ref, tok, problems, reward_fn, cfg, registry)
    meta = {
        **ckpt.inherited_meta(base_meta),
        "stage": "rl",
        "rl": asdict(cfg),
        "reward": reward_name,
        "base": str(model_dir),
        "base_stage": base_meta.get("stage"),
        **(meta_extra or {}),
    }
    has_answers = all("answer" in p for p in val_problems)
    best = BestCheckpoint(out_dir / "best", "val_pass1" if has_answers else "val_reward")

    def evaluate(module: torch.nn.Module) -> dict:
        metrics = ask(val_problems, "val_")
        best.offer(grpo_step.steps_done, metrics, policy, tok, meta)
        return metrics

    def load_state(state: dict) -> None:
        grpo_step.steps_done = state["step"]
        best.restore(state.get("rl_best"))

    def save_final(final_meta: dict) -> None:
        if best.step >= 0:  # the run is the kept model
            ckpt.load_weights(policy, best.folder)
        ckpt.save_model(out_dir, policy, tok.to_json(), {**final_meta, "best_step": best.step})

    def summarize(first: dict | None, last: dict | None) -> dict:
        return {
            "problems": len(problems),
            "val_problems": len(val_problems),
            "heldout_problems": len(held_out),
            "reward": reward_name,
            "val_reward_start": first["val_reward"] if first else None,
            "val_reward_last": last["val_reward"] if last else None,
            "val_pass1_start": first.get("val_pass1") if first else None,
            "val_pass1_last": last.get("val_pass1") if last else None,
            "best_step": best.step,
            "val_best": best.value if best.step >= 0 else None,
            "sample_end": last["val_sample"] if last else None,
        }

    panels = [
        ("reward", ["reward_mean", "val_reward"]),
        ("validation pass@1 (greedy)", ["val_pass1"]),
        ("KL to start / clipped share", ["kl", "clip_frac"]),
    ]
    stage = Stage(
        name="rl", model=policy, step=grpo_step.loss, begin_step=grpo_step.begin_step, meta=meta, summarize=summarize,
        evaluate=evaluate, state=lambda: {"rl_best": best.record()}, load_state=load_state, save_final=save_final,
        plot=("rl.png", panels), plot_title=f"GRPO from {Path(base).name}: {cfg.prompts_per_step}x{cfg.group_size} samples/step",
        header=f"GRPO: {len(problems)} problems, {len(val_problems)} for validation, {len(held_out)} held out; "
        f"{cfg.prompts_per_step} x {cfg.group_size} answers per step, reward {reward_name}",
    )  # fmt: skip
    # every step logged: a step is a whole rollout
    tcfg = dataclasses.replace(
        cfg.train_config(),
        log_every=1,
        eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every,
        keep_ckpts=cfg.keep_ckpts,
    )
    summary = run_training(
        stage, tcfg, out_dir, tok, single_process(device), resume=resume, progress=progress
    )
    return _finish_summary(
        summary, out_dir, held_start, ask(held_out, "heldout_") if held_out else {}, best.step
    )


def _sample(problems: list[dict], cfg: RLConfig) -> list[dict]:
    """At most cfg.eval_problems of them, a seeded sample: problem files are often sorted by kind."""
    if len(problems) > cfg.eval_problems:
        return random.Random(cfg.seed).sample(problems, cfg.eval_problems)
    return problems


def _finish_summary(summary: dict, out_dir: Path, start: dict, end: dict, best_step: int) -> dict:
    """The loop's summary plus the validation curve and the held-out before/after, each pass@1 with its
    95% Wilson interval; rewrites rl_summary.json and draws rl_pass1.png."""
    curve = [
        {"step": r["step"], "pass1": r["val_pass1"], "lo": r["val_pass1_lo"], "hi": r["val_pass1_hi"], "n": r["val_n"]}
        for r in read_metrics(out_dir / "metrics.jsonl")
        if "val_pass1_lo" in r
    ]  # fmt: skip
    summary["val_curve"] = curve
    held = {}
    if start.get("heldout_pass1") is not None and end.get("heldout_pass1") is not None:
        held = {
            "n": start["heldout_n"],
            **{
                when: {"pass1": d["heldout_pass1"], "lo": d["heldout_pass1_lo"], "hi": d["heldout_pass1_hi"]}
                for when, d in (("start", start), ("end", end))
            },
        }
        summary |= {
            "heldout_pass1_start": held["start"]["pass1"],
            "heldout_pass1_end": held["end"]["pass1"],
            "heldout_lift_points": round(100 * (held["end"]["pass1"] - held["start"]["pass1"]), 2),
            "heldout": held,
            "heldout_sample_end": end["heldout_sample"],
        }
    if curve:
        png = plot_pass1(curve, held, best_step, out_dir / "rl_pass1.png", "GRPO: pass@1 against step")
        summary["pass1_plot"] = str(png)
    atomic_write_json(out_dir / "rl_summary.json", summary)
    return summary


@dataclass
class RolloutBatch:
    """A step's rollout as the updates read it: the rows `update_rows` keeps, group after group."""

    ids: torch.Tensor  # (N, T) prompt + answer, right-padded
    mask: torch.Tensor  # (N, T-1) over target positions: 1 on the tokens the policy wrote
    advantages: torch.Tensor  # (N,)
    weights: torch.Tensor  # (N,) how many sampled answers each row stands for
    old_logps: torch.Tensor | None  # (N, T-1) under the policy that sampled them; None: one update
    ref_logps: torch.Tensor | None  # (N, T-1) under the starting model, for the KL term


@dataclass
class GRPOStep:
    """GRPO's step for the training loop: `begin_step(step)` samples and scores a group of answers per
    problem and takes the reference (and, for more than one update, the old) log-probs; then
    `loss(module, step, update)` is the clipped objective on one minibatch, `cfg.epochs` passes over
    the rollout in all."""

    policy: GPT
    ref: GPT | None  # the frozen starting model, for the KL term
    tok: Tokenizer
    problems: list[dict]
    reward: RewardFn
    cfg: RLConfig
    registry: ToolRegistry | None
    batch: RolloutBatch | None = None  # this step's rollout
    steps_done: int = 0  # optimizer steps taken: the step an evaluation belongs to

    def minibatch(self, rows: int) -> int:
        return self.cfg.minibatch_size or rows

    def begin_step(self, step: int) -> tuple[int, dict]:
        cfg, policy = self.cfg, self.policy
        self.steps_done = step + 1
        device = next(policy.parameters()).device
        G, N = cfg.group_size, cfg.prompts_per_step * cfg.group_size
        batch = [
            self.problems[i] for i in batch_indices(len(self.problems), cfg.prompts_per_step, step, cfg.seed)
        ]
        ro = rollout(
            policy, self.tok, batch, self.reward, cfg, cfg.seed * 1_000_003 + step * N, self.registry
        )
        rows, weights = update_rows(ro.rewards, G, keep_tied=self.ref is not None)
        ids = pad_right([ro.ids[i] for i in rows], device)
        mb = self.minibatch(len(rows))
        n_updates = cfg.epochs * math.ceil(len(rows) / mb)

        def logps_of(model: GPT) -> torch.Tensor:
            return torch.cat(
                [token_logps(model, ids[i : i + mb], cfg.temperature) for i in range(0, len(rows), mb)]
            )

        with torch.no_grad(), autocast(device, cfg.precision):
            # one update: the policy is still the sampler's, so the ratio's denominator is its own detached value
            old = logps_of(policy) if n_updates > 1 else None
            ref_lp = logps_of(self.ref) if self.ref is not None else None
        self.batch = RolloutBatch(
            ids=ids,
            mask=pad_right([ro.masks[i] for i in rows], device)[:, 1:],
            advantages=group_advantages(ro.rewards, G, cfg.adv_eps)[rows].to(device),
            weights=torch.tensor(weights, device=device),
            old_logps=old,
            ref_logps=ref_lp,
        )
        r = ro.rewards.view(-1, G)
        stats = {
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(dim=1).mean()),
            "zero_std_groups": float((r.std(dim=1) == 0).float().mean()),
            "answer_tokens": ro.answer_tokens / N,
            "rows_trained": len(rows) / N,
        }
        return n_updates, stats

    def loss(self, module: torch.nn.Module, step: int, update: int) -> tuple[torch.Tensor, dict]:
        cfg, b = self.cfg, self.batch
        mb = self.minibatch(b.ids.size(0))
        n_minibatches = math.ceil(b.ids.size(0) / mb)
        sl = slice((update % n_minibatches) * mb, (update % n_minibatches + 1) * mb)
        with autocast(b.ids.device, cfg.precision):
            lp = token_logps(module, b.ids[sl], cfg.temperature)
        loss, st = grpo_loss(
            lp, b.old_logps[sl] if b.old_logps is not None else lp.detach(), b.advantages[sl], b.mask[sl],
            cfg.clip_eps, b.ref_logps[sl] if b.ref_logps is not None else None, cfg.kl_beta, b.weights[sl],
        )  # fmt: skip
        return loss, {"clip_frac": st["clip_frac"], "kl": st["kl"]}


# ---- CLI ---------------------------------------------------------------------------------------------


def resolve_problems(args: RLOptions, cfg: RLConfig) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train, validation, held-out, what to record in config.json) from the CLI options. With a world,
    training asks about the SFT people, validation about half the evaluation people and the held-out
    problems about the other half (`split_people_for_validation`); from a file, validation is a tenth
    of the problems and none is held out. --val-problems replaces the validation problems."""
    held_out: list[dict] = []
    val: list[dict] = []
    if args.problems in ("world", "tools"):
        if not args.world:
            raise ChatforgeError(
                f"--problems {args.problems} needs --world DIR (the world folder the model was trained on)"
            )
        world = load_world(args.world)
        sft_people, eval_people = split_people(world, seed=world.seed)  # the split the speedrun's SFT used
        val_people, held_people = split_people_for_validation(eval_people, cfg.seed)
        val_people, held_people = val_people or sft_people, held_people or sft_people  # a tiny world
        if args.problems == "world":
            train = world_problems(world, sft_people, cfg.seed)
            val = world_problems(world, val_people, cfg.seed + 2)
            held_out = world_problems(world, held_people, cfg.seed + 1)
        else:  # word problems about the SFT people to train on, about the evaluation people held out
            train = tool_problems(world, sft_people, cfg.tool_problems, cfg.seed)
            val = tool_problems(world, val_people, cfg.eval_problems, cfg.seed + 2)
            held_out = tool_problems(world, held_people, cfg.eval_problems, cfg.seed + 1)
        source = {"problems": args.problems, "world": str(args.world)}
    else:
        train = load_problems(args.problems)
        source = {"problems": str(args.problems)}
    if args.val_problems:
        val = load_problems(args.val_problems)
        source["val_problems"] = str(args.val_problems)
    elif not val:
        train, val = split_validation(train, cfg.eval_problems, cfg.seed)
    return train, val, held_out, source


def cmd_rl(args: RLOptions) -> None:
    cfg = training_config(args.preset, "rl", args.settings, args.overrides)
    cfg.tools = cfg.tools or args.problems == "tools"
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ChatforgeError(f"--lr must be a positive number, got {cfg.lr}")
    train, val, held_out, source = resolve_problems(args, cfg)
    summary = grpo(
        Path(args.model), train, val, Path(args.out), cfg, args.reward, held_out=held_out,
        resume=args.resume, progress=not args.no_progress, meta_extra=source,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
