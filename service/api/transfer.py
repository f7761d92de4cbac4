"""Routes that move a codebook between deployments of one model and edited module (admin only):
``GET /admin/export`` streams the active edits as an archive, ``POST /admin/import-codebook``
loads one into a deployment whose codebook has no active edit. The archive and the commit are
`service.transfer`'s; these routes read the body, check each edit's metadata as POST /edits does,
and wait for the device thread to apply what was committed."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from horen_core.errors import InvalidInputError
from service import transfer
from service.api.errors import error_responses
from service.api.routes import AUTHED, Admin, RuntimeDep, check_metadata, run_job
from service.db.errors import DB_ERRORS
from service.jobs import SyncJob
from service.runtime import Runtime
from service.settings import Settings
from service.worker import NotReadyError, QueueFullError

log = logging.getLogger("horen.api")

IMPORT_PATH = "/admin/import-codebook"
router = APIRouter(tags=["admin"], responses=error_responses(*AUTHED))

_BINARY = {"schema": {"type": "string", "format": "binary"}}


class CodebookImportOut(BaseModel):
    imported: int = Field(description="edits committed, each with its event, as a POST /edits commits one")
    entries: int = Field(description="codebook entries they made (the other edits retrain one of them)")
    first_id: int | None = Field(description="this deployment's id of the archive's first edit; null when none")
    last_id: int | None = Field(description="this deployment's id of the archive's last edit; null when none")
    seconds: float = Field(description="time the commit took")


@router.get(
    "/admin/export",
    response_class=Response,
    responses={
        200: {
            "description": "a tar of manifest.json (identity: model, module, key_dim, value_dim), edits.jsonl "
            "(the active edits' rows, in id order) and vectors.safetensors (their keys and values)",
            "content": {transfer.MEDIA_TYPE: _BINARY},
        }
    },
)
def export_codebook(request: Request, runtime: RuntimeDep, _who: Admin) -> Response:
    """The active codebook and its edits, as an archive POST /admin/import-codebook reads."""
    codebook = runtime.served_codebook()
    editor = runtime.editor
    archive = transfer.export_archive(
        runtime.sessions,
        codebook,
        editor.identity,
        editor.config.to_dict(),
        request.app.state.settings.data_dir,
    )
    headers = {
        "Content-Length": str(archive.size),
        "Content-Disposition": f'attachment; filename="{archive.filename}"',
        "X-Horen-Edits": str(archive.edits),
    }
    return StreamingResponse(archive.chunks(), media_type=transfer.MEDIA_TYPE, headers=headers)


@router.post(
    IMPORT_PATH,
    status_code=201,
    response_model=CodebookImportOut,
    responses={
        400: {**error_responses(400)[400], "description": "not a codebook archive (malformed_archive)"},
        409: {**error_responses(409)[409], "description": "another model or module, or a codebook with edits"},
        413: {**error_responses(413)[413], "description": "body larger than HOREN_MAX_IMPORT_BYTES"},
        422: {**error_responses(422)[422], "description": "an edit of the archive is invalid (what, and its line)"},
    },
    # octet-stream: what clients and schemathesis send bytes as (the body's type is not checked)
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": _BINARY}}},
)
async def import_codebook(request: Request, runtime: RuntimeDep, who: Admin) -> dict:
    """Load an archive of GET /admin/export from a deployment of the same model and edited module,
    untrained, into this one's codebook, which must have no active edit (409 otherwise). All of it
    is committed in one transaction or nothing is; answers once this replica has applied it."""
    codebook = runtime.served_codebook()
    settings: Settings = request.app.state.settings
    with tempfile.TemporaryFile(dir=settings.data_dir) as body:
        async for chunk in request.stream():
            body.write(chunk)
        out = await run_in_threadpool(_import, runtime, codebook, settings, body, who.name)
    await _catch_up(runtime)
    return out


def _import(runtime: Runtime, codebook: int, settings: Settings, body: Any, by: str | None) -> dict:
    editor = runtime.editor
    vocab = editor.model.get_input_embeddings().num_embeddings
    with transfer.read_archive(body, editor.identity, vocab, settings.data_dir) as archive:
        for i, row in enumerate(archive.rows, 1):
            try:
                check_metadata(row.metadata, settings)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{transfer.EDITS} edit {i}: {exc}") from None
        out = transfer.import_archive(runtime.sessions, codebook, archive, by)
    log.info("imported %d edits (%d entries) in %.2fs", out["imported"], out["entries"], out["seconds"])
    return out


async def _catch_up(runtime: Runtime) -> None:
    """Have the device thread apply the committed events now, as it applies another replica's. If
    it cannot take the job, the edits are committed all the same and its periodic catch-up applies
    them (/readyz says so meanwhile)."""
    try:
        while await run_job(runtime, SyncJob()):
            pass
    except (QueueFullError, NotReadyError, *DB_ERRORS) as exc:
        log.warning("imported edits are committed; the device thread applies them later (%s)", type(exc).__name__)
