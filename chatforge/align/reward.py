"""A reward model: the SFT model's trunk plus a scalar head, trained on comparisons.

    chatforge prefs reward --model runs/sft --data prefs.jsonl --out runs/rm

r(prompt, answer) = head(final hidden state at the answer's last token)
                   + likelihood_weight * mean log p(answer token) under the trunk's own LM head.
The trunk starts from the SFT run (it already reads conversations and knows its world); the head
starts at zero and likelihood_weight at 1, so at step 0 the reward is how likely the SFT model
finds the answer (RewardModel says why that term is there). Training minimises the Bradley-Terry
loss -log sigmoid(r_chosen - r_rejected): the model only learns differences, so the reward's
zero point means nothing (GRPO's per-group normalisation does not care). Held-out pairwise
accuracy, P(r_chosen > r_rejected) on prompts it never trained on, is the number to watch.

`chatforge prefs winrate --model DPO_RUN --against SFT_RUN --rm RM_RUN --prompts FILE` samples one
answer per prompt from each model and reports how often the reward model prefers the first (`win_rate`).

The run folder is a normal one (config.json with "stage": "reward", model.safetensors,
tokenizer.json) plus reward_head.safetensors; `load_reward_model` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from chatforge import checkpoint as ckpt
from chatforge.align import encode_answer, final_hidden, logps_of_targets, pad_right
from chatforge.align.prefs import (
    EncodedPair,
    accuracy_by_kind,
    batch_indices,
    load_prefs,
    prompt_key,
    train_val_pairs,
)
from chatforge.align.problems import load_problems
from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.config import TrainConfig, training_config
from chatforge.device import autocast, pick_device, single_process
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes, atomic_write_json, read_jsonl
from chatforge.model.gpt import GPT
from chatforge.options import PrefTrainOptions, RewardOptions, WinrateOptions
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Stage, run_training

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A GPT trunk, a linear head from its final hidden state to one number, and the answer's
    log-likelihood under the trunk's own language-model head:

        r(prompt, answer) = head(h at the answer's last token)
                            + likelihood_weight * mean log p(answer token | what precedes it)

    Why the second term: the SFT trunk knows its world (it answers fact questions about its people
    almost perfectly), but a head reading one hidden state does not learn to use that knowledge from a
    thousand comparisons; it learns style (measured on the cpu speedrun's assistant: 0.66 held-out
    accuracy, wrong-fact pairs at 0.35). log p(answer) is how the trunk states what it knows, so a
    wrong fact scores low from the first step. The mean over the answer's tokens, not the sum, keeps
    the term on the head's scale (a few nats, not hundreds), so training can still outweigh it where
    the comparisons say so. likelihood_weight starts at 1 and both terms train."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # the head starts at 0: at step 0 the reward is the likelihood
        nn.init.zeros_(self.head.bias)
        self.likelihood_weight = nn.Parameter(torch.ones(()))
        self.kind = "outcome"  # or "process" (`chatforge prefs prm`): what its run's config.json records

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,), answer_mask (B, T) 1 on the answer's tokens -> rewards (B,).
        The head reads each row's last real token; the log-likelihood is averaged over the answer's tokens."""
        h = final_hidden(self.gpt, ids)
        last = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]
        # the same hidden states through the LM head: one more matmul, not a second forward
        token_logp = logps_of_targets(self.gpt.lm_head(h[:, :-1]), ids[:, 1:])
        mask = answer_mask[:, 1:].float()
        answer_logp = (token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return self.head(last.float()).squeeze(-1) + self.likelihood_weight * answer_logp

    def head_state(self) -> dict[str, torch.Tensor]:
        """What reward_head.safetensors holds: the head's weight and bias, and likelihood_weight."""
        return {**self.head.state_dict(), "likelihood_weight": self.likelihood_weight.detach().reshape(1)}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        # a reward model saved before the likelihood term had none: weight 0 keeps its scores
        weight = state.pop("likelihood_weight", torch.zeros(1))
        self.head.load_state_dict(state)
        with torch.no_grad():
            self.likelihood_weight.copy_(weight.reshape(()))


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _rewards(rm: RewardModel, seqs: list[list[int]], masks: list[list[int]], device) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    return rm(pad_right(seqs, device), lengths, pad_right(masks, device))


def pair_rewards(
    rm: RewardModel, pairs: list[EncodedPair], device, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) for a batch of pairs, in one forward pass over 2B rows."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    with autocast(torch.device(device), precision):
        r = _rewards(rm, seqs, masks, device).float()
    return r[: len(pairs)], r[len(pairs) :]


@torch.no_grad()
def evaluate_pairs(
    rm: RewardModel, pairs: list[EncodedPair], batch_size: int, device, precision: str = "auto"
) -> dict:
    """Held-out BT loss, pairwise accuracy (ties count half) and mean margin r_chosen - r_rejected."""
    was = rm.training
    rm.eval()
    losses, correct, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        rc, rr = pair_rewards(rm, pairs[i : i + batch_size], device, precision)
        losses.append(float(-F.logsigmoid(rc - rr).sum()))
        correct += ((rc > rr).float() + 0.5 * (rc == rr).float()).tolist()
        margins.append(float((rc - rr).sum()))
    rm.train(was)
    n = len(pairs)
    by_kind = {f"val_acc_{k}": v for k, v in accuracy_by_kind(pairs, correct).items()}
    return {
        "val_loss": sum(losses) / n,
        "val_acc": sum(correct) / n,
        "val_margin": sum(margins) / n,
        **by_kind,
    }


# ---- saving and loading ----------------------------------------------------------------------


def save_reward_model(out_dir: Path, rm: RewardModel, tok: Tokenizer, meta: dict) -> Path:
    """The trunk as a normal run folder (config.json last, so it vouches for the rest) + the head."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {k: v.detach().cpu().contiguous() for k, v in rm.head_state().items()}
    atomic_write_bytes(out_dir / HEAD_FILE, safetensors_bytes(head, metadata={"format": "pt"}))
    ckpt.save_model(out_dir, rm.gpt, tok.to_json(), {**meta, "stage": "reward", "reward_head": HEAD_FILE})
    return out_dir


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
    """(reward model in eval mode, its tokenizer) from a `chatforge prefs reward` run folder."""
    path = Path(path)
    run = ckpt.load_run(path, device=device)
    gpt, meta, model_dir = run.model, run.meta, run.folder
    if meta.get("stage") != "reward" or not (model_dir / HEAD_FILE).is_file():
        raise ChatforgeError(
            f"{model_dir} is not a reward model (no {HEAD_FILE}); train one with `chatforge prefs reward`"
        )
    rm = RewardModel(gpt)
    rm.kind = meta.get("reward_kind", "outcome")
    try:
        state = load_file(str(model_dir / HEAD_FILE))
        rm.load_head_state(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ChatforgeError(f"{model_dir / HEAD_FILE} is corrupt or does not fit the model ({e})") from None
    return rm.to(device).eval(), run.tokenizer


# ---- using a reward model ----------------------------------------------------------------------


@torch.no_grad()
def score(
    rm: RewardModel, tok: Tokenizer, conversations: list[list[dict]], batch_size: int = 16
) -> list[float]:
    """The reward of each conversation's last (assistant) message, given the turns before it."""
    device = next(rm.parameters()).device
    seqs, masks = [], []
    for conv in conversations:
        if not conv or conv[-1].get("role") != "assistant":
            raise ChatforgeError("score() takes conversations that end with the assistant answer to score")
        ids, mask, _ = encode_answer(tok, conv[:-1], conv[-1], rm.gpt.cfg.seq_len)
        seqs.append(ids)
        masks.append(mask)
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        out += _rewards(rm, seqs[i : i + batch_size], masks[i : i + batch_size], device).tolist()
    return out


@torch.no_grad()
def best_of_n(
    policy: GPT,
    rm: RewardModel,
    tok: Tokenizer,
    messages: list[dict],
    n: int,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
) -> dict:
    """Sample n answers from `policy` and keep the one the reward model scores highest.

    Returns {"answer", "reward", "candidates": [(answer, reward), ...] best first}."""
    if n < 1:
        raise ChatforgeError(f"best_of_n needs n >= 1, got {n}")
    prompt = render_prompt(tok, messages)
    stops = turn_end_ids(tok)
    outs = generate_batch(
        policy, [prompt] * n, max_new_tokens, temperature=temperature, top_p=top_p, seeds=seed, stop_ids=stops
    )
    answers = [tok.decode([t for t in o if t not in stops]).strip() for o in outs]
    rewards = score(rm, tok, [[*messages, {"role": "assistant", "content": a}] for a in answers])
    ranked = sorted(zip(answers, rewards, strict=True), key=lambda x: -x[1])
    return {"answer": ranked[0][0], "reward": ranked[0][1], "candidates": ranked}


@torch.no_grad()
def win_rate(
    rm: RewardModel,
    tok: Tokenizer,
    model: GPT,
    baseline: GPT,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Sample one answer per prompt from `model` and one from `baseline` (the same seed for both), let
    the reward model score each, and count how often `model`'s answer scores higher (ties count half).

    Both models and the reward model must share the tokenizer `tok` (true of an SFT run and the DPO or
    RL runs made from it). Returns {"win_rate", "wins", "ties", "losses", "n", "mean_reward_model",
    "mean_reward_baseline", "examples": the first 3 (prompt, answer, baseline answer, rewards)}."""
    if not prompts:
        raise ChatforgeError("win_rate needs at least one prompt")
    stops = turn_end_ids(tok)
    answers: dict[str, list[str]] = {"model": [], "baseline": []}
    for name, policy in (("model", model), ("baseline", baseline)):
        was = policy.training
        policy.eval()
        for i in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tok, m) for m in prompts[i : i + batch_size]]
            outs = generate_batch(
                policy, chunk, max_new_tokens, temperature=temperature, seeds=seed + i, stop_ids=stops
            )
            answers[name] += [tok.decode([t for t in o if t not in stops]).strip() for o in outs]
        policy.train(was)
    r = {
        name: score(
            rm, tok, [[*m, {"role": "assistant", "content": a}] for m, a in zip(prompts, ans, strict=True)]
        )
        for name, ans in answers.items()
    }
    wins = sum(a > b for a, b in zip(r["model"], r["baseline"], strict=True))
    ties = sum(a == b for a, b in zip(r["model"], r["baseline"], strict=True))
    n = len(prompts)
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "mean_reward_model": sum(r["model"]) / n,
        "mean_reward_baseline": sum(r["baseline"]) / n,
        "examples": [
            {
                "prompt": prompts[i][-1]["content"],
                "model": answers["model"][i],
                "baseline": answers["baseline"][i],
                "rewards": [round(r["model"][i], 4), round(r["baseline"][i], 4)],
            }
            for i in range(min(3, n))
        ],
    }


# ---- training ------------------------------------------------------------------------------------


def train_reward(
    base: Path,
    data: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    val_fraction: float = 0.1,
    val_data: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    kind: str = "outcome",
) -> dict:
    """Train a reward model from the run `base` on the comparisons in `data`; returns a summary.
    `kind` is recorded: "outcome" (whole answers compared) or "process" (answers cut after a step:
    a PRM, think.py's step scorer)."""
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    run = ckpt.load_run(base, device=device)
    gpt, tok, base_meta, model_dir = run.model, run.tokenizer, run.meta, run.folder
    max_len = min(cfg.seq_len or gpt.cfg.seq_len, gpt.cfg.seq_len)
    train, val, n_trunc = train_val_pairs(tok, data, val_data, val_fraction, cfg.seed, max_len)
    rm = RewardModel(gpt).to(device).train()
    autocast(torch.device(device), cfg.precision)  # a precision this device cannot run fails here, first
    bs = cfg.device_batch_size

    def step(module: torch.nn.Module, step: int, update: int) -> tuple[torch.Tensor, dict]:
        rc, rr = pair_rewards(
            module, [train[i] for i in batch_indices(len(train), bs, step, cfg.seed)], device, cfg.precision
        )
        return bt_loss(rc, rr), {"acc": float((rc > rr).float().mean())}

    def summarize(first: dict | None, last: dict | None) -> dict:
        return {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "truncated_pairs": n_trunc,
            "val_acc_start": first["val_acc"] if first else None,
            "val_acc_end": last["val_acc"] if last else None,
            "val_loss_end": last["val_loss"] if last else None,
            "val_acc_by_kind": {k[8:]: v for k, v in (last or {}).items() if k.startswith("val_acc_")},
        }

    meta = {
        **ckpt.inherited_meta(base_meta),
        "stage": "reward",
        "reward_kind": kind,
        "train": asdict(cfg),
        "data": str(data),
        "base": str(model_dir),
    }
    stage = Stage(
        name="reward", model=gpt, trained=rm, step=step, meta=meta, summarize=summarize,
        evaluate=(lambda module: evaluate_pairs(rm, val, bs, device, cfg.precision)) if val else None,
        plot=("reward.png", [("Bradley-Terry loss", ["loss", "val_loss"]), ("pairwise accuracy", ["acc", "val_acc"])]),
        plot_title=f"reward model from {Path(base).name}",
        state=lambda: {"head": rm.head_state()},
        load_state=lambda state: rm.load_head_state(state["head"]),
        save_final=lambda final_meta: save_reward_model(out_dir, rm, tok, final_meta),
        header=f"{len(train)} comparisons, {bs} per step",
    )  # fmt: skip
    return run_training(stage, cfg, out_dir, tok, single_process(device), resume=resume, progress=progress)


# ---- CLI -----------------------------------------------------------------------------------------


def pref_train_config(opts: PrefTrainOptions) -> TrainConfig:
    """The reward / DPO config: the preset's prefs section, --set, then --steps, --lr, ... ."""
    cfg = training_config(opts.preset, "prefs", opts.settings, opts.overrides)
    if cfg.max_steps < 1 or cfg.device_batch_size < 1:
        raise ChatforgeError("--steps and --batch-size must be at least 1")
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ChatforgeError(f"--lr must be a positive number, got {cfg.lr}")
    return cfg


def judge_prompts(path: Path) -> list[list[dict]]:
    """The prompts of a comparisons file (each once), or of a problems file (rl.load_problems)."""
    first = next((obj for _, obj in read_jsonl(path)), {})
    if "chosen" not in first:
        return [row["messages"] for row in load_problems(path)]
    seen, prompts = set(), []
    for row in load_prefs(path):
        if (key := prompt_key(row["messages"])) not in seen:
            seen.add(key)
            prompts.append(row["messages"])
    return prompts


def cmd_winrate(args: WinrateOptions) -> None:
    if args.n < 1:
        raise ChatforgeError(f"--n must be at least 1, got {args.n}")
    device = pick_device(args.device)
    rm, tok = load_reward_model(args.rm, device)
    judged, against = ckpt.load_run(args.model, device=device), ckpt.load_run(args.against, device=device)
    for run, name in ((judged, "--model"), (against, "--against")):
        if run.tokenizer.to_json() != tok.to_json():
            raise ChatforgeError(
                f"{name} {run.folder} has another tokenizer than the reward model; judge runs of one family"
            )
    model, model_dir, baseline, base_dir = judged.model, judged.folder, against.model, against.folder
    prompts = judge_prompts(Path(args.prompts))[: args.n]
    fits = [m for m in prompts if len(render_prompt(tok, m)) + args.max_new_tokens <= model.cfg.seq_len]
    if not fits:
        raise ChatforgeError(
            f"no prompt in {args.prompts} leaves {args.max_new_tokens} tokens of room in the context"
        )
    result = win_rate(
        rm, tok, model, baseline, fits, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    result = {"model": str(model_dir), "against": str(base_dir), "rm": str(args.rm), **result}
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(
        f"win rate {result['win_rate']:.3f} over {result['n']} prompts "
        f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses)"
    )


def cmd_reward(args: RewardOptions) -> None:
    summary = train_reward(
        Path(args.model), Path(args.data), Path(args.out), pref_train_config(args),
        val_fraction=args.val_fraction, val_data=args.val, resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
