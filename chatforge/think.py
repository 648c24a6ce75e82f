"""Thinking time into accuracy: search strategies over one model's samples, one dial to pick them.

    direct            the answer alone, greedy (System 1)
    cot               the steps, then the answer, greedy (chain of thought)
    vote:K            K sampled step traces, majority vote over their answers (self-consistency)
    best-of:N:orm     N traces, the one the outcome reward model (align/reward.py) scores highest
    best-of:N:prm     N traces, ranked by the process reward model's lowest step score
    best-of:N:oracle  N traces, any one the exact checker accepts (pass@N: the ceiling)
    tree:bBdD         Tree of Thoughts: D levels of B proposed next steps per kept state, each
                      partial trace rated by the PRM, the best B kept (beam), dead ends left for
                      the best states set aside earlier (backtracking)
    K                 the same as vote:K

Every strategy samples through the one engine (`engine.generate_batch`: all of a step's samples in
one batch, seeded) and counts the tokens it generated, apart from the prompt tokens it fed and the
tokens the verifiers read. A step is one line of the assistant's answer; the answer is the text
after "Answer:" (or, without that line, the last number written).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from chatforge import checkpoint as ckpt
from chatforge.align.prefs import write_prefs
from chatforge.align.reward import load_reward_model, pref_train_config, train_reward
from chatforge.align.reward import score as reward_score
from chatforge.align.rewards import last_number
from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.device import pick_device
from chatforge.engine import generate_batch, token_budgets
from chatforge.errors import ChatforgeError
from chatforge.redteam.defenses import DefenseStack
from chatforge.tasks import answer_line, get_task, split_steps

SPEC_HELP = "write direct, cot, vote:K, best-of:N:orm|prm|oracle or tree:bBdD (e.g. vote:8, tree:b5d3)"
VERIFIERS = ("orm", "prm", "oracle")
_TREE_RE = re.compile(r"^b(-?\d+)d(-?\d+)$")


# ---- the dial --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkSpec:
    """A parsed strategy: its name, samples (or beam breadth), verifier and tree depth."""

    strategy: str  # direct | cot | vote | best-of | tree
    n: int = 1
    verifier: str | None = None  # best-of: orm | prm | oracle; tree: prm
    depth: int = 0

    def __str__(self) -> str:
        if self.strategy == "vote":
            return f"vote:{self.n}"
        if self.strategy == "best-of":
            return f"best-of:{self.n}:{self.verifier}"
        if self.strategy == "tree":
            return f"tree:b{self.n}d{self.depth}"
        return self.strategy


def _count(text: str, what: str, example: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ChatforgeError(f"{what} must be a whole number, got {text!r}: write e.g. {example}") from None
    if n < 1:
        raise ChatforgeError(f"{what} must be at least 1, got {n}: write e.g. {example}")
    return n


def parse_spec(text: str) -> ThinkSpec:
    """`vote:8` -> ThinkSpec("vote", 8); bad input -> ChatforgeError naming the fix."""
    spec = str(text).strip().lower()
    head, _, rest = spec.partition(":")
    if spec in ("direct", "cot"):
        return ThinkSpec(spec)
    if spec.lstrip("-").isdigit():
        return ThinkSpec("vote", _count(spec, "the number of samples", "vote:8"))
    if head == "vote" and rest:
        return ThinkSpec("vote", _count(rest, "vote's number of samples", "vote:8"))
    if head == "best-of" and rest:
        n, _, verifier = rest.partition(":")
        verifier = verifier or "orm"
        if verifier not in VERIFIERS:
            raise ChatforgeError(
                f"unknown verifier {verifier!r} in {text!r}: write best-of:8:orm, :prm or :oracle"
            )
        return ThinkSpec("best-of", _count(n, "best-of's number of samples", "best-of:8:orm"), verifier)
    if head == "tree" and rest:
        shape, _, value = rest.partition(":")
        m = _TREE_RE.match(shape)
        if not m or value not in ("", "prm"):
            raise ChatforgeError(
                f"bad tree shape {rest!r}: write tree:bBdD with breadth B and depth D, e.g. tree:b5d3"
            )
        breadth = _count(m.group(1), "the tree's breadth", "tree:b5d3")
        return ThinkSpec("tree", breadth, "prm", _count(m.group(2), "the tree's depth", "tree:b5d3"))
    raise ChatforgeError(f"unknown thinking strategy {text!r}: {SPEC_HELP}")


def parse_request_think(value: object) -> ThinkSpec:
    """The server's "think" field: a spec string, or {"strategy": ..., "n": ..., "verifier": ...,
    "depth": ...} (n = samples or breadth)."""
    if isinstance(value, str | int) and not isinstance(value, bool):
        return parse_spec(str(value))
    if isinstance(value, dict) and isinstance(value.get("strategy"), str):
        s, n = value["strategy"], value.get("n", 1)
        parts = {
            "vote": f"vote:{n}",
            "best-of": f"best-of:{n}:{value.get('verifier', 'orm')}",
            "tree": f"tree:b{n}d{value.get('depth', 3)}",
        }
        return parse_spec(parts.get(s, s))
    raise ChatforgeError(f'"think" must be a strategy string or an object with "strategy": {SPEC_HELP}')


# ---- answers ------------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    """What follows "Answer:", else the last number written, else None."""
    line = answer_line(text)
    if line is not None:
        return line
    n = last_number(text)
    return None if n is None else str(n)


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """(the most frequent answer, its index of first appearance); None answers do not vote. A tie goes
    to the answer seen first, so the result depends only on the samples' order. (None, -1) if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, -1
    first = {}
    for i, a in enumerate(answers):
        if a is not None:
            first.setdefault(a, i)
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return best, first[best]


