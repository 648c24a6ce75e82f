"""Structured output: response_format json_schema / json_object through llguidance, enforced by a
per-row constraint in the engine's sampling. The model here has random weights, so its answers
are valid JSON for the schema only because the constraint makes them so (the same prompt without
response_format is checked to be no JSON at all). Also: bad schemas are OpenAI-shaped 400s, and a
forced tool call cut short by max_tokens finishes with "length"."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

from test_serve import MODEL_ID, TEXTS, TOOLS, serve, tiny_model  # noqa: E402

from chatforge.engine import BatchDecoder, Row  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "color", "tags"],
    "additionalProperties": False,
}
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


def check_person(text: str) -> None:
    """The answer parses and follows SCHEMA, checked field by field (jsonschema is not installed)."""
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == set(SCHEMA["required"])
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    assert type(obj["ok"]) is bool
    assert obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seq_len=512)


@pytest.fixture(scope="module")
def url(model, tok):
    with serve(create_app(model, tok, model_id=MODEL_ID, max_batch=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_unconstrained_answer_is_not_json(client):
    """The control: the same requests without response_format give no JSON, so the tests below
    can only pass through the constraint."""
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=60, temperature=0)
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_json_schema_answers_follow_the_schema(client):
    greedy = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=200, temperature=0, response_format=PERSON
    )
    sampled = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=200, temperature=1.0, seed=3, n=4, response_format=PERSON
    )
    for c in [*greedy.choices, *sampled.choices]:
        assert c.finish_reason == "stop"  # the JSON is complete, and only a stop id may follow it
        check_person(c.message.content)
    assert (
        len({c.message.content for c in sampled.choices}) > 1
    )  # sampled within the schema, not one fixed text


def test_json_object_and_streaming(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=300, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=200, temperature=0, response_format=PERSON, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    check_person(text)


def test_completions_take_response_format(client):
    r = client.completions.create(
        model=MODEL_ID,
        prompt="A person:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": PERSON},
    )
    check_person(r.choices[0].text)


@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "zz"}},
            },
            "zz",
        ),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_bad_response_formats_are_400s(url, fmt, words):
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 5, "response_format": fmt},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and words in err["message"] + str(err["param"])


def test_forced_tool_call_cut_by_max_tokens_finishes_with_length(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=1, temperature=0
    )
    assert r.choices[0].finish_reason == "length"


class OnlyIds:
    """A constraint allowing a fixed set of ids, recording what it was told."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.taken = ids, []

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.ids] = True
        return mask

    def advance(self, token: int) -> None:
        self.taken.append(token)


def test_engine_constraint_is_per_row(model):
    """The hook in BatchDecoder's sampling: a constrained row takes only allowed ids and its
    constraint hears each one; the unconstrained row beside it is what it is alone."""
    prompt = [0, 11, 12, 13]

    def run(rows):
        dec, out = BatchDecoder(model, len(rows), 64), {id(r): [] for r in rows}
        events = dec.admit(rows)
        while True:
            for row, t, _ in events:
                out[id(row)].append(t)
            if not dec.rows:
                return [out[id(r)] for r in rows]
            events = dec.step()

    with torch.inference_mode():
        (alone,) = run([Row(prompt=prompt, budget=8)])
        rule = OnlyIds([40, 41, 42])
        free, ruled = run([Row(prompt=prompt, budget=8), Row(prompt=prompt, budget=8, constraint=rule)])
    assert free == alone
    assert set(ruled) <= {40, 41, 42} and rule.taken == ruled and len(ruled) == 8
