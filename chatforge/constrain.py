"""Structured output: a JSON schema (or "any JSON object") as a per-row token constraint for
engine.BatchDecoder, through llguidance (a maintained constrained-decoding library; it compiles
the schema to a grammar and gives, at each step, the tokens that keep the text a valid prefix).

`json_grammar` compiles and checks a schema (ChatforgeError naming what is wrong), `JsonConstraint`
is the engine's `TokenConstraint` for one row. Once the JSON is complete only the stop ids are
allowed, so the answer ends there. JSON is written without whitespace between tokens
(`{"a":1,"b":[true]}`): a model cannot pad it out forever, and a schema may say otherwise in
llguidance's `x-guidance` options."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance
import torch

from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON; see the module docstring
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def guidance_tokenizer(tok: Tokenizer, vocab_size: int, stop_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of `tok` (built from its tokenizer.json, so imported models work too),
    sized to the model's vocabulary and ending at `stop_ids`. Building one takes a while for a
    large vocabulary, so it is kept per tokenizer."""
    key = (vocab_size, tuple(stop_ids))
    with _lock:
        cached = _tokenizers.setdefault(tok, {})
        if key not in cached:
            cached[key] = llguidance.LLTokenizer(tok.to_json(), n_vocab=vocab_size, eos_token=list(stop_ids))
        return cached[key]


def json_grammar(schema: dict[str, Any], ltok: llguidance.LLTokenizer) -> str:
    """The llguidance grammar of a JSON schema; ChatforgeError when the schema is not one it can
    enforce (an unknown type, an unsupported keyword: failing closed, never a loose answer)."""
    if not isinstance(schema, dict):
        raise ChatforgeError("the JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ChatforgeError(f"invalid JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ltok)
    if is_error:
        raise ChatforgeError(f"invalid JSON schema: {messages[0] if messages else 'not supported'}")
    return grammar


class JsonConstraint:
    """One row's constraint (engine.TokenConstraint): the tokens that keep its text valid JSON for
    the schema. A grammar from `json_grammar`; each row needs its own (it holds the row's state):
    `fresh` copies an unused one, which costs far less than compiling the grammar again."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: list[int]) -> None:
        self.matcher, self.stop_ids = matcher, stop_ids

    @classmethod
    def compile(cls, ltok: llguidance.LLTokenizer, grammar: str) -> JsonConstraint:
        matcher = llguidance.LLMatcher(ltok, grammar, log_level=0)
        if matcher.is_error():
            raise ChatforgeError(f"invalid JSON schema: {matcher.get_error()}")
        return cls(matcher, list(ltok.eos_tokens))

    def fresh(self) -> JsonConstraint:
        """A constraint at this one's state (call it on an unused one: the start of the JSON)."""
        return JsonConstraint(self.matcher.deep_copy(), self.stop_ids)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bias = self.matcher.compute_logit_bias()  # one byte per token: 0 = not allowed
        mask = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[:vocab_size] != 0
        if mask.size(0) < vocab_size:
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.size(0), dtype=torch.bool)])
        if not mask.any():  # the matcher failed (it should not): end the answer rather than sample blind
            mask[self.stop_ids] = True
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.is_stopped():  # after the JSON's end only a stop id follows, and ends the row
            self.matcher.consume_token(token)
