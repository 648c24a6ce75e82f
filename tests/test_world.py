"""The synthetic world: determinism, family constraints, held-out hygiene, reversal-curse setup,
template variety, learnable answers, exact arithmetic, and the folder round-trip."""

import datetime as dt
import json
import random
import re
import time
from collections import Counter

import pytest

from chatforge.errors import ChatforgeError
from chatforge.world import (
    ATTRIBUTES,
    CITIES,
    EMPLOYERS,
    HOBBIES,
    JOBS,
    N_PHRASINGS,
    N_TEMPLATES,
    QA,
    UNIVERSITIES,
    World,
    arithmetic_document,
    biographies,
    biography,
    build_world,
    fact_questions,
    format_date,
    load_world,
    qa_document,
    reverse_questions,
    story,
    write_world,
)

PARAPHRASES = 5


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=3, n_people=400, n_heldout=40)


@pytest.fixture(scope="module")
def folder(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    manifest = write_world(world, out, paraphrases=PARAPHRASES)
    return out, manifest


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _mentions(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def _names_pattern(world: World) -> re.Pattern:
    """Matches any full name in the world (longest first, on word boundaries)."""
    names = sorted((p.name for p in world.people), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(map(re.escape, names)) + r")\b")


def _age(older: dt.date, younger: dt.date) -> int:
    """Full years the older person had lived on the younger one's birth date."""
    return younger.year - older.year - ((younger.month, younger.day) < (older.month, older.day))


def _values(p, w) -> list[str]:
    vals = [format_date(p.birth_date), p.birth_city, p.university, p.employer, p.job, p.hobby]
    if w.parent_of(p) is not None:
        vals.append(w.parent_of(p).name)
    return vals


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    m1 = write_world(build_world(7, 120, 12), tmp_path / "a")
    m2 = write_world(build_world(7, 120, 12), tmp_path / "b")
    m3 = write_world(build_world(8, 120, 12), tmp_path / "c")
    assert m1 == m2
    for name in m1["sha256"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert m1["sha256"][name] != m3["sha256"][name]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # The text seed alone changes the text but not the people.
    m4 = write_world(build_world(7, 120, 12), tmp_path / "d", seed=99)
    assert m4["sha256"]["people.jsonl"] == m1["sha256"]["people.jsonl"]
    assert m4["sha256"]["pretrain.jsonl"] != m1["sha256"]["pretrain.jsonl"]


def test_text_functions_are_deterministic_given_rng(world):
    p = world.visible[0]
    for fn in (
        lambda r: biography(p, world, r),
        lambda r: story(world, r),
        lambda r: arithmetic_document(r),
        lambda r: [q.question for q in fact_questions(p, world, r)],
    ):
        assert fn(random.Random(5)) == fn(random.Random(5))
    assert [story(world, random.Random(s)) for s in range(5)] != [story(world, random.Random(0))] * 5


def test_build_world_does_not_touch_global_random():
    random.seed(123)
    before = random.random()
    random.seed(123)
    build_world(1, 50, 5)
    assert random.random() == before


# --- people and families ----------------------------------------------------------------------


def test_vocabularies_are_large_enough():
    for values, minimum in ((CITIES, 30), (UNIVERSITIES, 30), (EMPLOYERS, 30), (JOBS, 15), (HOBBIES, 15)):
        assert len(set(values)) == len(values) >= minimum


def test_names_are_unique_invented_and_ids_dense():
    w = build_world(11, 3000, 10)
    names = [p.name for p in w.people]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]{5,}", n) for n in names)
    assert len({p.last for p in w.people}) > 1000  # syllable-built, not a short list of surnames
    assert [p.id for p in w.people] == list(range(3000))
    assert {p.gender for p in w.people} == {"female", "male"}
    assert sum(p.held_out for p in w.people) == 10
    assert w.find(names[17]) is w.people[17] and w.find("Nobody Here") is None


def test_parent_links_obey_the_constraints():
    w = build_world(5, 1500, 100)
    children_of = Counter(p.parent_id for p in w.people if p.parent_id is not None)
    assert max(children_of.values()) == 1  # each person is the parent of at most one other
    for p in w.people:
        parent = w.parent_of(p)
        if parent is None:
            continue
        assert parent.id != p.id and parent.id == w.person(parent.id).id
        assert 20 <= _age(parent.birth_date, p.birth_date) <= 45
        assert w.child_of(parent) is p
        seen = {p.id}  # no cycles: walking up always ends
        q = parent
        while q is not None:
            assert q.id not in seen
            seen.add(q.id)
            q = w.parent_of(q)
    with_parent = sum(p.parent_id is not None for p in w.people) / len(w.people)
    assert with_parent >= 0.7
    assert sum(w.child_of(p) is not None for p in w.people) == round(with_parent * len(w.people))


# --- biographies ------------------------------------------------------------------------------


def test_biography_states_every_fact_names_the_child_first_and_never_the_child(world):
    rng = random.Random(0)
    checked = 0
    for p in world.people:
        parent, child = world.parent_of(p), world.child_of(p)
        for t in range(N_TEMPLATES):
            text = biography(p, world, rng, template=t)
            for v in _values(p, world):
                assert v in text, (t, v, text)
            assert _mentions(p.name, text)
            if child is not None:
                assert not _mentions(child.name, text), text
            if parent is not None:  # child named before parent: only child -> parent is learnable
                assert text.index(p.name) < text.index(parent.name), text
            checked += child is not None
    assert checked > 100


def test_at_least_five_distinct_templates_are_used(world, folder):
    p = next(p for p in world.visible if world.parent_of(p) is not None)
    names = [p.name, world.parent_of(p).name]
    drop = set(" ".join(_values(p, world) + names).lower().split())
    drop |= {"she", "he", "her", "his", "him", "mother", "father", "daughter", "son", "a", "an", "i", "my"}

    def skeleton(text: str) -> frozenset:
        words = re.findall(r"[a-z]+", text.lower().replace("'s", ""))
        return frozenset(w for w in words if w not in drop)

    # Same template, new shuffle -> same skeleton, so distinct skeletons mean distinct templates.
    assert len({skeleton(biography(p, world, random.Random(i), template=1)) for i in range(10)}) == 1
    bios = biographies(p, world, N_TEMPLATES, random.Random(1))
    assert N_TEMPLATES >= 5 and len({skeleton(b) for b in bios}) == N_TEMPLATES
    # In the written corpus each person's five paraphrases use five different templates.
    out, _ = folder
    child = world.child_of(p)
    own = [
        r["text"]
        for r in _read_jsonl(out / "pretrain.jsonl")
        if r["kind"] == "bio" and p.name in r["text"] and (child is None or child.name not in r["text"])
    ]
    assert len(own) == PARAPHRASES and len({skeleton(t) for t in own}) == PARAPHRASES


def test_attribute_order_is_shuffled(world):
    p = next(p for p in world.people if world.parent_of(p) is not None)
    vals = _values(p, world)
    rng = random.Random(2)
    for t in range(N_TEMPLATES):
        orders = set()
        for _ in range(20):
            text = biography(p, world, rng, template=t)
            orders.add(tuple(sorted(vals, key=text.index)))
        assert len(orders) >= 5, t


def test_biographies_cycle_distinct_templates(world):
    p = world.people[0]
    bios = biographies(p, world, N_TEMPLATES * 2 + 1, random.Random(4))
    assert len(bios) == N_TEMPLATES * 2 + 1
    assert len(set(bios[:N_TEMPLATES])) == N_TEMPLATES


# --- the written folder -----------------------------------------------------------------------


def _subject(text: str, pattern: re.Pattern) -> str:
    """The first full name in a biography is its subject (every template names it before the parent)."""
    return pattern.search(text).group(0)


def test_written_folder_counts_hashes_and_kinds(world, folder):
    import hashlib

    out, m = folder
    n, n_vis = len(world.people), len(world.visible)
    assert m["counts"] == {"bio": n_vis * PARAPHRASES, "arithmetic": n, "story": n // 2}
    assert m["n_people"] == n and m["n_heldout"] == 40 and m["paraphrases"] == PARAPHRASES
    assert m["seed"] == world.seed
    for name, digest in m["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    pretrain = _read_jsonl(out / "pretrain.jsonl")
    assert Counter(r["kind"] for r in pretrain) == Counter(m["counts"])
    assert all(set(r) == {"text", "kind"} and r["text"] for r in pretrain)
    kinds = [r["kind"] for r in pretrain]
    assert kinds[:50].count("bio") < 50  # shuffled, not grouped by kind
    bio_chars = sum(len(r["text"]) for r in pretrain if r["kind"] == "bio")
    assert bio_chars > 0.5 * sum(len(r["text"]) for r in pretrain)  # biographies are the bulk
    assert sorted(p.name for p in out.iterdir()) == [
        "heldout.jsonl",
        "manifest.json",
        "people.jsonl",
        "pretrain.jsonl",
    ]  # no temp files left behind
    people = _read_jsonl(out / "people.jsonl")
    assert people[0]["birth_date"] == world.people[0].birth_date.isoformat()
    assert len(people) == n


def test_held_out_people_stay_out_of_pretraining(world, folder):
    out, _ = folder
    pattern = _names_pattern(world)
    pretrain = _read_jsonl(out / "pretrain.jsonl")
    subjects = Counter(_subject(r["text"], pattern) for r in pretrain if r["kind"] == "bio")
    for p in world.people:
        assert subjects[p.name] == (0 if p.held_out else PARAPHRASES), p.name
    mentioned = {id(r): set(pattern.findall(r["text"])) for r in pretrain}
    for h in world.held_out:
        child = world.child_of(h)
        mentioning = [r for r in pretrain if h.name in mentioned[id(r)]]
        # A held-out name appears only as the parent inside its visible child's biographies.
        for r in mentioning:
            assert r["kind"] == "bio" and child is not None and not child.held_out
            assert _subject(r["text"], pattern) == child.name
            assert format_date(h.birth_date) not in r["text"]
        assert len(mentioning) == (PARAPHRASES if child is not None and not child.held_out else 0)
    heldout = _read_jsonl(out / "heldout.jsonl")
    assert sorted(r["person_id"] for r in heldout) == sorted(p.id for p in world.held_out)
    for r in heldout:
        p = world.person(r["person_id"])
        assert _subject(r["text"], pattern) == p.name
        assert all(v in r["text"] for v in _values(p, world))


def test_stories_feature_only_visible_people(world, folder):
    out, _ = folder
    stories = [r["text"] for r in _read_jsonl(out / "pretrain.jsonl") if r["kind"] == "story"]
    rng = random.Random(9)
    stories += [story(world, rng) for _ in range(200)]
    pattern = _names_pattern(world)
    for text in stories:
        featured = [world.find(n) for n in set(pattern.findall(text))]
        assert not any(p.held_out for p in featured), text
        assert 1 <= len(featured) <= 3  # one or two people, plus maybe a parent by name
        assert 3 <= len(re.split(r"(?<=[.!?])\s+", text.strip())) <= 6, text
        for p in featured:  # stated facts are the person's own
            for other in CITIES:
                if f"{p.name} mentioned being born in {other}." in text:
                    assert other == p.birth_city
            if f"{p.name} spent the whole afternoon on " in text:
                assert f"afternoon on {p.hobby}." in text
            child = world.child_of(p)
            if child is not None and _mentions(child.name, text):  # only child -> parent, never reverse
                assert text.index(child.name) < text.index(p.name)


# --- questions --------------------------------------------------------------------------------


def test_forward_answers_are_verbatim_in_every_biography(world):
    rng = random.Random(6)
    for p in world.people[:80]:
        qas = fact_questions(p, world, rng, n_phrasings=N_PHRASINGS)
        attrs = Counter(q.attribute for q in qas)
        expected = [a for a in ATTRIBUTES if a != "parent" or p.parent_id is not None]
        assert set(attrs) == set(expected) and set(attrs.values()) == {N_PHRASINGS}
        assert len({q.question for q in qas}) == len(qas)
        bios = biographies(p, world, N_TEMPLATES, rng)
        for q in qas:
            assert isinstance(q, QA) and q.person_id == p.id and p.name in q.question
            assert all(q.answer in b for b in bios), (q, bios)
        by_attr = {q.attribute: q.answer for q in qas}
        assert by_attr["birth_date"] == format_date(p.birth_date)
        if p.parent_id is not None:
            parent = world.parent_of(p)
            assert by_attr["parent"] == parent.name
            rel = "mother" if parent.gender == "female" else "father"
            assert all(rel in q.question for q in qas if q.attribute == "parent")
    assert len(fact_questions(world.people[0], world, rng, n_phrasings=1, attributes=("job",))) == 1


def test_reverse_questions_ask_parent_to_child_and_are_not_in_text(world):
    rng = random.Random(7)
    asked = 0
    for p in world.people:
        qas = reverse_questions(p, world, rng, n_phrasings=3)
        child = world.child_of(p)
        if child is None:
            assert qas == []
            continue
        asked += 1
        rel = "daughter" if child.gender == "female" else "son"
        assert len(qas) == 3 and len({q.question for q in qas}) == 3
        for q in qas:
            assert q.answer == child.name and q.attribute == "child" and q.person_id == p.id
            assert p.name in q.question and rel in q.question and child.name not in q.question
        for b in biographies(p, world, N_TEMPLATES, rng):
            assert child.name not in b
    assert asked > 200


def test_qa_document_renders_pairs():
    qas = [QA("Who is A's mother?", "B C", "parent", 1), QA("What is 2 + 2?", "4", "math", 2)]
    doc = qa_document(qas)
    assert doc == "Question: Who is A's mother?\nAnswer: B C\n\nQuestion: What is 2 + 2?\nAnswer: 4"
    pairs = re.findall(r"Question: (.*)\nAnswer: (.*)", doc)
    assert pairs == [(q.question, q.answer) for q in qas]


def test_format_date_is_the_one_format():
    assert format_date(dt.date(1975, 3, 3)) == "March 3, 1975"
    assert format_date(dt.date(2001, 12, 25)) == "December 25, 2001"


# --- arithmetic -------------------------------------------------------------------------------

_OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "plus": int.__add__, "minus": int.__sub__}
_OPS |= {"times": int.__mul__, "sum": int.__add__, "product": int.__mul__, "difference": int.__sub__}


def _binop(a: str, op: str, b: str, c: str) -> bool:
    return _OPS[op](int(a), int(b)) == int(c)


_PATTERNS = [
    (r"(\d+) ([-+*]) (\d+) = (\d+)", _binop),
    (r"(\d+) (plus|minus|times) (\d+) (?:is|equals) (\d+)\.", _binop),
    (r"(\d+) divided by (\d+) is (\d+)\.", lambda a, b, c: int(a) == int(b) * int(c)),
    (r"What is (\d+) ([-+*]) (\d+)\? The answer is (\d+)\.", _binop),
    (
        r"The (sum|product|difference) (?:of|between) (\d+) and (\d+) is (\d+)\.",
        lambda op, a, b, c: _binop(a, op, b, c),
    ),
    (
        r"Each \w+ holds (\d+) (\w+)\. A \w+ fills (\d+) \w+ and adds (\d+) more \2, "
        r"so there are (\d+) \2 in total\.",
        lambda per, _items, k, extra, total: int(per) * int(k) + int(extra) == int(total),
    ),
    (
        r"A \w+ has (\d+) coins, spends (\d+), and then earns (\d+) more, ending with (\d+) coins\.",
        lambda a, b, c, d: int(a) - int(b) + int(c) == int(d),
    ),
]


def test_arithmetic_documents_are_correct():
    rng = random.Random(8)
    used = Counter()
    for _ in range(400):
        lines = arithmetic_document(rng).split("\n")
        assert 3 <= len(lines) <= 6
        for line in lines:
            for i, (pat, check) in enumerate(_PATTERNS):
                m = re.fullmatch(pat, line)
                if m:
                    assert check(*m.groups()), line
                    assert all(int(x) >= 0 for x in re.findall(r"\d+", line))
                    used[i] += 1
                    break
            else:
                pytest.fail(f"unparsed arithmetic line: {line!r}")
    assert len(used) == len(_PATTERNS)  # every phrasing occurs


# --- load / errors / speed --------------------------------------------------------------------


def test_load_world_round_trip(world, folder):
    out, _ = folder
    loaded = load_world(out)
    assert loaded == world
    assert loaded.child_of(loaded.people[0]) == world.child_of(world.people[0])


def test_load_world_rejects_non_world_folders(tmp_path, folder):
    with pytest.raises(ChatforgeError, match="not a world folder"):
        load_world(tmp_path)
    with pytest.raises(ChatforgeError, match="not a world folder"):
        load_world(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ChatforgeError, match="not a chatforge world"):
        load_world(tmp_path)
    src, _ = folder
    bad = tmp_path / "tampered"
    bad.mkdir()
    for name in ("manifest.json", "people.jsonl"):
        (bad / name).write_bytes((src / name).read_bytes())
    (bad / "people.jsonl").write_bytes((src / "people.jsonl").read_bytes() + b"\n")  # edited after writing
    with pytest.raises(ChatforgeError, match="sha256"):
        load_world(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seed=0, n_people=1, n_heldout=0),
        dict(seed=0, n_people=0, n_heldout=0),
        dict(seed=0, n_people=10, n_heldout=10),
        dict(seed=0, n_people=10, n_heldout=-1),
        dict(seed=0, n_people=10.5, n_heldout=1),
        dict(seed="x", n_people=10, n_heldout=1),
        dict(seed=0, n_people=True, n_heldout=0),
        dict(seed=0, n_people=10**9, n_heldout=0),
    ],
)
def test_build_world_rejects_bad_arguments(kwargs):
    with pytest.raises(ChatforgeError):
        build_world(**kwargs)


def test_other_bad_arguments_raise(world, tmp_path):
    p = world.people[0]
    rng = random.Random(0)
    with pytest.raises(ChatforgeError):
        biography(p, world, rng, template=N_TEMPLATES)
    with pytest.raises(ChatforgeError):
        biographies(p, world, 0, rng)
    with pytest.raises(ChatforgeError):
        fact_questions(p, world, rng, n_phrasings=0)
    with pytest.raises(ChatforgeError):
        fact_questions(p, world, rng, n_phrasings=N_PHRASINGS + 1)
    with pytest.raises(ChatforgeError):
        fact_questions(p, world, rng, attributes=("shoe_size",))
    with pytest.raises(ChatforgeError):
        reverse_questions(p, world, rng, n_phrasings=0)
    with pytest.raises(ChatforgeError):
        world.person(10**6)
    with pytest.raises(ChatforgeError):
        write_world(world, tmp_path / "w", paraphrases=0)
    with pytest.raises(ChatforgeError):
        write_world(world, tmp_path / "w", n_stories=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChatforgeError, match="not a folder"):
        write_world(world, tmp_path / "file")


def test_build_and_write_2000_people_under_two_seconds(tmp_path):
    start = time.perf_counter()
    w = build_world(42, 2000, 100)
    m = write_world(w, tmp_path, paraphrases=5)
    assert time.perf_counter() - start < 2.0
    assert m["counts"]["bio"] == 1900 * 5
