"""Every error the API returns, mapped in one place to a status code and the one JSON shape
`{"error": {"type": ..., "message": ...}}`; on the OpenAI-compatible `/v1` routes the same errors
take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (our type is the `code`),
and a request that fails validation there is a 400, as OpenAI answers. Nothing below the routes
raises HTTPException."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from horen_core.errors import CorruptStateError, InvalidInputError
from service.auth import AdminDisabledError, EditsDisabledError, ForbiddenError, UnauthorizedError
from service.engine import EditConflictError, EditNotFoundError, NotReadyError, QueueFullError


class KeyNotFoundError(LookupError):
    """No stored API key with that id."""


class KeyNameTakenError(Exception):
    """An API key with that name exists already."""


class ModelNotFoundError(LookupError):
    """A /v1 request names a model this service does not serve."""


class UnsupportedOptionError(ValueError):
    """A /v1 option outside what this service supports (n > 1, echo, ...); ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# exception type -> (HTTP status, error type); the first match in order wins
ERROR_TABLE: list[tuple[type[BaseException], int, str]] = [
    (InvalidInputError, 422, "invalid_input"),
    (UnsupportedOptionError, 400, "unsupported_option"),
    (EditNotFoundError, 404, "not_found"),
    (KeyNotFoundError, 404, "not_found"),
    (ModelNotFoundError, 404, "model_not_found"),
    (UnauthorizedError, 401, "unauthorized"),
    (ForbiddenError, 403, "forbidden"),
    (AdminDisabledError, 403, "admin_disabled"),
    (EditsDisabledError, 403, "edits_disabled"),
    (KeyNameTakenError, 409, "conflict"),
    (QueueFullError, 503, "overloaded"),
    (NotReadyError, 503, "not_ready"),
    (EditConflictError, 409, "conflict"),
    (CorruptStateError, 500, "corrupt_state"),
]


# HTTP status -> OpenAI's error type, for /v1 routes
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error"}


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def openai_error_body(status: int, kind: str, message: str, param: str | None = None) -> dict:
    openai_type = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": openai_type, "param": param, "code": kind}}


def is_openai_route(req: Request) -> bool:
    return req.url.path.startswith("/v1/")


def _response(req: Request, status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    body = openai_error_body(status, kind, message, param) if is_openai_route(req) else error_body(kind, message)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, status, kind in ERROR_TABLE:

        async def handler(req: Request, exc: BaseException, status: int = status, kind: str = kind) -> JSONResponse:
            if is_openai_route(req) and status == 422:
                status = 400  # OpenAI answers every invalid request with 400
            return _response(req, status, kind, str(exc) or kind, getattr(exc, "param", None))

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
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return _response(req, exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(req: Request, exc: Exception) -> JSONResponse:
        return _response(req, 500, "internal", f"{type(exc).__name__}: {exc}")
