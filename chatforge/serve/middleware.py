"""What stands in front of the routes: `Guard` (the Host header, the API key and its user, the body
size limit and read deadline, lone surrogates, and the security headers on every response) and
`add_error_handlers`, which answers every error in OpenAI's shape (FastAPI's 422 becomes a 400,
unknown URLs a 404, a crash a 500 naming only the exception type).

The Content-Security-Policy allows scripts, styles, images and connections from this server only,
so even a rendering bug in the page cannot load a remote image (a known way to leak a conversation
through its URL)."""

from __future__ import annotations

import asyncio
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.serve.auth import LOCAL, NOBODY, USER_SCOPE_KEY, Keys, host_of
from chatforge.serve.protocol import APIError, lone_surrogate, validation_error

UPLOAD_PATH = re.compile(r"/v1/collections/[^/]+/files")  # POST: files into a collection
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware in front of the routes, in this order: the Host header against the allow-list
    (400: a DNS-rebinding page's requests carry its own name), the API key (401; the caller's `User`
    goes into the scope for the routes), the body size limit (413), the body read deadline (408: a
    client that trickles its body cannot hold a connection for long), and lone surrogates (400).
    Every response gets the security headers. Pure ASGI, so a rejected request's body is never
    parsed."""

    def __init__(
        self,
        app,
        *,
        keys: Keys,
        hosts: list[str] | None,
        max_body_bytes: int,
        body_timeout: float,
        upload_body_bytes: int = 0,
    ) -> None:
        self.app, self.keys, self.max_body, self.body_timeout = app, keys, max_body_bytes, body_timeout
        self.upload_body = upload_body_bytes  # file uploads into a collection may be larger (routes_rag.py)
        self.hosts = None if hosts is None or "*" in hosts else {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secure_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def refuse(err: APIError) -> None:
            await err.response()(scope, receive, secure_send)

        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and host_of(headers.get(b"host", b"")) not in self.hosts:
            return await refuse(
                APIError(
                    400,
                    "This server does not answer to that Host header "
                    "(its owner can add the name with --allowed-hosts).",
                    code="invalid_host",
                )
            )
        user = LOCAL
        if self.keys:
            given = headers.get(b"authorization", b"").decode("latin-1")
            given = given[7:].strip() if given[:7].lower() == "bearer " else ""
            found = self.keys.lookup(given) if given else None
            if found is None and scope["path"].startswith("/v1/"):
                msg = (
                    "Incorrect API key provided."
                    if given
                    else "You didn't provide an API key (Authorization: Bearer KEY)."
                )
                return await refuse(APIError(401, msg, code="invalid_api_key"))
            user = found or NOBODY  # the page and /health need no key
        scope[USER_SCOPE_KEY] = user
        limit = self.max_body
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        if self.upload_body and scope["method"] == "POST" and UPLOAD_PATH.fullmatch(scope["path"]):
            limit = self.upload_body
            too_big = APIError(
                413, f"The upload is larger than this server's limit ({limit} bytes of JSON with the files in "
                "base64); send fewer files at a time", code="upload_too_large",
            )  # fmt: skip
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await refuse(too_big)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True  # read the body here (bounded in size and time)
            deadline = asyncio.get_running_loop().time() + self.body_timeout
            while more:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    message = await asyncio.wait_for(receive(), max(left, 0))
                except TimeoutError:
                    slow = f"The request body did not arrive within {self.body_timeout:g} s."
                    return await refuse(APIError(408, slow, code="request_timeout"))
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    return await refuse(too_big)
            body = b"".join(chunks)
            if lone_surrogate(body):
                return await refuse(
                    APIError(
                        400,
                        "The request body holds a lone UTF-16 surrogate (\\uD800-\\uDFFF without its pair); "
                        "send valid Unicode text.",
                        code="invalid_unicode",
                    )
                )
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, secure_send)
        await self.app(scope, receive, secure_send)


async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError):
    return validation_error(exc).response()


async def _http(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        return APIError(
            404, f"Unknown URL {request.method} {request.url.path}", code="unknown_url"
        ).response()
    if exc.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()
    return APIError(exc.status_code, str(exc.detail)).response()


async def _crash(request: Request, exc: Exception):
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
