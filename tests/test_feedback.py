"""The feedback store: the message tree, ratings, the sft / prefs export rules, the CLI, the API
round trip, and that an acknowledged rating survives SIGKILL of the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import torch

from chatforge.chat_format import load_conversations
from chatforge.cli import parse_command, run_command
from chatforge.errors import ChatforgeError
from chatforge.options import ServeOptions
from chatforge.rag.answer import RAG_INSTRUCTION, with_document_objects
from chatforge.serve.feedback import FeedbackStore
from chatforge.tokenizer import Tokenizer

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
SYS = {"role": "system", "content": "Be kind."}


def answer(store: FeedbackStore, cid: str, history: list[dict], text: str, mid: str) -> str:
    """Store `history` and an answer `text` to it, as the server does for one chat request."""
    parent = store.store_path(cid, history)
    store.add_answer(cid, parent, mid, "m")
    store.finish_answer(mid, text, "stop")
    return mid


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "fb.sqlite")
    yield s
    s.close()


def run_cli(*argv: str) -> None:
    run_command(*parse_command(["feedback", *argv]))


def test_wal_and_full_sync(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_tree_reuses_history_and_keeps_regenerations(store):
    cid = store.create_conversation(source="web")["id"]
    a1 = answer(store, cid, [SYS, U("hi")], "hello!", "c1-0")
    a2 = answer(store, cid, [SYS, U("hi")], "hey", "c2-0")  # regenerate: same history, new sibling
    a3 = answer(store, cid, [SYS, U("hi"), A("hey"), U("how are you")], "fine", "c3-0")
    conv = store.get_conversation(cid)
    msgs = {m["id"]: m for m in conv["messages"]}
    assert len(msgs) == 6  # system, user, 2 answers, user, answer: the history was not stored twice
    assert msgs[a1]["parent_id"] == msgs[a2]["parent_id"]
    assert msgs[msgs[a3]["parent_id"]]["parent_id"] == a2  # the follow-up hangs under the answer it saw
    assert conv["title"] == "hi"
    with pytest.raises(KeyError):
        store.store_path("conv-nope", [U("x")])


def test_ratings_latest_wins_and_checks(store):
    cid = store.create_conversation()["id"]
    mid = answer(store, cid, [U("q")], "a", "c-0")
    store.rate(mid, 1)
    store.rate(mid, -1, comment="wrong", correction="right")
    m = [x for x in store.get_conversation(cid)["messages"] if x["id"] == mid][0]
    assert (m["rating"], m["comment"], m["correction"]) == (-1, "wrong", "right")
    assert store.list_conversations()[0]["down"] == 1 and store.list_conversations()[0]["up"] == 0
    with pytest.raises(KeyError):
        store.rate("nope", 1)
    user_id = [x for x in store.get_conversation(cid)["messages"] if x["role"] == "user"][0]["id"]
    with pytest.raises(ChatforgeError, match="only answers"):
        store.rate(user_id, 1)


def test_export_rules(store, tmp_path):
    # conversation 1: a bad answer, regenerated into a good one, then a good follow-up
    c1 = store.create_conversation()["id"]
    bad = answer(store, c1, [SYS, U("2+2?")], "5", "x1-0")
    good = answer(store, c1, [SYS, U("2+2?")], "4", "x2-0")
    follow = answer(store, c1, [SYS, U("2+2?"), A("4"), U("and 3+3?")], "6", "x3-0")
    store.rate(bad, -1)
    store.rate(good, 1)
    store.rate(follow, 1)
    # conversation 2: a bad answer with a correction; conversation 3: a follow-up after an
    # uncorrected bad answer (not SFT material); conversation 4: rated up but empty
    c2 = store.create_conversation()["id"]
    store.rate(answer(store, c2, [U("capital of France?")], "Berlin", "y1-0"), -1, correction="Paris")
    c3 = store.create_conversation()["id"]
    store.rate(answer(store, c3, [U("q")], "junk", "z1-0"), -1)
    store.rate(answer(store, c3, [U("q"), A("junk"), U("q2")], "ok", "z2-0"), 1)
    c4 = store.create_conversation()["id"]
    store.rate(answer(store, c4, [U("q")], "", "w1-0"), 1)

    sft = store.export_sft()
    assert sft == [
        {"messages": [SYS, U("2+2?"), A("4"), U("and 3+3?"), A("6")]},  # only the longest path of c1
        {"messages": [U("capital of France?"), A("Paris")]},  # the correction stands in
    ]
    prefs = store.export_prefs()
    assert {"messages": [SYS, U("2+2?")], "chosen": A("4"), "rejected": A("5")} in prefs
    assert {"messages": [U("capital of France?")], "chosen": A("Paris"), "rejected": A("Berlin")} in prefs
    assert len(prefs) == 2

    run_cli("export", "--db", str(store.path), "--as", "sft", "--out", str(tmp_path / "sft.jsonl"))
    assert load_conversations(tmp_path / "sft.jsonl") == [
        x["messages"] for x in sft
    ]  # what `chatforge sft` reads
    run_cli("export", "--db", str(store.path), "--as", "prefs", "--out", str(tmp_path / "prefs.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert lines == prefs
    for p in lines:  # prompt + either answer is a valid conversation
        load_conversations_ok = [p["messages"] + [p["chosen"]], p["messages"] + [p["rejected"]]]
        (tmp_path / "pair.jsonl").write_text("".join(json.dumps(m) + "\n" for m in load_conversations_ok))
        assert len(load_conversations(tmp_path / "pair.jsonl")) == 2


def test_owners(store):
    """A conversation, its messages and ratings belong to its user: to anyone else it does not
    exist (KeyError, the API's 404); owner=None (the admin, the CLI) sees everything."""
    a = store.create_conversation(owner="alice")["id"]
    mid = answer(store, a, [U("q")], "a", "o-0")
    b = store.create_conversation(owner="bob")["id"]
    for call in (
        lambda: store.get_conversation(a, owner="bob"),
        lambda: store.conversation_summary(a, owner="bob"),
        lambda: store.store_path(a, [U("more")], owner="bob"),
        lambda: store.rate(mid, -1, correction="poison", owner="bob"),
    ):
        with pytest.raises(KeyError):
            call()
    assert not store.delete_conversation(a, owner="bob")
    assert [c["id"] for c in store.list_conversations(owner="bob")] == [b]
    assert {c["id"] for c in store.list_conversations()} == {a, b}
    assert store.rate(mid, 1, owner="alice")["rating"] == 1
    assert store.get_conversation(a, owner="alice")["messages"][-1]["correction"] is None
    assert store.delete_conversation(a, owner="alice")


def test_answers_keep_their_documents_and_old_files_gain_the_column(store, tmp_path):
    cid = store.create_conversation(source="web")["id"]
    parent = store.store_path(cid, [U("who keeps the light?")])
    docs = [{"id": 1, "source": "keeper.md", "heading": "Lighthouse", "text": "Marta.", "chunk_id": 7}]
    store.add_answer(cid, parent, "c1-0", "m", "notes", docs)
    store.finish_answer("c1-0", "Marta [1].", "stop")
    answer(store, cid, [U("hi")], "hello", "c2-0")  # no retrieval: no documents
    got = {m["id"]: m for m in store.get_conversation(cid)["messages"]}
    assert got["c1-0"]["documents"] == docs and got["c1-0"]["collection"] == "notes"
    assert "documents" not in got["c2-0"] and "collection" not in got["c2-0"]

    # exported, a cited answer comes with the documents its prompt had ([1] must mean something)
    store.rate("c1-0", 1)
    store.add_answer(cid, parent, "c3-0", "m", "notes", docs)  # a regeneration, rated down and corrected
    store.finish_answer("c3-0", "Nobody.", "stop")
    store.rate("c3-0", -1, correction="Marta keeps it [1].")
    asked = with_document_objects([U("who keeps the light?")], docs)
    assert asked[0] == {"role": "system", "content": RAG_INSTRUCTION}
    assert '<doc id="1" source="keeper.md > Lighthouse">\nMarta.\n</doc>' in asked[1]["content"]
    sft = [e["messages"] for e in store.export_sft()]
    assert [*asked, A("Marta [1].")] in sft and [*asked, A("Marta keeps it [1].")] in sft
    prefs = store.export_prefs()
    assert {(e["chosen"]["content"], e["rejected"]["content"]) for e in prefs} == {
        ("Marta [1].", "Nobody."), ("Marta keeps it [1].", "Nobody.")
    }
    assert all(e["messages"] == asked for e in prefs)

    old = tmp_path / "old.sqlite"  # a file written before answers kept their documents
    db = sqlite3.connect(old)
    db.executescript(SCHEMA_BEFORE_SOURCES)
    db.execute("INSERT INTO conversations (id, created, updated) VALUES ('conv-1', 0, 0)")
    db.execute("INSERT INTO messages (id, conversation_id, role, content, created) VALUES ('m1', 'conv-1', 'user', 'hi', 0)")
    db.commit()
    db.close()
    reopened = FeedbackStore(old)
    assert [m["content"] for m in reopened.get_conversation("conv-1")["messages"]] == ["hi"]
    reopened.add_answer("conv-1", "m1", "a1", "m", "notes", docs)
    assert reopened.get_conversation("conv-1")["messages"][-1]["documents"] == docs
    reopened.close()


SCHEMA_BEFORE_SOURCES = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', model TEXT,
    source TEXT NOT NULL DEFAULT 'api', user TEXT, owner TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT, tool_calls TEXT,
    model TEXT, finish_reason TEXT, created REAL NOT NULL);
