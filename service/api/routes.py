"""HTTP routes: validation and status codes only. Work is submitted to the engine and awaited as a
future, so the event loop never runs torch. Each route names the role it needs (`service.auth`);
the ops routes (/healthz, /readyz, /metrics) need none."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from service.api.errors import KeyNameTakenError, KeyNotFoundError
from service.api.schemas import (
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
from service.engine import EditNotFoundError, Engine, NotReadyError
from service.replication import edit_to_dict

router = APIRouter()


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def get_keys(request: Request) -> KeyRing:
    return request.app.state.keys


def _role(needed: str):
    # a sync dependency: FastAPI runs it in the threadpool, where the key table lookup may block
    def dependency(
        keys: Annotated[KeyRing, Depends(get_keys)], authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        return keys.authorize(authorization, needed)

    return dependency


Reader = Annotated[Principal, Depends(_role("read"))]
Editor = Annotated[Principal, Depends(_role("edit"))]
Admin = Annotated[Principal, Depends(_role("admin"))]


def require_ready(engine: Engine) -> None:
    if engine.load_error is not None:
        raise NotReadyError(f"the model failed to load: {engine.load_error}")
    if not engine.ready.is_set():
        raise NotReadyError("the model is still loading")


async def _await(engine: Engine, kind: str, **payload):
    require_ready(engine)
    return await asyncio.wrap_future(engine.submit(kind, **payload))


@router.post("/edits", status_code=201, response_model=EditOut, tags=["edits"])
async def create_edit(body: EditCreate, engine: EngineDep, who: Editor) -> dict:
    """Train prompt -> target into the codebook; answers after the edit is committed."""
    return await _await(
        engine,
        "edit",
        prompt=body.prompt,
        target=body.target,
        metadata=body.metadata,
        format=body.format,
        by=who.name,
    )


@router.post("/edits/batch", status_code=201, response_model=EditBatchOut, tags=["edits"])
async def create_edits(body: EditBatchCreate, engine: EngineDep, who: Editor) -> dict:
    """Apply many edits in order; each is committed on its own."""
    items = await _await(engine, "edits", edits=[e.model_dump() for e in body.edits], by=who.name)
    return {"items": items}


@router.get("/edits", response_model=EditList, tags=["edits"])
def list_edits(
    engine: EngineDep,
    _who: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Annotated[str | None, Query(pattern="^(active|rolled_back)$")] = None,
    q: Annotated[str | None, Query(max_length=500, description="text search on prompt and target")] = None,
) -> dict:
    require_ready(engine)
    with engine.sessions() as session:
        items, total = repo.list_edits(session, engine.codebook_id, limit=limit, offset=offset, status=status, q=q)
        return {"items": [edit_to_dict(e) for e in items], "total": total}


@router.get("/edits/{edit_id}", response_model=EditOut, tags=["edits"])
def get_edit(edit_id: int, engine: EngineDep, _who: Reader) -> dict:
    require_ready(engine)
    with engine.sessions() as session:
        e = repo.get_edit(session, edit_id)
        if e is None or e.codebook_id != engine.codebook_id:
            raise EditNotFoundError(f"no edit with id {edit_id}")
        return edit_to_dict(e)


@router.post("/generate", response_model=GenerateOut, tags=["generate"])
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, _who: Reader) -> dict:
    """Continue the prompt with every active edit applied."""
    limit = request.app.state.settings.max_new_tokens_limit
    if body.max_new_tokens > limit:
        from horen_core.errors import InvalidInputError

        raise InvalidInputError(f"max_new_tokens must be <= {limit}")
    res = await _await(
        engine,
        "generate",
        prompt=body.prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        format=body.format,
        edits=body.edits,
    )
    engine.metrics.generates.inc()
    return {"text": res.text, "edit_id": res.edit_id}


@router.post("/admin/edits/{edit_id}/rollback", response_model=EditOut, tags=["admin"])
async def rollback(edit_id: int, engine: EngineDep, who: Admin) -> dict:
    """Roll back one edit; the model then behaves as if it had never been made. Idempotent."""
    return await _await(engine, "rollback", edit_id=edit_id, by=who.name)


@router.get("/admin/audit", response_model=AuditList, tags=["admin"])
def audit(
    engine: EngineDep,
    _who: Admin,
    actor: Annotated[str | None, Query(max_length=255, description="the API key's name")] = None,
    kind: Annotated[Literal["edit", "rollback"] | None, Query()] = None,
    since: Annotated[datetime | None, Query(description="from this time on (ISO 8601, inclusive)")] = None,
    until: Annotated[datetime | None, Query(description="before this time (ISO 8601, exclusive)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """Edits and rollbacks of this codebook, newest first, with who made them and when."""
    require_ready(engine)
    since, until = (_aware(t) for t in (since, until))
    with engine.sessions() as session:
        rows, total = repo.audit_events(
            session, engine.codebook_id, actor=actor, kind=kind, since=since, until=until, limit=limit, offset=offset
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


@router.post("/admin/keys", status_code=201, response_model=ApiKeyCreated, tags=["admin"])
def create_key(body: ApiKeyCreate, engine: EngineDep, keys: Annotated[KeyRing, Depends(get_keys)], who: Admin) -> dict:
    """Make an API key; the answer holds the key itself, the only time it is shown."""
    if body.name in {name for name, _ in keys.static_names()}:
        raise KeyNameTakenError(f"a key named {body.name!r} is configured in the settings")
    key = new_key()
    try:
        with engine.sessions.begin() as session:
            row = repo.create_api_key(session, body.name, sha256_hex(key), body.role, who.name)
            out = _stored_key(row)
    except IntegrityError:
        raise KeyNameTakenError(f"a key named {body.name!r} exists already") from None
    return {**out, "key": key}


@router.get("/admin/keys", response_model=ApiKeyList, tags=["admin"])
def list_keys(engine: EngineDep, keys: Annotated[KeyRing, Depends(get_keys)], _who: Admin) -> dict:
    """Every API key by name and role (never the key): those of the settings, then the stored ones."""
    static = [{"id": None, "name": n, "role": r, "source": "settings"} for n, r in keys.static_names()]
    with engine.sessions() as session:
        return {"items": static + [_stored_key(row) for row in repo.list_api_keys(session)]}


@router.delete("/admin/keys/{key_id}", status_code=204, tags=["admin"])
def delete_key(key_id: int, engine: EngineDep, _who: Admin) -> Response:
    """Delete a stored key; it stops working at once."""
    with engine.sessions.begin() as session:
        if not repo.delete_api_key(session, key_id):
            raise KeyNotFoundError(f"no stored API key with id {key_id}")
    return Response(status_code=204)


@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={200: {"model": Health}, 503: {"model": Health}})
async def readyz(engine: EngineDep) -> JSONResponse:
    """200 when the model is loaded and the codebook has applied every committed event; else 503."""
    if engine.load_error is not None or not engine.ready.is_set():
        why = f"model failed to load: {engine.load_error}" if engine.load_error else "model loading"
        return JSONResponse({"status": "not_ready", "detail": {"reason": why}}, status_code=503)
    ok, seen, latest = await run_in_threadpool(engine.in_sync)
    detail = {"last_event_applied": seen, "last_event_committed": latest, **engine.device_summary()}
    return JSONResponse({"status": "ready" if ok else "syncing", "detail": detail}, status_code=200 if ok else 503)


@router.get("/metrics", tags=["ops"])
async def metrics(engine: EngineDep) -> Response:
    engine.metrics.queue_depth.set(engine.depth())
    return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")
