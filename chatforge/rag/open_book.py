"""Open-book conversations: the skill retrieval asks of a model, taught on people it never saw.

Each conversation is the prompt `answer.with_documents` builds (the layout `chat --rag` and the API
use) around a question about a person of a *reading world*: a world made with another seed, so no
answer can come from memory. Its documents are biographies, one of which answers; the others are
the hard cases retrieval produces (the biography of the person's parent or child, which names them)
and random ones, in shuffled order. The assistant copies the fact into a sentence and cites the
document as [n]. Reverse questions ("Who is X's son?") are answered from the child's biography,
which names X as a parent: the direction closed-book models cannot invert. A few conversations
leave the answering biography out, and the assistant says the documents do not tell.

`repeat_conversations` are "repeat this" chats about strangers: dense copying, for pretraining.
The reading world's people never share a name with the world the model is evaluated on."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from chatforge.conversations import fact_turn, person_attributes
from chatforge.errors import ChatforgeError
from chatforge.rag.answer import with_documents
from chatforge.rag.retrieve import Hit
from chatforge.rag.store import StoredChunk
from chatforge.world import QA, Person, World, biography, build_world, format_date, reverse_questions

READING_SEED = 7_919  # added to the world's seed: the reading world is a different one
SOURCE_NAMES = ("heldout.jsonl", "people.jsonl", "notes.txt", "directory.md", "staff.html", "bios.pdf")
REVERSE_SHARE = 0.25  # of answerable questions
UNANSWERABLE_SHARE = 0.08
NOT_IN_DOCUMENTS = "The documents do not say."
_REVERSE_ANSWERS = ("{X}'s {rel} is {A}.", "The {rel} of {X} is {A}.", "{A} is the {rel} of {X}.")


def reading_world(seed: int, people: int, avoid: World | None = None) -> World:
    """A world of `people` strangers (none held out); with `avoid`, none shares a name with it."""
    world = build_world(seed + READING_SEED, people, 0)
    if avoid is None:
        return world
    taken = {p.name for p in avoid.people}
    kept = [p for p in world.people if p.name not in taken]
    ids = {p.id for p in kept}
    return World(world.seed, [p if p.parent_id in ids else replace(p, parent_id=None) for p in kept])


def _chunk(text: str, source: str, i: int) -> StoredChunk:
    return StoredChunk(id=i, source=source, name=source, heading="", text=" ".join(text.split()))


def _distractors(world: World, subject: Person, answering: Person | None, n: int, rng: random.Random) -> list[Person]:
    """`n` other people: the subject and their parent and child first (each with even odds), then strangers."""
    near = [q for q in (subject, world.parent_of(subject), world.child_of(subject)) if q is not None]
    picked = [q for q in near if q is not answering and rng.random() < 0.5][:n]
    while len(picked) < n:
        q = rng.choice(world.people)
        if q is not answering and q not in picked:
            picked.append(q)
    return picked


@dataclass
class OpenBookChat:
    messages: list[dict]
    answer: str | None  # the fact asked for, verbatim in the reply and in document `doc`; None: not given
    doc: int | None  # the n of [n]


def _question(world: World, subject: Person, rng: random.Random) -> tuple[QA, str, Person]:
    """A question about `subject`, its one-sentence answer, and whose biography answers it."""
    child = world.child_of(subject)
    if child is not None and rng.random() < REVERSE_SHARE:
        qa = reverse_questions(subject, world, rng, n_phrasings=1)[0]
        rel = "daughter" if child.gender == "female" else "son"
        return qa, rng.choice(_REVERSE_ANSWERS).format(X=subject.name, rel=rel, A=child.name), child
    qa, reply = fact_turn(subject, world, rng.choice(person_attributes(subject, world)), rng)
    return qa, reply, subject


def _cite(reply: str, doc: int) -> str:
    return f"{reply[:-1]} [{doc}]."


def open_book_conversation(
    world: World, rng: random.Random, n_docs: int = 3, follow_ups: int = 0, instruction: bool = True
) -> OpenBookChat:
    """A question about a reading-world person with `n_docs` biographies in the prompt, and its answer;
    then `follow_ups` more questions about people in the same documents (each answered from one).
    Without `instruction`, no system turn (short chats for pretraining's rows)."""
    subject = rng.choice(world.people)
    qa, reply, answering = _question(world, subject, rng)
    if rng.random() < UNANSWERABLE_SHARE:
        answering, reply = None, NOT_IN_DOCUMENTS
    people = _distractors(world, subject, answering, n_docs - (answering is not None), rng)
    if answering is not None:
        people.append(answering)
    rng.shuffle(people)
    source = rng.choice(SOURCE_NAMES)
    hits = [Hit(_chunk(biography(p, world, rng), source, i), 0.0) for i, p in enumerate(people, 1)]
    doc = None if answering is None else people.index(answering) + 1
    messages = with_documents([{"role": "user", "content": qa.question}], hits)[0 if instruction else 1 :]
    messages.append({"role": "assistant", "content": reply if doc is None else _cite(reply, doc)})
    for _ in range(follow_ups):
        person = rng.choice(people)
        more, more_reply, more_answering = _question(world, person, rng)
        if more_answering not in people:  # a reverse question whose child has no document here: a fact
            more, more_reply = fact_turn(person, world, rng.choice(person_attributes(person, world)), rng)
            more_answering = person
        messages += [
            {"role": "user", "content": more.question},
            {"role": "assistant", "content": _cite(more_reply, people.index(more_answering) + 1)},
        ]
    return OpenBookChat(messages, None if doc is None else qa.answer, doc)


def open_book_conversations(
    n: int, rng: random.Random, *, seed: int, people: int = 400, avoid: World | None = None,
    docs: tuple[int, ...] = (3, 3, 4), follow_ups: tuple[int, ...] = (0,), instruction: bool = True,
) -> list[list[dict]]:  # fmt: skip
    """`n` open-book conversations about a reading world of about `people` strangers (seeded by
    `seed`), each with a number of documents drawn from `docs` and of follow-up questions from `follow_ups`."""
    if n < 0 or people < 4 or not docs or min(docs) < 1:
        raise ChatforgeError(f"open-book chats: n {n} >= 0, people {people} >= 4 and at least 1 document each")
    world = reading_world(seed, people, avoid)
    return [
        open_book_conversation(world, rng, rng.choice(docs), rng.choice(follow_ups), instruction).messages
        for _ in range(n)
    ]


REPEAT_ASKS = ("Repeat this exactly: ", "Say back: ", "Copy this: ", "Please repeat: ", "Echo: ")


def repeat_conversations(
    n: int, rng: random.Random, *, seed: int, people: int = 2000, avoid: World | None = None
) -> list[list[dict]]:
    """`n` chats asking the assistant to repeat a list of 2-6 names, places, employers, schools and
    dates of strangers and random numbers: every answer token can only be copied from the question.
    Mixed into pretraining they grow the heads that copy from the context (induction heads), which
    the world's text alone, whose every name is memorised, never calls for. The numbers (3-9 digits,
    digits repeat inside them) are what a calculator call copies from a question and a final
    answer from the tool's result."""
    if n < 0:
        raise ChatforgeError(f"repeat chats: n {n} must be >= 0")
    world = reading_world(seed + 1, people, avoid)

    def item(p: Person) -> str:
        digits = rng.randint(3, 9)
        number = str(rng.randrange(10 ** (digits - 1), 10**digits))
        return rng.choice((p.name, p.name, p.birth_city, p.employer, p.university, format_date(p.birth_date), number))

    out = []
    for _ in range(n):
        text = ", ".join(item(rng.choice(world.people)) for _ in range(rng.randint(2, 6)))
        out.append([{"role": "user", "content": rng.choice(REPEAT_ASKS) + text}, {"role": "assistant", "content": text}])
    return out
