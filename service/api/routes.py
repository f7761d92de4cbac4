"""HTTP routes: validation and status codes only. Work is submitted to the device thread as a typed
job and awaited as a future, so the event loop never runs torch; reads take a session of their own.
Each route names the role it needs (`service.auth`); the ops routes (/healthz, /readyz, /metrics)
need none."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BeforeValidator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from horen_core.errors import InvalidInputError
from service.api.errors import KeyNameTakenError, KeyNotFoundError, error_responses
from service.api.schemas import (
    MAX_ID,
    MAX_OFFSET,
    NO_NUL,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    AuditList,
    EditBatchCreate,
    EditBatchOut,
    EditCreate,
    EditList,
    EditOut,
    GenerateOut,
    GenerateRequest,
    Health,
)
from service.auth import KeyRing, Principal, new_key, sha256_hex
from service.db import repository as repo
from service.db.errors import DB_ERRORS
from service.jobs import EditJob, EditRequest, GenerateJob, Job, RollbackJob
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings

# what every route that needs a key may answer besides its own errors (400: a body that is not
# JSON; 413, 429: the limits middleware)
AUTHED = (400, 401, 403, 413, 422, 429, 503)
router = APIRouter(responses=error_responses(*AUTHED))
ops = APIRouter(tags=["ops"])


def _iso_only(v: Any) -> Any:
    # pydantic also reads a number as Unix time; the schema says ISO 8601 date-time, so only that is accepted
    if isinstance(v, str) and "T" not in v.upper():
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    return v


IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]
EditId = Annotated[int, Path(ge=1, le=MAX_ID, description="an edit's id")]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


# a session for the route's reads (or its own transaction), closed before the response is sent
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_metrics(runtime: RuntimeDep) -> Metrics:
    return runtime.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_keys(request: Request) -> KeyRing:
    return request.app.state.keys


_bearer = HTTPBearer(auto_error=False, description="an API key (HOREN_API_KEYS, /admin/keys or HOREN_ADMIN_TOKEN)")


def _role(needed: str):
    # a sync dependency: FastAPI runs it in the threadpool, where the key table lookup may block
    def dependency(
        keys: Annotated[KeyRing, Depends(get_keys)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        return keys.authorize(f"Bearer {credentials.credentials}" if credentials else None, needed)

    return dependency


Reader = Annotated[Principal, Depends(_role("read"))]
Editor = Annotated[Principal, Depends(_role("edit"))]
Admin = Annotated[Principal, Depends(_role("admin"))]


def check_metadata(metadata: dict[str, Any] | None, settings: Settings) -> None:
    """Raise ``InvalidInputError`` for metadata over HOREN_MAX_METADATA_BYTES or _DEPTH, or with text
    no database can store (NUL, lone surrogates)."""
    if not metadata:
        return
    _check_json(metadata, 1, settings.max_metadata_depth)
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > settings.max_metadata_bytes:
        raise InvalidInputError(
            f"metadata is {size} bytes as JSON; the limit is {settings.max_metadata_bytes} (HOREN_MAX_METADATA_BYTES)"
        )


def _check_json(value: Any, depth: int, limit: int) -> None:
    """Walk a JSON value at nesting ``depth``, stopping (with ``InvalidInputError``) past ``limit``."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInputError("metadata must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("metadata must be valid Unicode text (no lone surrogates)") from None
    elif isinstance(value, dict | list):
        if depth > limit:
            raise InvalidInputError(f"metadata is nested deeper than {limit} levels (HOREN_MAX_METADATA_DEPTH)")
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(k, str):
                _check_json(k, depth, limit)
            _check_json(v, depth + 1, limit)


async def run_job(runtime: Runtime, job: Job) -> Any:
    return await asyncio.wrap_future(runtime.submit(job))


_EDIT_LINKS = {
    "GetEdit": {"operationId": "get_edit_edits__edit_id__get", "parameters": {"edit_id": "$response.body#/id"}},
    "RollbackEdit": {
        "operationId": "rollback_admin_edits__edit_id__rollback_post",
        "parameters": {"edit_id": "$response.body#/id"},
    },
}


