"""Multiple choice by log-likelihood (ARC, HellaSwag, MMLU, ...), base-model style.

For each example every choice is appended to the context as " " + choice, and the model's
summed log-probability of the choice's tokens picks the answer (the lm-eval-harness way).
`accuracy` uses the raw sum, which favours short choices; `accuracy_norm` divides by the
choice's bytes, which removes that bias. No chat template: this works on base models.

Files read (`load_mc`): jsonl in several layouts, detected per line:
  ARC (llm-foundry)  {"query": "Question: ...", "choices": [...], "gold": 0}
  ARC (AI2 / HF)     {"question": {"stem", "choices": [{"text", "label"}]} | str,
                      "choices": {"text": [...], "label": [...]}, "answerKey": "B"}
  HellaSwag          {"ctx", "endings": [...], "label": 0}  (activity_label used when present)
  MMLU               {"question", "choices": [...], "answer": 0 | "B"}
MMLU csv (question, choice0..choiceN, answer; with or without a header row; answer index or
letter), llama.cpp HellaSwag text (6 lines per task: context, label, 4 endings; .txt/.txt.bz2),
and folders of such files (e.g. mmlu/test: each file's stem becomes a group).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatforge.errors import ChatforgeError
from chatforge.eval.base import (
    DATA_HINT,
    EvalContext,
    EvalInputs,
    TaskResult,
    accuracy_groups,
    autocast,
    register,
    subset,
)
from chatforge.fileio import open_text, read_jsonl
from chatforge.tokenizer import Tokenizer


@dataclass
class MCExample:
    context: str  # the full prompt before the choice, e.g. "Question: ...\nAnswer:"
    choices: list[str]
    gold: int
    group: str = ""  # e.g. the MMLU subject


# ---- scoring ---------------------------------------------------------------------------------


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    tok: Tokenizer,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    bar: tqdm | None = None,
) -> list[list[float]]:
    """Summed log-prob (nats) of each choice's tokens given its context: one list per example.

    Rows (context + choice) from all examples are scored batch_size at a time, right-padded
    (causal attention keeps padding from touching real positions). A row longer than the
    context window keeps its last seq_len + 1 tokens. `bar` advances by one per choice.
    """
    device = torch.device(device)
    seq_len = model.cfg.seq_len
    bos = tok.start_ids()
    rows: list[tuple[list[int], int]] = []  # (ids, how many trailing ids are the choice)
    for ex in examples:
        ctx_ids = bos + tok.encode(ex.context)
        for choice in ex.choices:
            cont = tok.encode(" " + choice)
            ids = (ctx_ids + cont)[-(seq_len + 1) :]
            rows.append((ids, min(len(cont), len(ids) - 1)))
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for r, (ids, n_cont) in enumerate(chunk):
            L = len(ids) - 1
            x[r, :L] = torch.tensor(ids[:-1])
            y[r, L - n_cont : L] = torch.tensor(ids[-n_cont:])  # targets only on the choice's tokens
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (logp * (y >= 0)).sum(dim=1).tolist()
        if bar is not None:
            bar.update(len(chunk))
    out, k = [], 0
    for ex in examples:
        out.append(scores[k : k + len(ex.choices)])
        k += len(ex.choices)
    return out


class MultipleChoice:
    def __init__(self, examples: Sequence[MCExample], name: str) -> None:
        if not examples:
            raise ChatforgeError(f"{name}: no multiple-choice examples")
        self.examples = list(examples)
        self.name = name

    def run(self, ctx: EvalContext) -> TaskResult:
        examples = subset(self.examples, ctx.max_examples, ctx.seed)
        with ctx.bar(sum(len(ex.choices) for ex in examples), "choice") as bar:
            scores = score_choices(
                ctx.model, ctx.tokenizer, examples, batch_size=ctx.batch_size, device=ctx.device, bar=bar
            )
        details = []
        for ex, s in zip(examples, scores, strict=True):
            per_byte = [v / len((" " + c).encode("utf-8")) for v, c in zip(s, ex.choices, strict=True)]
            pred = max(range(len(s)), key=s.__getitem__)
            pred_norm = max(range(len(s)), key=per_byte.__getitem__)
            details.append(
                {
                    "prompt": ex.context,
                    "choices": ex.choices,
                    "gold": ex.gold,
                    "prediction": pred,
                    "correct": pred == ex.gold,
                    "prediction_norm": pred_norm,
                    "correct_norm": pred_norm == ex.gold,
                    "logprobs": [round(v, 4) for v in s],
                    "group": ex.group,
                }
            )
        n = len(details)
        correct = [d["correct"] for d in details]
        return TaskResult(
            self.name,
            "accuracy",
            sum(correct) / n,
            n,
            details,
            extra={
                "accuracy_norm": sum(d["correct_norm"] for d in details) / n,
                "chance": sum(1 / len(ex.choices) for ex in examples) / n,
            },
            groups=accuracy_groups([d["group"] for d in details], correct),
        )


# ---- loading ---------------------------------------------------------------------------------


def question_context(question: str) -> str:
    q = question.strip()
    return (q if q.startswith("Question:") else f"Question: {q}") + "\nAnswer:"


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag preprocessing: WikiHow markup out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _answer_index(value, labels: Sequence[str], n: int, where: str) -> int:
    """An answer as an index (int or digit string) or a label/letter ("B"), checked against n choices."""
    if isinstance(value, str) and value.strip() in labels:
        return list(labels).index(value.strip())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ChatforgeError(
            f"{where}: answer {value!r} is not one of {n} choices (an index 0..{n - 1} or a letter)"
        )
    return value


def _strings(value, where: str, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise ChatforgeError(f"{where}: {what} must be a list of at least two strings")
    return value


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def parse_mc_record(obj: dict, where: str, group: str = "") -> MCExample:
    """One jsonl record in any supported layout (see the module doc) -> MCExample."""
    if "query" in obj and "gold" in obj:  # ARC, llm-foundry
        choices = _strings(obj.get("choices"), where, "'choices'")
        q = obj["query"]
        if not isinstance(q, str):
            raise ChatforgeError(f"{where}: 'query' must be a string")
        return MCExample(
            question_context(q), choices, _answer_index(obj["gold"], [], len(choices), where), group
        )
    if "endings" in obj:  # HellaSwag
        endings = [_hellaswag_clean(e) for e in _strings(obj["endings"], where, "'endings'")]
        ctx = obj.get("ctx")
        if not isinstance(ctx, str):
            raise ChatforgeError(f"{where}: HellaSwag records need a string 'ctx'")
        label = obj.get("activity_label")
        text = f"{label}: {ctx}" if isinstance(label, str) and label else ctx
        return MCExample(
            _hellaswag_clean(text), endings, _answer_index(obj.get("label"), [], len(endings), where), group
        )
    if "answerKey" in obj:  # ARC, AI2 original or HF datasets
        q, choices = obj.get("question"), obj.get("choices")
        if isinstance(q, dict):  # {"stem", "choices": [{"text", "label"}]}
            q, choices = q.get("stem"), q.get("choices")
            if isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
                choices = {
                    "text": [c.get("text") for c in choices],
                    "label": [c.get("label") for c in choices],
                }
        if not isinstance(q, str) or not isinstance(choices, dict):
            raise ChatforgeError(
                f"{where}: ARC records need 'question' and 'choices': {{text: [...], label: [...]}}"
            )
        texts = _strings(choices.get("text"), where, "'choices.text'")
        labels = [str(x) for x in choices.get("label") or _letters(len(texts))]
        gold = _answer_index(str(obj["answerKey"]), labels, len(texts), where)
        return MCExample(question_context(q), texts, gold, group)
    if "question" in obj and "choices" in obj and "answer" in obj:  # MMLU
        choices = _strings(obj["choices"], where, "'choices'")
        if not isinstance(obj["question"], str):
            raise ChatforgeError(f"{where}: 'question' must be a string")
        gold = _answer_index(obj["answer"], _letters(len(choices)), len(choices), where)
        return MCExample(question_context(obj["question"]), choices, gold, group)
    raise ChatforgeError(
        f"{where}: unknown multiple-choice layout (keys {sorted(obj)}); expected ARC {{query, choices, gold}}, "
        "HellaSwag {ctx, endings, label}, MMLU {question, choices, answer} or ARC {question, choices, answerKey}"
    )


def _load_jsonl(path: Path, group: str) -> list[MCExample]:
    return [parse_mc_record(obj, f"{path} line {n}", group) for n, obj in read_jsonl(path)]


def _load_csv(path: Path, group: str) -> list[MCExample]:
    """MMLU csv: question, choice..., answer; a first row starting with "question" is a header."""
    out = []
    with open_text(path) as f:
        reader = csv.reader(f)
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not row or not any(cell.strip() for cell in row):
                continue
            if reader.line_num == 1 and row[0].strip().lower() == "question":
                continue
            if len(row) < 4:
                raise ChatforgeError(
                    f"{where}: expected question, at least two choices and an answer; got {len(row)} columns"
                )
            q, choices, ans = row[0], row[1:-1], row[-1]
            gold = _answer_index(ans, _letters(len(choices)), len(choices), where)
            out.append(MCExample(question_context(q), choices, gold, group))
    return out


def _load_hellaswag_txt(path: Path, group: str) -> list[MCExample]:
    """llama.cpp's HellaSwag text: blocks of 6 lines (context, gold label 0-3, four endings)."""
    with open_text(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ChatforgeError(
            f"{path} line {len(lines) - len(lines) % 6 + 1}: incomplete task; HellaSwag text files hold 6 lines "
            "per task (context, label, 4 endings)"
        )
    out = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if not label.isdigit() or not 0 <= int(label) < 4:
            raise ChatforgeError(f"{path} line {i + 2}: expected the gold label 0-3, got {label[:40]!r}")
        endings = [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]]
        out.append(MCExample(_hellaswag_clean(lines[i]), endings, int(label), group))
    return out


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".bz2", ".gz"):
        name = name.removesuffix(suffix)
    return next((k for k in ("jsonl", "csv", "txt") if name.endswith("." + k)), None)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".bz2", ".gz", ".jsonl", ".csv", ".txt"):
        name = name.removesuffix(suffix)
    return name