# ---- tree search ----------------------------------------------------------------------------------

State = tuple[str, ...]  # the steps so far


@dataclass
class Node:
    steps: State
    value: float
    done: bool


def tree_search(
    propose: Callable[[list[State]], list[list[str]]],
    value: Callable[[list[State]], list[float]],
    is_done: Callable[[State], bool],
    breadth: int,
    depth: int,
    prune_below: float = -math.inf,
) -> list[Node]:
    """One tree search (see `search_steps`) with its proposer and value function called directly."""
    return run_lockstep(
        [search_steps(is_done, breadth, depth, prune_below)],
        lambda ids, asks: [propose(states) for states in asks],
        lambda ids, asks: [value(states) if states else [] for states in asks],
    )[0]


def search_steps(
    is_done: Callable[[State], bool], breadth: int, depth: int, prune_below: float = -math.inf
) -> Generator[list[State], list, list[Node]]:
    """Beam search over steps with backtracking, as a generator that asks for what it needs: it
    yields the kept states and is sent the next steps proposed for each, then yields the new states
    and is sent their values (always in that order, so many searches run in step: `run_lockstep`).
    States under `prune_below` are dropped, finished ones set apart, the best `breadth` of the rest
    kept and the others held in reserve. A level that keeps nothing backtracks: the best states of the
    reserve are expanded instead. Returns the finished states, then the unfinished ones still kept,
    each group best first."""
    beam, reserve, finished, seen = [Node((), 0.0, False)], [], [], {()}
    for _ in range(depth):
        proposals = yield [n.steps for n in beam]
        new = []
        for node, steps in zip(beam, proposals, strict=True):
            for s in steps:
                state = (*node.steps, s)
                if state not in seen:
                    seen.add(state)
                    new.append(state)
        scores = yield new
        alive = [Node(s, v, is_done(s)) for s, v in zip(new, scores, strict=True) if v >= prune_below]
        finished += [n for n in alive if n.done]
        open_ = sorted((n for n in alive if not n.done), key=lambda n: -n.value)
        beam, spare = open_[:breadth], open_[breadth:]
        reserve += spare
        if not beam:  # a dead end: go back to the best states set aside
            reserve.sort(key=lambda n: -n.value)
            beam, reserve = reserve[:breadth], reserve[breadth:]
            if not beam:
                break
    return sorted(finished, key=lambda n: -n.value) + sorted(beam, key=lambda n: -n.value)