@router.post(
    "/edits",
    status_code=201,
    response_model=EditOut,
    tags=["edits"],
    responses={201: {"links": _EDIT_LINKS}, **error_responses(409)},
)
async def create_edit(body: EditCreate, request: Request, runtime: RuntimeDep, who: Editor) -> EditOut:
    """Train prompt -> target into the codebook; answers after the edit is committed."""
    check_metadata(body.metadata, request.app.state.settings)
    (row,) = await run_job(runtime, EditJob(edits=[EditRequest(**body.model_dump())], by=who.name))
    return EditOut.from_row(row)


@router.post(
    "/edits/batch", status_code=201, response_model=EditBatchOut, tags=["edits"], responses=error_responses(409)
)
async def create_edits(body: EditBatchCreate, request: Request, runtime: RuntimeDep, who: Editor) -> dict:
    """Apply many edits in order; each is committed on its own."""
    settings = request.app.state.settings
    if len(body.edits) > settings.max_batch_edits:
        raise InvalidInputError(f"at most {settings.max_batch_edits} edits in one batch (HOREN_MAX_BATCH_EDITS)")
    for e in body.edits:
        check_metadata(e.metadata, settings)
    rows = await run_job(runtime, EditJob(edits=[EditRequest(**e.model_dump()) for e in body.edits], by=who.name))
    return {"items": [EditOut.from_row(r) for r in rows]}


@router.get("/edits", response_model=EditList, tags=["edits"])
def list_edits(
    runtime: RuntimeDep,
    session: SessionDep,
    _who: Reader,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[Literal["active", "rolled_back"] | None, Query()] = None,
    q: Annotated[
        str | None, Query(max_length=500, pattern=NO_NUL, description="text search on prompt and target")
    ] = None,
) -> dict:
    codebook = runtime.served_codebook()
    items, total = repo.list_edits(session, codebook, limit=limit, offset=offset, status=status, q=q)
    return {"items": [EditOut.from_row(e) for e in items], "total": total}


