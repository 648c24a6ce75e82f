"""The OpenAI API as this server speaks it: the request bodies (pydantic models that refuse unknown
fields), the error shape {"error": {"message", "type", "param", "code"}} (`APIError`, and
`validation_error` for FastAPI's 422s), and the checks that turn a request's sampling fields,
stop strings and token limit into generation settings."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"retry-after": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# a \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the second without the first:
# valid JSON, but no text. Pairs (an escaped emoji) do not match, so their bodies are not parsed here.
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_SURROGATE_ESCAPE = re.compile(rb"%s(?!%s)|(?<!%s)%s" % (_HIGH, _LOW, _HIGH, _LOW))


def lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body holds a string with a lone surrogate (which no UTF-8 text can carry, so it
    would fail later, in the tokenizer or SQLite). Pairs (an emoji escaped) are fine."""
    if not _SURROGATE_ESCAPE.search(body):
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except ValueError:  # not JSON: the route's parser says so
        return False
    return False


_TYPE_TAG = re.compile(r"(str|int|float|bool|dict|list|none|[A-Za-z_-]+\[.*\])")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 list of errors -> one OpenAI-style 400 about the first problem."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({first.get('ctx', {}).get('error', 'invalid JSON')}).",
            code="invalid_json",
        )
    # drop "body" and pydantic's union-branch tags ("str", "list[int]") from the location
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.fullmatch(str(x))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request needs a JSON body.", code="invalid_json")
    msg = first.get("msg", "invalid request")
    return APIError(400, f"Invalid value for '{param}': {msg}." if param else f"{msg}.", param=param)


# ---- request bodies ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]  # images and audio are not something these models read
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """tool_choice {"type": "function", "function": {"name": ...}}: the answer is a call to that function."""

    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    """response_format's json_schema: a name, and the schema the answer must follow (none: any
    JSON object). The answer is held to the schema whether `strict` is true or not."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # the name `schema` is pydantic's
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: "text" (no constraint), "json_object" (any JSON object) or
    "json_schema" (JSON valid against json_schema.schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields chat and text completions share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="chatforge extension: sample from the k most likely")
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    trim_history: bool = Field(
        False,
        description="chatforge extension (the web page sends it): leave the oldest turns out of the "
        "prompt, never the system prompt, so it fits the context; the answer says how many",
    )
    # chatforge extension: answer from this collection (the caller's own: NAME, or USER:NAME for an
    # admin; routes_rag.py); the response carries the retrieved chunks as "documents"
    # [{id, source, heading, text, chunk_id}], which the answer cites as [id]
    collection: str | None = Field(None, min_length=1, max_length=130)
    # chatforge extension: a thinking strategy ("vote:8", or {"strategy": "vote", "n": 8}); docs/thinking.md
    think: str | int | dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = Field(
        None, description="as on chat completions (vLLM's extension): the text must be JSON"
    )


class ConversationCreate(_Strict):
    title: str = Field("", max_length=200)
    source: Literal["web", "api"] = "api"


class FeedbackRequest(_Strict):
    message_id: str = Field(min_length=1, max_length=200)
    rating: Literal[-1, 0, 1]
    comment: str | None = Field(None, max_length=10_000)
    correction: str | None = Field(None, max_length=100_000)


# ---- request fields -> generation settings -------------------------------------------------
def sampling_settings(req: SamplingRequest) -> dict:
    """The Job's sampling keywords; 400 for the OpenAI knobs this server does not have."""
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(
            400, "presence_penalty and frequency_penalty are not supported (use 0)", param="presence_penalty"
        )
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    temperature = 1.0 if req.temperature is None else req.temperature
    return {"temperature": temperature, "top_k": req.top_k, "top_p": req.top_p}


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def token_budget(ctx: int, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """The token budget: what was asked for, or all the room the context leaves; 400 if it overflows."""
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your messages resulted in "
            f"{n_prompt} tokens. Please reduce the length of the messages.",
            param="messages" if param == "max_tokens" else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
            "Please reduce the prompt or the completion length.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


# ---- collections (routes_rag.py) -----------------------------------------------------------
class CollectionCreate(_Strict):
    name: str = Field(min_length=1, max_length=64)
    embedding: str | None = Field(None, description="the embedding model (default: the server's)")


class UploadedFile(_Strict):
    """A file as JSON: its name (the format comes from its suffix) and its bytes in base64, so
    uploads need no multipart parser and pass the same checks as every other body."""

    name: str = Field(min_length=1, max_length=200)
    content: str


class UploadRequest(_Strict):
    files: list[UploadedFile] = Field(min_length=1)
