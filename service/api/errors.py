"""Every error the API returns, mapped in one place to a status code and the one JSON shape
`{"error": {"type": ..., "message": ...}}`; on the OpenAI-compatible `/v1` routes the same errors
take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (our type is the `code`),
and a request that fails validation there is a 400, as OpenAI answers. Nothing below the routes
raises HTTPException. The limits middleware (`service.api.limits`) answers 413 `body_too_large` and
429 `too_many_requests` in the same shapes. No body carries internals (driver messages, hosts, tracebacks): what a
database or an unexpected error said goes to the server log, the client gets a fixed message."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from horen_core.errors import CorruptStateError, InvalidInputError, UnknownEditError
from service.auth import AdminDisabledError, EditsDisabledError, ForbiddenError, UnauthorizedError
from service.editing import EditConflictError
from service.imports import ImportFinishedError, ImportNotFoundError
from service.transfer import CodebookNotEmptyError, IdentityMismatchError, MalformedArchiveError
from service.worker import NotReadyError, QueueFullError

log = logging.getLogger("horen.api")


class KeyNotFoundError(LookupError):
    """No stored API key with that id."""


class KeyNameTakenError(Exception):
    """An API key with that name exists already."""


class BodyTooLargeError(Exception):
    """A streamed request body (a codebook import) grew past its limit while it was read."""


class ModelNotFoundError(LookupError):
    """A /v1 request names a model this service does not serve."""


class UnsupportedOptionError(ValueError):
    """A /v1 option outside what this service supports (n > 1, echo, ...); ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


DB_UNAVAILABLE = "the database is unavailable; retry later"

# exception type -> (HTTP status, error type, fixed public message or None for the exception's own);
# the first match in order wins. A fixed message means the exception's text is logged, not sent.
ERROR_TABLE: list[tuple[type[BaseException], int, str, str | None]] = [
    (InvalidInputError, 422, "invalid_input", None),
    (UnsupportedOptionError, 400, "unsupported_option", None),
    (UnknownEditError, 404, "not_found", None),
    (KeyNotFoundError, 404, "not_found", None),
    (ModelNotFoundError, 404, "model_not_found", None),
    (UnauthorizedError, 401, "unauthorized", None),
    (ForbiddenError, 403, "forbidden", None),
    (AdminDisabledError, 403, "admin_disabled", None),
    (EditsDisabledError, 403, "edits_disabled", None),
    (KeyNameTakenError, 409, "conflict", None),
    (ImportNotFoundError, 404, "not_found", None),
    (ImportFinishedError, 409, "conflict", None),
    (QueueFullError, 503, "overloaded", None),
    (NotReadyError, 503, "not_ready", None),
    (EditConflictError, 409, "conflict", None),
    (IdentityMismatchError, 409, "conflict", None),
    (CodebookNotEmptyError, 409, "conflict", None),
    (MalformedArchiveError, 400, "malformed_archive", None),
    (BodyTooLargeError, 413, "body_too_large", None),
    (CorruptStateError, 500, "corrupt_state", None),
    (sa.IntegrityError, 409, "conflict", "the request conflicts with what is stored"),
    (sa.DataError, 422, "invalid_input", "the database refused a value of this request"),
    # unreachable, failing, read-only, full, locked for too long: nothing was written, retrying may work
    (sa.DBAPIError, 503, "database_unavailable", DB_UNAVAILABLE),
    (sa.TimeoutError, 503, "database_unavailable", DB_UNAVAILABLE),
    (sa.DisconnectionError, 503, "database_unavailable", DB_UNAVAILABLE),
]


class ErrorDetail(BaseModel):
    type: str = Field(description="stable, machine-readable: not_found, validation_error, database_unavailable, ...")
    message: str


class ErrorOut(BaseModel):
    """Every error of the non-/v1 routes."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = Field(description="our error type")


class OpenAIErrorOut(BaseModel):
    """Every error of the /v1 routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