@router.api_route("/edits/batch", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def edits_batch_other_methods() -> None:
    """Keeps ``/edits/batch`` from being read as ``/edits/{edit_id}`` by methods it does not have."""
    raise StarletteHTTPException(405)


@router.get("/edits/{edit_id}", response_model=EditOut, tags=["edits"], responses=error_responses(404))
def get_edit(edit_id: EditId, runtime: RuntimeDep, session: SessionDep, _who: Reader) -> EditOut:
    return EditOut.from_row(repo.codebook_edit(session, runtime.served_codebook(), edit_id))


@router.post("/generate", response_model=GenerateOut, response_model_exclude_unset=True, tags=["generate"])
async def generate(
    body: GenerateRequest, request: Request, runtime: RuntimeDep, metrics: MetricsDep, _who: Reader
) -> dict:
    """Continue the prompt with every active edit applied."""
    limit = request.app.state.settings.max_new_tokens_limit
    if body.max_new_tokens > limit:
        raise InvalidInputError(f"max_new_tokens must be <= {limit} (HOREN_MAX_NEW_TOKENS_LIMIT)")
    job = GenerateJob(
        prompt=body.prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        format=body.format,
        edits=body.edits,
    )
    res = await run_job(runtime, job)
    metrics.generates.inc()
    out = {"text": res.text, "edit_id": res.edit_id}
    if res.score is not None and res.edit_id is not None:  # routed: say how close it came to the threshold
        out.update(score=res.score, threshold=res.threshold)
    return out


@router.post(
    "/admin/edits/{edit_id}/rollback", response_model=EditOut, tags=["admin"], responses=error_responses(404, 409)
)
async def rollback(edit_id: EditId, runtime: RuntimeDep, who: Admin) -> EditOut:
    """Roll back one edit; the model then behaves as if it had never been made. Idempotent."""
    return EditOut.from_row(await run_job(runtime, RollbackJob(edit_id=edit_id, by=who.name)))


@router.get("/admin/audit", response_model=AuditList, tags=["admin"])
def audit(
    runtime: RuntimeDep,
    session: SessionDep,
    _who: Admin,
    actor: Annotated[str | None, Query(max_length=255, pattern=NO_NUL, description="the API key's name")] = None,
    kind: Annotated[Literal["edit", "rollback"] | None, Query()] = None,
    since: Annotated[IsoTime | None, Query(description="from this time on (ISO 8601, inclusive)")] = None,
    until: Annotated[IsoTime | None, Query(description="before this time (ISO 8601, exclusive)")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict:
    """Edits and rollbacks of this codebook, newest first, with who made them and when."""
    codebook = runtime.served_codebook()
    since, until = (_aware(t) for t in (since, until))
    rows, total = repo.audit_events(
        session, codebook, actor=actor, kind=kind, since=since, until=until, limit=limit, offset=offset
    )
    items = [
        {
            "id": r.id,
            "kind": r.kind,
            "edit_id": r.edit_id,
            "actor": r.actor,
            "at": r.created_at,
            "prompt": r.prompt,
            "target": r.target,
        }
        for r in rows
    ]
    return {"items": items, "total": total}


def _aware(t: datetime | None) -> datetime | None:
    """A time without an offset is read as UTC (the log's times are UTC)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _stored_key(row) -> dict:
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "source": "database",
        "created_at": row.created_at,
        "created_by": row.created_by,
    }


_KEY_LINKS = {
    "DeleteKey": {
        "operationId": "delete_key_admin_keys__key_id__delete",
        "parameters": {"key_id": "$response.body#/id"},
    }
}


@router.post(
    "/admin/keys",
    status_code=201,
    response_model=ApiKeyCreated,
    tags=["admin"],
    responses={201: {"links": _KEY_LINKS}, **error_responses(409)},
)
def create_key(
    body: ApiKeyCreate, session: SessionDep, keys: Annotated[KeyRing, Depends(get_keys)], who: Admin
) -> dict:
    """Make an API key; the answer holds the key itself, the only time it is shown."""
    if body.name in {name for name, _ in keys.static_names()}:
        raise KeyNameTakenError(f"a key named {body.name!r} is configured in the settings")
    key = new_key()
    try:
        with session.begin():
            row = repo.create_api_key(session, body.name, sha256_hex(key), body.role, who.name)
            out = _stored_key(row)
    except IntegrityError:
        raise KeyNameTakenError(f"a key named {body.name!r} exists already") from None
    return {**out, "key": key}


@router.get("/admin/keys", response_model=ApiKeyList, tags=["admin"])
def list_keys(session: SessionDep, keys: Annotated[KeyRing, Depends(get_keys)], _who: Admin) -> dict:
    """Every API key by name and role (never the key): those of the settings, then the stored ones."""
    static = [{"id": None, "name": n, "role": r, "source": "settings"} for n, r in keys.static_names()]
    return {"items": static + [_stored_key(row) for row in repo.list_api_keys(session)]}


@router.delete(
    "/admin/keys/{key_id}",
    status_code=204,
    tags=["admin"],
    response_class=Response,
    responses={204: {"description": "deleted"}, **error_responses(404)},
)
def delete_key(key_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _who: Admin) -> Response:
    """Delete a stored key; it stops working at once."""
    with session.begin():
        if not repo.delete_api_key(session, key_id):
            raise KeyNotFoundError(f"no stored API key with id {key_id}")
    return Response(status_code=204)


@ops.get("/healthz", response_model=Health)
async def healthz() -> dict:
    return {"status": "ok"}


_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


@ops.get(
    "/readyz",
    responses={
        200: {"model": Health},
        503: {"model": Health, "headers": _RETRY, "description": "not ready; detail.reason says why"},
    },
)
async def readyz(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """200 when the model is loaded and the codebook has applied every committed event; else 503
    with ``detail.reason`` (model loading or failed, database unavailable, catching up)."""
    retry = {"Retry-After": str(request.app.state.settings.db_retry_after)}
    reason = runtime.not_ready_reason()
    if reason is not None:
        return JSONResponse({"status": "not_ready", "detail": {"reason": reason}}, status_code=503, headers=retry)
    try:
        ok, seen, latest = await run_in_threadpool(runtime.in_sync)
    except DB_ERRORS:
        detail = {"reason": "database unavailable", **runtime.device_summary()}
        return JSONResponse({"status": "not_ready", "detail": detail}, status_code=503, headers=retry)
    detail = {"last_event_applied": seen, "last_event_committed": latest, **runtime.device_summary()}
    if not ok:
        detail["reason"] = "catching up with the edit log"
        return JSONResponse({"status": "syncing", "detail": detail}, status_code=503, headers=retry)
    return JSONResponse({"status": "ready", "detail": detail})


@ops.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}},
)
async def metrics(runtime: RuntimeDep, metrics: MetricsDep) -> Response:
    metrics.queue_depth.set(runtime.queue_depth())
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
