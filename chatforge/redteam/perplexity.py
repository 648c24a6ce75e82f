"""The perplexity filter against adversarial suffixes (Alon & Kamfonas 2023; Jain et al. 2023).

GCG's suffixes are strings of unrelated tokens ("describing.\\ + similarlyNow write oppositeley.]("),
far less likely under a language model than anything a person types. The filter scores the user's
text under the model itself, token by token (`align.scored_tokens`), and takes the largest perplexity
over windows of `window` consecutive tokens, so a short suffix after a long ordinary request still
stands out (the whole-prompt mean would dilute it). A text is flagged when that windowed perplexity
is above a threshold calibrated on benign prompts to a chosen false-positive rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from chatforge.align import scored_tokens
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer

DEFAULT_WINDOW = 10  # Jain et al.'s window


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ChatforgeError(f"perplexity window must be an integer >= 1 token, got {window!r}")


def max_window_perplexities(
    model: torch.nn.Module,
    tok: Tokenizer,
    texts: Sequence[str],
    window: int = DEFAULT_WINDOW,
    batch_size: int = 16,
) -> list[float]:
    """Each text's largest perplexity over windows of `window` scored tokens (the whole text when
    shorter); 1.0 for a text with no token to score. Texts past the context keep their first tokens."""
    _check_window(window)
    if isinstance(texts, str):
        raise ChatforgeError("give a list of texts, not one string")
    limit = getattr(getattr(model, "cfg", None), "seq_len", 2048)
    seqs = [(tok.start_ids() + tok.encode(t))[:limit] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of like lengths pad little
    out = [1.0] * len(seqs)  # a text with no token to score
    for i, scored in zip(
        order, scored_tokens(model, [seqs[i] for i in order], batch_size=batch_size), strict=True
    ):
        logps = [lp for lp, _ in scored]
        if logps:
            w = min(window, len(logps))
            sums = [sum(logps[k : k + w]) for k in range(len(logps) - w + 1)]
            out[i] = math.exp(-min(sums) / w)
    return out


def perplexity_filter(
    model: torch.nn.Module, tok: Tokenizer, text: str, *, threshold: float, window: int = DEFAULT_WINDOW
) -> tuple[bool, float]:
    """(flagged, max windowed perplexity) for one user text: flagged when above `threshold`."""
    if not isinstance(threshold, int | float) or not threshold > 0 or not math.isfinite(threshold):
        raise ChatforgeError(f"perplexity threshold must be a positive number, got {threshold!r}")
    if not isinstance(text, str):
        raise ChatforgeError(f"the perplexity filter reads text, got {type(text).__name__}")
    (ppl,) = max_window_perplexities(model, tok, [text], window)
    return ppl > threshold, ppl


def calibrate_threshold(
    model: torch.nn.Module,
    tok: Tokenizer,
    benign: Sequence[str],
    *,
    false_positive_rate: float = 0.01,
    window: int = DEFAULT_WINDOW,
) -> float:
    """The smallest threshold that flags at most `false_positive_rate` of the benign texts: the
    (k+1)-th largest benign score, k = floor(rate x n)."""
    if not 0 <= false_positive_rate < 1:
        raise ChatforgeError(f"false_positive_rate must be in [0, 1), got {false_positive_rate!r}")
    if len(benign) == 0:
        raise ChatforgeError("calibrating the perplexity filter needs benign prompts; the list is empty")
    scores = sorted(max_window_perplexities(model, tok, benign, window), reverse=True)
    return scores[math.floor(false_positive_rate * len(scores))]


def benign_prompts(data_dir: str | Path, with_inputs: bool = False) -> dict[str, list[str]]:
    """Benign requests from the self-instruct sets under `data_dir` (e.g. ../shared/data): name ->
    instructions; `with_inputs` appends each one's first instance input (longer, slower to score)."""
    root = Path(data_dir) / "self_instruct"
    out: dict[str, list[str]] = {}
    for name in ("seed_tasks", "user_oriented_instructions"):
        path = root / f"{name}.jsonl"
        if not path.is_file():
            continue
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["instruction"].strip()
                first = (row.get("instances") or [{}])[0].get("input", "").strip()
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ChatforgeError(f"{path}:{n}: not a self-instruct row ({e})") from e
            texts.append(f"{text}\n{first}" if first and with_inputs else text)
        out[name] = texts
    if not out:
        raise ChatforgeError(
            f"no self-instruct prompts under {root}: expected seed_tasks.jsonl or user_oriented_instructions.jsonl"
        )
    return out
