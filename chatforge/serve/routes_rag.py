"""Collections on the server (the web page's documents): list, create, upload files into, delete,
and read a chunk a citation points to. Ingest is `chatforge rag add`'s own code
(`rag.command.add_documents` -> `Collection.ingest`), run in the thread pool so the event loop
keeps answering while a file is embedded.

Who owns what, as with conversations: a user's collections live in their own folder,
ROOT/_users/USER/NAME (no collection name starts with "_", so `chatforge rag list` never sees
these folders), and they see only those. An admin's collections are ROOT/NAME, the ones `chatforge
rag add` makes, and an admin sees everyone's: another user's as "USER:NAME". Another user's
collection is "not found", the same answer as one that does not exist. On a server without keys the
one caller is the local admin.

`serve --shared-collections NAME` lets every user read an admin's collection NAME and ask about it
(their own collection of that name, if they have one, comes first); only admins change it.

Uploads are JSON, {"files": [{"name", "content": base64}]}, not multipart: the body passes the same
size and time limits as every request (middleware.Guard reads it whole in any case, so a streaming
multipart parser would gain nothing) and no parser dependency is added."""

from __future__ import annotations

import base64
import binascii
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

from fastapi import APIRouter

from chatforge.errors import ChatforgeError
from chatforge.rag.command import add_documents
from chatforge.rag.embed import get_embedder
from chatforge.rag.extract import file_format
from chatforge.rag.store import Collection, check_name, collection_exists, list_collections
from chatforge.serve.auth import USER_NAME, User
from chatforge.serve.protocol import APIError, CollectionCreate, UploadRequest
from chatforge.serve.state import Caller, ServerState, State

USERS_DIR = "_users"  # under the collections folder; "_" starts no collection name
INGEST_WAIT_S = 10.0  # an upload waits this long for the one before it, then gets a 429
log = logging.getLogger("chatforge.rag")
router = APIRouter()


@dataclass(frozen=True)
class Place:
    """Where a collection the caller may use lives: `root / name`, owned by `owner` (None: the
    admins'), and how the caller names it (`ident`)."""

    root: Path
    name: str
    owner: str | None
    ident: str
    shared: bool = False  # an admins' collection every user may read (serve --shared-collections)

    @property
    def exists(self) -> bool:
        return collection_exists(self.name, self.root)


def user_folder(user: str) -> str:
    """A user's folder name: the name itself when it is a plain folder name, else "_" + its hex
    (user names may be "..", or hold "@")."""
    try:
        check_name(user)
    except ChatforgeError:
        return "_" + user.encode().hex()
    return user


def folder_user(folder: str) -> str | None:
    if not folder.startswith("_"):
        return folder
    try:
        return bytes.fromhex(folder[1:]).decode()
    except ValueError:
        return None


def place_for(srv: ServerState, user: User, ident: str, *, param: str | None = None, missing: int = 404) -> Place:
    """The collection `ident` names for `user` ("NAME", or "USER:NAME" for an admin), checked to
    exist; `missing` is the status for one that does not, or is not theirs."""
    if not user.name:
        raise APIError(401, "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key")
    owner, sep, name = ident.rpartition(":")
    try:
        check_name(name)
    except ChatforgeError as e:
        raise APIError(400, str(e), param=param) from None
    base = srv.rag.base
    if not sep:
        owner = None if user.admin else user.name
    elif not USER_NAME.fullmatch(owner) or not (user.admin or owner == user.name):
        raise _missing(ident, missing, param)
    return Place(base if owner is None else base / USERS_DIR / user_folder(owner), name, owner, ident)


def existing(srv: ServerState, user: User, ident: str, *, param: str | None = None, missing: int = 404) -> Place:
    """A collection the caller may change: their own (an admin: anyone's)."""
    place = place_for(srv, user, ident, param=param, missing=missing)
    if not place.exists:
        if _shared(srv, user, ident) is not None:
            raise _read_only(ident, param)
        raise _missing(ident, missing, param)
    return place


def readable(srv: ServerState, user: User, ident: str, *, param: str | None = None, missing: int = 404) -> Place:
    """A collection the caller may read and ask about: their own, else a shared one of that name."""
    place = place_for(srv, user, ident, param=param, missing=missing)
    if place.exists:
        return place
    shared = _shared(srv, user, ident)
    if shared is None:
        raise _missing(ident, missing, param)
    return shared


def _shared(srv: ServerState, user: User, ident: str) -> Place | None:
    """The shared collection `ident` names, for a caller who is not an admin (admins reach it anyway)."""
    if user.admin or ident not in srv.rag.shared:
        return None
    place = Place(srv.rag.base, ident, None, ident, shared=True)
    return place if place.exists else None


