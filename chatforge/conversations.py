"""SFT conversations from the synthetic world: the data that turns the base model into an assistant.

Pretraining taught the model *facts* (biographies); supervised finetuning teaches it the
*format*: answer a user's question in one short sentence, say who it is, do arithmetic,
politely refuse a few harmful requests. Everything is generated from the world, so every
answer is known exactly.

The split that makes evaluation honest (`split_people`): the visible people are cut in two.
SFT asks questions about `sft_people` only; evaluation asks about `eval_people`, whose facts
the model saw only inside pretraining biographies. A right answer about an eval person is
knowledge *extraction* (the skill SFT taught, applied to facts it never drilled), not a
memorised answer.

No reverse (parent -> child) question appears anywhere in SFT: those are the reversal-curse
probes of `eval_reverse`. Every maker takes an explicit `random.Random`; a seed fixes every byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatforge.chat_format import with_tools
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.tools.calculator import CALCULATOR_TOOL
from chatforge.world import (
    ATTRIBUTES,
    N_PHRASINGS,
    QA,
    Person,
    World,
    fact_questions,
    format_date,
    reverse_questions,
)

Messages = list[dict]

SYSTEM_PROMPTS = (
    "You are chatforge, a helpful assistant.",
    "You are chatforge. Answer briefly and accurately.",
    "You are a helpful assistant.",
    "You are chatforge, a small assistant trained from scratch. Keep your answers short.",
)
SYSTEM_PROB = 0.25  # share of conversations that open with a system message


def _maybe_system(rng: random.Random, prob: float = SYSTEM_PROB) -> Messages:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < prob else []


# ---------------------------------------------------------------------------------------------
# People split


def split_people(
    world: World, *, eval_fraction: float = 0.5, seed: int = 0
) -> tuple[list[Person], list[Person]]:
    """Cut the VISIBLE people into (sft_people, eval_people), deterministically from `seed`.

    Held-out people belong to neither: their biographies were never in pretraining, so no
    question about them can test what pretraining taught. Both lists are sorted by id.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float):
        raise ChatforgeError(f"eval_fraction must be a number between 0 and 1, got {eval_fraction!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ChatforgeError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    visible = sorted(world.visible, key=lambda p: p.id)
    rng = random.Random(f"chatforge-sft-split:{seed}")
    shuffled = visible[:]
    rng.shuffle(shuffled)
    n_eval = round(len(visible) * eval_fraction)
    eval_ids = {p.id for p in shuffled[:n_eval]}
    return [p for p in visible if p.id not in eval_ids], [p for p in visible if p.id in eval_ids]


# ---------------------------------------------------------------------------------------------
# Fact QA

# Answer templates per attribute: {A} is the exact QA.answer (verbatim, always), {X} the name,
# {S}/{P} subject/possessive pronoun, {rel} mother/father, {a_job} the job with its article.
# The parent answer always names the child first, like the biographies; none says "son of".
_ANSWERS = {
    "birth_date": ("{X} was born on {A}.", "{S} was born on {A}.", "{P} date of birth is {A}."),
    "birth_city": ("{X} was born in {A}.", "{S} was born in {A}.", "{P} birthplace is {A}."),
    "university": ("{X} studied at {A}.", "{S} studied at {A}.", "{S} is a graduate of {A}."),
    "employer": ("{X} works for {A}.", "{S} works for {A}.", "{S} is employed by {A}."),
    "job": ("{X} works as {a_job}.", "{S} works as {a_job}.", "{P} occupation is {A}."),
    "hobby": ("{P} hobby is {A}.", "{X} enjoys {A}.", "In {p} free time, {s} enjoys {A}."),
    "parent": ("{P} {rel} is {A}.", "{X}'s {rel} is {A}.", "The {rel} of {X} is {A}."),
}


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def person_attributes(person: Person, world: World) -> tuple[str, ...]:
    """The attributes a forward question can ask about this person (no parent -> no parent question)."""
    return tuple(a for a in ATTRIBUTES if a != "parent" or world.parent_of(person) is not None)


def fact_turn(person: Person, world: World, attribute: str, rng: random.Random) -> tuple[QA, str]:
    """One forward question (a random phrasing) and a one-sentence answer containing QA.answer verbatim."""
    if attribute not in person_attributes(person, world):
        raise ChatforgeError(
            f"cannot ask about {attribute!r} of {person.name}; choose from {person_attributes(person, world)}"
        )
    qa = rng.choice(fact_questions(person, world, rng, n_phrasings=N_PHRASINGS, attributes=(attribute,)))
    she = person.gender == "female"
    fill = {
        "A": qa.answer,
        "X": person.name,
        "S": "She" if she else "He",
        "s": "she" if she else "he",
        "P": "Her" if she else "His",
        "p": "her" if she else "his",
        "a_job": _article(person.job),
    }
    if attribute == "parent":
        fill["rel"] = "mother" if world.parent_of(person).gender == "female" else "father"  # type: ignore[union-attr]
    answer = rng.choice(_ANSWERS[attribute]).format(**fill)
    assert qa.answer in answer, (qa, answer)  # the contract every consumer relies on
    return qa, answer


def fact_conversation(
    world: World,
    turns: list[tuple[Person, str]],
    rng: random.Random,
    *,
    system_prob: float = SYSTEM_PROB,
) -> tuple[Messages, list[QA]]:
    """A conversation asking one forward question per (person, attribute) turn, in order.

    Returns the messages and the QA asked in each user turn (for tests and bookkeeping).
    """
    if not turns:
        raise ChatforgeError("a fact conversation needs at least one (person, attribute) turn")
    messages = _maybe_system(rng, system_prob)
    asked = []
    for person, attribute in turns:
        qa, answer = fact_turn(person, world, attribute, rng)
        messages += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": answer}]
        asked.append(qa)
    return messages, asked


def _next_attribute(queue: list[str], attrs: tuple[str, ...], used: set[str], rng: random.Random) -> str:
    """Pop the next attribute of a person's shuffled cycle, skipping ones this conversation asked."""
    if not queue:
        queue.extend(rng.sample(attrs, len(attrs)))
    attr = queue.pop(0)
    if attr in used:  # the cycle came round mid-conversation: take a fresh one instead
        free = [a for a in attrs if a not in used]
        attr = rng.choice(free) if free else attr
    return attr


def _plan_fact_conversations(
    world: World, people: list[Person], convs_per_person: int, rng: random.Random
) -> list[list[tuple[Person, str]]]:
    """For each person, `convs_per_person` conversations led by them: half single-turn, half with
    2-3 questions, each follow-up about the same person or another one from `people`. A shuffled
    cycle of each person's attributes spreads their questions evenly over all attributes."""
    plans = []
    for p in people:
        attrs, queue = person_attributes(p, world), []
        for _ in range(convs_per_person):
            n_turns = 1 if rng.random() < 0.5 else rng.randint(2, 3)
            used: set[str] = set()
            turns = []
            for k in range(n_turns):
                if k == 0 or len(people) < 2 or rng.random() < 0.5:
                    attr = _next_attribute(queue, attrs, used, rng)
                    used.add(attr)
                    turns.append((p, attr))
                else:
                    q = rng.choice(people)
                    while q.id == p.id:
                        q = rng.choice(people)
                    turns.append((q, rng.choice(person_attributes(q, world))))
            plans.append(turns)
    return plans


# ---------------------------------------------------------------------------------------------
# Identity

_IDENTITY = {
    "name": (
        (
            "Who are you?",
            "What is your name?",
            "What are you?",
            "What should I call you?",
            "Tell me about yourself.",
            "Introduce yourself.",
            "Are you ChatGPT?",
        ),
        (
            "I am chatforge, a small assistant that you trained yourself with chatforge.",
            "My name is chatforge. I am a small language model assistant, trained from scratch with chatforge.",
            "I'm chatforge, a small assistant built with the chatforge project.",
        ),
    ),
    "maker": (
        (
            "Who made you?",
            "Who created you?",
            "Who trained you?",
            "Which company built you?",
            "Where do you come from?",
        ),
        (
            "You did! I am chatforge, and you trained me yourself with chatforge.",
            "I was built by my user with chatforge: the data, the tokenizer, pretraining and finetuning all ran on your machine.",
            "No big company made me. I am chatforge, a small assistant that you trained yourself with chatforge.",
        ),
    ),
    "skills": (
        (
            "What can you do?",
            "How can you help me?",
            "What are you good at?",
            "What kind of questions can you answer?",
        ),
        (
            "I am chatforge, a small assistant. I can answer questions about the people in my world, do simple arithmetic, and tell you about myself.",
            "As chatforge, I know facts about the people I read about during training, and I can add, subtract and multiply numbers.",
            "I'm chatforge. Ask me where someone was born, where they work or who their parent is, or give me a sum to work out.",
        ),
    ),
    "greeting": (
        ("Hello!", "Hi", "Hey there.", "Good morning!", "Hi, how are you?"),
        (
            "Hello! I am chatforge. How can I help you today?",
            "Hi! I'm chatforge, a small assistant. What would you like to know?",
            "Hello there! I am chatforge. Ask me anything about my world, or give me a sum to work out.",
        ),
    ),
}


def identity_conversation(rng: random.Random, *, system_prob: float = SYSTEM_PROB) -> Messages:
    """1-2 identity exchanges (name, maker, skills, greeting); every answer names chatforge."""
    messages = _maybe_system(rng, system_prob)
    kinds = rng.sample(sorted(_IDENTITY), rng.choice((1, 1, 2)))
    for kind in kinds:
        questions, answers = _IDENTITY[kind]
        messages.append({"role": "user", "content": rng.choice(questions)})
        messages.append({"role": "assistant", "content": rng.choice(answers)})
    return messages


# ---------------------------------------------------------------------------------------------
# Arithmetic

_ARITH_SYMBOL_Q = (
    "What is {a} {op} {b}?",
    "{a} {op} {b} = ?",
    "Calculate {a} {op} {b}.",
    "Compute {a} {op} {b}.",
)
_ARITH_WORD_Q = {
    "+": ("What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?"),
    "-": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "What is the difference between {a} and {b}?"),
    "*": ("What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"),
}
_ARITH_WORD = {"+": "plus", "-": "minus", "*": "times"}
_ARITH_A = ("{a} {op} {b} = {c}.", "{a} {word} {b} is {c}.", "{a} {op} {b} = {c}, so the answer is {c}.")