def run_lockstep(
    searches: list[Generator],
    propose_many: Callable[[list[int], list[list[State]]], list[list[list[str]]]],
    value_many: Callable[[list[int], list[list[State]]], list[list[float]]],
) -> list[list[Node]]:
    """Drive several `search_steps` together: each round, one proposer call for every search's
    states and one value call for every search's new states, so the engine sees them in one batch.
    The callbacks get the indices of the searches still running and what each of them asks."""
    asks = {i: next(g) for i, g in enumerate(searches)}
    results: list[list[Node]] = [[] for _ in searches]
    phase = propose_many
    while asks:
        ids = list(asks)
        answers = phase(ids, [asks[i] for i in ids])
        for i, answer in zip(ids, answers, strict=True):
            try:
                asks[i] = searches[i].send(answer)
            except StopIteration as stop:
                results[i] = stop.value
                del asks[i]
        phase = value_many if phase is propose_many else propose_many
    return results


# ---- the thinker ----------------------------------------------------------------------------------


@dataclass
class Sample:
    """One answer the model wrote: its text, the answer extracted, the tokens it took."""

    text: str
    answer: str | None
    tokens: int


@dataclass
class ThinkResult:
    text: str  # the response chosen
    answer: str | None
    strategy: str
    generated_tokens: int  # new tokens the engine generated, every sample and step counted
    prompt_tokens: int  # tokens fed as prompts (each sample's prompt counted)
    verifier_tokens: int = 0  # tokens the reward models read
    candidates: list[tuple[str, float]] = field(default_factory=list)  # (text, score), best first


