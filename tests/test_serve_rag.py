"""Collections on the server (serve/routes_rag.py): upload files (JSON + base64) through `chatforge rag
add`'s own ingest, list, read a cited chunk, delete; each user sees only their own collections (an
admin everyone's), also through the chat request's `collection` field; bad uploads are one-line
4xx errors before any work; ingest runs off the event loop."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.rag.command import add_files
from chatforge.rag.embed import EMBEDDERS, HashEmbedder
from chatforge.rag.store import Collection
from chatforge.serve.auth import Keys, User
from chatforge.tokenizer import Tokenizer

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from chatforge.serve import routes_rag  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.serve.state import RagSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ALICE, BOB, ADMIN = "alice-key-0123456789", "bob-key-0123456789ab", "admin-key-0123456789"
KEEPER = "# Lighthouse\n\nThe lighthouse keeper is Marta Quill. She lives on Gull Rock.\n"
TEA = "Tea is brewed at ninety degrees. The kettle is copper.\n"
QUESTION = "Who is the lighthouse keeper?"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([KEEPER, TEA, QUESTION] * 20, 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=512, n_layer=1, n_embd=32, n_head=4, n_kv_head=2)).eval()


def client(model, tok, root, **limits) -> TestClient:
    keys = Keys()
    keys.add(ALICE, User("alice"))
    keys.add(BOB, User("bob"))
    rag = RagSettings(root=root, embedding=limits.pop("embedding", "hash-384"), **limits)
    app = create_app(model, tok, model_id="tiny", keys=keys, api_key=ADMIN, max_batch=2, rag=rag)
    return TestClient(app, base_url="http://localhost")


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(c, key, name, files: dict[str, bytes | str]):
    body = {"files": [{"name": n, "content": base64.b64encode(d.encode() if isinstance(d, str) else d).decode()}
                      for n, d in files.items()]}  # fmt: skip
    return c.post(f"/v1/collections/{name}/files", json=body, headers=auth(key))


def ask(c, key, collection, question=QUESTION):
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 4,
            "temperature": 0, "collection": collection}  # fmt: skip
    return c.post("/v1/chat/completions", json=body, headers=auth(key))


def test_upload_list_cite_and_delete(model, tok, tmp_path):
    with client(model, tok, tmp_path) as c:
        r = upload(c, ALICE, "notes", {"keeper.md": KEEPER, "tea.txt": TEA})
        assert r.status_code == 200, r.text
        assert [(f["name"], f["outcome"]) for f in r.json()["files"]] == [("keeper.md", "added"), ("tea.txt", "added")]
        assert r.json()["collection"] == {"id": "notes", "object": "collection", "name": "notes", "owner": "alice",
                                          "documents": 2, "chunks": 2, "embedding": "hash-384",
                                          "shared": False, "writable": True}  # fmt: skip
        # the same ingest as `chatforge rag add`: the chunks are what add_files makes of the same files
        (tmp_path / "cli").mkdir()
        for n, text in (("keeper.md", KEEPER), ("tea.txt", TEA)):
            (tmp_path / "cli" / n).write_text(text)
        ref = Collection.open("ref", tmp_path / "cli-root", create_with="hash-384")
        add_files(ref, [(tmp_path / "cli" / "keeper.md", "keeper.md"), (tmp_path / "cli" / "tea.txt", "tea.txt")], HashEmbedder())
        ref_chunks = ref.chunks([1, 2])
        ref.close()

        again = upload(c, ALICE, "notes", {"keeper.md": KEEPER})
        assert again.json()["files"] == [{"name": "keeper.md", "outcome": "unchanged", "chunks": 0}]
        listed = c.get("/v1/collections", headers=auth(ALICE)).json()["data"]
        assert [(x["id"], x["documents"]) for x in listed] == [("notes", 2)]
        docs = c.get("/v1/collections/notes", headers=auth(ALICE)).json()["data"]
        assert [d["name"] for d in docs] == ["keeper.md", "tea.txt"] and "source" not in docs[0]

        # the chat answer's documents carry chunk ids; the chunk route gives the cited text back
        r = ask(c, ALICE, "notes")
        assert r.status_code == 200, r.text
        documents = r.json()["documents"]
        assert documents[0]["id"] == 1 and documents[0]["source"] == "keeper.md"
        chunk = c.get(f"/v1/collections/notes/chunks/{documents[0]['chunk_id']}", headers=auth(ALICE)).json()
        assert chunk["document"] == "keeper.md" and chunk["heading"] == "Lighthouse"
        assert chunk["text"] == documents[0]["text"] == ref_chunks[0].text
        assert c.get("/v1/collections/notes/chunks/999", headers=auth(ALICE)).status_code == 404

        # deleting a document, then the collection
        keeper_id = next(d["id"] for d in docs if d["name"] == "keeper.md")
        assert c.delete(f"/v1/collections/notes/files/{keeper_id}", headers=auth(ALICE)).json()["deleted"]
        assert [d["name"] for d in c.get("/v1/collections/notes", headers=auth(ALICE)).json()["data"]] == ["tea.txt"]
        assert c.get(f"/v1/collections/notes/chunks/{documents[0]['chunk_id']}", headers=auth(ALICE)).status_code == 404
        assert c.delete("/v1/collections/notes", headers=auth(ALICE)).json()["deleted"]
        assert c.get("/v1/collections", headers=auth(ALICE)).json()["data"] == []
        gone = ask(c, ALICE, "notes")
        assert gone.status_code == 400 and gone.json()["error"]["param"] == "collection"


def test_collections_belong_to_their_user(model, tok, tmp_path):
    # a collection made with `chatforge rag add` in the server's folder is the admins'
    (tmp_path / "secret.txt").write_text("The vault code is 4711.\n")
    cli = Collection.open("ops", tmp_path / "root", create_with="hash-384")
    add_files(cli, [(tmp_path / "secret.txt", "secret.txt")], HashEmbedder())
    cli.close()
    with client(model, tok, tmp_path / "root") as c:
        assert upload(c, ALICE, "notes", {"keeper.md": KEEPER}).status_code == 200
        assert upload(c, BOB, "notes", {"tea.txt": TEA}).status_code == 200  # the same name, his own
        a = ask(c, ALICE, "notes").json()["documents"]
        b = ask(c, BOB, "notes").json()["documents"]
        assert {d["source"] for d in a} == {"keeper.md"} and {d["source"] for d in b} == {"tea.txt"}
        alice_chunk = a[0]["chunk_id"]

        # bob sees nothing of alice's, nor the admins', by any name: the same "not found" as for nothing
        assert [x["id"] for x in c.get("/v1/collections", headers=auth(BOB)).json()["data"]] == ["notes"]
        for path in ("/v1/collections/alice:notes", "/v1/collections/ops", f"/v1/collections/alice:notes/chunks/{alice_chunk}"):
            r = c.get(path, headers=auth(BOB))
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert c.delete("/v1/collections/alice:notes", headers=auth(BOB)).status_code == 404
        assert upload(c, BOB, "alice:notes", {"tea.txt": TEA}).status_code == 404
        for name in ("alice:notes", "ops"):
            r = ask(c, BOB, name)
            assert r.status_code == 400 and r.json()["error"]["param"] == "collection"
            assert "vault" not in r.text and str(tmp_path) not in r.text

        # the admin sees everyone's, another user's as USER:NAME, and can read and delete them
        listed = c.get("/v1/collections", headers=auth(ADMIN)).json()["data"]
        assert sorted((x["id"], x["owner"]) for x in listed) == [("alice:notes", "alice"), ("bob:notes", "bob"), ("ops", None)]
        chunk = c.get(f"/v1/collections/alice:notes/chunks/{alice_chunk}", headers=auth(ADMIN)).json()
        assert chunk["text"] == a[0]["text"] and chunk["collection"] == "alice:notes"
        assert {d["source"] for d in ask(c, ADMIN, "alice:notes").json()["documents"]} == {"keeper.md"}
        assert ask(c, ADMIN, "ops").status_code == 200
        assert c.delete("/v1/collections/bob:notes", headers=auth(ADMIN)).json()["deleted"]
        assert c.get("/v1/collections", headers=auth(BOB)).json()["data"] == []
        assert c.get("/v1/collections").status_code == 401  # no key, no collections


def test_shared_collections_are_read_only_for_users(model, tok, tmp_path):
    (tmp_path / "handbook.md").write_text(KEEPER)
    (tmp_path / "secret.txt").write_text("The vault code is 4711.\n")
    for name, file in (("handbook", "handbook.md"), ("ops", "secret.txt")):  # `chatforge rag add`'s, the admins'
        coll = Collection.open(name, tmp_path / "root", create_with="hash-384")
        add_files(coll, [(tmp_path / file, file)], HashEmbedder())
        coll.close()
    with client(model, tok, tmp_path / "root", shared=("handbook",)) as c:
        # every user lists, reads and asks about the shared one; the unshared "ops" stays the admins'
        listed = c.get("/v1/collections", headers=auth(BOB)).json()["data"]
        assert [(x["id"], x["owner"], x["shared"], x["writable"]) for x in listed] == [("handbook", None, True, False)]
        assert c.get("/v1/collections/ops", headers=auth(BOB)).status_code == 404
        r = ask(c, BOB, "handbook")
        assert r.status_code == 200 and {d["source"] for d in r.json()["documents"]} == {"handbook.md"}
        chunk = c.get(f"/v1/collections/handbook/chunks/{r.json()['documents'][0]['chunk_id']}", headers=auth(BOB))
        assert chunk.json()["text"] == r.json()["documents"][0]["text"]

        # nobody but an admin changes it: upload, create, delete a file or the whole, each a one-line 403
        doc_id = c.get("/v1/collections/handbook", headers=auth(BOB)).json()["data"][0]["id"]
        for r in (
            upload(c, BOB, "handbook", {"tea.txt": TEA}),
            c.post("/v1/collections", json={"name": "handbook"}, headers=auth(BOB)),
            c.delete(f"/v1/collections/handbook/files/{doc_id}", headers=auth(BOB)),
            c.delete("/v1/collections/handbook", headers=auth(BOB)),
        ):
            assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text
            assert "read-only" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
        assert [d["name"] for d in c.get("/v1/collections/handbook", headers=auth(BOB)).json()["data"]] == ["handbook.md"]

        # the admin sees it marked shared and may change it; a user's own collection of the name comes first
        admin = {x["id"]: x for x in c.get("/v1/collections", headers=auth(ADMIN)).json()["data"]}
        assert admin["handbook"]["shared"] and admin["handbook"]["writable"] and not admin["ops"]["shared"]
        assert upload(c, ADMIN, "handbook", {"tea.txt": TEA}).status_code == 200
        assert c.get("/v1/collections/handbook", headers=auth(ALICE)).json()["documents"] == 2
        own = Collection.open("handbook", tmp_path / "root" / "_users" / "alice", create_with="hash-384")
        add_files(own, [(tmp_path / "secret.txt", "mine.txt")], HashEmbedder())  # made before the share
        own.close()
        assert [(x["id"], x["owner"]) for x in c.get("/v1/collections", headers=auth(ALICE)).json()["data"]] == [("handbook", "alice")]
        assert {d["source"] for d in ask(c, ALICE, "handbook").json()["documents"]} == {"mine.txt"}
        assert upload(c, ALICE, "handbook", {"tea.txt": TEA}).status_code == 200  # hers to change


def test_shared_collections_must_exist(tmp_path):
    from chatforge.errors import ChatforgeError
    from chatforge.options import ServeOptions
    from chatforge.serve.command import rag_settings

    coll = Collection.open("handbook", tmp_path, create_with="hash-384")
    coll.close()
    opts = ServeOptions(model="x", rag_root=str(tmp_path), rag_embedding="hash-384", shared_collections=["handbook,handbook"])
    assert rag_settings(opts).shared == ("handbook",)
    with pytest.raises(ChatforgeError, match="--shared-collections wiki: no collection 'wiki'.*rag add --collection wiki"):
        rag_settings(ServeOptions(model="x", rag_root=str(tmp_path), shared_collections=["handbook", "wiki"]))


def test_bad_uploads_are_one_line_errors(model, tok, tmp_path):
    with client(model, tok, tmp_path, max_upload_bytes=2000, max_files=3, max_documents=3) as c:
        def error(r, status):
            assert r.status_code == status, r.text
            message = r.json()["error"]["message"]
            assert "\n" not in message and "Traceback" not in message
            return message

        assert ".exe" in error(upload(c, ALICE, "notes", {"tool.exe": "MZ"}), 400)
        assert "plain file name" in error(upload(c, ALICE, "notes", {"../keeper.md": KEEPER}), 400)
        bad64 = c.post("/v1/collections/notes/files", json={"files": [{"name": "a.txt", "content": "no base64!"}]}, headers=auth(ALICE))
        assert "base64" in error(bad64, 400)
        assert "upload limit" in error(upload(c, ALICE, "notes", {"big.txt": "word " * 500}), 413)
        huge = upload(c, ALICE, "notes", {"huge.txt": "word " * 20_000})  # over the body limit: refused unread
        assert huge.json()["error"]["code"] == "upload_too_large" and error(huge, 413)
        assert "at most 3 files" in error(upload(c, ALICE, "notes", {f"{i}.txt": TEA for i in range(4)}), 400)
        assert "collection name" in error(upload(c, ALICE, ".hidden", {"tea.txt": TEA}), 400)
        # a corrupt PDF alone: 400 naming it, and no collection is left behind
        assert "broken.pdf" in error(upload(c, ALICE, "notes", {"broken.pdf": b"%PDF-1.4 not really"}), 400)
        assert c.get("/v1/collections", headers=auth(ALICE)).json()["data"] == []
        # beside a good file: the good one lands and the response names the bad one
        r = upload(c, ALICE, "notes", {"broken.pdf": b"%PDF-1.4 not really", "tea.txt": TEA})
        assert r.status_code == 200
        assert [f.get("outcome", "failed") for f in r.json()["files"]] == ["failed", "added"]
        assert r.json()["files"][0]["error"].startswith("broken.pdf")
        assert upload(c, ALICE, "notes", {"a.txt": "one", "b.txt": "two"}).status_code == 200
        assert "allows 3 per collection" in error(upload(c, ALICE, "notes", {"c.txt": "three"}), 400)
        assert upload(c, ALICE, "notes", {"a.txt": "one, changed"}).json()["files"][0]["outcome"] == "replaced"
        made = c.post("/v1/collections", json={"name": "notes"}, headers=auth(ALICE))
        assert "exists already" in error(made, 409)
        assert "embedding" in error(c.post("/v1/collections", json={"name": "x", "embedding": "nope"}, headers=auth(ALICE)), 400)
        assert c.post("/v1/collections", json={"name": "empty"}, headers=auth(ALICE)).json()["documents"] == 0


class GatedEmbedder:
    """hash-384 that waits for a gate: an ingest that takes as long as the test wants."""

    name, dim = "gated-test", 384
    started, gate = threading.Event(), threading.Event()

    def embed(self, texts: list[str]) -> np.ndarray:
        GatedEmbedder.started.set()
        assert GatedEmbedder.gate.wait(20)
        return HashEmbedder().embed(texts)


def test_ingest_runs_off_the_event_loop(model, tok, tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDERS, GatedEmbedder.name, GatedEmbedder)
    monkeypatch.setattr(routes_rag, "INGEST_WAIT_S", 0.2)
    with client(model, tok, tmp_path, embedding=GatedEmbedder.name) as c:
        results = {}
        slow = threading.Thread(target=lambda: results.setdefault("r", upload(c, ALICE, "notes", {"keeper.md": KEEPER})))
        slow.start()
        try:
            assert GatedEmbedder.started.wait(20)
            # mid-ingest the server answers, and a second upload is told to come back
            assert c.get("/health").json()["status"] == "ok"
            assert c.get("/v1/collections", headers=auth(BOB)).status_code == 200
            busy = upload(c, BOB, "other", {"tea.txt": TEA})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"
        finally:
            GatedEmbedder.gate.set()
            slow.join(20)
        assert results["r"].status_code == 200 and results["r"].json()["chunks"] == 1


def test_every_format_uploads_as_rag_add_ingests_it(model, tok, tmp_path):
    from test_rag import make_fixtures

    words = make_fixtures(tmp_path / "files")
    files = {name: (tmp_path / "files" / name).read_bytes() for name in words}
    cli = Collection.open("cli", tmp_path / "cli", create_with="hash-384")
    add_files(cli, [(tmp_path / "files" / name, name) for name in words], HashEmbedder())
    expected = {(c.name, c.heading, c.text) for c in cli.chunks(list(range(1, cli.n_chunks() + 1)))}
    cli.close()
    with client(model, tok, tmp_path / "root") as c:
        r = upload(c, ALICE, "all", files)
        assert r.status_code == 200, r.text
        assert {f["name"]: f["outcome"] for f in r.json()["files"]} == dict.fromkeys(words, "added")
        n = r.json()["collection"]["chunks"]
        got = [c.get(f"/v1/collections/all/chunks/{i}", headers=auth(ALICE)).json() for i in range(1, n + 1)]
    assert {(g["document"], g["heading"], g["text"]) for g in got} == expected
    for name, word in words.items():
        assert any(word in g["text"] for g in got if g["document"] == name), name


def test_serve_options_check_the_upload_limits(tmp_path):
    from chatforge.errors import ChatforgeError
    from chatforge.options import ServeOptions
    from chatforge.serve.command import rag_settings

    opts = ServeOptions(model="x", rag_root=str(tmp_path), rag_embedding="hash-384", max_upload_mb=0.5, max_documents=7)
    assert rag_settings(opts) == RagSettings(root=tmp_path, embedding="hash-384", max_upload_bytes=2**19, max_documents=7)
    for bad in ({"max_upload_mb": 0}, {"max_documents": 0}, {"rag_embedding": "nope"}):
        with pytest.raises(ChatforgeError):
            rag_settings(ServeOptions(**{"model": "x", **bad}))