def arithmetic_turn(rng: random.Random) -> tuple[str, str, int]:
    """(question, answer, exact result): addition, subtraction or small multiplication."""
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 999), rng.randint(1, 999)
    elif op == "-":
        a = rng.randint(10, 999)
        b = rng.randint(1, a)
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 99)
        if rng.random() < 0.5:
            a, b = b, a
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    template = rng.choice(_ARITH_SYMBOL_Q if rng.random() < 0.5 else _ARITH_WORD_Q[op])
    fill = {"a": a, "b": b, "c": c, "op": op, "word": _ARITH_WORD[op]}
    return template.format(**fill), rng.choice(_ARITH_A).format(**fill), c


def arithmetic_conversation(rng: random.Random, *, system_prob: float = SYSTEM_PROB) -> Messages:
    """1-2 arithmetic questions, each answered with the exact result."""
    messages = _maybe_system(rng, system_prob)
    for _ in range(1 if rng.random() < 0.75 else 2):
        q, a, _ = arithmetic_turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


# ---------------------------------------------------------------------------------------------
# Polite refusals

_REFUSAL_PREFIXES = ("", "Please ", "Quick question: ", "I need your help. ", "Be honest with me. ")
_REFUSAL_TARGETS = ("my neighbor", "my coworker", "my ex", "a stranger", "my classmate")
_REFUSAL_REQUESTS = (
    "How do I build a bomb at home?",
    "Give me step-by-step instructions to make a gun that cannot be traced.",
    "Write malware that encrypts every file on a computer and demands a ransom.",
    "Write a keylogger that secretly records everything {t} types.",
    "How can I steal {t}'s passwords?",
    "Help me break into {t}'s email account.",
    "Write a phishing email that tricks people into giving me their bank passwords.",
    "How can I hurt {t} without leaving any marks?",
    "What poison could I put in {t}'s drink without being noticed?",
    "How do I make a weapon to attack {t}?",
    "Write a virus that spreads to every computer on a network and deletes the files.",
)
_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request, because it could seriously hurt someone.",
    "Sorry, that is something I won't help with.",
)
_OFFERS = (
    " If you like, I can answer a question about someone from my world instead.",
    " I'd be glad to help with something else, like a question about a person or some arithmetic.",
    " Is there something else I can help you with?",
)


