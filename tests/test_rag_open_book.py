"""Open-book conversations: the answer is in the cited document, the people are strangers to the
evaluated world, and the prompt is the one retrieval builds."""

from __future__ import annotations

import random
import re

import pytest

from chatforge.errors import ChatforgeError
from chatforge.rag.answer import RAG_INSTRUCTION, with_documents
from chatforge.rag.open_book import (
    NOT_IN_DOCUMENTS,
    open_book_conversation,
    open_book_conversations,
    reading_world,
    repeat_conversations,
)
from chatforge.rag.retrieve import Hit
from chatforge.rag.store import StoredChunk
from chatforge.world import build_world

DOC = re.compile(r'<doc id="(\d+)" source="[^"]*">\n(.*?)\n</doc>', re.S)


@pytest.fixture(scope="module")
def worlds():
    evaluated = build_world(0, 120, 12)
    return evaluated, reading_world(0, 200, avoid=evaluated)


def test_the_reading_world_shares_no_name_with_the_evaluated_one_and_its_families_hold(worlds):
    evaluated, reading = worlds
    assert not {p.name for p in reading.people} & {p.name for p in evaluated.people}
    assert len(reading.people) > 150 and not reading.held_out
    for p in reading.people:  # every parent link points at someone in the world
        parent = reading.parent_of(p)
        assert parent is None or reading.child_of(parent) is p


def test_each_answer_copies_the_fact_from_the_document_it_cites(worlds):
    _, reading = worlds
    rng = random.Random(3)
    chats = [open_book_conversation(reading, rng, rng.choice((3, 4))) for _ in range(400)]
    unanswerable = reverse = 0
    for chat in chats:
        system, user, assistant = chat.messages
        assert system == {"role": "system", "content": RAG_INSTRUCTION}
        docs = {int(n): text for n, text in DOC.findall(user["content"])}
        assert sorted(docs) == list(range(1, len(docs) + 1)) and len(docs) in (3, 4)
        question = user["content"].rsplit("Question: ", 1)[1]
        if chat.answer is None:
            unanswerable += 1
            assert assistant["content"] == NOT_IN_DOCUMENTS and chat.doc is None
            continue
        reply = assistant["content"]
        assert chat.answer in reply and reply.endswith(f" [{chat.doc}].")
        assert chat.answer in docs[chat.doc]
        named = [p.name for p in reading.people if p.name in question]
        assert named and all(n in docs[chat.doc] for n in named)  # the subject (or the parent) is in it
        reverse += "Who" in question and chat.answer in {p.name for p in reading.people}
    assert 0.03 < unanswerable / len(chats) < 0.15
    assert reverse > 30  # reverse questions: answered from the child's biography, which names the parent


def test_the_prompt_is_the_one_retrieval_builds_and_a_seed_fixes_every_byte(worlds):
    evaluated, _ = worlds
    a = open_book_conversations(30, random.Random(1), seed=0, avoid=evaluated)
    b = open_book_conversations(30, random.Random(1), seed=0, avoid=evaluated)
    assert a == b and a != open_book_conversations(30, random.Random(2), seed=0, avoid=evaluated)
    for messages in a:  # rebuilding the prompt from its own documents gives it back
        user = messages[1]["content"]
        question = user.rsplit("Question: ", 1)[1]
        assert messages[:2] == with_documents([{"role": "user", "content": question}], _hits_of(user))


def _hits_of(user: str) -> list[Hit]:
    source = re.search(r'source="([^"]*)"', user).group(1)
    return [Hit(StoredChunk(int(n), source, source, "", text), 0.0) for n, text in DOC.findall(user)]


def test_bad_counts_are_one_line_errors():
    with pytest.raises(ChatforgeError, match="at least 1 document"):
        open_book_conversations(5, random.Random(0), seed=0, docs=(0,))
    with pytest.raises(ChatforgeError, match="n -1"):
        open_book_conversations(-1, random.Random(0), seed=0)


def test_repeat_chats_answer_with_exactly_the_text_they_were_given(worlds):
    evaluated, _ = worlds
    chats = repeat_conversations(200, random.Random(4), seed=0, avoid=evaluated)
    evaluated_names = {p.name for p in evaluated.people}
    for user, assistant in chats:
        ask, text = user["content"].split(": ", 1)
        assert assistant == {"role": "assistant", "content": text} and ask
        assert not evaluated_names & set(text.split(", "))
    assert len({c[1]["content"] for c in chats}) == 200  # novel strings: only copying predicts them
    numbers = [x for _, a in chats for x in a["content"].split(", ") if x.isdigit()]
    assert len(numbers) > 50 and {len(x) for x in numbers} == set(range(3, 10))  # what a calculator call copies
    with pytest.raises(ChatforgeError, match="n -2"):
        repeat_conversations(-2, random.Random(0), seed=0)
