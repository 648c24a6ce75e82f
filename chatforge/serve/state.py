"""What every route of one server shares: `ServerState` (the model, tokenizer, scheduler, store and
settings; FastAPI keeps it in `app.state.server`, routes get it with the `State` dependency), the
caller (`Caller`: the `User` whose key came with the request, set by middleware.Guard) and the `Inbox` that carries the scheduler thread's events to the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from chatforge.model.gpt import GPT
from chatforge.rag.embed import DEFAULT_EMBEDDING
from chatforge.rag.store import default_root
from chatforge.redteam.defenses import DefenseStack
from chatforge.serve.auth import NOBODY, USER_SCOPE_KEY, User
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.scheduler import Scheduler
from chatforge.tokenizer import Tokenizer


class Inbox:
    """Events from the scheduler thread to the event loop's per-request queues, with one wake-up of
    the loop per burst (a decode step of 16 rows makes 16 events, not 16 wake-ups)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: tuple) -> None:  # any thread
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1  # the first of a burst schedules the delivery
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


@dataclass(frozen=True)
class RagSettings:
    """Where the server's collections live and what an upload may be (routes_rag.py)."""

    root: Path | None = None  # None: $CHATFORGE_RAG_ROOT, else ~/.chatforge/rag, looked up per request
    embedding: str = DEFAULT_EMBEDDING  # what a collection made on the server embeds with
    max_upload_bytes: int = 16 << 20  # one upload's files together, decoded
    max_files: int = 20  # files per upload
    max_documents: int = 1000  # documents per collection
    shared: tuple[str, ...] = ()  # admins' collections every user may read and ask about

    @property
    def base(self) -> Path:
        return self.root if self.root is not None else default_root()


@dataclass
class ServerState:
    model: GPT
    tok: Tokenizer
    model_id: str  # the name clients use in "model"
    scheduler: Scheduler
    store: FeedbackStore | None  # None: this server keeps no conversations
    page: dict[str, bytes] = field(default_factory=dict)  # the chat page's files, read once at start
    created: int = field(default_factory=lambda: int(time.time()))
    inbox: Inbox | None = None  # made on the first request, for the loop that serves it
    keys_required: bool = False  # whether the server has keys (then /metrics needs an admin's)
    verifiers: dict = field(default_factory=dict)  # --prm / --orm reward models for the "think" field
    defenses: DefenseStack | None = None  # a redteam.defenses.DefenseStack every chat request and answer passes through
    rag: RagSettings = field(default_factory=RagSettings)  # collections: where, and upload limits
    ingest_lock: threading.Lock = field(default_factory=threading.Lock)  # one upload ingested at a time

    @property
    def ctx(self) -> int:
        """Most tokens per request, prompt + completion: --max-model-len (default the model's context)."""
        return self.scheduler.max_model_len


async def _server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_server_state)]  # a route's `srv: State` parameter


async def _caller(request: Request) -> User:
    return request.scope.get(USER_SCOPE_KEY, NOBODY)  # no Guard, no rights


Caller = Annotated[User, Depends(_caller)]  # a route's `user: Caller` parameter: who sent the request