def _read_only(ident: str, param: str | None) -> APIError:
    return APIError(
        403, f"collection {ident!r} is shared by this server's admins and is read-only; "
        "upload to a collection of your own under another name", param=param, code="read_only",
    )  # fmt: skip


def _missing(ident: str, status: int, param: str | None) -> APIError:
    return APIError(
        status, f"no collection {ident!r}; GET /v1/collections lists yours, or upload files to make it",
        param=param, code="not_found",
    )  # fmt: skip


def _places(srv: ServerState, user: User) -> list[Place]:
    """The collections `user` sees: their own and the shared ones; for an admin, everyone's."""
    base = srv.rag.base
    if not user.admin:
        root = base / USERS_DIR / user_folder(user.name)
        own = list_collections(root)
        shared = [_shared(srv, user, n) for n in srv.rag.shared if n not in own]  # their own comes first
        return [Place(root, n, user.name, n) for n in own] + [p for p in shared if p is not None]
    out = [Place(base, n, None, n, shared=n in srv.rag.shared) for n in list_collections(base)]
    users = base / USERS_DIR
    for folder in sorted(users.iterdir()) if users.is_dir() else []:
        owner = folder_user(folder.name)
        if owner is not None:
            out += [Place(folder, n, owner, f"{owner}:{n}") for n in list_collections(folder)]
    return out


def _summary(place: Place, coll: Collection, documents: bool = False, user: User | None = None) -> dict:
    docs = coll.documents()
    out = {
        "id": place.ident, "object": "collection", "name": place.name, "owner": place.owner,
        "documents": len(docs), "chunks": coll.n_chunks(), "embedding": coll.embedding,
        "shared": place.shared, "writable": user is None or user.admin or not place.shared,
    }  # fmt: skip
    if documents:  # never `source`: for files added by `chatforge rag add` it is a path on the server
        out["data"] = [{k: d[k] for k in ("id", "name", "chunks", "sha256", "added")} for d in docs]
    return out


def _open(place: Place) -> Collection:
    return Collection.open(place.name, place.root)


# ---- routes ----------------------------------------------------------------------------------
# plain `def`: FastAPI runs them in the thread pool, off the event loop (SQLite, embedding, disk)
@router.get("/v1/collections")
def list_user_collections(srv: State, user: Caller) -> dict:
    out = []
    for place in _places(srv, user):
        coll = _open(place)
        try:
            out.append(_summary(place, coll, user=user))
        finally:
            coll.close()
    return {"object": "list", "data": out}


@router.post("/v1/collections")
def create_collection(req: CollectionCreate, srv: State, user: Caller) -> dict:
    try:
        check_name(req.name)  # the caller's own: no "USER:" in front
    except ChatforgeError as e:
        raise APIError(400, str(e), param="name") from None
    place = place_for(srv, user, req.name, param="name")
    if place.exists:
        raise APIError(409, f"collection {req.name!r} exists already; upload files to it, or pick another name", param="name")
    if _shared(srv, user, req.name) is not None:
        raise _read_only(req.name, "name")
    embedding = req.embedding or srv.rag.embedding
    try:
        get_embedder(embedding)  # an unknown model or a missing extra is said before a folder is made
    except ChatforgeError as e:
        raise APIError(400, str(e), param="embedding") from None
    coll = Collection.open(place.name, place.root, create_with=embedding)
    try:
        return _summary(place, coll)
    finally:
        coll.close()


@router.get("/v1/collections/{ident}")
def get_collection(ident: str, srv: State, user: Caller) -> dict:
    place = readable(srv, user, ident)
    coll = _open(place)
    try:
        return _summary(place, coll, documents=True, user=user)
    finally:
        coll.close()


@router.delete("/v1/collections/{ident}")
def delete_collection(ident: str, srv: State, user: Caller) -> dict:
    place = existing(srv, user, ident)
    with ingest_turn(srv):  # not while a file is being added to it
        shutil.rmtree(place.root / place.name)
    return {"id": place.ident, "object": "collection.deleted", "deleted": True}


@router.delete("/v1/collections/{ident}/files/{doc_id}")
def delete_document(ident: str, doc_id: int, srv: State, user: Caller) -> dict:
    place = existing(srv, user, ident)
    coll = _open(place)
    try:
        doc = next((d for d in coll.documents() if d["id"] == doc_id), None)
        if doc is None:
            raise APIError(404, f"no document {doc_id} in collection {ident!r}", code="not_found")
        coll.remove(doc["source"])
    finally:
        coll.close()
    return {"id": doc_id, "object": "collection.document.deleted", "name": doc["name"], "deleted": True}


