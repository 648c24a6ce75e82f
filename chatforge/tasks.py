"""Tasks with checkable answers, written as steps: the Game of 24 and world age problems.

Each task turns a problem into a prompt (a direct one, or one that asks for steps), writes correct
step traces (for training), extracts the final answer from a model's text, checks it exactly, and
labels each step of a trace by program (the first wrong step bad, the steps before it good): the
labels a process reward model trains on.

Game of 24 (the Tree-of-Thoughts format): four numbers, each step combines two of them,

    4 * 6 = 24 (left: 1 1 24)
    1 * 1 = 1 (left: 1 24)
    1 * 24 = 24 (left: 24)
    Answer: (4 * 6) * (1 * 1) = 24

World age problems: people of the synthetic world, one age given, the others as differences,
a sum or a difference asked, the steps numbered:

    1. Ben is 34 + 7 = 41.
    2. Cara is 41 - 12 = 29.
    3. The sum is 34 + 41 + 29 = 104.
    Answer: 104
"""

from __future__ import annotations

import ast
import csv
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.world import build_world

ANSWER_RE = re.compile(r"Answer:\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    """One problem: its task, the text it is asked in, a reference answer, what the checker needs."""

    task: str
    question: str
    answer: str
    data: dict = field(default_factory=dict, compare=False, hash=False)


def answer_line(text: str) -> str | None:
    """What follows the first "Answer:" (up to the line's end), or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def split_steps(text: str) -> list[str]:
    """A trace's steps: its non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- Game of 24 ------------------------------------------------------------------------------

OPS = "+-*/"
_STEP_RE = re.compile(r"^(\d+(?:/\d+)?) ([-+*/]) (\d+(?:/\d+)?) = (-?\d+(?:/\d+)?) \(left: ([-\d/ ]+)\)$")


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def _moves(
    nums: tuple[Fraction, ...],
) -> list[tuple[Fraction, str, Fraction, Fraction, tuple[Fraction, ...]]]:
    """Every (a, op, b, result, numbers left) one step can make; subtraction never goes negative
    (the bigger number first), as the traces are written."""
    out = []
    for i in range(len(nums)):
        for j in range(len(nums)):
            if i == j:
                continue
            a, b = nums[i], nums[j]
            rest = tuple(nums[k] for k in range(len(nums)) if k not in (i, j))
            for op in OPS:
                if op in "+*" and i > j:  # commutative: one order
                    continue
                if op == "-" and a < b:
                    continue
                r = _apply(a, op, b)
                if r is not None:
                    out.append((a, op, b, r, tuple(sorted((*rest, r)))))
    return out


@lru_cache(maxsize=200_000)
def solvable(nums: tuple[Fraction, ...]) -> bool:
    """Whether these numbers (sorted) can still make exactly 24."""
    if len(nums) == 1:
        return nums[0] == 24
    return any(solvable(left) for *_, left in _moves(nums))


def _key(nums) -> tuple[Fraction, ...]:
    return tuple(sorted(Fraction(x) for x in nums))


def solutions(numbers: list[int], limit: int = 1000) -> list[list[str]]:
    """Distinct correct traces (3 steps + the answer line) for four numbers, up to `limit`."""
    found: list[list[str]] = []

    def walk(nums: tuple[Fraction, ...], exprs: dict, steps: list[str]) -> None:
        if len(found) >= limit:
            return
        if len(nums) == 1:
            if nums[0] == 24:
                found.append([*steps, f"Answer: {_final(exprs)} = 24"])
            return
        for a, op, b, r, left in _moves(nums):
            if not solvable(left):
                continue
            new = _combine(exprs, a, op, b, r)
            step = f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(r)} (left: {' '.join(_fmt(x) for x in left)})"
            walk(left, new, [*steps, step])

    walk(_key(numbers), {"pool": [(Fraction(n), str(n)) for n in sorted(numbers)]}, [])
    unique = list(dict.fromkeys("\n".join(t) for t in found))
    return [t.split("\n") for t in unique]


def _combine(exprs: dict, a: Fraction, op: str, b: Fraction, r: Fraction) -> dict:
    """The pool of (value, expression) after combining a and b (the first match of each value)."""
    pool = list(exprs["pool"])
    ia = next(i for i, (v, _) in enumerate(pool) if v == a)
    ea = pool.pop(ia)[1]
    ib = next(i for i, (v, _) in enumerate(pool) if v == b)
    eb = pool.pop(ib)[1]
    pool.append((r, f"({ea} {op} {eb})"))
    return {"pool": pool}


def _final(exprs: dict) -> str:
    expr = exprs["pool"][0][1]
    return expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr


def eval_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """(value, the integers used) of an arithmetic expression of + - * / and parentheses, or None
    when it is anything else or divides by zero."""
    try:
        tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def ev(node) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = ev(node.left), ev(node.right)
            return None if a is None or b is None else _apply(a, ops[type(node.op)], b)
        return None

    value = ev(tree.body)
    return None if value is None else (value, used)


class Game24:
    """The Game of 24 over the puzzles of 24.csv (Yao et al.'s file: rank, puzzle, ...)."""

    name = "game24"

    def load(self, path: str | Path, ranks: tuple[int, int]) -> list[Problem]:
        """The puzzles ranked lo..hi (inclusive) in the csv, with one reference solution each."""
        lo, hi = ranks
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if lo <= int(r["Rank"]) <= hi]
        except (OSError, KeyError, ValueError) as e:
            raise ChatforgeError(f"cannot read Game-of-24 puzzles from {path} ({e}); give 24.csv") from None
        problems = []
        for r in rows:
            nums = [int(x) for x in r["Puzzles"].split()]
            sols = solutions(nums, limit=1)
            ref = answer_line(sols[0][-1]) if sols else ""
            problems.append(
                Problem(self.name, r["Puzzles"], ref or "", {"numbers": nums, "rank": int(r["Rank"])})
            )
        return problems

    def prompt(self, p: Problem, steps: bool) -> list[dict]:
        ask = f"Make 24 from {p.question}." + (" Think step by step." if steps else "")
        return [{"role": "user", "content": ask}]

    def extract(self, text: str) -> str | None:
        """The expression of the answer line ("Answer: EXPR = 24" -> EXPR, spaces normalised)."""
        line = answer_line(text)
        if line is None:
            return None
        expr = line.split("=")[0].strip()
        return " ".join(expr.split()) or None

    def check(self, p: Problem, answer: str | None) -> bool:
        """Exact: the expression uses exactly the puzzle's four numbers and equals 24."""
        got = eval_expression(answer) if answer else None
        return got is not None and got[0] == 24 and sorted(got[1]) == sorted(p.data["numbers"])

    def traces(self, p: Problem, rng: random.Random, n: int) -> list[list[str]]:
        """Up to n distinct correct traces, chosen at random among all of them."""
        sols = solutions(p.data["numbers"])
        return rng.sample(sols, min(n, len(sols)))

    def step_labels(self, p: Problem, steps: list[str]) -> list[bool | None]:
        """True for each step up to the first wrong one, False for it, None after it. A step is wrong
        when it misreads the numbers left, miscounts, or leaves numbers that cannot make 24."""
        labels: list[bool | None] = []
        nums = _key(p.data["numbers"])
        for s in steps:
            if s.startswith("Answer:"):
                ok = len(nums) == 1 and self.check(p, self.extract(s))
            else:
                nxt = _step_result(nums, s)
                ok = nxt is not None and solvable(nxt)
                nums = nxt or nums
            labels.append(ok)
            if not ok:
                return labels + [None] * (len(steps) - len(labels))
        return labels

    def wrong_step(self, p: Problem, steps: list[str], i: int, rng: random.Random) -> str | None:
        """A plausible wrong step i after correct steps[:i]: a legal move into a dead end, or a slip
        (a miscounted result, a misstated list of what is left, a number that is not there), or a
        wrong answer line; None when there is none to make."""
        nums = _key(p.data["numbers"])
        for s in steps[:i]:
            nums = _step_result(nums, s) or nums
        if len(nums) == 1:
            return self._wrong_answer(p, steps[i] if i < len(steps) else "", rng)
        moves = _moves(nums)
        dead = [m for m in moves if not solvable(m[4])]
        if dead and rng.random() < 0.4:
            a, op, b, r, left = rng.choice(dead)
        else:
            a, op, b, r, left = _slip(nums, rng.choice(moves), rng)
        return f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(r)} (left: {' '.join(_fmt(x) for x in left)})"

    def _wrong_answer(self, p: Problem, right: str, rng: random.Random) -> str:
        """A wrong answer line that looks right: the right expression with one operator or one
        number changed (a near miss a verifier must read closely), else the numbers strung together."""
        expr = self.extract(right) or ""
        spots = [m.start() for m in re.finditer(r"[-+*/]|\d+", expr)]
        for j in rng.sample(spots, len(spots)):
            tok = re.match(r"[-+*/]|\d+", expr[j:]).group(0)
            numbers = [str(n) for n in p.data["numbers"] if str(n) != tok]
            other = [o for o in OPS if o != tok] if tok in OPS else numbers
            for o in rng.sample(other, len(other)):
                wrong = expr[:j] + o + expr[j + len(tok) :]
                if not self.check(p, wrong):
                    return f"Answer: {wrong} = 24"
        return f"Answer: {' '.join(str(n) for n in reversed(p.data['numbers']))} = 24"


def _slip(nums: tuple[Fraction, ...], move: tuple, rng: random.Random) -> tuple:
    """A move gone wrong the ways a model's steps go wrong: the result miscounted, a number of
    what is left misstated, or an operand that is not among the numbers."""
    a, op, b, r, left = move
    rest = list(left)
    rest.remove(r)
    kind = rng.choice(("result", "left", "operand"))
    if kind == "left" and rest:
        j = rng.randrange(len(rest))
        rest[j] = max(Fraction(1), rest[j] + rng.choice((-2, -1, 1, 2, 3)))
        if Counter(rest) != Counter(left) - Counter([r]):
            return a, op, b, r, tuple(sorted((*rest, r)))
    if kind == "operand":
        other = a + rng.choice((1, 2, 3))
        made = _apply(other, op, b)
        if other not in nums and made is not None and made >= 0:
            return other, op, b, made, tuple(sorted((*rest, made)))
    wrong = r + rng.choice((-2, -1, 1, 2))
    return a, op, b, wrong, tuple(sorted((*rest, wrong)))


def _step_result(nums: tuple[Fraction, ...], step: str) -> tuple[Fraction, ...] | None:
    """The numbers left after a well-formed, correctly computed step on `nums`, else None."""
    m = _STEP_RE.match(step.strip())
    if not m:
        return None
    a, op, b, r = Fraction(m.group(1)), m.group(2), Fraction(m.group(3)), Fraction(m.group(4))
    rest = Counter(nums)
    for x in (a, b):
        if rest[x] == 0:
            return None
        rest[x] -= 1
    if _apply(a, op, b) != r:
        return None
    left = tuple(sorted([*rest.elements(), r]))
    try:
        stated = tuple(sorted(Fraction(x) for x in m.group(5).split()))
    except (ValueError, ZeroDivisionError):
        return None
    return left if stated == left else None


# ---- world age problems -----------------------------------------------------------------------


class WorldSteps:
    """Age problems over people of the synthetic world: one age given, the others as differences
    from the person before, then the sum of all ages or the gap between the first and the last."""

    name = "world"

    def make(self, n: int, seed: int, people: int = 3) -> list[Problem]:
        """n problems over `people` people each (names from chatforge.world's people)."""
        rng = random.Random(seed)
        names = [p.first for p in build_world(seed, 400, 0).people]
        out = []
        for _ in range(n):
            who = rng.sample(sorted(set(names)), people)
            ages = [rng.randint(20, 60)]
            diffs = []
            for _ in range(people - 1):
                d = rng.randint(1, 19) * rng.choice((1, -1))
                if not 5 <= ages[-1] + d <= 90:
                    d = -d
                diffs.append(d)
                ages.append(ages[-1] + d)
            facts = [f"{who[0]} is {ages[0]}."] + [
                f"{who[i + 1]} is {abs(d)} years {'older' if d > 0 else 'younger'} than {who[i]}."
                for i, d in enumerate(diffs)
            ]
            ask_sum = rng.random() < 0.5
            q = (
                "What is the sum of their ages?" if ask_sum
                else f"How many years older is the older of {who[0]} and {who[-1]}?"
            )  # fmt: skip
            answer = sum(ages) if ask_sum else abs(ages[-1] - ages[0])
            data = {"names": who, "ages": ages, "diffs": diffs, "sum": ask_sum}
            out.append(Problem(self.name, " ".join(facts) + " " + q, str(answer), data))
        return out

    def prompt(self, p: Problem, steps: bool) -> list[dict]:
        return [{"role": "user", "content": p.question + (" Think step by step." if steps else "")}]

    def extract(self, text: str) -> str | None:
        line = answer_line(text)
        m = re.search(r"-?\d+", line or "")
        return m.group(0) if m else None

    def check(self, p: Problem, answer: str | None) -> bool:
        return answer is not None and answer == p.answer

    def traces(self, p: Problem, rng: random.Random, n: int) -> list[list[str]]:
        return [self._trace(p)]

    def _trace(self, p: Problem) -> list[str]:
        who, ages, diffs = p.data["names"], p.data["ages"], p.data["diffs"]
        steps = [
            f"{i + 1}. {who[i + 1]} is {ages[i]} {'+' if d > 0 else '-'} {abs(d)} = {ages[i + 1]}."
            for i, d in enumerate(diffs)
        ]
        if p.data["sum"]:
            # one addition per step: a small model adds two numbers far more reliably than three
            total = ages[0]
            for i, a in enumerate(ages[1:]):
                so_far = "" if i == len(ages) - 2 else " so far"
                steps.append(f"{len(steps) + 1}. The sum{so_far} is {total} + {a} = {total + a}.")
                total += a
        else:
            hi, lo = max(ages[0], ages[-1]), min(ages[0], ages[-1])
            steps.append(f"{len(steps) + 1}. The gap is {hi} - {lo} = {p.answer}.")
        return [*steps, f"Answer: {p.answer}"]

    def step_labels(self, p: Problem, steps: list[str]) -> list[bool | None]:
        """Each step must be the reference trace's step (same numbers); the answer line must be right."""
        ref = self._trace(p)
        labels: list[bool | None] = []
        for i, s in enumerate(steps):
            if s.startswith("Answer:"):
                ok = self.check(p, self.extract(s))
            else:
                ok = i < len(ref) - 1 and _numbers(s) == _numbers(ref[i]) and _arith_ok(s)
            labels.append(ok)
            if not ok:
                return labels + [None] * (len(steps) - len(labels))
        return labels

    def wrong_step(self, p: Problem, steps: list[str], i: int, rng: random.Random) -> str | None:
        """Step i with a wrong result (off by a small amount), or a wrong answer line."""
        ref = self._trace(p)
        if i >= len(ref):
            return None
        if ref[i].startswith("Answer:"):
            return f"Answer: {int(p.answer) + rng.choice((-10, -1, 1, 10))}"
        head, result = ref[i].rsplit("= ", 1)
        return f"{head}= {int(result.rstrip('.')) + rng.choice((-10, -2, -1, 1, 2, 10))}."


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _arith_ok(step: str) -> bool:
    m = re.search(r"(\d+(?: [-+] \d+)+) = (-?\d+)", step)
    got = eval_expression(m.group(1)) if m else None
    return got is not None and got[0] == int(m.group(2))


TASKS = {"game24": Game24(), "world": WorldSteps()}


def get_task(name: str) -> Game24 | WorldSteps:
    if name not in TASKS:
        raise ChatforgeError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def trace_conversations(
    task, problems: list[Problem], rng: random.Random, per_problem: int
) -> list[list[dict]]:
    """SFT conversations: up to `per_problem` step traces per problem, and one direct answer."""
    convs = []
    for p in problems:
        traces = task.traces(p, rng, per_problem)
        for t in traces:
            convs.append([*task.prompt(p, steps=True), {"role": "assistant", "content": "\n".join(t)}])
        if traces:
            convs.append([*task.prompt(p, steps=False), {"role": "assistant", "content": traces[0][-1]}])
    return convs
