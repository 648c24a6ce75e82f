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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatforge import checkpoint as ckpt
from chatforge.align import config_dict, plot_metrics, resume_train, save_train_checkpoint, sequence_logps
from chatforge.align.prefs import (
    EncodedPair,
    accuracy_by_kind,
    batch_indices,
    load_prefs,
    train_val_pairs,
)
from chatforge.align.reward import pref_train_config
from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.model.lora import has_lora, merge_lora, save_adapter
from chatforge.options import DPOOptions
from chatforge.tokenizer import Tokenizer
from chatforge.train.common import MetricsLog, autocast, build_optimizers, lr_multiplier, pick_device, set_lr


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


def pair_logps(model: torch.nn.Module, pairs: list[EncodedPair], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (chosen, rejected) of a batch, in one forward pass over 2B rows."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    with autocast(torch.device(device)):  # bf16 on CUDA; the log-probs come back in float32
        lp = sequence_logps(model, seqs, masks, device)
    return lp[: len(pairs)], lp[len(pairs) :]


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, pairs: list[EncodedPair], batch_size: int, device, progress: bool = True
) -> torch.Tensor:
    """(N, 2) summed answer log-probs of every pair under `model` as it is now (the reference)."""
    was = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not progress):
        c, r = pair_logps(model, pairs[i : i + batch_size], device)
        out.append(torch.stack([c, r], dim=1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def evaluate_dpo(
    model: torch.nn.Module, pairs: list[EncodedPair], ref: torch.Tensor, beta: float, batch_size: int, device
) -> dict:
    """Held-out DPO loss, preference accuracy (chosen reward > rejected), margin, mean rewards."""
    was = model.training
    model.eval()
    loss_sum, chosen_sum, rejected_sum = 0.0, 0.0, 0.0
    correct: list[float] = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[i : i + batch_size], device)
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
    from chatforge.train.sft import chat_samples, lora_setup

    if beta <= 0:
        raise ChatforgeError(f"--beta must be positive, got {beta}")
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, base_meta, model_dir = ckpt.load_model(base, device)
    tok = Tokenizer.load(model_dir)
    max_len = min(cfg.seq_len or model.cfg.seq_len, model.cfg.seq_len)
    rows = load_prefs(data)  # its single-turn prompts give the end-of-run samples
    train, val, n_trunc = train_val_pairs(tok, data, val_data, val_fraction, cfg.seed, max_len)
    lora_meta = {}
    if cfg.lora_rank:
        lora_meta = {"lora": lora_setup(model, cfg)}
        print(f"LoRA rank {cfg.lora_rank}: {lora_meta['lora']['trainable_params']:,} trainable parameters")
    bs = cfg.device_batch_size
    # the reference = the model before any update (LoRA starts as a no-op, so the same holds there)
    ref_train = reference_logps(model, train, bs, device, progress)
    ref_val = reference_logps(model, val, bs, device, progress)
    model.train()
    optimizers = build_optimizers(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, state = resume_train(out_dir, model, optimizers, resume, cfg.max_steps)
    meta = {
        **ckpt.inherited_meta(base_meta),
        "stage": "dpo",
        "train": config_dict(cfg),
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
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if state else None)
    first_eval = None
    t0, train_time = time.perf_counter(), state.get("train_seconds", 0.0)
    bar = tqdm(range(start, cfg.max_steps + 1), initial=start, total=cfg.max_steps + 1, disable=not progress)
    for step in bar:
        if val and (step % max(cfg.eval_every, 1) == 0 or step == cfg.max_steps):
            ev = evaluate_dpo(model, val, ref_val, beta, bs, device)
            first_eval = first_eval or ev
            metrics.log(step=step, **{k: round(v, 5) for k, v in ev.items()})
            bar.write(
                f"step {step}: held-out preference accuracy {ev['val_acc']:.3f}, margin {ev['val_margin']:.3f}"
            )
        if step == cfg.max_steps:
            break
        idx = batch_indices(len(train), bs, step, cfg.seed)
        set_lr(optimizers, lr_multiplier(step, cfg))
        c, r = pair_logps(model, [train[i] for i in idx], device)
        ref = ref_train[idx].to(device)
        loss, cr, rj = dpo_loss(c, r, ref[:, 0], ref[:, 1], beta)
        if rpo_alpha:  # + alpha x NLL per token of the chosen answers: keeps their likelihood from sinking
            n_tok = torch.tensor([sum(train[i].chosen_mask) for i in idx], device=device).clamp(min=1)
            loss = loss + rpo_alpha * (-c / n_tok).mean()
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step % max(cfg.log_every, 1) == 0 or step + 1 == cfg.max_steps:
            acc = float((cr > rj).float().mean())
            margin = float((cr - rj).mean())
            metrics.log(
                step=step + 1, loss=round(float(loss.detach()), 5), acc=round(acc, 4), margin=round(margin, 5)
            )
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}", margin=f"{margin:.2f}")
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.max_steps:
            extra = {"train_seconds": train_time + time.perf_counter() - t0}
            save_train_checkpoint(out_dir, step + 1, model, tok, meta, optimizers, extra, cfg.keep_ckpts)
    bar.close()
    train_time += time.perf_counter() - t0
    if (
        start < cfg.max_steps or not state
    ):  # the finished run's checkpoint: --resume with more steps extends it
        extra = {"train_seconds": train_time}
        save_train_checkpoint(out_dir, cfg.max_steps, model, tok, meta, optimizers, extra, cfg.keep_ckpts)
    last = evaluate_dpo(model, val, ref_val, beta, bs, device) if val else None
    model.eval()
    prompts = [row["messages"] for row in rows if len(row["messages"]) == 1][:3]
    samples = chat_samples(model, tok, [m[0]["content"] for m in prompts]) if prompts else []
    summary = {
        "train_pairs": len(train),
        "val_pairs": len(val),
        "truncated_pairs": n_trunc,
        "beta": beta,
        "steps": cfg.max_steps,
        "train_seconds": round(train_time, 2),
        "val_acc_start": first_eval["val_acc"] if first_eval else None,
        "val_acc_end": last["val_acc"] if last else None,
        "val_margin_end": last["val_margin"] if last else None,
        "val_acc_by_kind": {k[8:]: v for k, v in (last or {}).items() if k.startswith("val_acc_")},
        "samples": [f"{q} -> {a}" for q, a in samples],
    }
    final_meta = {**meta, "step": cfg.max_steps, "summary": summary}
    if has_lora(model):
        save_adapter(model, out_dir, final_meta)  # the adapter apart, and the merged model beside it
        merge_lora(model)
    ckpt.save_model(out_dir, model, tok.to_json(), final_meta)
    summary["plot"] = str(
        plot_metrics(
            out_dir / "metrics.jsonl",
            out_dir / "dpo.png",
            [
                ("DPO loss", ["loss", "val_loss"]),
                ("preference accuracy", ["acc", "val_acc"]),
                ("implicit reward", ["margin", "val_margin", "val_chosen_reward", "val_rejected_reward"]),
            ],
            f"DPO from {Path(base).name} (beta {beta})",
        )
    )
    atomic_write_json(out_dir / "dpo_summary.json", summary)
    return summary


def cmd_dpo(args: DPOOptions) -> None:
    summary = dpo(
        Path(args.model), Path(args.data), Path(args.out), pref_train_config(args),
        beta=args.beta, rpo_alpha=args.rpo_alpha, val_fraction=args.val_fraction, val_data=args.val, resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
