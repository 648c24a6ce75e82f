"""Direct Preference Optimization (Rafailov et al. 2023): learn from comparisons without a reward model.

    chatforge prefs dpo --model runs/sft --data prefs.jsonl --out runs/dpo [--beta 0.1 --lora-rank 8]

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy's implicit reward is
beta * log(pi(y|x) / pi_ref(y|x)), and the loss is the Bradley-Terry loss on those rewards:

    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

log pi(y|x) is summed over the answer's tokens only (the mask from encode_answer). The reference
is the starting model, frozen; since it never changes, its log-probabilities are computed once
before training (with the starting weights, which the policy has at that moment), so no second
model is kept in memory. With --lora-rank the policy trains LoRA adapters only (model/lora.py)
and the finished run holds the adapter and the merged model, like a LoRA SFT run.

DPO only asks that chosen beat rejected *relative to the reference*; it can get there by pushing
both down, and the freed probability goes to answers nobody compared: on the world demo (lr 1e-4,
200 steps) held-out fact accuracy fell from 93% to 86% and refusals from 96% to 48%. --rpo-alpha adds
alpha x the chosen answers' per-token NLL (RPO, Pang et al. 2024), which keeps the chosen answers
likely (with 1.0: 90% facts, 98% refusals); a lower learning rate also does.

Held-out preference accuracy (the policy's implicit reward ranks the chosen answer higher) and
the reward margin are logged and plotted (dpo.png); the run folder chats like any other.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatforge import checkpoint as ckpt
from chatforge.align import sequence_logps
from chatforge.align.prefs import (
    EncodedPair,
    accuracy_by_kind,
    batch_indices,
    load_prefs,
    train_val_pairs,
)
from chatforge.align.reward import pref_train_config
from chatforge.config import TrainConfig
from chatforge.device import autocast, pick_device, single_process
from chatforge.errors import ChatforgeError
from chatforge.options import DPOOptions
from chatforge.train.loop import Stage, run_training
from chatforge.train.sft import chat_samples, lora_setup


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards); rewards are beta * (policy - ref) log-probs,
    detached (they are for logging and accuracy)."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def pair_logps(
    model: torch.nn.Module, pairs: list[EncodedPair], device, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (chosen, rejected) of a batch, in one forward pass over 2B rows."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    with autocast(torch.device(device), precision):  # the log-probs come back in float32
        lp = sequence_logps(model, seqs, masks, device)
    return lp[: len(pairs)], lp[len(pairs) :]


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    pairs: list[EncodedPair],
    batch_size: int,
    device,
    progress: bool = True,
    precision: str = "auto",
) -> torch.Tensor:
    """(N, 2) summed answer log-probs of every pair under `model` as it is now (the reference)."""
    was = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not progress):
        c, r = pair_logps(model, pairs[i : i + batch_size], device, precision)
        out.append(torch.stack([c, r], dim=1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def evaluate_dpo(
    model: torch.nn.Module,
    pairs: list[EncodedPair],
    ref: torch.Tensor,
    beta: float,
    batch_size: int,
    device,
    precision: str = "auto",
) -> dict:
    """Held-out DPO loss, preference accuracy (chosen reward > rejected), margin, mean rewards."""
    was = model.training
    model.eval()
    loss_sum, chosen_sum, rejected_sum = 0.0, 0.0, 0.0
    correct: list[float] = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[i : i + batch_size], device, precision)
        rc, rr = ref[i : i + batch_size, 0].to(device), ref[i : i + batch_size, 1].to(device)
        loss, cr, rj = dpo_loss(c, r, rc, rr, beta)
        loss_sum += float(loss) * len(c)
        correct += ((cr > rj).float() + 0.5 * (cr == rj).float()).tolist()
        chosen_sum += float(cr.sum())
        rejected_sum += float(rj.sum())
    model.train(was)
    n = len(pairs)
    by_kind = accuracy_by_kind(pairs, correct)
    return {
        "val_loss": loss_sum / n,
        "val_acc": sum(correct) / n,
        **{f"val_acc_{k}": v for k, v in by_kind.items()},
        "val_margin": (chosen_sum - rejected_sum) / n,
        "val_chosen_reward": chosen_sum / n,
        "val_rejected_reward": rejected_sum / n,
    }


def dpo(
    base: Path,
    data: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    beta: float = 0.1,
    rpo_alpha: float = 0.0,
    val_fraction: float = 0.1,
    val_data: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """DPO-train the model in `base` on the comparisons in `data`; returns a summary dict."""
    if beta <= 0:
        raise ChatforgeError(f"--beta must be positive, got {beta}")
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    run = ckpt.load_run(base, device=device)
    model, tok, base_meta, model_dir = run.model, run.tokenizer, run.meta, run.folder
    max_len = min(cfg.seq_len or model.cfg.seq_len, model.cfg.seq_len)
    rows = load_prefs(data)  # its single-turn prompts give the end-of-run samples
    train, val, n_trunc = train_val_pairs(tok, data, val_data, val_fraction, cfg.seed, max_len)
    lora_meta = {}
    if cfg.lora_rank:
        lora_meta = {"lora": lora_setup(model, cfg)}
        print(f"LoRA rank {cfg.lora_rank}: {lora_meta['lora']['trainable_params']:,} trainable parameters")
    bs = cfg.device_batch_size
    # the reference = the model before any update (LoRA starts as a no-op, so the same holds there)
    autocast(torch.device(device), cfg.precision)  # a precision this device cannot run fails here, first
    ref_train = reference_logps(model, train, bs, device, progress, cfg.precision)
    ref_val = reference_logps(model, val, bs, device, progress, cfg.precision)
    model.train()

    def step(module: torch.nn.Module, step: int, update: int) -> tuple[torch.Tensor, dict]:
        idx = batch_indices(len(train), bs, step, cfg.seed)
        c, r = pair_logps(module, [train[i] for i in idx], device, cfg.precision)
        ref = ref_train[idx].to(device)
        loss, cr, rj = dpo_loss(c, r, ref[:, 0], ref[:, 1], beta)
        if rpo_alpha:  # + alpha x NLL per token of the chosen answers: keeps their likelihood from sinking
            n_tok = torch.tensor([sum(train[i].chosen_mask) for i in idx], device=device).clamp(min=1)
            loss = loss + rpo_alpha * (-c / n_tok).mean()
        return loss, {"acc": float((cr > rj).float().mean()), "margin": float((cr - rj).mean())}

    def summarize(first: dict | None, last: dict | None) -> dict:
        prompts = [row["messages"] for row in rows if len(row["messages"]) == 1][:3]
        samples = chat_samples(model, tok, [m[0]["content"] for m in prompts]) if prompts else []
        return {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "truncated_pairs": n_trunc,
            "beta": beta,
            "val_acc_start": first["val_acc"] if first else None,
            "val_acc_end": last["val_acc"] if last else None,
            "val_margin_end": last["val_margin"] if last else None,
            "val_acc_by_kind": {k[8:]: v for k, v in (last or {}).items() if k.startswith("val_acc_")},
            "samples": [f"{q} -> {a}" for q, a in samples],
        }

    meta = {
        **ckpt.inherited_meta(base_meta),
        "stage": "dpo",
        "train": asdict(cfg),
        "dpo": {
            "beta": beta,
            "rpo_alpha": rpo_alpha,
            "val_fraction": val_fraction,
            "val": str(val_data) if val_data else None,
        },
        "data": str(data),
        "base": str(model_dir),
        "base_stage": base_meta.get("stage"),
        **lora_meta,
    }
    panels = [
        ("DPO loss", ["loss", "val_loss"]),
        ("preference accuracy", ["acc", "val_acc"]),
        ("implicit reward", ["margin", "val_margin", "val_chosen_reward", "val_rejected_reward"]),
    ]
    stage = Stage(
        name="dpo", model=model, step=step, meta=meta, summarize=summarize, plot=("dpo.png", panels),
        evaluate=(lambda module: evaluate_dpo(module, val, ref_val, beta, bs, device, cfg.precision)) if val else None,
        plot_title=f"DPO from {Path(base).name} (beta {beta})", header=f"{len(train)} comparisons, {bs} per step",
    )  # fmt: skip
    return run_training(stage, cfg, out_dir, tok, single_process(device), resume=resume, progress=progress)


def cmd_dpo(args: DPOOptions) -> None:
    summary = dpo(
        Path(args.model), Path(args.data), Path(args.out), pref_train_config(args),
        beta=args.beta, rpo_alpha=args.rpo_alpha, val_fraction=args.val_fraction, val_data=args.val, resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
