"""What stands in front of the routes: `Guard` (the API key, the body size limit, and the security
headers on every response) and `add_error_handlers`, which answers every error in OpenAI's shape
(FastAPI's 422 becomes a 400, unknown URLs a 404, a crash a 500 naming only the exception type).

The Content-Security-Policy allows scripts, styles, images and connections from this server only,
so even a rendering bug in the page cannot load a remote image (a known way to leak a conversation
through its URL)."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.serve.protocol import APIError, validation_error

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
    """ASGI middleware in front of the routes: the API key (401), the body size limit (413), and the
    security headers on every response. Pure ASGI, so a rejected request's body is never parsed."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secure_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = (
                    "Incorrect API key provided."
                    if given
                    else "You didn't provide an API key (Authorization: Bearer KEY)."
                )
                err = APIError(401, msg, code="invalid_api_key")
                return await err.response()(scope, receive, secure_send)
        too_big = APIError(
            413, f"The request body is larger than {self.max_body} bytes.", code="request_too_large"
        )
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await too_big.response()(scope, receive, secure_send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True  # read the body here (bounded), then hand it on
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await too_big.response()(scope, receive, secure_send)
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