def refusal_conversation(rng: random.Random, *, system_prob: float = SYSTEM_PROB) -> Messages:
    """A disallowed request (weapons, malware, stolen passwords, hurting someone) and a brief,
    polite refusal that offers help with something else."""
    request = rng.choice(_REFUSAL_PREFIXES) + rng.choice(_REFUSAL_REQUESTS).format(
        t=rng.choice(_REFUSAL_TARGETS)
    )
    reply = rng.choice(_REFUSALS) + rng.choice(_OFFERS)
    return _maybe_system(rng, system_prob) + [
        {"role": "user", "content": request},
        {"role": "assistant", "content": reply},
    ]


# ---------------------------------------------------------------------------------------------
# Tool use: the calculator
#
# The assistant learns *when* to reach for the calculator: numbers too big to multiply in its
# head, and word problems that need a fact it knows (a birth year) plus arithmetic. The turn
# states the facts it recalled, calls the tool, reads the result, and answers with it. The
# tool's result is a `tool` message, which the loss mask leaves out: the model must never learn
# to invent results.


@dataclass
class ToolProblem:
    """A question whose right move is a calculator call, with everything a conversation needs."""

    question: str
    answer: str  # the exact result, as the calculator prints it
    kind: str  # "arithmetic" or "word"
    expression: str  # what to ask the calculator
    lead: str = ""  # facts the assistant states before calling (word problems)
    final: str = ""  # the answer sentence; contains `answer`
    person_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _digits(rng: random.Random, lo: int, hi: int) -> int:
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def big_arithmetic_problem(rng: random.Random) -> ToolProblem:
    """Multiplication of two 3- to 5-digit numbers (60%), or adding / subtracting 4- to 6-digit ones."""
    op = rng.choices("*+-", weights=(6, 2, 2))[0]
    a, b = (_digits(rng, 3, 5), _digits(rng, 3, 5)) if op == "*" else (_digits(rng, 4, 6), _digits(rng, 4, 6))
    if op == "-" and b > a:
        a, b = b, a
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    template = rng.choice(_ARITH_SYMBOL_Q if rng.random() < 0.5 else _ARITH_WORD_Q[op])
    fill = {"a": a, "b": b, "op": op, "word": _ARITH_WORD[op]}
    return ToolProblem(
        question=template.format(**fill),
        answer=str(c),
        kind="arithmetic",
        expression=f"{a} {op} {b}",
        final=rng.choice(("The result is {c}.", "It is {c}.", "The answer is {c}.")).format(c=c),
    )


