"""The feedback store: conversations, answers and people's ratings in one SQLite file, and the
`chatforge feedback list|export` commands that turn them into the next finetune's data.

Tables (one file, WAL journal so the server's readers never block its writer; synchronous=FULL
so a rating is on disk before the API acknowledges it, and survives a kill or a power cut):

    conversations  id, title, model, source ("web" | "api"), user (the request's `user` field),
                   owner (the user whose API key created it), created, updated
    messages       id, conversation_id, parent_id, role, content, tool_calls (JSON), model,
                   finish_reason, created
    ratings        message_id, rating (+1 / -1, 0 clears), comment, correction, created
                   (append-only: the latest row per message is its rating)

Owners: every method that reads or changes a conversation takes `owner`; a conversation (with its
messages and ratings) whose `owner` is not the caller is treated as absent (KeyError, the API's 404),
so one user can neither see nor change another's. owner=None (an admin, the CLI) sees all.

Messages form a tree, as in ChatGPT: every message points at the one before it. Asking again
(regenerate) adds a second assistant answer under the same user message; editing a message
starts a branch. `store_path` writes a request's messages by walking the tree and reusing a
child with the same role and content, so a client that resends its whole history (as the
OpenAI API has it) extends the tree instead of duplicating it.

Export rules (`chatforge feedback export --as sft|prefs`):

- sft: for every assistant answer rated +1 (or rated -1 with a correction, which then stands in
  for it), the conversation from its root down to that answer, as {"messages": [...]} (what
  `chatforge sft --data` reads). Earlier answers on the way rated -1 are replaced by their
  correction; a path through a -1 answer without one is left out (SFT trains on every assistant
  turn, and that one was bad). A path that is the beginning of another exported path of the same
  conversation is left out too, so no turn is counted twice.
- prefs: pairs for preference tuning (DPO), {"messages": prompt, "chosen": answer, "rejected":
  answer}, where the prompt is the conversation up to a user message and both answers reply to
  it: (a) every answer rated +1 against every answer rated -1 among the answers to the same
  message (e.g. an answer and its regeneration), and (b) an answer rated -1 with a correction:
  the correction is chosen, the answer rejected.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.options import FeedbackExportOptions, FeedbackListOptions
from chatforge.rag.answer import with_document_objects
from chatforge.terminal import strip_controls

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT,
    source TEXT NOT NULL DEFAULT 'api',
    user TEXT,
    owner TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT,
    tool_calls TEXT,
    model TEXT,
    finish_reason TEXT,
    sources TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, created);
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
    comment TEXT,
    correction TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ratings_by_message ON ratings(message_id, id);
"""
TITLE_CHARS = 80  # a conversation's default title: its first user message, cut here


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class FeedbackStore:
    """One SQLite file shared by the server's threads (one connection behind a lock: SQLite
    writes one at a time anyway, and the store's work is tiny next to generation)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ChatforgeError(
                f"no feedback database at {self.path}; `chatforge serve --db FILE` creates one"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout=5000")
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ChatforgeError(
                    f"{self.path}: SQLite refused WAL mode ({mode}); is it on a network drive?"
                )
            self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged rating is on disk
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(conversations)")}
            if "owner" not in columns:  # a file from before owners: its conversations are the admin's
                self.db.execute("ALTER TABLE conversations ADD COLUMN owner TEXT")
            if "sources" not in {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}:
                self.db.execute("ALTER TABLE messages ADD COLUMN sources TEXT")  # a file from before RAG
            self.db.execute(
                "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations(owner, updated)"
            )
        except sqlite3.DatabaseError as e:
            raise ChatforgeError(f"cannot open the feedback database {self.path} ({e})") from None
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _write(self, fn):
        """Run fn(db) in one transaction (BEGIN IMMEDIATE ... COMMIT): all of it is stored, or none."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # ---- conversations -----------------------------------------------------------------------
    def create_conversation(
        self,
        *,
        title: str = "",
        model: str | None = None,
        source: str = "api",
        user: str | None = None,
        owner: str | None = None,
    ) -> dict:
        cid, now = new_id("conv"), time.time()
        self._write(
            lambda db: db.execute(
                "INSERT INTO conversations (id, title, model, source, user, owner, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, title[:200], model, source, user, owner, now, now),
            )
        )
        return self.conversation_summary(cid)

    def conversation_summary(self, cid: str, owner: str | None = None) -> dict:
        rows = self._read(
            """SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages
               FROM conversations c WHERE c.id = ? AND (? IS NULL OR c.owner = ?)""",
            (cid, owner, owner),
        )
        if not rows:
            raise KeyError(cid)
        return _conversation_dict(rows[0])

    def list_conversations(self, limit: int = 100, owner: str | None = None) -> list[dict]:
        """Newest first, each with its message count and its answers' up / down rating counts."""
        rows = self._read(
            f"""WITH latest AS (
                    SELECT r.message_id, r.rating FROM ratings r
                    WHERE r.id = (SELECT MAX(id) FROM ratings WHERE message_id = r.message_id))
                SELECT c.*,
                    (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages,
                    (SELECT COUNT(*) FROM latest l JOIN messages m ON m.id = l.message_id
                        WHERE m.conversation_id = c.id AND l.rating = 1) AS up,
                    (SELECT COUNT(*) FROM latest l JOIN messages m ON m.id = l.message_id
                        WHERE m.conversation_id = c.id AND l.rating = -1) AS down
                FROM conversations c WHERE (? IS NULL OR c.owner = ?)
                ORDER BY c.updated DESC LIMIT {int(limit)}""",
            (owner, owner),
        )
        return [_conversation_dict(r) for r in rows]

    def get_conversation(self, cid: str, owner: str | None = None) -> dict:
        """The conversation with all its messages (every branch, oldest first), each with its rating."""
        out = self.conversation_summary(cid, owner)
        out["messages"] = [self._message_dict(r) for r in self._messages(cid)]
        return out

    def delete_conversation(self, cid: str, owner: str | None = None) -> bool:
        sql = "DELETE FROM conversations WHERE id = ? AND (? IS NULL OR owner = ?)"
        return self._write(lambda db: db.execute(sql, (cid, owner, owner)).rowcount) > 0

    def _messages(self, cid: str) -> list[sqlite3.Row]:
        return self._read(
            """SELECT m.*, r.rating, r.comment, r.correction FROM messages m
               LEFT JOIN ratings r ON r.id = (SELECT MAX(id) FROM ratings WHERE message_id = m.id)
               WHERE m.conversation_id = ? ORDER BY m.created, m.rowid""",
            (cid,),
        )

    @staticmethod
    def _message_dict(r: sqlite3.Row) -> dict:
        d = {
            "id": r["id"],
            "parent_id": r["parent_id"],
            "role": r["role"],
            "content": r["content"],
            "model": r["model"],
            "finish_reason": r["finish_reason"],
            "created": r["created"],
            "rating": r["rating"] or 0,
            "comment": r["comment"],
            "correction": r["correction"],
        }
        if r["tool_calls"]:
            d["tool_calls"] = json.loads(r["tool_calls"])
        if r["sources"]:  # the documents the answer was given and their collection
            d.update(json.loads(r["sources"]))
        return d

    # ---- messages ----------------------------------------------------------------------------
    def store_path(
        self, cid: str, messages: list[dict], parent_id: str | None = None, owner: str | None = None
    ) -> str | None:
        """Store `messages` (OpenAI schema) as a path from `parent_id` (None: the root), reusing
        messages already there; returns the id of the last one (None for an empty list)."""

        def write(db: sqlite3.Connection) -> str | None:
            sql = "SELECT 1 FROM conversations WHERE id = ? AND (? IS NULL OR owner = ?)"
            if not db.execute(sql, (cid, owner, owner)).fetchone():
                raise KeyError(cid)
            parent, now = parent_id, time.time()
            if parent is not None:
                row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent,)).fetchone()
                if row is None or row[0] != cid:
                    raise KeyError(parent)
            for m in messages:
                calls = json.dumps(m["tool_calls"], sort_keys=True) if m.get("tool_calls") else None
                found = db.execute(
                    "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? AND role = ? "
                    "AND content IS ? AND tool_calls IS ? ORDER BY created LIMIT 1",
                    (cid, parent, m["role"], m.get("content"), calls),
                ).fetchone()
                if found:
                    parent = found[0]
                    continue
                mid = new_id("msg")
                db.execute(
                    "INSERT INTO messages "
                    "(id, conversation_id, parent_id, role, content, tool_calls, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (mid, cid, parent, m["role"], m.get("content"), calls, now),
                )
                parent = mid
            first_user = next((m.get("content") for m in messages if m["role"] == "user"), None)
            db.execute(
                "UPDATE conversations SET updated = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                "WHERE id = ?",
                (now, (first_user or "")[:TITLE_CHARS], cid),
            )
            return parent

        return self._write(write)

    def add_answer(
        self,
        cid: str,
        parent_id: str | None,
        message_id: str,
        model: str,
        collection: str | None = None,
        documents: list[dict] | None = None,
    ) -> None:
        """Insert an (empty, unfinished) assistant answer now, so it can be rated even while it streams;
        with the documents retrieved for it from `collection`, so a reopened answer shows its sources."""
        sources = json.dumps({"collection": collection, "documents": documents}) if documents is not None else None

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, model, sources, created) "
                "VALUES (?, ?, ?, 'assistant', '', ?, ?, ?)",
                (message_id, cid, parent_id, model, sources, time.time()),
            )

        self._write(write)

    def finish_answer(self, message_id: str, content: str, finish_reason: str, tool_calls=None) -> None:
        calls = json.dumps(tool_calls, sort_keys=True) if tool_calls else None
        self._write(
            lambda db: db.execute(
                "UPDATE messages SET content = ?, finish_reason = ?, tool_calls = ? WHERE id = ?",
                (content, finish_reason, calls, message_id),
            )
        )

    # ---- ratings -----------------------------------------------------------------------------
    def rate(
        self,
        message_id: str,
        rating: int,
        comment: str | None = None,
        correction: str | None = None,
        owner: str | None = None,
    ) -> dict:
        """Record a person's rating of an assistant answer (+1, -1, or 0 to clear). The row is
        committed with synchronous=FULL before this returns. KeyError for an unknown message, or
        one in a conversation `owner` does not own."""
        if rating not in (-1, 0, 1):
            raise ChatforgeError(f"rating must be 1, -1 or 0 (clear), got {rating!r}")

        def write(db: sqlite3.Connection) -> dict:
            row = db.execute(
                "SELECT m.role, m.conversation_id FROM messages m JOIN conversations c "
                "ON c.id = m.conversation_id WHERE m.id = ? AND (? IS NULL OR c.owner = ?)",
                (message_id, owner, owner),
            ).fetchone()
            if row is None:
                raise KeyError(message_id)
            if row["role"] != "assistant":
                raise ChatforgeError(
                    f"message {message_id} is a {row['role']} message; only answers are rated"
                )
            now = time.time()
            cur = db.execute(
                "INSERT INTO ratings (message_id, rating, comment, correction, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (message_id, rating, comment or None, correction or None, now),
            )
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, row["conversation_id"]))
            return {
                "id": f"fb-{cur.lastrowid}",
                "object": "feedback",
                "message_id": message_id,
                "conversation_id": row["conversation_id"],
                "rating": rating,
                "comment": comment or None,
                "correction": correction or None,
                "created": int(now),
            }

        return self._write(write)

    # ---- export ------------------------------------------------------------------------------
    def _trees(self) -> list[dict[str, dict]]:
        """Every conversation as {message id: message dict}."""
        cids = [r["id"] for r in self._read("SELECT id FROM conversations ORDER BY created")]
        return [{r["id"]: self._message_dict(r) for r in self._messages(cid)} for cid in cids]

    def export_sft(self) -> list[dict]:
        out = []
        for tree in self._trees():
            paths = []
            for m in tree.values():
                good = m["rating"] == 1 or (m["rating"] == -1 and m["correction"])
                if m["role"] != "assistant" or not good:
                    continue
                path = _path(tree, m["id"])
                msgs = [_fixed(x) for x in path]
                if any(x is None for x in msgs) or not (
                    msgs[-1].get("content") or msgs[-1].get("tool_calls")
                ):
                    continue  # a bad answer without a correction on the way, or an empty answer
                paths.append(([x["id"] for x in path], _as_asked(msgs[:-1], path[-1]) + msgs[-1:]))
            ids = [p for p, _ in paths]
            for p, msgs in paths:
                if not any(len(q) > len(p) and q[: len(p)] == p for q in ids):  # keep only the longest
                    out.append({"messages": msgs})
        return out

    def export_prefs(self) -> list[dict]:
        out = []
        for tree in self._trees():
            answers: dict[str | None, list[dict]] = {}
            for m in tree.values():
                if m["role"] == "assistant":
                    answers.setdefault(m["parent_id"], []).append(m)
            for parent, group in answers.items():
                prompt = [_plain(x) for x in _path(tree, parent)] if parent else []
                if not prompt:
                    continue
                ups = [m for m in group if m["rating"] == 1]
                downs = [m for m in group if m["rating"] == -1]
                for down in downs:
                    rejected = _plain(down)
                    for up in ups:
                        asked = _as_asked(prompt, up if up.get("documents") else down)
                        out.append({"messages": asked, "chosen": _plain(up), "rejected": rejected})
                    if down["correction"]:
                        chosen = {"role": "assistant", "content": down["correction"]}
                        out.append({"messages": _as_asked(prompt, down), "chosen": chosen, "rejected": rejected})
        return out