@router.get("/v1/collections/{ident}/chunks/{chunk_id}")
def get_chunk(ident: str, chunk_id: int, srv: State, user: Caller) -> dict:
    """The chunk a citation points to (the chat answer's documents[i].chunk_id)."""
    place = readable(srv, user, ident)
    coll = _open(place)
    try:
        found = coll.chunks([chunk_id])
    finally:
        coll.close()
    if not found:
        raise APIError(404, f"no chunk {chunk_id} in collection {ident!r} (re-added or removed since?)", code="not_found")
    c = found[0]
    return {"id": c.id, "object": "collection.chunk", "collection": place.ident, "document": c.name,
            "heading": c.heading, "text": c.text}  # fmt: skip


@router.post("/v1/collections/{ident}/files")
def upload_files(ident: str, req: UploadRequest, srv: State, user: Caller) -> dict:
    """Add files to a collection (made if absent, as `chatforge rag add` makes it); a file with the
    name of one already there replaces it, the same bytes again are skipped. A file that cannot be
    read is named in "files" and the rest land; when none lands it is a 400."""
    place = place_for(srv, user, ident)
    if not place.exists and _shared(srv, user, ident) is not None:
        raise _read_only(ident, None)
    files = _decoded(srv, req)
    with ingest_turn(srv):
        made = not place.exists
        if made and ":" in ident:  # an admin adds to another user's collections, never makes one for them
            raise _missing(ident, 404, None)
        try:
            embedding = srv.rag.embedding if made else _embedding_of(place)
            embedder = get_embedder(embedding)
        except ChatforgeError as e:
            raise APIError(400, str(e), param="files") from None
        coll = Collection.open(place.name, place.root, create_with=embedding if made else None)
        try:
            _check_room(srv, coll, [name for name, _ in files])
            items = [(name, name, lambda data=data: data) for name, data in files]
            result = add_documents(coll, items, embedder, log=log.info)
            summary = _summary(place, coll)
        finally:
            coll.close()
        if result["failed"] == len(files):
            if made:  # nothing landed: leave no empty collection behind
                shutil.rmtree(place.root / place.name, ignore_errors=True)
            raise APIError(400, result["files"][0]["error"], param="files")
    return {"object": "collection.upload", "collection": summary, "files": result["files"], "chunks": result["chunks"]}


def _embedding_of(place: Place) -> str:
    coll = _open(place)
    try:
        return coll.embedding
    finally:
        coll.close()


def _decoded(srv: ServerState, req: UploadRequest) -> list[tuple[str, bytes]]:
    """The request's files as (name, bytes), every limit checked before any work: how many, a plain
    file name of a known format, valid base64, the bytes together within the server's limit."""
    limits = srv.rag
    if len(req.files) > limits.max_files:
        raise APIError(400, f"at most {limits.max_files} files per upload, got {len(req.files)}; send them in parts", param="files")
    out, total = [], 0
    for i, f in enumerate(req.files):
        name = f.name.strip()
        if PurePath(name).name != name or "\\" in name or not name.isprintable():
            raise APIError(400, f"files[{i}].name: give a plain file name (no folders), got {f.name!r}", param=f"files.{i}.name")
        try:
            file_format(name)
        except ChatforgeError as e:
            raise APIError(400, str(e), param=f"files.{i}.name") from None
        try:
            data = base64.b64decode(f.content, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{name}: content is not base64", param=f"files.{i}.content") from None
        total += len(data)
        if total > limits.max_upload_bytes:
            raise APIError(
                413, f"the files are larger than this server's upload limit of {_size(limits.max_upload_bytes)}; "
                "send fewer at a time, or ask for a larger --max-upload-mb", param="files", code="upload_too_large",
            )  # fmt: skip
        out.append((name, data))
    if len({name for name, _ in out}) < len(out):
        raise APIError(400, "two files have the same name; rename one", param="files")
    return out


def _check_room(srv: ServerState, coll: Collection, names: list[str]) -> None:
    have = {d["source"] for d in coll.documents()}
    new = [n for n in names if n not in have]
    if len(have) + len(new) > srv.rag.max_documents:
        raise APIError(
            400, f"collection {coll.name!r} would hold {len(have) + len(new)} documents; this server allows "
            f"{srv.rag.max_documents} per collection (delete some, or use another collection)", param="files",
        )  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


@contextmanager
def ingest_turn(srv: ServerState) -> Iterator[None]:
    """One ingest (or collection delete) at a time per server: embedding is CPU-heavy. An upload
    waits INGEST_WAIT_S for the one before it, then is told to try again (429)."""
    if not srv.ingest_lock.acquire(timeout=INGEST_WAIT_S):
        raise APIError(429, "another upload is being added; try again in a moment", code="busy")
    try:
        yield
    finally:
        srv.ingest_lock.release()