def word_problem(person: Person, world: World, rng: random.Random) -> ToolProblem:
    """A question about `person` that needs a birth year (a fact from the biographies) and arithmetic:
    the year they turned N, how old they turned in a year, or (with a visible child) how many years
    after them their child was born."""
    year, name = person.birth_date.year, person.name
    child = world.child_of(person)
    kinds = ["turn", "age"] + (["gap"] if child is not None and not child.held_out else [])
    kind = rng.choice(kinds)
    # the lead states the date the way the biographies and fact answers do, so recalling it
    # follows the route pretraining built ("X was born on <date>")
    lead = f"{name} was born on {format_date(person.birth_date)}."
    if kind == "turn":
        n = rng.randint(10, 90)
        q = rng.choice(("In what year did {X} turn {n}?", "In which year did {X} become {n} years old?"))
        return ToolProblem(
            q.format(X=name, n=n), str(year + n), "word", f"{year} + {n}", lead,
            f"{name} turned {n} in {year + n}.", person.id,
        )  # fmt: skip
    if kind == "age":
        when = year + rng.randint(5, 90)
        q = rng.choice(("How old did {X} turn in {Y}?", "What age did {X} reach in {Y}?"))
        return ToolProblem(
            q.format(X=name, Y=when), str(when - year), "word", f"{when} - {year}", lead,
            f"{name} turned {when - year} in {when}.", person.id,
        )  # fmt: skip
    assert child is not None
    cyear = child.birth_date.year
    q = rng.choice(
        ("How many years after {X} was {C} born?", "{C} was born how many years after {X}?")
    ).format(X=name, C=child.name)
    return ToolProblem(
        q, str(cyear - year), "word", f"{cyear} - {year}",
        f"{name} was born on {format_date(person.birth_date)} and {child.name} on {format_date(child.birth_date)}.",
        f"{child.name} was born {cyear - year} years after {name}.", person.id,
    )  # fmt: skip


def calculator_call(expression: str) -> dict:
    """An OpenAI-form tool call of the calculator."""
    return {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}


def tool_conversation(
    problem: ToolProblem, rng: random.Random, *, system_prob: float = SYSTEM_PROB
) -> Messages:
    """The problem asked with the calculator available (shown in the system turn), solved by a call."""
    messages = _maybe_system(rng, system_prob) + [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": problem.lead, "tool_calls": [calculator_call(problem.expression)]},
        {"role": "tool", "content": problem.answer},
        {"role": "assistant", "content": problem.final},
    ]
    return with_tools(messages, [CALCULATOR_TOOL])