def _conversation_dict(r: sqlite3.Row) -> dict:
    d = {
        "id": r["id"],
        "object": "conversation",
        "title": r["title"],
        "model": r["model"],
        "source": r["source"],
        "user": r["user"],
        "owner": r["owner"],
        "created": int(r["created"]),
        "updated": int(r["updated"]),
        "n_messages": r["n_messages"],
    }
    for k in ("up", "down"):
        if k in r.keys():
            d[k] = r[k]
    return d


def _path(tree: dict[str, dict], mid: str) -> list[dict]:
    """The messages from the root down to `mid`."""
    path = []
    while mid is not None:
        m = tree[mid]
        path.append(m)
        mid = m["parent_id"]
    return path[::-1]


def _as_asked(prompt: list[dict], answer: dict) -> list[dict]:
    """The prompt as the model saw it: with the documents retrieved for `answer` (a RAG answer), so an
    exported answer that cites [n] comes with what [n] is."""
    return with_document_objects(prompt, answer["documents"]) if answer.get("documents") else prompt


def _plain(m: dict) -> dict:
    """A stored message as an OpenAI-schema message."""
    out: dict[str, Any] = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    return out


def _fixed(m: dict) -> dict | None:
    """For SFT: an answer rated -1 becomes its correction, or None when it has none."""
    if m["role"] == "assistant" and m["rating"] == -1:
        return {"role": "assistant", "content": m["correction"]} if m["correction"] else None
    return _plain(m)