@dataclass
class Thinker:
    """A model and what its strategies need: the tokenizer, optional reward models (an outcome one,
    a process one), a task's answer extraction and, for the oracle, its exact checker."""

    model: object
    tok: object
    orm: object | None = None
    prm: object | None = None
    extract: Callable[[str], str | None] = extract_answer
    check: Callable[[str | None], bool] | None = None
    temperature: float = 0.8
    top_k: int | None = None
    max_new_tokens: int = 160
    step_tokens: int = 48
    seed: int = 0
    batch_rows: int = 256  # sequences per engine call: the KV cache of a bigger batch would not pay
    spec: ThinkSpec | None = None  # the strategy chat and the server answer with
    generated: int = 0
    prompted: int = 0
    verified: int = 0
    _calls: int = 0
    _line_ends: frozenset[int] | None = None
    _scores: dict = field(default_factory=dict)  # (reward model, prompt, answer) -> score

    # -- the engine, counted
    def generate(
        self, prompts: list[list[int]], max_new: int, greedy: bool, stop: Sequence[int]
    ) -> list[list[int]]:
        """generate_batch over these prompts, `batch_rows` at a time, with this thinker's sampling
        (each call seeded afresh from `seed`), every token counted."""
        outs: list[list[int]] = []
        for i in range(0, len(prompts), self.batch_rows):
            chunk = prompts[i : i + self.batch_rows]
            budgets = token_budgets(self.model, chunk, max_new)
            self._calls += 1
            outs += generate_batch(
                self.model, chunk, max(budgets), temperature=0.0 if greedy else self.temperature,
                top_k=self.top_k, seeds=self.seed * 1_000_003 + self._calls * 10_007, stop_ids=stop,
            )  # fmt: skip
        self.generated += sum(len(o) for o in outs)
        self.prompted += sum(len(p) for p in prompts)
        return outs

    def _text(self, ids: list[int]) -> str:
        ends = set(turn_end_ids(self.tok))
        return self.tok.decode([t for t in ids if t not in ends]).strip()

    def sample(self, messages: list[dict], n: int, greedy: bool = False) -> list[Sample]:
        """n answers to `messages` in one batch (greedy: one answer, however many asked)."""
        return self.sample_many([messages], n, greedy)[0]

    def sample_many(self, prompts: list[list[dict]], n: int, greedy: bool = False) -> list[list[Sample]]:
        """n answers to each prompt, every prompt's samples in the same batches."""
        k = 1 if greedy else n
        ids = [render_prompt(self.tok, m) for m in prompts for _ in range(k)]
        outs = self.generate(ids, self.max_new_tokens, greedy, turn_end_ids(self.tok))
        samples = [Sample(t := self._text(o), self.extract(t), len(o)) for o in outs]
        return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]

    # -- verifiers: items are (prompt messages, answer text)
    def _score(self, rm, items: list[tuple[list[dict], str]]) -> list[float]:
        """The reward model's score of each (prompt, answer). Each distinct pair is scored once per
        thinker (samples and tree states share their first steps), shortest first so a batch pads little."""
        keys = [(id(rm), tuple((m["role"], m["content"]) for m in msgs), t) for msgs, t in items]
        todo = {k: item for k, item in zip(keys, items, strict=True) if k not in self._scores}
        if todo:
            lengths = {
                k: len(render_prompt(self.tok, m)) + len(self.tok.encode(t)) for k, (m, t) in todo.items()
            }
            order = sorted(todo, key=lengths.__getitem__)
            convs = [[*todo[k][0], {"role": "assistant", "content": todo[k][1]}] for k in order]
            self._scores.update(zip(order, reward_score(rm, self.tok, convs, batch_size=64), strict=True))
            self.verified += sum(lengths.values())
        return [self._scores[k] for k in keys]

    def orm_scores(self, items: list[tuple[list[dict], str]]) -> list[float]:
        return self._score(self.needs("orm", self.orm), items)

    def prm_scores(self, items: list[tuple[list[dict], str]]) -> list[float]:
        """Each answer's lowest step score: every prefix of its steps scored by the PRM, all in one go."""
        prm = self.needs("prm", self.prm)
        prefixes, owner = [], []
        for i, (m, t) in enumerate(items):
            steps = split_steps(t) or [t]
            prefixes += [(m, "\n".join(steps[: j + 1])) for j in range(len(steps))]
            owner += [i] * len(steps)
        out = [math.inf] * len(items)
        for i, s in zip(owner, self._score(prm, prefixes), strict=True):
            out[i] = min(out[i], s)
        return out

    def needs(self, name: str, model: object | None) -> object:
        if model is None:
            flag = (
                "--prm RUN (train one with `chatforge prefs prm`)"
                if name == "prm"
                else "--orm RUN (a `chatforge prefs reward` run)"
            )
            raise ChatforgeError(f"this strategy ranks with a {name.upper()} but none is loaded: pass {flag}")
        return model

    # -- steps for the tree
    def line_ends(self) -> frozenset[int]:
        """Token ids whose text holds a newline: a step ends at the first of them."""
        if self._line_ends is None:
            ids = range(self.tok.vocab_size)
            self._line_ends = frozenset(i for i in ids if "\n" in self.tok.decode([i]))
        return self._line_ends

    def _continue(self, messages: list[dict], steps: State) -> list[int]:
        """The prompt ids that continue an answer after `steps`."""
        return render_prompt(self.tok, messages) + (self.tok.encode("\n".join(steps) + "\n") if steps else [])

    def propose(self, asks: list[tuple[list[dict], list[State]]], k: int) -> list[list[list[str]]]:
        """k sampled next lines for each state of each (messages, states), all in the same batches."""
        prompts = [self._continue(m, s) for m, states in asks for s in states for _ in range(k)]
        room = [j for j, p in enumerate(prompts) if len(p) < self.model.cfg.seq_len]  # full ones end there
        ends = set(turn_end_ids(self.tok))
        outs: list[list[int]] = [[] for _ in prompts]
        if room:
            made = self.generate(
                [prompts[j] for j in room], self.step_tokens, False, [*ends, *self.line_ends()]
            )
            for j, o in zip(room, made, strict=True):
                outs[j] = o
        lines = iter(self.tok.decode([t for t in o if t not in ends]).split("\n")[0].strip() for o in outs)
        return [[[ln for ln in (next(lines) for _ in range(k)) if ln] for _ in states] for _, states in asks]


