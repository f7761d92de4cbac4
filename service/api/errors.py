"""Every error the API returns, mapped in one place to a status code and the one JSON shape
`{"error": {"type": ..., "message": ...}}`. Nothing below the routes raises HTTPException."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from horen_core.errors import CorruptStateError, InvalidInputError
from service.engine import EditConflictError, EditNotFoundError, NotReadyError, QueueFullError


class UnauthorizedError(Exception):
    """Missing or wrong admin token."""


class AdminDisabledError(Exception):
    """No admin token is configured, so admin routes are off."""


# exception type -> (HTTP status, error type); the first match in order wins
ERROR_TABLE: list[tuple[type[BaseException], int, str]] = [
    (InvalidInputError, 422, "invalid_input"),
    (EditNotFoundError, 404, "not_found"),
    (UnauthorizedError, 401, "unauthorized"),
    (AdminDisabledError, 403, "admin_disabled"),
    (QueueFullError, 503, "overloaded"),
    (NotReadyError, 503, "not_ready"),
    (EditConflictError, 409, "conflict"),
    (CorruptStateError, 500, "corrupt_state"),
]


def error_body(kind: str, message: str) -> dict:
    return {"error": {"type": kind, "message": message}}


def _response(status: int, kind: str, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, status, kind in ERROR_TABLE:

        async def handler(_req: Request, exc: BaseException, status: int = status, kind: str = kind) -> JSONResponse:
            return _response(status, kind, str(exc) or kind)

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _response(400, "malformed_json", "request body is not valid JSON")
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return _response(422, "validation_error", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return _response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_req: Request, exc: Exception) -> JSONResponse:
        return _response(500, "internal", f"{type(exc).__name__}: {exc}")
