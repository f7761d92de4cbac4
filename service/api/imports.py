"""Bulk import routes: ``POST /imports`` stores the facts of a JSONL upload and answers 202 with
the job; the device thread makes them between other requests (`service.imports`). ``GET /imports/{id}``
shows progress, ``DELETE /imports/{id}`` cancels (what is committed stays)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from horen_core.errors import InvalidInputError
from service import imports
from service.api.errors import error_responses
from service.api.routes import AUTHED, Editor, RuntimeDep, SessionDep, check_metadata
from service.api.schemas import MAX_ID
from service.settings import Settings

IMPORTS_PATH = "/imports"
NDJSON = "application/x-ndjson"
router = APIRouter(tags=["imports"], responses=error_responses(*AUTHED))
ImportId = Annotated[int, Path(ge=1, le=MAX_ID, description="an import's id")]


class ImportFailure(BaseModel):
    line: int = Field(description="the fact's line in the upload (1-based, blank lines counted)")
    error: str


class ImportOut(BaseModel):
    id: int
    status: Literal["queued", "running", "done", "failed", "cancelled"] = Field(
        description="queued, then running; ends done (failed facts are listed), failed (no fact made) or cancelled"
    )
    total: int = Field(description="facts in the upload")
    done: int = Field(description="facts committed as edits, each exactly as POST /edits commits one")
    failed: int = Field(description="facts refused (why, in errors)")
    pending: int = Field(description="facts not made yet (after a cancel: never made)")
    errors: list[ImportFailure] = Field(description=f"the first {imports.MAX_ERRORS_SHOWN} failed facts")
    rate: float | None = Field(description="facts per second since the import started")
    eta_seconds: float | None = Field(description="seconds left at that rate, while it runs")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    created_by: str | None = Field(description="name of the API key that made it; null when open")
    message: str | None = Field(description="what a cancel kept and what it left undone")


_UPLOAD = {"schema": {"type": "string", "format": "binary"}}
_FORM = {
    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
}


@router.post(
    IMPORTS_PATH,
    status_code=202,
    response_model=ImportOut,
    responses=error_responses(413),
    openapi_extra={"requestBody": {"required": True, "content": {NDJSON: _UPLOAD, "multipart/form-data": _FORM}}},
)
async def create_import(request: Request, runtime: RuntimeDep, session: SessionDep, who: Editor) -> dict:
    """Queue a JSONL upload of facts, one ``{"prompt", "target", "metadata"?, "subject"?, "format"?}``
    per line (as the body, ``application/x-ndjson``, or as the ``file`` field of a multipart form),
    up to HOREN_MAX_IMPORT_FACTS. A bad line is a 422 naming it, and nothing is queued."""
    codebook = runtime.served_codebook()
    settings: Settings = request.app.state.settings
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidInputError("a multipart import needs its JSONL in a file field named 'file'")
        data = await upload.read()
    else:
        data = await request.body()
    out = await run_in_threadpool(_store, session, codebook, settings, data, who.name)
    runtime.queue_import(out["id"])
    return out


def _store(session: Session, codebook: int, settings: Settings, data: bytes, by: str | None) -> dict:
    facts = imports.parse_jsonl(data, settings.max_import_facts, lambda m: check_metadata(m, settings))
    with session.begin():
        job = imports.create_import(session, codebook, facts, by)
        session.flush()
        return imports.import_to_dict(session, job)


@router.get(IMPORTS_PATH + "/{import_id}", response_model=ImportOut, responses=error_responses(404))
def get_import(import_id: ImportId, runtime: RuntimeDep, session: SessionDep, _who: Editor) -> dict:
    return imports.import_to_dict(session, _job(session, runtime.served_codebook(), import_id))


@router.delete(IMPORTS_PATH + "/{import_id}", response_model=ImportOut, responses=error_responses(404, 409))
def cancel_import(import_id: ImportId, runtime: RuntimeDep, session: SessionDep, who: Editor) -> dict:
    """Stop an import: the facts it committed stay (its ``done``), the rest are never made. 409 once
    it has ended; cancelling again answers the cancelled import."""
    codebook = runtime.served_codebook()
    with session.begin():
        job = _job(session, codebook, import_id)
        imports.cancel_import(session, job, who.name)
        session.flush()
        return imports.import_to_dict(session, job)


def _job(session: Session, codebook: int, import_id: int):
    job = imports.get_import(session, import_id, codebook)
    if job is None:
        raise imports.ImportNotFoundError(f"no import with id {import_id}")
    return job