def _done(state: State) -> bool:
    return bool(state) and state[-1].startswith("Answer:")


def think(
    th: Thinker, spec: ThinkSpec, messages: list[dict], steps_messages: list[dict] | None = None
) -> ThinkResult:
    """Answer `messages` with `spec`. `steps_messages` is the prompt that asks for steps (a task's
    "Think step by step."), default `messages`. Tokens are counted from this call's start."""
    steps_messages = steps_messages or messages
    g0, p0, v0 = th.generated, th.prompted, th.verified
    cands: list[tuple[str, float]] = []
    if spec.strategy in ("direct", "cot"):
        s = th.sample(messages if spec.strategy == "direct" else steps_messages, 1, greedy=True)[0]
        text = s.text
    elif spec.strategy == "vote":
        samples = th.sample(steps_messages, spec.n)
        _, i = majority_vote([s.answer for s in samples])
        text = samples[max(i, 0)].text
    elif spec.strategy == "best-of":
        samples = th.sample(steps_messages, spec.n)
        scores = rank_scores(th, spec.verifier or "orm", steps_messages, samples)
        cands = sorted(zip([s.text for s in samples], scores, strict=True), key=lambda c: -c[1])
        text = cands[0][0]
    elif spec.strategy == "tree":
        text, cands = tree_answers(th, spec, [steps_messages])[0]
    else:
        raise ChatforgeError(f"unknown thinking strategy {spec.strategy!r}: {SPEC_HELP}")
    return ThinkResult(
        text, th.extract(text), str(spec), th.generated - g0, th.prompted - p0, th.verified - v0, cands
    )


def think_defended(
    th: Thinker, spec: ThinkSpec, messages: list[dict], defenses: DefenseStack | None
) -> ThinkResult:
    """`think` behind the defense stack, the one way chat and the server think: the conversation goes
    through `defenses.prepare` first (a scanner's refusal raises InputBlocked and nothing is
    generated), and every text the result holds, the answer and each ranked candidate, through
    `checked_text` after, so no unchecked answer leaves it."""
    if defenses is None:
        return think(th, spec, messages)
    prepared = defenses.prepare(messages)
    r = think(th, spec, prepared)
    text = defenses.checked_text(r.text, prepared)
    cands = [(defenses.checked_text(t, prepared), score) for t, score in r.candidates]
    return dataclasses.replace(r, text=text, answer=th.extract(text), candidates=cands)


def rank_scores(th: Thinker, verifier: str, messages: list[dict], samples: list[Sample]) -> list[float]:
    """A score per sample (higher is better); ties keep the samples' order when sorted stably."""
    items = [(messages, s.text) for s in samples]
    if verifier == "orm":
        return th.orm_scores(items)
    if verifier == "prm":
        return th.prm_scores(items)
    if th.check is None:
        raise ChatforgeError(
            "best-of:N:oracle needs an exact checker, which only a task with known answers has"
        )
    return [float(th.check(s.answer)) for s in samples]