"""


def test_cli_list_and_errors(store, tmp_path, capsys):
    cid = store.create_conversation()["id"]
    store.rate(answer(store, cid, [U("hello world")], "hi", "l-0"), 1)
    run_cli("list", "--db", str(store.path))
    out = capsys.readouterr().out
    assert cid in out and "hello world" in out
    # a title is a remote user's text: an escape sequence in it must not reach the terminal
    evil = store.create_conversation(title="pwn\x1b]52;c;ZWNobyBoaQ==\x07ed\x1b[2J")["id"]
    run_cli("list", "--db", str(store.path))
    out = capsys.readouterr().out
    assert evil in out and "pwned" in out and "\x1b" not in out and "\x07" not in out
    with pytest.raises(ChatforgeError, match="no feedback database"):
        run_cli("list", "--db", str(tmp_path / "missing.sqlite"))
    empty = FeedbackStore(tmp_path / "empty.sqlite")
    empty.close()
    with pytest.raises(ChatforgeError, match="nothing to export"):
        run_cli(
            "export",
            "--db",
            str(tmp_path / "empty.sqlite"),
            "--as",
            "prefs",
            "--out",
            str(tmp_path / "o.jsonl"),
        )
    assert not (tmp_path / "o.jsonl").exists()


# ---- through the server ----------------------------------------------------------------------
TEXTS = ["Hello there, how are you today? I am fine, thank you very much."] * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random run folder, as `chatforge serve --model` loads it."""
    from chatforge.checkpoint import save_model
    from chatforge.model.gpt import GPT, GPTConfig

    tok = Tokenizer.train(TEXTS, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1))
    run = tmp_path_factory.mktemp("run") / "tinyrun"
    save_model(run, model, tok.to_json(), {"stage": "test"})
    return run