def load_mc(path: str | Path) -> list[MCExample]:
    """Examples from a jsonl / csv / HellaSwag .txt file, or every such file in a folder (one group each)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _file_kind(f))
        if not files:
            raise ChatforgeError(f"{p} holds no .jsonl, .csv or .txt multiple-choice files")
        out = []
        for f in files:
            out += _load_file(f, re.sub(r"_(test|dev|val|validation|train)$", "", _stem(f)))
        return out
    if not p.is_file():
        raise ChatforgeError(f"no multiple-choice file at {p}: check the path ({DATA_HINT})")
    return _load_file(p, "")


def _load_file(p: Path, group: str) -> list[MCExample]:
    kind = _file_kind(p)
    if kind is None:
        raise ChatforgeError(
            f"{p}: unsupported multiple-choice file; use .jsonl, .csv (MMLU) or .txt (HellaSwag)"
        )
    try:
        loader = {"jsonl": _load_jsonl, "csv": _load_csv, "txt": _load_hellaswag_txt}[kind]
        examples = loader(p, group)
    except (UnicodeDecodeError, OSError, EOFError, csv.Error) as e:
        raise ChatforgeError(f"{p} could not be read ({e}); is it the right file?") from None
    if not examples:
        raise ChatforgeError(f"{p} holds no multiple-choice examples")
    return examples


def mc_task_name(path: str | Path) -> str:
    """mc:arc_easy for arc/arc_easy.jsonl; mc:mmlu_test for the folder mmlu/test."""
    p = Path(path)
    if p.is_dir() and p.name in ("test", "dev", "val", "validation", "train") and p.resolve().parent.name:
        return f"mc:{p.resolve().parent.name}_{p.name}"
    return f"mc:{_stem(p)}"


@register("mc")
def _mc_tasks(inputs: EvalInputs) -> list[MultipleChoice]:
    if not inputs.mc_files:
        raise ChatforgeError("the mc task needs data: give --mc FILE (ARC/MMLU/HellaSwag jsonl, csv or txt)")
    return [MultipleChoice(load_mc(p), mc_task_name(p)) for p in inputs.mc_files]