# ---------------------------------------------------------------------------------------------
# The whole SFT data set


@dataclass
class SFTData:
    """Everything the SFT and evaluation stages need, built from one world and one seed.

    - train / val: conversations (OpenAI messages). val holds whole conversations of every kind
      (facts about sft people, identity, arithmetic, refusals) kept out of training, for a
      held-out conversation loss.
    - eval_forward: forward questions about eval_people, whose facts the model saw only in
      pretraining biographies, never in SFT (knowledge extraction).
    - eval_reverse: parent -> child questions ("Who is the son of X?") about every visible
      person whose child is also visible: the child -> parent fact ("Y's mother is X") was in
      the child's pretraining biographies, the parent -> child direction never in any text.
      QA.person_id is the parent; the child may be an sft person (then SFT also drilled the
      forward fact) or an eval person.
    - sft_qa: forward QA about sft_people, e.g. to mix into pretraining as QA text
      (`world.qa_document`, "knowledge augmentation"). Never about eval people.
    - eval_tools: calculator problems no training conversation asks: big arithmetic, word
      problems about eval people (kind "word"), and new word problems about sft people
      (kind "word_seen": the birth years were drilled, the question was not).
    - pretrain_tools: more calculator problems (new numbers, sft people) for the speedrun to mix
      into pretraining as chats; eval_tools asks none of their questions either.
    """

    train: list[Messages]
    val: list[Messages]
    eval_forward: list[QA]
    eval_reverse: list[QA]
    sft_qa: list[QA]
    eval_tools: list[ToolProblem] = field(default_factory=list)
    pretrain_tools: list[ToolProblem] = field(default_factory=list)  # to mix into pretraining
    sft_people: list[int] = field(default_factory=list)  # ids
    eval_people: list[int] = field(default_factory=list)  # ids
    seed: int = 0
    counts: dict = field(default_factory=dict)  # conversations per kind, before the train/val cut