def test_api_round_trip(run_dir, tmp_path):
    from fastapi.testclient import TestClient

    from chatforge.serve.command import build_server_app

    args = ServeOptions(
        model=str(run_dir), db=str(tmp_path / "fb.sqlite"), api_key=None, max_batch=4, max_queue=8,
        max_request_kb=64, device="cpu",
    )  # fmt: skip
    app, name, db, _ = build_server_app(args)
    assert name == "tinyrun"
    with TestClient(app, base_url="http://localhost") as c:
        conv = c.post("/v1/conversations", json={"title": "t", "source": "web"}).json()
        body = {
            "model": name,
            "messages": [U("hi")],
            "max_tokens": 5,
            "metadata": {"conversation_id": conv["id"]},
        }
        r1 = c.post("/v1/chat/completions", json=body).json()
        r2 = c.post("/v1/chat/completions", json=body).json()  # a regeneration
        assert r1["conversation_id"] == conv["id"]
        ok = c.post("/v1/feedback", json={"message_id": r1["id"] + "-0", "rating": -1, "comment": "meh"})
        assert ok.status_code == 200 and ok.json()["rating"] == -1
        assert c.post("/v1/feedback", json={"message_id": r2["id"] + "-0", "rating": 1}).status_code == 200
        got = c.get(f"/v1/conversations/{conv['id']}").json()
        answers = {m["id"]: m for m in got["messages"] if m["role"] == "assistant"}
        assert answers[r1["id"] + "-0"]["content"] == r1["choices"][0]["message"]["content"]
        assert answers[r1["id"] + "-0"]["comment"] == "meh"
        listed = c.get("/v1/conversations").json()["data"]
        assert [(x["id"], x["up"], x["down"]) for x in listed] == [(conv["id"], 1, 1)]
        stored = c.post("/v1/chat/completions", json={**body, "metadata": None, "store": True}).json()
        assert stored["conversation_id"] != conv["id"]  # store: true without an id makes a new one
        assert c.delete(f"/v1/conversations/{stored['conversation_id']}").json()["deleted"]
    prefs = FeedbackStore(db).export_prefs()
    assert prefs == [
        {
            "messages": [U("hi")],
            "chosen": A(r2["choices"][0]["message"]["content"]),
            "rejected": A(r1["choices"][0]["message"]["content"]),
        }
    ]


def test_rating_survives_sigkill(run_dir, tmp_path, cli_env):
    """SIGKILL the server right after it acknowledged a rating: the rating is in the file. The
    server's key comes from a file, so it is nowhere in the process list."""
    key = "file-key-0123456789abcdef"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    auth = {"Authorization": f"Bearer {key}"}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    db = tmp_path / "fb.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "chatforge.serve.command",
        "--model",
        str(run_dir),
        "--port",
        str(port),
        "--db",
        str(db),
        "--api-key-file",
        str(key_file),
    ]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert key.encode() not in cmdline and b"--api-key-file" in cmdline
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        body = {"model": "tinyrun", "messages": [U("hi")], "max_tokens": 3, "store": True}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30).json()
        mid = r["id"] + "-0"
        ack = httpx.post(
            url + "/v1/feedback",
            json={"message_id": mid, "rating": -1, "correction": "Hello!"},
            headers=auth,
            timeout=30,
        )
        assert ack.status_code == 200
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no checkpoint of the WAL
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(db) as con:  # a plain reader: the WAL is replayed on open
        rows = con.execute("SELECT rating, correction FROM ratings WHERE message_id = ?", (mid,)).fetchall()
    assert rows == [(-1, "Hello!")]