_WHY = {
    400: "invalid request (malformed JSON, an unsupported option)",
    401: "no valid API key",
    403: "the key's role does not allow this, or admin routes or anonymous edits are off",
    404: "no such resource",
    409: "a conflict with what is stored",
    413: "request body larger than HOREN_MAX_BODY_BYTES",
    422: "the request failed validation (limits: see the settings)",
    429: "too many requests of this client in flight (HOREN_MAX_CLIENT_CONCURRENCY); see Retry-After",
    503: "not ready, overloaded or the database is unavailable; see Retry-After",
}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for these error statuses, with the error schema and Retry-After
    where the service sends it."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        entry: dict = {"model": OpenAIErrorOut if openai else ErrorOut, "description": _WHY.get(status, "error")}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[status] = entry
    return out


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, error type, public message) of an exception; unknown ones are a 500 with a fixed
    message. Exceptions with a fixed message are logged here, so their detail stays server-side."""
    for exc_type, status, kind, public in ERROR_TABLE:
        if isinstance(exc, exc_type):
            if public is None:
                return status, kind, str(exc) or kind
            log.warning("%s (%d): %s", kind, status, _first_line(exc))
            return status, kind, public
    log.error("unexpected error", exc_info=exc)
    return 500, "internal", "internal error; the server log has the details"


def _first_line(exc: BaseException) -> str:
    # a database that is down needs one line per request in the log, not a traceback
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"


# HTTP status -> OpenAI's error type, for /v1 routes
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error"}


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def openai_error_body(status: int, kind: str, message: str, param: str | None = None) -> dict:
    openai_type = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": openai_type, "param": param, "code": kind}}


def is_openai_route(req: Request) -> bool:
    return req.url.path.startswith("/v1/")


def retry_after(kind: str, retry_db: int = 2) -> str:
    return str(retry_db) if kind == "database_unavailable" else "1"


def error_response(
    path: str,
    status: int,
    kind: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    retry_db: int = 2,
) -> JSONResponse:
    """The error response for a request to ``path`` (OpenAI's shape under /v1/)."""
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", retry_after(kind, retry_db))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    openai = path.startswith("/v1/")
    if openai and status == 422:
        status = 400  # OpenAI answers every invalid request with 400
    body = openai_error_body(status, kind, message, param) if openai else error_body(kind, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _response(req: Request, status: int, kind: str, message: str, param: str | None = None, headers=None):
    retry_db = getattr(getattr(req.app.state, "settings", None), "db_retry_after", 2)
    return error_response(req.url.path, status, kind, message, param, headers, retry_db)


def _allowed_methods(req: Request) -> list[str]:
    scope = {"type": "http", "path": req.url.path, "root_path": "", "method": "", "headers": []}
    matched = [route for route in _routes(req.app.router.routes) if _matches(route, scope)]
    literal = [route for route in matched if "{" not in route.path]  # /edits/batch, not /edits/{edit_id}
    return sorted({m for route in literal or matched for m in route.methods})


def _routes(routes) -> list:
    """Leaf routes with methods, also those of included routers."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out += _routes(inner.routes)
        elif getattr(route, "methods", None) and getattr(route, "include_in_schema", True):
            out.append(route)
    return out


def _matches(route, scope: dict) -> bool:
    return route.matches(scope)[0] != Match.NONE


def install_error_handlers(app: FastAPI) -> None:
    async def handler(req: Request, exc: Exception) -> JSONResponse:
        status, kind, message = classify(exc)
        return _response(req, status, kind, message, getattr(exc, "param", None))

    for exc_type, *_ in ERROR_TABLE:
        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def validation(req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _response(req, 400, "malformed_json", "request body is not valid JSON")
        parts, params = [], []
        for e in errors:
            where = [str(x) for x in e.get("loc", ()) if x != "body"]
            loc = ".".join(where)
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
            params.append(where[0] if where else None)
        status = 400 if is_openai_route(req) else 422
        return _response(req, status, "validation_error", "; ".join(parts), params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}
        kind = kinds.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names the first matching route's methods, not all of them
            headers["Allow"] = ", ".join(_allowed_methods(req))
        return _response(req, exc.status_code, kind, str(exc.detail), headers=headers)

    app.add_exception_handler(Exception, handler)
