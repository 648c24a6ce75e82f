"""Stage 3: alignment. Comparisons, LLM-assisted labeling, a reward model, DPO, and GRPO.

    prefs.py    the comparison format (jsonl), crash-safe appends, world-made comparisons,
                Anthropic hh-rlhf import, and encoding pairs for the trainers
    label.py    `chatforge prefs label`: a person picks A or B, optionally helped by a judge model
    reward.py   `chatforge prefs reward`: GPT trunk + scalar head trained with a Bradley-Terry loss
    dpo.py      `chatforge prefs dpo`: Direct Preference Optimization against a frozen reference
    rewards.py  reward functions for RL: exact answer, number match, a reward model
    rl.py       `chatforge rl`: GRPO (group-relative advantages, clipped ratio, optional k3 KL)

    problems.py RL problems: loaded from .jsonl, or built from a world (facts, sums, calculator)

This file holds what the three trainers share: how an answer is tokenised after its prompt (the
mask covers that answer only), per-token log-probabilities, the final hidden states the reward
model reads, and the preference trainers' default config. They train through the one loop in
train/loop.py, which owns resume, checkpoints, metrics and the plot.
"""

from __future__ import annotations

import torch

from chatforge.chat_format import render_conversation, render_prompt
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.tokenizer import Tokenizer

# ---- tokenising an answer after its prompt ---------------------------------------------------


def encode_answer(
    tok: Tokenizer, messages: list[dict], answer: str | dict, max_len: int
) -> tuple[list[int], list[int], bool]:
    """ChatML ids of the prompt turns + one assistant answer, and a mask with 1 on that answer only
    (its content and its <|im_end|>; earlier assistant turns of the prompt get 0). The ids end at
    the answer's last token, so ids[-1] is where the reward model reads its score.

    Too long for `max_len`: the prompt loses its oldest tokens first (down to half the room), then
    the answer its last ones, as TRL does. Returns (ids, mask, truncated)."""
    msg = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
    prompt = render_prompt(tok, messages)
    ids, mask = render_conversation(tok, [*messages, msg])
    if ids[: len(prompt)] != prompt:  # the renderer's contract; a custom tokenizer could break it
        raise ChatforgeError("the prompt does not tokenize the same alone and before its answer")
    answer_ids = ids[len(prompt) :]
    answer_mask = mask[len(prompt) :]
    end = max((i + 1 for i, m in enumerate(answer_mask) if m), default=0)  # drop the newline after it
    answer_ids, answer_mask = answer_ids[:end], answer_mask[:end]
    truncated = len(prompt) + len(answer_ids) > max_len
    if truncated:
        keep_prompt = min(len(prompt), max(max_len - len(answer_ids), max_len // 2))
        prompt = prompt[len(prompt) - keep_prompt :]
        answer_ids = answer_ids[: max_len - keep_prompt]
        answer_mask = answer_mask[: max_len - keep_prompt]
    return prompt + answer_ids, [0] * len(prompt) + answer_mask, truncated


def pad_right(seqs: list[list[int]], device, value: int = 0) -> torch.Tensor:
    """(B, T) int64, each row padded on the right. Causal attention never lets a real token see the
    padding after it, so no attention mask is needed; losses mask the padding out."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)


# ---- log-probabilities and hidden states -----------------------------------------------------


def token_logps(model: torch.nn.Module, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for t < T-1: (B, T-1) float32. Logits are divided by
    `temperature` first, so RL scores tokens under the distribution it sampled them from."""
    logits = model(ids[:, :-1]).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logps_of_targets(logits, ids[:, 1:])


@torch.no_grad()
def scored_tokens(
    model: torch.nn.Module, seqs: list[list[int]], top_k: int = 0, batch_size: int = 8
) -> list[list[tuple[float, list[tuple[int, float]]]]]:
    """Each token of each sequence after its first, scored in one forward pass per batch:
    (log p(token | the tokens before it), the top_k most likely tokens there as (id, log p), best
    first). What a server's `echo` + `logprobs` report, and an eval harness's log-likelihood."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = pad_right(chunk, device)
        if ids.size(1) < 2:  # one token each: nothing before it to score it by
            out += [[] for _ in chunk]
            continue
        logits = model(ids[:, :-1]).float()
        chosen = logps_of_targets(logits, ids[:, 1:]).tolist()
        top_lp, top_ids = logits.topk(top_k, dim=-1) if top_k else (logits[..., :0], logits[..., :0].long())
        top_lp = (top_lp - logits.logsumexp(-1, keepdim=True)).tolist()
        top_ids = top_ids.tolist()
        for r, seq in enumerate(chunk):
            out.append(
                [
                    (chosen[r][t], list(zip(top_ids[r][t], top_lp[r][t], strict=True)))
                    for t in range(len(seq) - 1)
                ]
            )
    return out


def logps_of_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] at each position: logits (B, T, V), targets (B, T) -> (B, T) float32."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(
    model: torch.nn.Module, seqs: list[list[int]], masks: list[list[int]], device
) -> torch.Tensor:
    """Summed log-probability of the masked (answer) tokens of each sequence: (B,)."""
    ids = pad_right(seqs, device)
    mask = pad_right(masks, device).float()
    return (token_logps(model, ids) * mask[:, 1:]).sum(-1)


def final_hidden(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The last layer's normalised hidden states (B, T, n_embd): GPT.forward without lm_head."""
    return model(ids, return_hidden=True)


# ---- the preference trainers' defaults ---------------------------------------------------------
