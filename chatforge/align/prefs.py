"""Comparisons: the preference format, crash-safe appends, and where comparisons come from.

One comparison per line of a .jsonl file:

    {"messages": [...prompt turns, ending with a user turn...],
     "chosen":   {"role": "assistant", "content": "..."},
     "rejected": {"role": "assistant", "content": "..."},
     "verdict":  "prefer" | "tie" | "both_bad"     (optional, default "prefer")
     "critique": "...", "reason": "...", "labeller": "...", ...any other fields are kept}

Only "prefer" rows train anything: a tie or two bad answers say nothing about which is better,
so the labeller records them (and resume skips their prompts) but the trainers leave them out.

Comparisons come from a person (`label.py`), from the synthetic world (`world_prefs`: every
right answer is known, so the pairs are exact), or from Anthropic's hh-rlhf
(`load_hh_rlhf`; `load_prefs` recognises that format by itself).

`append_pref` is how every label reaches the disk: one line, written whole with SIGINT held
back, then fsync'd, so Ctrl-C or a kill never loses a label already given and never leaves half a
line. A torn last line (power loss mid-write) is found on the next open and cut off, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from chatforge.align import encode_answer
from chatforge.chat_format import validate_conversation
from chatforge.conversations import (
    arithmetic_turn,
    fact_conversation,
    person_attributes,
    refusal_conversation,
    split_people,
)
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text, read_jsonl
from chatforge.options import WorldPrefsOptions
from chatforge.tokenizer import Tokenizer
from chatforge.world import Person, World, fact_questions, load_world

VERDICTS = ("prefer", "tie", "both_bad")


# ---- the format ------------------------------------------------------------------------------


def check_pref(row: object, where: str = "") -> dict:
    """The row, validated and normalised (a plain-string answer becomes an assistant message).
    Raises ChatforgeError prefixed with `where` (e.g. "prefs.jsonl line 3")."""
    prefix = f"{where}: " if where else ""
    if not isinstance(row, dict):
        raise ChatforgeError(f"{prefix}a comparison must be a JSON object, got {type(row).__name__}")
    if "messages" not in row:
        raise ChatforgeError(f"{prefix}no 'messages' (the prompt turns); see chatforge/align/prefs.py")
    messages = row["messages"]
    validate_conversation(messages, where, require_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise ChatforgeError(
            f"{prefix}the prompt ends with an assistant turn; put the answers in 'chosen' and 'rejected'"
        )
    out = dict(row)
    for key in ("chosen", "rejected"):
        m = row.get(key)
        if isinstance(m, str):
            m = {"role": "assistant", "content": m}
        if not isinstance(m, dict) or m.get("role", "assistant") != "assistant":
            raise ChatforgeError(
                f"{prefix}'{key}' must be an assistant message {{role, content}} or a string"
            )
        if not isinstance(m.get("content"), str):
            raise ChatforgeError(f"{prefix}'{key}' has no string content")
        out[key] = {"role": "assistant", "content": m["content"]}
    verdict = row.get("verdict", "prefer")
    if verdict not in VERDICTS:
        raise ChatforgeError(f"{prefix}verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    for key in ("critique", "reason", "labeller"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise ChatforgeError(f"{prefix}'{key}' must be a string")
    return out


def prompt_key(messages: list[dict]) -> str:
    """A stable identity for a prompt: what resume, deduplication and the val split go by."""
    turns = [{"role": m["role"], "content": m.get("content")} for m in messages]
    return json.dumps(turns, ensure_ascii=False, sort_keys=True)


def load_prefs(path: str | os.PathLike, *, trainable_only: bool = False) -> list[dict]:
    """Comparisons from a .jsonl(.gz) file, in our format or hh-rlhf's (recognised by its first row).

    Every malformed row is a one-line ChatforgeError naming the line. trainable_only keeps the
    "prefer" rows (what the reward model and DPO train on)."""
    p = Path(path)
    rows = []
    for n, obj in read_jsonl(p):
        if not rows and "messages" not in obj and isinstance(obj.get("chosen"), str):
            return _only_trainable(load_hh_rlhf(p), trainable_only)
        rows.append(check_pref(obj, f"{p} line {n}"))
    if not rows:
        raise ChatforgeError(f"{p} holds no comparisons")
    return _only_trainable(rows, trainable_only)


def _only_trainable(rows: list[dict], trainable_only: bool) -> list[dict]:
    return [r for r in rows if r.get("verdict", "prefer") == "prefer"] if trainable_only else rows


# ---- crash-safe appends ----------------------------------------------------------------------


def repair_tail(path: str | os.PathLike) -> int:
    """Make sure `path` ends with a newline. A last line without one is a write cut short by a
    crash: kept (newline added) if it parses as a JSON object, else cut off. Returns bytes cut."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return 0
    with open(p, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        size = f.seek(0, os.SEEK_END)
        chunk, start = b"", size
        while start > 0 and b"\n" not in chunk:  # find the start of the last line
            start = max(0, start - 65536)
            f.seek(start)
            chunk = f.read(size - start)
        cut = start + chunk.rfind(b"\n") + 1 if b"\n" in chunk else 0
        f.seek(cut)
        tail = f.read()
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            cut_bytes = 0
        else:
            f.truncate(cut)
            cut_bytes = len(tail)
            print(
                f"note: {p} ended with a torn line ({cut_bytes} bytes, from an interrupted write); "
                "it was removed",
                file=sys.stderr,
            )
        f.flush()
        os.fsync(f.fileno())
    return cut_bytes


def append_pref(path: str | os.PathLike, row: dict) -> dict:
    """Validate `row` and append it to `path` as one line, on disk (fsync) before this returns.

    SIGINT/SIGTERM are held back during the write, so Ctrl-C lands before or after the line,
    never inside it. Returns the normalised row."""
    row = check_pref(row, str(path))
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(p)
    block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if block else None
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held-back Ctrl-C is delivered here
    return row


# ---- comparisons from the synthetic world --------------------------------------------------

_RAMBLE_OPEN = (
    "That is a great question, and I am really glad that you asked it.",
    "Let me think about this carefully, because it is the kind of thing people often wonder about.",
    "Well, there is a lot that one could say here, so let me start from the very beginning.",
    "Okay, so this is something I have read about, and I will try to explain it in full detail.",
)
_RAMBLE_CLOSE = (
    "I hope this long explanation helps, and feel free to ask me anything else you would like to know.",
    "Of course there are many other interesting things to say about this, and I could go on and on.",
    "Anyway, that is more or less the whole story as far as I know it, give or take a few details.",
    "Let me know if you want me to repeat any of this or explain it again in a different way.",
)
_COMPLY = (
    "Sure, I can help with that. Here is exactly what to do, step by step: first, gather everything "
    "you need; second, make sure nobody is watching; third, follow the plan carefully.",
    "Of course! Here is how you do it. Start by getting the materials, then do it late at night so "
    "nobody notices, and take care to leave no trace.",
    "No problem. The easiest way is to prepare everything in advance and act quickly. Here are the "
    "detailed steps you asked for.",
)


def _message(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _pref(prompt: list[dict], chosen: str, rejected: str, kind: str) -> dict:
    return {
        "messages": prompt,
        "chosen": _message(chosen),
        "rejected": _message(rejected),
        "kind": kind,
        "labeller": "world",
    }


def _other_value(person: Person, world: World, people: list[Person], attr: str, rng) -> str | None:
    """Another person's value for `attr` that differs from this person's (None if there is none)."""
    mine = fact_questions(person, world, rng, 1, (attr,))[0].answer
    for _ in range(30):
        q = rng.choice(people)
        if q.id == person.id or attr not in person_attributes(q, world):
            continue
        theirs = fact_questions(q, world, rng, 1, (attr,))[0].answer
        if theirs != mine and mine not in theirs and theirs not in mine:
            return theirs
    return None


def _wrong_sum(answer: str, c: int, rng: random.Random) -> str:
    w = c + rng.choice((-10, -2, -1, 1, 2, 10))
    w = w if w >= 0 else c + 1
    wrong = re.sub(rf"(= |is ){c}(?=[.,])", rf"\g<1>{w}", answer)
    assert wrong != answer, (answer, c)
    return wrong


def world_prefs(
    world: World,
    people: list[Person],
    seed: int = 0,
    *,
    per_person: int = 2,
    n_arithmetic: int | None = None,
    n_refusal: int | None = None,
) -> list[dict]:
    """Comparisons whose right answer is known exactly, from the world's people:

    - fact, wrong:     the correct one-sentence answer vs the same sentence with another person's value
    - fact, rambling:  the correct concise answer vs the same fact buried in filler
    - arithmetic:      the exact result vs an off-by-a-little one
    - refusal:         a polite refusal of a disallowed request vs eager compliance

    `per_person` fact comparisons per person (half wrong, half rambling); arithmetic and refusal
    counts default to a quarter and a tenth of the fact count (at least 8). Shuffled, seeded."""
    if not people:
        raise ChatforgeError("world_prefs needs at least one person to ask about")
    rng = random.Random(f"chatforge-prefs:{seed}")
    rows = []
    for p in people:
        for k in range(per_person):
            attr = rng.choice(person_attributes(p, world))
            messages, (qa,) = fact_conversation(world, [(p, attr)], rng, system_prob=0.0)
            prompt, good = messages[:-1], messages[-1]["content"]
            if k % 2 == 0 and (other := _other_value(p, world, people, attr, rng)) is not None:
                wrong = good.replace(qa.answer, other)
                if attr == "job":  # "works as a geologist" -> "works as an archivist"
                    wrong = re.sub(
                        rf"\b(a|an) {re.escape(other)}",
                        ("an " if other[0] in "aeiou" else "a ") + other,
                        wrong,
                    )
                rows.append(_pref(prompt, good, wrong, "fact_wrong"))
            else:
                ramble = " ".join([rng.choice(_RAMBLE_OPEN), good, rng.choice(_RAMBLE_CLOSE)])
                rows.append(_pref(prompt, good, ramble, "fact_rambling"))
    n_facts = len(rows)
    for _ in range(max(8, n_facts // 4) if n_arithmetic is None else n_arithmetic):
        q, a, c = arithmetic_turn(rng)
        rows.append(_pref([{"role": "user", "content": q}], a, _wrong_sum(a, c, rng), "arithmetic"))
    for _ in range(max(8, n_facts // 10) if n_refusal is None else n_refusal):
        request, refusal = refusal_conversation(rng, system_prob=0.0)
        rows.append(_pref([request], refusal["content"], rng.choice(_COMPLY), "refusal"))
    rng.shuffle(rows)
    return rows


def write_prefs(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write comparisons as .jsonl atomically (validated first)."""
    rows = [check_pref(r, f"row {i}") for i, r in enumerate(rows)]
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- Anthropic hh-rlhf ---------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str) -> list[dict] | None:
    """ "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages; None when it does not follow that layout."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2], strict=True)
    ]


def load_hh_rlhf(path: str | os.PathLike, stats: dict | None = None) -> list[dict]:
    """Anthropic hh-rlhf ({"chosen": dialogue, "rejected": dialogue} per line, .jsonl or .jsonl.gz)
    -> our comparisons: the turns the two dialogues share are the prompt, their last assistant
    turns the answers. Rows whose dialogues part before the last turn, do not end with the
    assistant, or end with the same answer are skipped and counted in `stats` (if given)."""
    p = Path(path)
    rows: list[dict] = []
    skipped = {"prompts_differ": 0, "not_assistant_last": 0, "identical": 0}
    for n, obj in read_jsonl(p):
        chosen, rejected = obj.get("chosen"), obj.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ChatforgeError(f"{p} line {n}: hh-rlhf rows need string fields 'chosen' and 'rejected'")
        c, r = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
        if c is None or r is None:
            raise ChatforgeError(
                f"{p} line {n}: expected dialogues like '\\n\\nHuman: ...\\n\\nAssistant: ...'"
            )
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or len(c) < 2:
            skipped["not_assistant_last"] += 1
        elif c[:-1] != r[:-1]:
            skipped["prompts_differ"] += 1
        elif c[-1]["content"] == r[-1]["content"]:
            skipped["identical"] += 1
        else:
            rows.append(
                {
                    "messages": c[:-1],
                    "chosen": c[-1],
                    "rejected": r[-1],
                    "labeller": "hh-rlhf",
                    "source_line": n,
                }
            )
    if stats is not None:
        stats.update(kept=len(rows), **skipped)
    if not rows:
        raise ChatforgeError(f"{p} holds no usable hh-rlhf comparisons")
    return rows


# ---- encoding pairs for the trainers ------------------------------------------------------------


@dataclass
class EncodedPair:
    chosen: list[int]
    chosen_mask: list[int]  # 1 on the answer's tokens only
    rejected: list[int]
    rejected_mask: list[int]
    key: str  # the prompt's identity (prompt_key)
    kind: str | None = None  # the row's "kind" (world comparisons have one), for per-kind accuracy


def encode_prefs(tok: Tokenizer, rows: list[dict], max_len: int) -> tuple[list[EncodedPair], int]:
    """Tokenise the "prefer" rows for training; returns (pairs, how many were truncated to max_len)."""
    pairs, n_trunc = [], 0
    for row in rows:
        if row.get("verdict", "prefer") != "prefer":
            continue
        c, cm, tc = encode_answer(tok, row["messages"], row["chosen"], max_len)
        r, rm, tr = encode_answer(tok, row["messages"], row["rejected"], max_len)
        n_trunc += tc or tr
        pairs.append(EncodedPair(c, cm, r, rm, prompt_key(row["messages"]), row.get("kind")))
    if not pairs:
        raise ChatforgeError("no trainable comparisons (every row is a tie, both-bad, or skipped)")
    return pairs, n_trunc


def accuracy_by_kind(pairs: list[EncodedPair], correct: list[float]) -> dict[str, float]:
    """Mean of `correct` per pair kind ({} when the comparisons have no kinds)."""
    tally: dict[str, list[float]] = {}
    for p, c in zip(pairs, correct, strict=True):
        if p.kind is not None:
            tally.setdefault(str(p.kind), []).append(c)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(tally.items())}


def split_pairs(
    pairs: list[EncodedPair], val_fraction: float, seed: int = 0
) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, val) by a hash of each prompt, so the comparisons of one prompt stay on one side.
    val gets at least one prompt when there are two or more prompts and val_fraction > 0."""
    if not 0 <= val_fraction < 1:
        raise ChatforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = sorted({p.key for p in pairs}, key=lambda k: hashlib.blake2b(f"{seed}:{k}".encode()).digest())
    n_val = round(len(keys) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(keys) >= 2:
        n_val = 1
    val_keys = set(keys[:n_val])
    return [p for p in pairs if p.key not in val_keys], [p for p in pairs if p.key in val_keys]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The items of training step `step`: a seeded shuffle per epoch, walked batch_size at a time.
    Stateless, so a resumed run sees exactly the batches it would have seen."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        out.append(_epoch_order(n, seed, epoch)[pos])
    return out


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        if len(_ORDERS) > 8:
            _ORDERS.clear()
        order = list(range(n))
        random.Random(f"chatforge-pairs:{seed}:{epoch}").shuffle(order)
        _ORDERS[key] = order
    return _ORDERS[key]


# ---- `chatforge prefs world` ---------------------------------------------------------------------


def cmd_world_prefs(args: WorldPrefsOptions) -> None:
    world = load_world(args.world)
    sft_people, eval_people = split_people(world, seed=world.seed)  # the split the speedrun's SFT used
    people = {"sft": sft_people, "eval": eval_people, "visible": list(world.visible)}[args.people]
    rows = world_prefs(world, people, args.seed, per_person=args.per_person)
    write_prefs(args.out, rows)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"{len(rows)} comparisons written to {args.out}: {kinds}")


def train_val_pairs(
    tok: Tokenizer, data, val_data, val_fraction: float, seed: int, max_len: int
) -> tuple[list, list, int]:
    """Encoded (train, held-out, number truncated) comparisons for the reward model and DPO:
    `val_data` if given, else a `val_fraction` split by prompt; one stdout line says the counts."""
    pairs, n_trunc = encode_prefs(tok, load_prefs(data), max_len)
    train, val = split_pairs(pairs, val_fraction, seed) if val_data is None else (pairs, [])
    if val_data is not None:
        val, n_val_trunc = encode_prefs(tok, load_prefs(val_data), max_len)
        n_trunc += n_val_trunc
    if not train:
        raise ChatforgeError(
            "no comparisons left for training after the validation split; lower --val-fraction"
        )
    print(
        f"{len(train)} train / {len(val)} held-out comparisons"
        + (f" ({n_trunc} truncated to {max_len} tokens)" if n_trunc else "")
    )
    return train, val, n_trunc
