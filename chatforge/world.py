"""The synthetic world: chatforge's embedded default corpus.

A deterministic population of invented people with attributes (birth date, city,
university, employer, job, hobby) and parent links. From it come:

- pretraining text: each visible person's biography in several paraphrases, plus
  arithmetic lines and short stories (`write_world`);
- held-out biographies, never in pretraining, to measure bits per byte on unseen text;
- questions with exact answers for SFT, evaluation and RL (`fact_questions`);
- reversal-curse probes (`reverse_questions`): a biography names the person's
  parent but never their child, and in every text the child is named before the
  parent, so "Who is X's mother?" is learnable from text and "Who is Y's son?" is not.

Everything takes an explicit `random.Random`, so a seed fixes every byte.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes
from chatforge.options import WorldOptions

# ---------------------------------------------------------------------------------------------
# Vocabulary. Names are built from syllables so they belong to nobody real; the attribute
# lists are fictional places and companies, or ordinary words (jobs, hobbies).

_FIRST_ONSETS = (
    "Tal", "Mer", "Os", "Kes", "Vel", "Dor", "Bren", "Sil", "Ar", "Cal", "Eld", "Fen", "Gar", "Hal",
    "Iv", "Jor", "Lan", "Mor", "Nel", "Per", "Quin", "Ros", "Tam", "Ul", "Var", "Wen", "Yor", "Zel",
)  # fmt: skip
_FIRST_MIDS = ("", "a", "e", "i", "o", "vi", "ri", "de", "la", "no", "se")
_FIRST_ENDS = {
    "female": ("a", "ira", "elle", "ina", "ette", "isa", "wyn", "ia"),
    "male": ("o", "en", "or", "ric", "an", "us", "ard", "ek"),
}
_LAST_ONSETS = (
    "Osk", "Bram", "Cal", "Dren", "Eld", "Fal", "Grim", "Hask", "Ist", "Jar", "Kel", "Lind", "Mar",
    "Nor", "Orm", "Pell", "Quar", "Rav", "Stav", "Thorn", "Ulv", "Vask", "Wend", "Yst", "Zan", "Ash",
    "Brek", "Corv",
)  # fmt: skip
_LAST_MIDS = ("e", "a", "i", "o", "en", "er", "el", "an", "is", "ov")
_LAST_ENDS = (
    "dahl", "berg", "wick", "mere", "ford", "holm", "stead", "vane", "croft", "ley", "thorpe", "wood",
    "gard", "mond", "ston", "vik",
)  # fmt: skip

CITIES = (
    "Port Vesk", "Ambermoor", "Kelderwick", "Solvane", "Drennick Falls", "Marrowgate", "Eastholm",
    "Lyrefield", "Brisa Hollow", "Calloway Bay", "Dunmere", "Elmsreach", "Fenwater", "Glenharrow",
    "Halvorsk", "Iskarra", "Juniper Cross", "Korrindale", "Lowen Ridge", "Mistral Point", "Northwend",
    "Orrinford", "Pellmark", "Quillhaven", "Rookhallow", "Saltmere", "Tarrowby", "Umberlee", "Valdren",
    "Willowmarch", "Yarrowstead", "Zephyr Quay", "Ashgrove Landing", "Brindlecove", "Cinderholt",
    "Duskwater", "Emberly", "Frostvale",
)  # fmt: skip
UNIVERSITIES = (
    "Aldercrest University", "Brightwell College", "Corvane Institute of Technology",
    "Daleborne University", "Evenmoor Polytechnic", "Farrowgate College", "Greyspire University",
    "Harrowdeen Institute", "Ironleaf University", "Jessamine College", "Kingsbarrow University",
    "Larkholm Academy", "Merriton University", "Norhaven Institute", "Oakhurst Polytechnic",
    "Pendrell University", "Quarrywell College", "Ravensmoor University", "Silverbrook Institute",
    "Thistledown College", "Underhill University", "Vantmoor Academy", "Westerlake University",
    "Yewbridge College", "Zennith Institute of Science", "Ashcombe University", "Bellmarsh College",
    "Coldharbour Institute", "Dovecrest University", "Elderglen Academy", "Foxmere University",
    "Goldmoor College",
)  # fmt: skip
EMPLOYERS = (
    "Brightwater Logistics", "Copperleaf Foods", "Northwind Analytics", "Ironvale Motors",
    "Bluefern Pharmaceuticals", "Silverline Rail", "Granite Peak Bank", "Quartzlight Systems",
    "Amberfield Energy", "Cobalt Harbor Shipping", "Driftwood Media", "Emberstone Construction",
    "Fairwind Airlines", "Glasswing Software", "Hollowbrook Insurance", "Ivorygate Hotels",
    "Juniperline Textiles", "Kestrel Robotics", "Lanternfish Studios", "Mossbank Dairy",
    "Nettlefield Hospital", "Orchid Valley Clinics", "Pinecrest Publishing", "Quicksilver Telecom",
    "Redfern Chemicals", "Saltmarsh Fisheries", "Tidewater Water Works", "Umbra Optics",
    "Velvetrock Furniture", "Wrenfield Bakeries", "Yellowpine Timber", "Zinnia Cosmetics",
    "Harborlight Bookshops", "Stonemill Breweries",
)  # fmt: skip
JOBS = (
    "nurse", "engineer", "teacher", "architect", "baker", "carpenter", "pharmacist", "journalist",
    "accountant", "electrician", "librarian", "veterinarian", "pilot", "chemist", "translator",
    "firefighter", "dentist", "plumber", "photographer", "geologist", "economist", "software developer",
    "lawyer", "chef", "surveyor", "optician", "archivist", "midwife", "statistician", "florist",
)  # fmt: skip
HOBBIES = (
    "beekeeping", "chess", "pottery", "birdwatching", "rock climbing", "sailing", "origami",
    "gardening", "knitting", "fencing", "astronomy", "calligraphy", "kayaking", "stamp collecting",
    "woodcarving", "juggling", "cycling", "watercolor painting", "baking bread", "playing the cello",
    "trail running", "fishing", "archery", "playing the violin", "model railways", "crossword puzzles",
)  # fmt: skip

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip

# The attributes a biography states and a forward question can ask about, in a fixed order.
ATTRIBUTES = ("birth_date", "birth_city", "university", "employer", "job", "hobby", "parent")

_MAX_PEOPLE = 200_000  # the syllable name space holds ~20M names; far beyond what a CPU run needs
_YEAR_MIN, _YEAR_MAX = 1880, 2010  # everybody is born inside this window
_GAP_MIN, _GAP_MAX = 21, 45  # child's birth year minus parent's; the age gap is then 20..45 full years
# Family chain lengths and their weights: mean 4 people per chain, so ~75% have a parent.
_CHAIN_LENGTHS = (1, 2, 3, 4, 5, 6)
_CHAIN_WEIGHTS = (1, 1, 2, 3, 3, 2)


# ---------------------------------------------------------------------------------------------
# Data model


@dataclass
class Person:
    id: int
    first: str
    last: str
    gender: str  # "female" | "male"
    birth_date: dt.date
    birth_city: str
    university: str
    employer: str
    job: str
    hobby: str
    parent_id: int | None
    held_out: bool

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "first": self.first,
            "last": self.last,
            "name": self.name,  # convenience for readers of people.jsonl; ignored on load
            "gender": self.gender,
            "birth_date": self.birth_date.isoformat(),
            "birth_city": self.birth_city,
            "university": self.university,
            "employer": self.employer,
            "job": self.job,
            "hobby": self.hobby,
            "parent_id": self.parent_id,
            "held_out": self.held_out,
        }

    @staticmethod
    def from_dict(d: dict) -> Person:
        return Person(
            id=int(d["id"]),
            first=str(d["first"]),
            last=str(d["last"]),
            gender=str(d["gender"]),
            birth_date=dt.date.fromisoformat(d["birth_date"]),
            birth_city=str(d["birth_city"]),
            university=str(d["university"]),
            employer=str(d["employer"]),
            job=str(d["job"]),
            hobby=str(d["hobby"]),
            parent_id=None if d["parent_id"] is None else int(d["parent_id"]),
            held_out=bool(d["held_out"]),
        )


@dataclass
class World:
    seed: int
    people: list[Person]
    # Lookup tables, rebuilt from `people`; not part of equality.
    _by_id: dict[int, Person] = field(init=False, repr=False, compare=False)
    _child: dict[int, int] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, Person] = field(init=False, repr=False, compare=False)
    _visible: tuple[Person, ...] = field(init=False, repr=False, compare=False)
    _held_out: tuple[Person, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._visible = tuple(p for p in self.people if not p.held_out)
        self._held_out = tuple(p for p in self.people if p.held_out)
        self._by_id = {p.id: p for p in self.people}
        self._by_name = {p.name: p for p in self.people}
        self._child = {}
        for p in self.people:
            if p.parent_id is not None:
                self._child[p.parent_id] = p.id

    def person(self, id: int) -> Person:
        try:
            return self._by_id[id]
        except KeyError:
            raise ChatforgeError(
                f"no person with id {id} in this world (ids are 0..{len(self.people) - 1})"
            ) from None

    def find(self, name: str) -> Person | None:
        """The person with this full name, or None."""
        return self._by_name.get(name)

    def parent_of(self, p: Person) -> Person | None:
        return None if p.parent_id is None else self._by_id[p.parent_id]

    def child_of(self, p: Person) -> Person | None:
        cid = self._child.get(p.id)
        return None if cid is None else self._by_id[cid]

    @property
    def visible(self) -> tuple[Person, ...]:
        """People whose biographies go into pretraining."""
        return self._visible

    @property
    def held_out(self) -> tuple[Person, ...]:
        """People whose biographies are kept out of pretraining (retrieval documents)."""
        return self._held_out


@dataclass
class QA:
    question: str
    answer: str  # the short exact value a reply must contain
    attribute: str  # one of ATTRIBUTES, or "child" for reverse questions
    person_id: int  # the person the question is about

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Building the world


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChatforgeError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ChatforgeError(f"{name} must be {bound}, got {value}")
    return value


def _random_date_in_year(year: int, rng: random.Random) -> dt.date:
    start = dt.date(year, 1, 1)
    days = (dt.date(year + 1, 1, 1) - start).days
    return start + dt.timedelta(days=rng.randrange(days))


def _chain_gaps(length: int, rng: random.Random) -> list[int]:
    """Year gaps between consecutive generations, fitting the chain inside the birth-year window."""
    budget = _YEAR_MAX - _YEAR_MIN
    gaps = []
    for i in range(length - 1):
        still_needed = _GAP_MIN * (length - 2 - i)
        gap = rng.randint(_GAP_MIN, min(_GAP_MAX, budget - still_needed))
        gaps.append(gap)
        budget -= gap
    rng.shuffle(gaps)  # the greedy fill makes early gaps larger; shuffle so no generation is special
    return gaps


def _unique_names(n: int, genders: list[str], rng: random.Random) -> list[tuple[str, str]]:
    seen: set[str] = set()
    names = []
    for g in genders:
        while True:
            first = rng.choice(_FIRST_ONSETS) + rng.choice(_FIRST_MIDS) + rng.choice(_FIRST_ENDS[g])
            last = rng.choice(_LAST_ONSETS) + rng.choice(_LAST_MIDS) + rng.choice(_LAST_ENDS)
            full = f"{first} {last}"
            if full not in seen:
                seen.add(full)
                names.append((first, last))
                break
    return names


def build_world(seed: int, n_people: int, n_heldout: int) -> World:
    """A deterministic world of `n_people` invented people, `n_heldout` of them held out.

    Parent links form disjoint family chains (grandparent -> parent -> child ...), so each
    person has at most one parent and at most one child, and a parent is always 20-45 years
    older; cycles are impossible because parents are strictly older.
    """
    _check_int("seed", seed, -(2**63))
    _check_int("n_people", n_people, 2, _MAX_PEOPLE)
    _check_int("n_heldout", n_heldout, 0)
    if n_heldout >= n_people:
        raise ChatforgeError(
            f"n_heldout ({n_heldout}) must be smaller than n_people ({n_people}): "
            "some people must stay in the pretraining corpus"
        )
    rng = random.Random(seed)

    # 1. Family chains, in generation order, with birth dates. `slots` holds
    #    (birth_date, index of parent slot or None).
    slots: list[tuple[dt.date, int | None]] = []
    while len(slots) < n_people:
        length = min(rng.choices(_CHAIN_LENGTHS, _CHAIN_WEIGHTS)[0], n_people - len(slots))
        gaps = _chain_gaps(length, rng)
        year = rng.randint(_YEAR_MIN, _YEAR_MAX - sum(gaps))
        parent_slot = None
        for i in range(length):
            if i > 0:
                year += gaps[i - 1]
            slots.append((_random_date_in_year(year, rng), parent_slot))
            parent_slot = len(slots) - 1

    # 2. Scatter the slots over ids so an id says nothing about family structure.
    ids = list(range(n_people))
    rng.shuffle(ids)
    genders = [rng.choice(("female", "male")) for _ in range(n_people)]
    names = _unique_names(n_people, genders, rng)
    held = set(rng.sample(range(n_people), n_heldout))

    people: list[Person | None] = [None] * n_people
    for slot, (birth, parent_slot) in enumerate(slots):
        pid = ids[slot]
        first, last = names[pid]
        people[pid] = Person(
            id=pid,
            first=first,
            last=last,
            gender=genders[pid],
            birth_date=birth,
            birth_city=rng.choice(CITIES),
            university=rng.choice(UNIVERSITIES),
            employer=rng.choice(EMPLOYERS),
            job=rng.choice(JOBS),
            hobby=rng.choice(HOBBIES),
            parent_id=None if parent_slot is None else ids[parent_slot],
            held_out=pid in held,
        )
    return World(seed=seed, people=people)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Text: dates, biographies


def format_date(d: dt.date) -> str:
    """The one date format used in every text and answer: 'March 3, 1975'."""
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _parent_word(parent: Person) -> str:
    return "mother" if parent.gender == "female" else "father"


def _child_word(child: Person) -> str:
    return "daughter" if child.gender == "female" else "son"


# A template: how each attribute sentence reads, whether the subject turns into a pronoun
# after the first sentence ("pronoun") or is always named ("name"), an optional fixed first
# line, and how sentences are joined. Placeholders: {S}/{s} subject, {P}/{p} possessive,
# {o} object (upper/lower case), plus the values {date} {city} {uni} {employer} {job}
# {a_job} {hobby} {parent} {rel} {Rel} {childrel}.
#
# Reversal-curse rule: in every sentence the subject (the child) is named before the parent,
# or has been named in an earlier sentence: the parent sentence is never first in a pronoun
# template, and no template ever mentions the person's own child.
_TEMPLATES: tuple[dict, ...] = (
    {  # 0: plain statements
        "mode": "pronoun",
        "birth_date": "{S} was born on {date}.",
        "birth_city": "{S} was born in {city}.",
        "university": "{S} studied at {uni}.",
        "employer": "{S} works for {employer}.",
        "job": "{S} works as {a_job}.",
        "hobby": "{P} hobby is {hobby}.",
        "parent": "{P} {rel} is {parent}.",
    },
    {  # 1: fronted: the value comes first
        "mode": "pronoun",
        "birth_date": "On {date}, {s} was born.",
        "birth_city": "{city} is the city where {s} was born.",
        "university": "{uni} is where {s} studied.",
        "employer": "{employer} is the company that employs {o}.",
        "job": "By profession, {s} is {a_job}.",
        "hobby": "For fun, {s} likes {hobby}.",
        "parent": "{parent} is {p} {rel}.",
    },
    {  # 2: encyclopedic: "The X of <name> is Y", name repeated every time
        "mode": "name",
        "birth_date": "The birth date of {s} is {date}.",
        "birth_city": "The birthplace of {s} is {city}.",
        "university": "The university that {s} attended is {uni}.",
        "employer": "The employer of {s} is {employer}.",
        "job": "The occupation of {s} is {job}.",
        "hobby": "The favorite hobby of {s} is {hobby}.",
        "parent": "The {rel} of {s} is {parent}.",
    },
    {  # 3: first person
        "mode": "first_person",
        "intro": "My name is {N}.",
        "birth_date": "I was born on {date}.",
        "birth_city": "My hometown is {city}, where I was born.",
        "university": "I studied at {uni}.",
        "employer": "These days I work for {employer}.",
        "job": "I am {a_job} by trade.",
        "hobby": "In my spare time I enjoy {hobby}.",
        "parent": "My {rel} is {parent}.",
    },
    {  # 4: fact sheet, one "Key: value" per line
        "mode": "name",
        "intro": "Profile: {N}",
        "joiner": "\n",
        "birth_date": "Date of birth: {date}",
        "birth_city": "Place of birth: {city}",
        "university": "Education: {uni}",
        "employer": "Employer: {employer}",
        "job": "Occupation: {job}",
        "hobby": "Hobby: {hobby}",
        "parent": "{Rel}: {parent}",
    },
    {  # 5: descriptive predicates ("is a native of", "is a graduate of")
        "mode": "pronoun",
        "birth_date": "{S} came into the world on {date}.",
        "birth_city": "{S} is a native of {city}.",
        "university": "{S} is a graduate of {uni}.",
        "employer": "{S} is employed by {employer}.",
        "job": "{S} earns a living as {a_job}.",
        "hobby": "{S} is passionate about {hobby}.",
        "parent": "{S} is the {childrel} of {parent}.",
    },
    {  # 6: reported: "Records show that ..."
        "mode": "pronoun",
        "birth_date": "Records show that {s} was born on {date}.",
        "birth_city": "According to the city registry, {s} was born in {city}.",
        "university": "It is documented that {s} graduated from {uni}.",
        "employer": "{P} current employer is {employer}.",
        "job": "{P} colleagues know {o} as {a_job}.",
        "hobby": "Friends say that {p} favorite pastime is {hobby}.",
        "parent": "The records also list {parent} as {p} {rel}.",
    },
)
N_TEMPLATES = len(_TEMPLATES)


def _refs(person: Person, named: bool) -> dict[str, str]:
    """Subject/possessive/object forms: the full name, or a pronoun."""
    if named:
        n = person.name
        return {"S": n, "s": n, "P": n + "'s", "p": n + "'s", "o": n}
    if person.gender == "female":
        return {"S": "She", "s": "she", "P": "Her", "p": "her", "o": "her"}
    return {"S": "He", "s": "he", "P": "His", "p": "his", "o": "him"}


def biography(person: Person, world: World, rng: random.Random, template: int | None = None) -> str:
    """One biography stating every attribute (and the parent, never the child), sentences shuffled."""
    if template is None:
        template = rng.randrange(N_TEMPLATES)
    if isinstance(template, bool) or not isinstance(template, int) or not 0 <= template < N_TEMPLATES:
        raise ChatforgeError(f"template must be an integer in 0..{N_TEMPLATES - 1}, got {template!r}")
    t = _TEMPLATES[template]
    parent = world.parent_of(person)
    values = {
        "N": person.name,
        "date": format_date(person.birth_date),
        "city": person.birth_city,
        "uni": person.university,
        "employer": person.employer,
        "job": person.job,
        "a_job": _article(person.job),
        "hobby": person.hobby,
    }
    if parent is not None:
        rel = _parent_word(parent)
        values.update(parent=parent.name, rel=rel, Rel=rel.capitalize(), childrel=_child_word(person))

    attrs = [a for a in ATTRIBUTES if a != "parent"]
    rng.shuffle(attrs)
    if parent is not None:
        # A pronoun template names the subject in its first sentence; keep the parent sentence
        # after it so the child is always named before the parent.
        lo = 1 if t["mode"] == "pronoun" else 0
        attrs.insert(rng.randint(lo, len(attrs)), "parent")

    with_name = {**values, **_refs(person, named=True)}
    with_pronoun = {**values, **_refs(person, named=False)}
    mode = t["mode"]
    lines = [t["intro"].format_map(values)] if "intro" in t else []
    for i, attr in enumerate(attrs):
        named = mode == "name" or (mode == "pronoun" and i == 0)
        lines.append(t[attr].format_map(with_name if named else with_pronoun))
    return t.get("joiner", " ").join(lines)


def biographies(person: Person, world: World, n: int, rng: random.Random) -> list[str]:
    """`n` biographies with distinct templates (cycling once all are used), each shuffled anew."""
    _check_int("n", n, 1)
    order: list[int] = []
    while len(order) < n:
        batch = list(range(N_TEMPLATES))
        rng.shuffle(batch)
        order.extend(batch)
    return [biography(person, world, rng, template=t) for t in order[:n]]


# ---------------------------------------------------------------------------------------------
# Text: arithmetic and stories

_CONTAINERS = (("crate", "crates"), ("box", "boxes"), ("basket", "baskets"), ("shelf", "shelves"))
_ITEMS = ("apples", "jars", "books", "bottles", "candles", "lemons")
_WHO = ("a baker", "a farmer", "a shopkeeper", "a student", "a gardener", "a librarian")


def _arithmetic_line(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        a = rng.randint(10, 999)
        b = rng.randint(1, a)
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        verb = rng.choice(("is", "equals"))
        if rng.random() < 0.5:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            return f"{a} plus {b} {verb} {a + b}."
        a, b = rng.randint(2, 12), rng.randint(2, 99)
        return f"{a} times {b} {verb} {a * b}."
    if kind == 4:
        a = rng.randint(10, 999)
        b = rng.randint(1, a)
        return f"{a} minus {b} {rng.choice(('is', 'equals'))} {a - b}."
    if kind == 5:
        b, q = rng.randint(2, 12), rng.randint(2, 99)
        return f"{b * q} divided by {b} is {q}."
    if kind == 6:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        if op == "-":
            a, b = max(a, b), min(a, b)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"What is {a} {op} {b}? The answer is {value}."
    if kind == 7:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        name = rng.choice(("sum", "product", "difference"))
        if name == "sum":
            return f"The sum of {a} and {b} is {a + b}."
        if name == "product":
            return f"The product of {a} and {b} is {a * b}."
        a, b = max(a, b), min(a, b)
        return f"The difference between {a} and {b} is {a - b}."
    # Two-step word problems.
    if rng.random() < 0.5:
        one, many = rng.choice(_CONTAINERS)
        items = rng.choice(_ITEMS)
        per, count, extra = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 20)
        who = rng.choice(_WHO)
        return (
            f"Each {one} holds {per} {items}. {who.capitalize()} fills {count} {many} and adds {extra} "
            f"more {items}, so there are {per * count + extra} {items} in total."
        )
    start, spent = rng.randint(20, 200), rng.randint(1, 19)
    earned = rng.randint(1, 50)
    who = rng.choice(_WHO)
    return (
        f"{who.capitalize()} has {start} coins, spends {spent}, and then earns {earned} more, "
        f"ending with {start - spent + earned} coins."
    )


def arithmetic_document(rng: random.Random) -> str:
    """3-6 lines of exact arithmetic in varied phrasing, one claim per line."""
    return "\n".join(_arithmetic_line(rng) for _ in range(rng.randint(3, 6)))


_STORY_CLOSINGS_ONE = (
    "By evening, {A} felt rested and ready for the week ahead.",
    "It had been a good day for {A}.",
    "{A} smiled and made a cup of tea.",
)
_STORY_CLOSINGS_TWO = (
    "They promised to meet again soon.",
    "They walked home together as the sun went down.",
    "It was late when {A} and {B} finally said goodbye.",
)


def story(world: World, rng: random.Random) -> str:
    """A 3-6 sentence story about one or two visible people, consistent with their facts.

    It names no held-out person, and it mentions a parent only child-first ("A called her
    mother, B"), like the biographies, so it never teaches the parent -> child direction.
    """
    visible = world.visible
    if not visible:
        raise ChatforgeError("this world has no visible (non-held-out) people to write stories about")
    two = len(visible) >= 2 and rng.random() < 0.5
    a, b = rng.sample(visible, 2) if two else (rng.choice(visible), None)
    ra = _refs(a, named=False)
    v = {
        "A": a.name,
        "a_jobA": _article(a.job),
        "employerA": a.employer,
        "hobbyA": a.hobby,
        "cityA": a.birth_city,
        "uniA": a.university,
        "sA": ra["s"],
        "pA": ra["p"],
    }
    if b is None:
        opening = rng.choice(
            (
                "{A} had been looking forward to the weekend.",
                "{A} woke up early on Saturday morning.",
                "Nobody was surprised that {A} had a busy week.",
            )
        )
        middle = [
            "{A} had just finished another long week as {a_jobA} at {employerA}.",
            "On Saturday, {A} spent the whole afternoon on {hobbyA}.",
            "{A} still remembers the years at {uniA} fondly.",
            "Sometimes {A} thinks about {cityA}, the city where {sA} was born.",
            "Friends often ask {A} about {hobbyA}, and {sA} is always happy to explain.",
        ]
        parent = world.parent_of(a)
        if parent is not None and not parent.held_out:
            v.update(parent=parent.name, rel=_parent_word(parent))
            middle.append("{A} called {pA} {rel}, {parent}, to talk about the week.")
        closing = rng.choice(_STORY_CLOSINGS_ONE)
    else:
        v.update(
            B=b.name,
            a_jobB=_article(b.job),
            employerB=b.employer,
            hobbyB=b.hobby,
            cityB=b.birth_city,
            sB=_refs(b, named=False)["s"],
        )
        opening = rng.choice(
            (
                "{A} and {B} met for coffee one afternoon.",
                "{A} ran into {B} at the train station.",
                "One rainy evening, {A} invited {B} over for dinner.",
            )
        )
        middle = [
            "{A} talked about {hobbyA}, while {B} talked about {hobbyB}.",
            "{B} described a busy month as {a_jobB} at {employerB}.",
            "{A} mentioned being born in {cityA}.",
            "{B} said that {cityB}, where {sB} was born, is still a lovely city.",
            "{A} explained what it is like to work as {a_jobA} at {employerA}.",
        ]
        if a.university == b.university:
            middle.append("They discovered that both of them had studied at {uniA}.")
        closing = rng.choice(_STORY_CLOSINGS_TWO)
    picked = rng.sample(middle, rng.randint(1, min(4, len(middle))))
    return " ".join(s.format(**v) for s in [opening, *picked, closing])


# ---------------------------------------------------------------------------------------------
# Questions with exact answers

_FORWARD_PHRASINGS = {
    "birth_date": (
        "When was {X} born?",
        "What is {X}'s date of birth?",
        "On what date was {X} born?",
        "What is the birth date of {X}?",
        "{X} was born on which date?",
    ),
    "birth_city": (
        "Where was {X} born?",
        "In which city was {X} born?",
        "{X} was born in which city?",
        "What is {X}'s birthplace?",
        "Which city is the birthplace of {X}?",
    ),
    "university": (
        "Where did {X} study?",
        "Which university did {X} attend?",
        "{X} studied at which university?",
        "What university did {X} go to?",
        "Where did {X} go to university?",
    ),
    "employer": (
        "Where does {X} work?",
        "Which company employs {X}?",
        "Who is {X}'s employer?",
        "{X} works for which company?",
        "For which company does {X} work?",
    ),
    "job": (
        "What is {X}'s job?",
        "What does {X} do for a living?",
        "What is {X}'s occupation?",
        "What is the profession of {X}?",
        "{X} works as what?",
    ),
    "hobby": (
        "What is {X}'s hobby?",
        "What does {X} do in {p} free time?",
        "What does {X} enjoy doing in {p} spare time?",
        "Which hobby does {X} have?",
        "What pastime does {X} enjoy?",
    ),
    "parent": (
        "Who is {X}'s {rel}?",
        "Who is the {rel} of {X}?",
        "What is the name of {X}'s {rel}?",
        "{X}'s {rel} is who?",
        "Name the {rel} of {X}.",
    ),
}
# Reverse (parent -> child) questions mirror the parent phrasings, so only the direction differs.
_REVERSE_PHRASINGS = (
    "Who is {X}'s {rel}?",
    "Who is the {rel} of {X}?",
    "What is the name of {X}'s {rel}?",
    "{X}'s {rel} is who?",
    "Name the {rel} of {X}.",
)
N_PHRASINGS = len(_REVERSE_PHRASINGS)


def _answer(person: Person, world: World, attribute: str) -> str:
    if attribute == "birth_date":
        return format_date(person.birth_date)
    if attribute == "parent":
        return world.parent_of(person).name  # type: ignore[union-attr]
    return getattr(person, attribute)


def fact_questions(
    person: Person,
    world: World,
    rng: random.Random,
    n_phrasings: int = 3,
    attributes: tuple[str, ...] = ATTRIBUTES,
) -> list[QA]:
    """Forward questions (child -> parent included), `n_phrasings` distinct phrasings per attribute.

    The parent question is skipped for people without a parent. Answers are the exact strings
    the biographies contain.
    """
    _check_int("n_phrasings", n_phrasings, 1, N_PHRASINGS)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ChatforgeError(f"unknown attribute(s) {unknown}; choose from {list(ATTRIBUTES)}")
    parent = world.parent_of(person)
    fill = {"X": person.name, "p": _refs(person, named=False)["p"]}
    if parent is not None:
        fill["rel"] = _parent_word(parent)
    out = []
    for attr in attributes:
        if attr == "parent" and parent is None:
            continue
        answer = _answer(person, world, attr)
        for q in rng.sample(_FORWARD_PHRASINGS[attr], n_phrasings):
            out.append(QA(q.format(**fill), answer, attr, person.id))
    return out


def reverse_questions(person: Person, world: World, rng: random.Random, n_phrasings: int = 3) -> list[QA]:
    """Parent -> child questions ("Who is the son of X?") about `person`; empty if no child.

    No text in the corpus states this direction, which is what the reversal-curse probe measures.
    """
    _check_int("n_phrasings", n_phrasings, 1, N_PHRASINGS)
    child = world.child_of(person)
    if child is None:
        return []
    fill = {"X": person.name, "rel": _child_word(child)}
    return [
        QA(q.format(**fill), child.name, "child", person.id)
        for q in rng.sample(_REVERSE_PHRASINGS, n_phrasings)
    ]


def qa_document(qas: list[QA]) -> str:
    """QA pairs as plain text, to be mixed into pretraining."""
    return "\n\n".join(f"Question: {qa.question}\nAnswer: {qa.answer}" for qa in qas)


# ---------------------------------------------------------------------------------------------
# Writing and loading a world folder

WORLD_FORMAT = "chatforge-world"
WORLD_VERSION = 1
FILES = {"people": "people.jsonl", "pretrain": "pretrain.jsonl", "heldout": "heldout.jsonl"}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_world(
    world: World,
    out_dir: str | os.PathLike,
    *,
    paraphrases: int = 5,
    n_arithmetic: int | None = None,
    n_stories: int | None = None,
    n_qa: int = 0,
    heldout_paraphrases: int = 1,
    seed: int | None = None,
) -> dict:
    """Write people.jsonl, pretrain.jsonl, heldout.jsonl and manifest.json into `out_dir`.

    pretrain.jsonl: {"text", "kind"} per line, kind in bio|arithmetic|story (|qa when n_qa > 0),
    shuffled; biographies of visible people x `paraphrases` are the bulk. Defaults: one
    arithmetic document and half a story per person. `n_qa` optionally adds forward-question
    documents about visible people (never reverse ones). `seed` (default: the world's seed)
    fixes the text; the same world and seed give byte-identical files. Returns the manifest.
    """
    n = len(world.people)
    _check_int("paraphrases", paraphrases, 1)
    _check_int("heldout_paraphrases", heldout_paraphrases, 1)
    n_arithmetic = _check_int("n_arithmetic", n if n_arithmetic is None else n_arithmetic, 0)
    n_stories = _check_int("n_stories", n // 2 if n_stories is None else n_stories, 0)
    _check_int("n_qa", n_qa, 0)
    seed = world.seed if seed is None else _check_int("seed", seed, -(2**63))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"{out} exists and is not a folder; pick another output path for the world")
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(f"chatforge-world-text:{seed}")  # a stream apart from the one that built the world
    visible = world.visible
    pretrain: list[dict] = []
    for p in visible:
        pretrain.extend({"text": t, "kind": "bio"} for t in biographies(p, world, paraphrases, rng))
    pretrain.extend({"text": arithmetic_document(rng), "kind": "arithmetic"} for _ in range(n_arithmetic))
    if n_stories and not visible:
        raise ChatforgeError("no visible people to write stories about; lower n_heldout or set n_stories=0")
    pretrain.extend({"text": story(world, rng), "kind": "story"} for _ in range(n_stories))
    for _ in range(n_qa):
        p = rng.choice(visible)
        qas = fact_questions(p, world, rng, n_phrasings=1)
        pretrain.append({"text": qa_document(rng.sample(qas, min(3, len(qas)))), "kind": "qa"})
    rng.shuffle(pretrain)

    heldout = [
        {"text": t, "person_id": p.id}
        for p in world.held_out
        for t in biographies(p, world, heldout_paraphrases, rng)
    ]

    blobs = {
        FILES["people"]: _jsonl([p.to_dict() for p in world.people]),
        FILES["pretrain"]: _jsonl(pretrain),
        FILES["heldout"]: _jsonl(heldout),
    }
    for name, data in blobs.items():
        atomic_write_bytes(out / name, data)

    counts = {"bio": 0, "arithmetic": 0, "story": 0}
    if n_qa:
        counts["qa"] = 0
    for r in pretrain:
        counts[r["kind"]] += 1
    manifest = {
        "format": WORLD_FORMAT,
        "version": WORLD_VERSION,
        "seed": world.seed,
        "text_seed": seed,
        "n_people": n,
        "n_heldout": len(world.held_out),
        "paraphrases": paraphrases,
        "heldout_paraphrases": heldout_paraphrases,
        "counts": counts,
        "n_heldout_docs": len(heldout),
        "files": dict(FILES),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def load_world(path: str | os.PathLike) -> World:
    """Read a folder written by `write_world` back into the same World."""
    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ChatforgeError(f"{root} is not a world folder (no manifest.json); create one with write_world")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{mpath} is not valid JSON ({e}); rewrite the world folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != WORLD_FORMAT:
        raise ChatforgeError(f"{mpath} is not a chatforge world manifest; rewrite the world folder")
    ppath = root / manifest["files"]["people"]
    if not ppath.is_file():
        raise ChatforgeError(f"{ppath} is missing; rewrite the world folder")
    data = ppath.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["sha256"].get(ppath.name):
        raise ChatforgeError(
            f"{ppath} does not match its sha256 in manifest.json (edited or torn); rewrite it"
        )
    people = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            people.append(Person.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ChatforgeError(f"{ppath}:{i}: bad person record ({e}); rewrite the world folder") from None
    world = World(seed=int(manifest["seed"]), people=people)
    if len(world._by_id) != len(people) or any(
        p.parent_id is not None and p.parent_id not in world._by_id for p in people
    ):
        raise ChatforgeError(f"{ppath} has duplicate ids or dangling parent links; rewrite the world folder")
    return world


def cmd_world(opts: WorldOptions) -> None:
    world = build_world(opts.seed, opts.people, opts.heldout)
    manifest = write_world(world, opts.out, paraphrases=opts.paraphrases, seed=opts.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"world written to {opts.out}")