# ---- CLI -----------------------------------------------------------------------------------
def cmd_feedback_list(args: FeedbackListOptions) -> None:
    store = FeedbackStore(args.db, create=False)
    try:
        rows = store.list_conversations(limit=args.limit)
    finally:
        store.close()
    if not rows:
        print(f"{args.db}: no conversations yet")
        return
    print(f"{'conversation':<29} {'updated':<16} {'msgs':>4} {'up':>3} {'down':>4}  title")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"]))
        title = " ".join(strip_controls(r["title"]).split())[:60]  # titles come from remote users
        print(f"{r['id']:<29} {when:<16} {r['n_messages']:>4} {r['up']:>3} {r['down']:>4}  {title}")


def cmd_feedback_export(args: FeedbackExportOptions) -> None:
    store = FeedbackStore(args.db, create=False)
    try:
        items = store.export_sft() if args.fmt == "sft" else store.export_prefs()
    finally:
        store.close()
    if not items:
        what = "no answer is rated up (or corrected)" if args.fmt == "sft" else "no answer has a pair"
        raise ChatforgeError(
            f"nothing to export from {args.db}: {what}; "
            "rate answers on the chat page or with POST /v1/feedback"
        )
    lines = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    atomic_write_text(args.out, lines)
    print(
        f"{len(items)} {'conversations' if args.fmt == 'sft' else 'preference pairs'} written to {args.out}"
    )
