"""What the chat page uses besides the OpenAI API: its own files (GET /, /app.js, /style.css and
the vendored Markdown renderer and sanitiser under /vendor/),
the stored conversations (/v1/conversations) and ratings (/v1/feedback), and the two helpers
with which a chat completion stores itself (`conversation_for`, `store_request`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from chatforge.errors import ChatforgeError
from chatforge.serve.auth import User
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.protocol import APIError, ChatCompletionRequest, ConversationCreate, FeedbackRequest
from chatforge.serve.state import Caller, ServerState, State
from chatforge.serve.streaming import Choice

WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {  # name -> media type; the page is these files and nothing else
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    # markdown-it and DOMPurify, vendored so the page works offline (versions: docs/web.md)
    "vendor/markdown-it.min.js": "text/javascript; charset=utf-8",
    "vendor/purify.min.js": "text/javascript; charset=utf-8",
}

router = APIRouter()


def read_page() -> dict[str, bytes]:
    return {name: (WEB_DIR / name).read_bytes() for name in WEB_FILES}


# ---- the page ------------------------------------------------------------------------------
def _file(srv: ServerState, name: str) -> Response:
    return Response(srv.page[name], media_type=WEB_FILES[name], headers={"cache-control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index(srv: State) -> Response:
    return _file(srv, "index.html")


@router.get("/app.js", include_in_schema=False)
async def app_js(srv: State) -> Response:
    return _file(srv, "app.js")


@router.get("/style.css", include_in_schema=False)
async def style_css(srv: State) -> Response:
    return _file(srv, "style.css")


@router.get("/vendor/{name}", include_in_schema=False)
async def vendor_js(name: str, srv: State) -> Response:
    if f"vendor/{name}" not in WEB_FILES:
        raise APIError(404, f"Unknown URL GET /vendor/{name}", code="unknown_url")
    return _file(srv, f"vendor/{name}")


# ---- storing a chat completion -------------------------------------------------------------
def conversation_for(srv: ServerState, req: ChatCompletionRequest, user: User) -> str | None:
    """metadata's conversation_id, checked (it exists and `user` owns it); None when there is none
    (`store` then makes a new one)."""
    cid = (req.metadata or {}).get("conversation_id")
    if cid is None and not req.store:
        return None
    if srv.store is None:
        raise APIError(400, "this server keeps no conversations (start it with --db FILE)", param="store")
    if cid is None:
        return None
    try:
        srv.store.conversation_summary(cid, user.owner)
    except KeyError:
        raise APIError(
            404, f"no conversation {cid}", param="metadata.conversation_id", code="not_found"
        ) from None
    return cid


def store_request(
    srv: ServerState,
    conv_id: str | None,
    user: User,
    request_user: str | None,
    messages: list[dict],
    choices: list[Choice],
    cid: str,
    collection: str | None = None,
    documents: list[dict] | None = None,
) -> str:
    """Write the request's messages and an empty answer per choice (filled in by finish_choices),
    in a conversation `user` owns (a new one when conv_id is None); each answer keeps the documents
    retrieved for it."""
    assert srv.store is not None
    if conv_id is None:
        conv_id = srv.store.create_conversation(
            model=srv.model_id, source="api", user=request_user, owner=user.name
        )["id"]
    try:
        parent = srv.store.store_path(conv_id, messages, owner=user.owner)
    except KeyError:  # deleted since conversation_for looked
        raise APIError(
            404, f"no conversation {conv_id}", param="metadata.conversation_id", code="not_found"
        ) from None
    for c in choices:
        c.message_id = f"{cid}-{c.index}"
        srv.store.add_answer(conv_id, parent, c.message_id, srv.model_id, collection, documents)
    return conv_id


# ---- conversations and feedback ------------------------------------------------------------
def _store(srv: ServerState) -> FeedbackStore:
    if srv.store is None:
        raise APIError(
            400, "this server keeps no conversations (start it with --db FILE)", code="store_disabled"
        )
    return srv.store


# Each route sees only the caller's conversations (an admin's: all); another user's conversation is
# "not found", the same answer as for one that does not exist, so ids cannot be probed.
@router.get("/v1/conversations")
def list_conversations(srv: State, user: Caller, limit: int = 100) -> dict:
    rows = _store(srv).list_conversations(limit=max(1, min(limit, 1000)), owner=user.owner)
    return {"object": "list", "data": rows}


@router.post("/v1/conversations")
def create_conversation(req: ConversationCreate, srv: State, user: Caller) -> dict:
    return _store(srv).create_conversation(
        title=req.title, model=srv.model_id, source=req.source, owner=user.name
    )


@router.get("/v1/conversations/{conversation_id}")
def get_conversation(conversation_id: str, srv: State, user: Caller) -> dict:
    try:
        return _store(srv).get_conversation(conversation_id, owner=user.owner)
    except KeyError:
        raise APIError(404, f"no conversation {conversation_id}", code="not_found") from None


@router.delete("/v1/conversations/{conversation_id}")
def delete_conversation(conversation_id: str, srv: State, user: Caller) -> dict:
    if not _store(srv).delete_conversation(conversation_id, owner=user.owner):
        raise APIError(404, f"no conversation {conversation_id}", code="not_found")
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.post("/v1/feedback")
def feedback(req: FeedbackRequest, srv: State, user: Caller) -> dict:
    try:
        return _store(srv).rate(req.message_id, req.rating, req.comment, req.correction, owner=user.owner)
    except KeyError:
        raise APIError(
            404, f"no stored answer {req.message_id}", param="message_id", code="not_found"
        ) from None
    except ChatforgeError as e:
        raise APIError(400, str(e), param="message_id") from None