def tree_answers(
    th: Thinker, spec: ThinkSpec, prompts: list[list[dict]]
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Tree of Thoughts for each prompt, all searches in step (one engine batch per level), the PRM
    rating partial traces. States still unfinished after `depth` levels are completed greedily, and
    every answer is ranked by its lowest step score. Returns (best text, [(text, score)...]) each."""
    th.needs("prm", th.prm)
    searches = [search_steps(_done, spec.n, spec.depth) for _ in prompts]

    def propose_many(ids: list[int], asks: list[list[State]]) -> list[list[list[str]]]:
        return th.propose([(prompts[i], a) for i, a in zip(ids, asks, strict=True)], spec.n)

    def value_many(ids: list[int], asks: list[list[State]]) -> list[list[float]]:
        flat = [(prompts[i], "\n".join(s)) for i, a in zip(ids, asks, strict=True) for s in a]
        scores = iter(th._score(th.prm, flat))
        return [[next(scores) for _ in a] for a in asks]

    nodes = run_lockstep(searches, propose_many, value_many)
    items, owner = [], []
    ends = [(i, n) for i, ns in enumerate(nodes) for n in [m for m in ns if not m.done][: spec.n]]
    ends = [(i, n) for i, n in ends if len(th._continue(prompts[i], n.steps)) < th.model.cfg.seq_len]
    outs = (
        th.generate(
            [th._continue(prompts[i], n.steps) for i, n in ends],
            th.max_new_tokens,
            True,
            turn_end_ids(th.tok),
        )
        if ends
        else []
    )
    for i, ns in enumerate(nodes):
        for n in ns:
            if n.done:
                items.append((prompts[i], "\n".join(n.steps)))
                owner.append(i)
    for (i, n), o in zip(ends, outs, strict=True):
        items.append((prompts[i], "\n".join(n.steps) + "\n" + th._text(o)))
        owner.append(i)
    ranked: list[list[tuple[str, float]]] = [[] for _ in prompts]
    for i, item, score in zip(owner, items, th.prm_scores(items), strict=True):
        ranked[i].append((item[1], score))
    empty = [i for i, cands in enumerate(ranked) if not cands]  # nothing survived: a greedy answer instead
    fallback = dict(zip(empty, th.sample_many([prompts[i] for i in empty], 1, greedy=True), strict=True))
    out = []
    for i, cands in enumerate(ranked):
        cands.sort(key=lambda c: -c[1])
        out.append((cands[0][0], cands) if cands else (fallback[i][0].text, []))
    return out


# ---- verifiers for a task: labelled pairs and `chatforge prefs prm` ----------------------------------


def _pair(task, p, chosen: list[str], rejected: list[str], kind: str) -> dict:
    return {
        "messages": task.prompt(p, steps=True),
        "chosen": {"role": "assistant", "content": "\n".join(chosen)},
        "rejected": {"role": "assistant", "content": "\n".join(rejected)},
        "kind": kind,
        "labeller": "program",
    }


def verifier_pairs(
    task, problems: list, rng, process: bool, samples: list[list[str]] | None = None, refs: int = 1
) -> list[dict]:
    """Comparisons a reward model trains on, every label made by program.

    Process (a PRM): a trace cut after a right step i beats the same trace cut after a wrong step i
    (the first wrong step: `task.step_labels` confirms it is labelled bad and the steps before it
    good); of the model's own traces, each one's prefix up to its first wrong step loses to the
    reference's prefix of the same length. Outcome (an ORM): a whole right trace beats a whole wrong
    one (the model's own, or the reference with a wrong answer line). `refs` correct traces per
    problem (where it has that many) each give their own program-made pairs: more states to rate."""
    rows = []
    for j, p in enumerate(problems):
        traces = task.traces(p, rng, refs)
        if not traces:
            continue
        for ref in traces:
            for i in range(len(ref)):
                wrong = task.wrong_step(p, ref, i, rng)
                if wrong is None or task.step_labels(p, [*ref[:i], wrong])[i] is not False:
                    continue
                if process:
                    rows.append(_pair(task, p, ref[: i + 1], [*ref[:i], wrong], "program_step"))
                elif i == len(ref) - 1:
                    rows.append(_pair(task, p, ref, [*ref[:i], wrong], "program_answer"))
        ref = traces[0]
        for text in samples[j] if samples else []:
            steps = split_steps(text)
            labels = task.step_labels(p, steps)
            if False not in labels:
                continue
            if process:
                i = labels.index(False)
                rows.append(_pair(task, p, ref[: i + 1], steps[: i + 1], "own_step"))
            else:
                rows.append(_pair(task, p, ref, steps, "own_answer"))
    return rows


def _ranks(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        ranks = int(lo), int(hi or lo)
    except ValueError:
        raise ChatforgeError(f"--ranks takes LO-HI, e.g. 1-800, got {text!r}") from None
    if not 1 <= ranks[0] <= ranks[1] <= 800:
        raise ChatforgeError(f"--ranks {text} reaches outside 1-800: puzzles 801-900 are kept for reporting")
    return ranks


def task_problems(opts) -> tuple[object, list]:
    """The task and its training problems for `prefs prm` (game24: --ranks of --puzzles)."""
    task = get_task(opts.task)
    if opts.task == "game24":
        return task, task.load(opts.puzzles, _ranks(opts.ranks))
    return task, task.make(opts.problems, seed=101)


def cmd_prm(opts) -> None:
    import json
    import random
    from pathlib import Path

    cfg = pref_train_config(opts)
    if opts.samples < 0:
        raise ChatforgeError(f"--samples must be 0 or more, got {opts.samples}")
    if opts.refs < 1:
        raise ChatforgeError(f"--refs must be at least 1, got {opts.refs}")
    task, problems = task_problems(opts)
    texts = None
    if opts.samples:
        run = ckpt.load_run(opts.model, device=pick_device(cfg.device), inference=True)
        th = Thinker(run.model, run.tokenizer, extract=task.extract, temperature=1.0, seed=cfg.seed)
        drawn = th.sample_many([task.prompt(p, True) for p in problems], opts.samples)
        texts = [[s.text for s in group] for group in drawn]
    rows = verifier_pairs(task, problems, random.Random(cfg.seed), not opts.outcome, texts, opts.refs)
    if not rows:
        raise ChatforgeError("no labelled pairs came out of these problems; give more (--ranks, --problems)")
    pairs = Path(opts.out) / "verifier_pairs.jsonl"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    write_prefs(pairs, rows)
    kind = "outcome" if opts.outcome else "process"
    print(f"{len(rows)} {kind} pairs from {len(problems)} {opts.task} problems -> {pairs}")
    summary = train_reward(
        Path(opts.model),
        pairs,
        Path(opts.out),
        cfg,
        resume=opts.resume,
        progress=not opts.no_progress,
        kind=kind,
    )
    print(json.dumps(summary, indent=2, default=str))


# ---- the dial in chat and the server ----------------------------------------------------------------


def _load_verifier(path: str, tok, device, kind: str):
    flag = "--prm" if kind == "process" else "--orm"
    rm, rm_tok = load_reward_model(path, device)  # loaded once; its run records its kind
    recorded = rm.kind
    if recorded != kind:
        raise ChatforgeError(
            f"{flag} {path} is an {recorded} reward model; give a `chatforge prefs prm`"
            + (" run" if kind == "process" else " --outcome (or `prefs reward`) run")
        )
    if rm_tok.to_json() != tok.to_json():
        raise ChatforgeError(f"{flag} {path} has another tokenizer than the model; give one trained from it")
    return rm


def load_verifiers(tok, *, prm: str | None = None, orm: str | None = None, device="cpu") -> dict:
    """The reward models named (checked to be of their kind and on the model's tokenizer), as
    {"prm": model, "orm": model} for those given."""
    out = {}
    if prm:
        out["prm"] = _load_verifier(prm, tok, device, "process")
    if orm:
        out["orm"] = _load_verifier(orm, tok, device, "outcome")
    return out


def load_thinker(
    model, tok, spec: ThinkSpec, *, prm: str | None = None, orm: str | None = None, device="cpu", **sampling
) -> Thinker:
    """A Thinker for `spec`, with the reward models it needs loaded (and only those): a missing one
    is a one-line error naming the flag."""
    th = Thinker(model, tok, spec=spec, **{k: v for k, v in sampling.items() if v is not None})
    if spec.verifier == "prm":
        th.prm = _load_verifier(th.needs("prm", prm), tok, device, "process")
    if spec.verifier == "orm":
        th.orm = _load_verifier(th.needs("orm", orm), tok, device, "outcome")
    if spec.verifier == "oracle":
        raise ChatforgeError(
            "best-of:N:oracle needs an exact checker, which only a task with known answers has"
        )
    return th


def usage_note(r: ThinkResult) -> str:
    return f"think {r.strategy}: {r.generated_tokens} tokens generated, {r.prompt_tokens} prompt tokens" + (
        f", {r.verifier_tokens} read by the verifier" if r.verifier_tokens else ""
    )
