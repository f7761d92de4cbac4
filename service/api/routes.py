"""HTTP routes: validation and status codes only. Work is submitted to the engine and awaited as a
future, so the event loop never runs torch."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api.errors import AdminDisabledError, UnauthorizedError
from service.api.schemas import (
    EditBatchCreate,
    EditBatchOut,
    EditCreate,
    EditList,
    EditOut,
    GenerateOut,
    GenerateRequest,
    Health,
)
from service.db import repository as repo
from service.engine import EditNotFoundError, Engine, NotReadyError
from service.replication import edit_to_dict

router = APIRouter()


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def _require_ready(engine: Engine) -> None:
    if engine.load_error is not None:
        raise NotReadyError(f"the model failed to load: {engine.load_error}")
    if not engine.ready.is_set():
        raise NotReadyError("the model is still loading")


async def _await(engine: Engine, kind: str, **payload):
    _require_ready(engine)
    return await asyncio.wrap_future(engine.submit(kind, **payload))


@router.post("/edits", status_code=201, response_model=EditOut, tags=["edits"])
async def create_edit(body: EditCreate, engine: EngineDep) -> dict:
    """Train prompt -> target into the codebook; answers after the edit is committed."""
    return await _await(
        engine, "edit", prompt=body.prompt, target=body.target, metadata=body.metadata, format=body.format
    )


@router.post("/edits/batch", status_code=201, response_model=EditBatchOut, tags=["edits"])
async def create_edits(body: EditBatchCreate, engine: EngineDep) -> dict:
    """Apply many edits in order; each is committed on its own."""
    items = await _await(engine, "edits", edits=[e.model_dump() for e in body.edits])
    return {"items": items}


@router.get("/edits", response_model=EditList, tags=["edits"])
def list_edits(
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Annotated[str | None, Query(pattern="^(active|rolled_back)$")] = None,
    q: Annotated[str | None, Query(max_length=500, description="text search on prompt and target")] = None,
) -> dict:
    _require_ready(engine)
    with engine.sessions() as session:
        items, total = repo.list_edits(session, engine.codebook_id, limit=limit, offset=offset, status=status, q=q)
        return {"items": [edit_to_dict(e) for e in items], "total": total}


@router.get("/edits/{edit_id}", response_model=EditOut, tags=["edits"])
def get_edit(edit_id: int, engine: EngineDep) -> dict:
    _require_ready(engine)
    with engine.sessions() as session:
        e = repo.get_edit(session, edit_id)
        if e is None or e.codebook_id != engine.codebook_id:
            raise EditNotFoundError(f"no edit with id {edit_id}")
        return edit_to_dict(e)


@router.post("/generate", response_model=GenerateOut, tags=["generate"])
async def generate(body: GenerateRequest, request: Request, engine: EngineDep) -> dict:
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


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    token = request.app.state.settings.admin_token
    if not token:
        raise AdminDisabledError("admin routes are disabled: set HOREN_ADMIN_TOKEN to enable them")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise UnauthorizedError("a valid admin bearer token is required")
    return "admin"


@router.post("/admin/edits/{edit_id}/rollback", response_model=EditOut, tags=["admin"])
async def rollback(edit_id: int, engine: EngineDep, who: Annotated[str, Depends(require_admin)]) -> dict:
    """Roll back one edit; the model then behaves as if it had never been made. Idempotent."""
    return await _await(engine, "rollback", edit_id=edit_id, by=who)


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
