"""The editing console: a static page at ``/console`` (plain ES modules, no build step, nothing from
another host) that speaks the public API with the signed-in user's key, plus ``GET /console/session``,
which says whose key it is and what its role allows so the page shows only the controls that would
work. The page keeps the key in the tab's session storage; the server keeps no console state."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import Scope

from service.api.errors import error_responses
from service.api.routes import AUTHED, get_keys
from service.auth import EditsDisabledError, KeyRing

STATIC = Path(__file__).parent / "static"
# the page loads only its own files and talks only to this service
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["console"])
_bearer = HTTPBearer(auto_error=False, description="the API key the console signed in with")


class ConsoleSession(BaseModel):
    name: str | None = Field(description="the key's name; null for an anonymous caller of an open service")
    role: Literal["read", "edit", "admin"] = Field(description="what this caller may do")
    open: bool = Field(description="true when the service has no API keys and the caller gave none")


@router.get("/console/session", response_model=ConsoleSession, responses=error_responses(*AUTHED))
def console_session(
    keys: Annotated[KeyRing, Depends(get_keys)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> dict:
    """Who the bearer key belongs to and its role; 401 for a key the service does not know."""
    header = f"Bearer {credentials.credentials}" if credentials else None
    who = keys.authorize(header, "read")
    if who.name is not None:
        return {"name": who.name, "role": who.role, "open": False}
    try:  # anonymous on an open service: edits are allowed on loopback only
        keys.authorize(None, "edit")
        role = "edit"
    except EditsDisabledError:
        role = "read"
    return {"name": None, "role": role, "open": True}


class _ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the console at /console on ``app``, after its API routes."""
    app.include_router(router)
    app.mount("/console", _ConsoleFiles(directory=STATIC, html=True), name="console")