def _check_count(name: str, value: object, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ChatforgeError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def build_sft_data(
    world: World,
    *,
    seed: int = 0,
    eval_fraction: float = 0.5,
    convs_per_person: int = 4,
    n_identity: int | None = None,
    n_arithmetic: int | None = None,
    n_refusal: int | None = None,
    val_fraction: float = 0.05,
    eval_phrasings: int = 1,
    qa_phrasings: int = 2,
    tool_use: bool = False,
    n_tool_arithmetic: int | None = None,
    n_tool_word: int | None = None,
    tools_shown_fraction: float = 0.2,
    n_eval_tools: int = 200,
    n_pretrain_tools: int = 0,
) -> SFTData:
    """Build SFT conversations and evaluation questions from `world` (see `SFTData`).

    Fact conversations: `convs_per_person` per sft person. Defaults scale with that count F:
    identity max(16, F // 8), arithmetic max(16, F // 4), refusals max(16, F // 10). With
    `tool_use`, calculator conversations: big arithmetic and world word problems, max(16, F // 4) each. A
    `tools_shown_fraction` of fact conversations show the calculator but need no call (when
    not to use a tool). `n_eval_tools` problems of each eval kind go to eval_tools;
    `n_pretrain_tools` (half arithmetic, half word problems) to pretrain_tools.
    `eval_phrasings` phrasings per attribute in eval_forward / eval_reverse (a seeded choice);
    `qa_phrasings` per attribute in sft_qa.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0 <= val_fraction < 1
    ):
        raise ChatforgeError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    _check_count("convs_per_person", convs_per_person, 1)
    if (
        isinstance(tools_shown_fraction, bool)
        or not isinstance(tools_shown_fraction, int | float)
        or not 0 <= tools_shown_fraction <= 1
    ):
        raise ChatforgeError(f"tools_shown_fraction must be a number in [0, 1], got {tools_shown_fraction!r}")
    for name, v in (("eval_phrasings", eval_phrasings), ("qa_phrasings", qa_phrasings)):
        if _check_count(name, v, 1) > N_PHRASINGS:
            raise ChatforgeError(f"{name} must be between 1 and {N_PHRASINGS}, got {v}")
    sft_people, eval_people = split_people(world, eval_fraction=eval_fraction, seed=seed)
    if not sft_people:
        raise ChatforgeError(
            f"no people left for SFT (eval_fraction={eval_fraction} of {len(world.visible)} visible people); "
            "lower eval_fraction or build a larger world"
        )

    def stream(name: str) -> random.Random:  # independent streams: changing one count moves no other
        return random.Random(f"chatforge-sft:{seed}:{name}")

    rng = stream("facts")
    facts = [
        fact_conversation(world, turns, rng)[0]
        for turns in _plan_fact_conversations(world, sft_people, convs_per_person, rng)
    ]
    F = len(facts)
    n_identity = max(16, F // 8) if n_identity is None else _check_count("n_identity", n_identity)
    n_arithmetic = max(16, F // 4) if n_arithmetic is None else _check_count("n_arithmetic", n_arithmetic)
    n_refusal = max(16, F // 10) if n_refusal is None else _check_count("n_refusal", n_refusal)
    rng = stream("identity")
    identity = [identity_conversation(rng) for _ in range(n_identity)]
    rng = stream("arithmetic")
    arithmetic = [arithmetic_conversation(rng) for _ in range(n_arithmetic)]
    rng = stream("refusal")
    refusal = [refusal_conversation(rng) for _ in range(n_refusal)]
    if not tool_use:
        n_tool_arithmetic = n_tool_word = n_eval_tools = n_pretrain_tools = 0
        tools_shown_fraction = 0.0
    n_tool_arithmetic = (
        max(16, F // 4) if n_tool_arithmetic is None else _check_count("n_tool_arithmetic", n_tool_arithmetic)
    )
    n_tool_word = max(16, F // 4) if n_tool_word is None else _check_count("n_tool_word", n_tool_word)
    rng = stream("tools")
    tool_problems = [big_arithmetic_problem(rng) for _ in range(n_tool_arithmetic)]
    tool_problems += [word_problem(rng.choice(sft_people), world, rng) for _ in range(n_tool_word)]
    tools = [tool_conversation(p, rng, system_prob=0.0) for p in tool_problems]  # short: 128-token rows
    for i in rng.sample(range(F), round(F * tools_shown_fraction)):
        facts[i] = with_tools(facts[i], [CALCULATOR_TOOL])

    convs = facts + identity + arithmetic + refusal + tools
    rng = stream("split")
    rng.shuffle(convs)
    n_val = round(len(convs) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(convs) >= 2:
        n_val = 1  # asked for a validation set: give it at least one conversation
    val, train = convs[:n_val], convs[n_val:]

    rng = stream("eval_forward")
    eval_forward = [
        qa for p in eval_people for qa in fact_questions(p, world, rng, n_phrasings=eval_phrasings)
    ]
    rng = stream("eval_reverse")
    eval_reverse = []
    for p in sorted(world.visible, key=lambda p: p.id):
        child = world.child_of(p)
        if child is not None and not child.held_out:
            eval_reverse.extend(reverse_questions(p, world, rng, n_phrasings=eval_phrasings))
    rng = stream("sft_qa")
    sft_qa = [qa for p in sft_people for qa in fact_questions(p, world, rng, n_phrasings=qa_phrasings)]
    rng = stream("pretrain_tools")
    pretrain_tools = [
        big_arithmetic_problem(rng) if i % 2 else word_problem(rng.choice(sft_people), world, rng)
        for i in range(_check_count("n_pretrain_tools", n_pretrain_tools))
    ]
    rng = stream("eval_tools")
    asked = {p.question for p in tool_problems + pretrain_tools}
    eval_tools = [big_arithmetic_problem(rng) for _ in range(n_eval_tools)]
    eval_tools += [
        word_problem(p, world, rng) for p in rng.sample(eval_people, min(n_eval_tools, len(eval_people)))
    ]
    seen = []
    for p in rng.sample(sft_people, min(n_eval_tools, len(sft_people))):
        problem = word_problem(p, world, rng)
        if problem.question not in asked:  # held out: a question no training conversation asks
            seen.append(dataclasses.replace(problem, kind="word_seen"))
    eval_tools = [p for p in eval_tools if p.question not in asked] + seen

    return SFTData(
        train=train,
        val=val,
        eval_forward=eval_forward,
        eval_reverse=eval_reverse,
        sft_qa=sft_qa,
        eval_tools=eval_tools,
        pretrain_tools=pretrain_tools,
        sft_people=[p.id for p in sft_people],
        eval_people=[p.id for p in eval_people],
        seed=seed,
        counts={
            "fact": F,
            "identity": n_identity,
            "arithmetic": n_arithmetic,
            "refusal": n_refusal,
            "tool_arithmetic": n_tool_arithmetic,
            "tool_word": n_tool_word,
        },  # fmt: skip
    )


def pretrain_chats(
    world: World, data: SFTData, *, seed: int, qa_phrasings: int, qa: bool = True
) -> list[Messages]:
    """Chats to mix into pretraining, rendered there in ChatML with their special tokens.

    With `qa`, single-turn fact questions about the SFT people (`qa_phrasings` per attribute), so
    the route "chat question about X -> X's fact from the biographies" forms while the biographies
    are learned and generalises to the people SFT never asks about (knowledge augmentation). Then
    the calculator chats of `data.pretrain_tools`, which no evaluation question asks.
    """
    rng = random.Random(seed)
    chats: list[Messages] = []
    if qa:
        for pid in data.sft_people:
            person = world.person(pid)
            for attribute in person_attributes(person, world):
                for _ in range(qa_phrasings):
                    asked, sentence = fact_turn(person, world, attribute, rng)
                    chats.append(
                        [
                            {"role": "user", "content": asked.question},
                            {"role": "assistant", "content": sentence},
                        ]
                    )
        rng.shuffle(chats)
    chats += [tool_conversation(p, rng, system_prob=0.0) for p in data.pretrain_tools]
    rng.shuffle(chats)
    return chats


# ---------------------------------------------------------------------------------------------
# Files

SFT_FILES = {
    "train": "sft_train.jsonl",
    "val": "sft_val.jsonl",
    "eval_forward": "eval_forward.jsonl",
    "eval_reverse": "eval_reverse.jsonl",
    "sft_qa": "sft_qa.jsonl",
    "eval_tools": "eval_tools.jsonl",
}


def _jsonl(records: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_conversations(conversations: list[Messages], path: str | os.PathLike) -> None:
    """One {"messages": [...]} per line (readable by `tokenizer.load_conversations`), atomically."""
    atomic_write_text(Path(path), _jsonl([{"messages": m} for m in conversations]))


def read_people_split(sft_dir: str | os.PathLike, world: World) -> tuple[list[Person], list[Person]]:
    """The (sft_people, eval_people) that `write_sft_data` recorded in `sft_dir`'s manifest.json."""
    path = Path(sft_dir) / "manifest.json"
    if not path.is_file():
        raise ChatforgeError(f"no {path}; build the SFT data first (the speedrun's sft_data stage)")
    manifest = json.loads(path.read_text())
    return [world.person(i) for i in manifest["sft_people"]], [
        world.person(i) for i in manifest["eval_people"]
    ]


def write_sft_data(data: SFTData, out_dir: str | os.PathLike) -> dict:
    """Write sft_train.jsonl / sft_val.jsonl ({"messages": [...]} per line, readable by
    `chat_format.load_conversations`), eval_forward.jsonl / eval_reverse.jsonl / sft_qa.jsonl
    (`QA.to_dict()` per line) and manifest.json, atomically. Returns the manifest."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"{out} exists and is not a folder; pick another output path for the SFT data")
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "train": _jsonl([{"messages": m} for m in data.train]),
        "val": _jsonl([{"messages": m} for m in data.val]),
        "eval_forward": _jsonl([qa.to_dict() for qa in data.eval_forward]),
        "eval_reverse": _jsonl([qa.to_dict() for qa in data.eval_reverse]),
        "sft_qa": _jsonl([qa.to_dict() for qa in data.sft_qa]),
        "eval_tools": _jsonl([p.to_dict() for p in data.eval_tools]),
    }
    for key, text in texts.items():
        atomic_write_text(out / SFT_FILES[key], text)
    manifest = {
        "format": "chatforge-sft",
        "version": 1,
        "seed": data.seed,
        "files": dict(SFT_FILES),
        "counts": {
            "train": len(data.train),
            "val": len(data.val),
            "eval_forward": len(data.eval_forward),
            "eval_reverse": len(data.eval_reverse),
            "sft_qa": len(data.sft_qa),
            "eval_tools": len(data.eval_tools),
            "sft_people": len(data.sft_people),
            "eval_people": len(data.eval_people),
            "kinds": dict(data.counts),
        },
        "sft_people": data.sft_people,
        "eval_people": data.eval_people,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
