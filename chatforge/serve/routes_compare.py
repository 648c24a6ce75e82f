"""The web page's compare view on the server: a person picks the better of two answers to one prompt
and the pick is appended to the comparison file that `chatforge prefs` reads (`--comparisons FILE`).

    GET  /v1/compare         whether picks are kept and which judge drafts them
    POST /v1/compare/judge   the judge model's draft pick and its reason (label.Judge)
    POST /v1/compare         append one pick (label.comparison_row, written by prefs.append_pref)

The two answers come from POST /v1/chat/completions with n = 2 (two samples of the one model this
server has). The rows are the terminal labeller's, so `chatforge prefs label` skips prompts picked
here and the trainers read them as they read its own. Behind the same API key as every /v1/ route;
the labeller stored with a pick is "web:" + the caller's user name."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from chatforge.align.label import Judge, Judgement, comparison_row
from chatforge.align.prefs import append_pref
from chatforge.chat_format import validate_conversation
from chatforge.errors import ChatforgeError
from chatforge.serve.protocol import APIError
from chatforge.serve.state import Caller

MAX_TEXT = 100_000  # characters of one answer or message


@dataclass
class CompareState:
    path: Path | None  # None: this server keeps no comparisons
    judge: Judge | None = None
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # one append at a time
    judge_lock: threading.Lock = field(default_factory=threading.Lock)  # one judge call at a time

    def __post_init__(self) -> None:  # fail at start, not at the first pick
        if self.path is not None and self.path.exists() and not self.path.is_file():
            raise ChatforgeError(f"--comparisons {self.path} is not a file")


async def _compare_state(request: Request) -> CompareState:
    return request.app.state.compare


Compare = Annotated[CompareState, Depends(_compare_state)]
router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pair(_Strict):
    messages: list[dict] = Field(min_length=1, max_length=200)
    a: str = Field(max_length=MAX_TEXT)
    b: str = Field(max_length=MAX_TEXT)


class JudgeDraft(_Strict):
    pick: Literal["A", "B"]
    p_a: float = Field(ge=0, le=1)
    critique: str = Field(max_length=MAX_TEXT)


class Pick(Pair):
    verdict: Literal["prefer_a", "prefer_b", "tie", "both_bad"]
    comment: str | None = Field(None, max_length=10_000)
    judge: JudgeDraft | None = None


def _prompt(messages: list[dict]) -> list[dict]:
    """The prompt turns, checked as the comparison file checks them (400 otherwise)."""
    try:
        validate_conversation(messages, "messages", require_assistant=False)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the prompt must end with a user turn", param="messages")
    return messages


@router.get("/v1/compare")
def compare_info(cmp: Compare, user: Caller) -> dict:
    return {"comparisons": cmp.path is not None, "judge": cmp.judge.name if cmp.judge else None}


@router.post("/v1/compare/judge")
async def judge_pair(req: Pair, cmp: Compare, user: Caller) -> dict:
    if cmp.judge is None:
        raise APIError(400, "this server has no judge (start it with --judge RUN)", code="no_judge")
    messages = _prompt(req.messages)

    def run() -> Judgement:
        with cmp.judge_lock:
            return cmp.judge(messages, req.a, req.b)

    try:
        j = await run_in_threadpool(run)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    return {"model": cmp.judge.name, "pick": j.pick, "p_a": j.p_a, "critique": j.critique}


@router.post("/v1/compare")
async def save_pick(req: Pick, cmp: Compare, user: Caller) -> dict:
    if cmp.path is None:
        raise APIError(
            400, "this server keeps no comparisons (start it with --comparisons FILE)", code="store_disabled"
        )
    messages = _prompt(req.messages)
    j = Judgement(req.judge.pick, req.judge.p_a, req.judge.critique) if req.judge else None
    judge_name = cmp.judge.name if cmp.judge else "judge"
    row = comparison_row(messages, req.a, req.b, req.verdict, req.comment or "", j, judge_name, f"web:{user.name}")

    def append() -> int:
        with cmp.write_lock:
            append_pref(cmp.path, row)
            with open(cmp.path, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    try:
        count = await run_in_threadpool(append)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    except OSError as e:  # the server's disk or permissions, not the request
        raise APIError(500, f"cannot write the comparison file ({e.strerror or e})", type="server_error") from None
    return {"saved": True, "verdict": row["verdict"], "count": count}
