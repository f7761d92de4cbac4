"""`create_app(settings)`: the FastAPI application. The runtime starts with the app (model loading
runs on the device thread, so /healthz answers at once and /readyz turns 200 when ready)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from service import console
from service.api import imports, openai_compat, transfer
from service.api.errors import install_error_handlers
from service.api.limits import LimitsMiddleware
from service.api.routes import ops, router
from service.auth import KeyRing
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger("horen.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        app.state.keys = KeyRing(settings, runtime.sessions)
        runtime.start()
        try:
            line = await run_in_threadpool(app.state.keys.describe_open_access)
            if line:
                log.warning(line)
        except Exception:  # e.g. the database not migrated yet: the routes will say so
            log.exception("could not read the API keys table")
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(
        title="HoReN Server",
        version="0.1.0",
        description="Live fact editing of a resident language model with a HoReN codebook.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.model_id = openai_compat.served_model_id(settings)
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_client_concurrency=settings.max_client_concurrency,
        streamed={
            transfer.IMPORT_PATH: (settings.max_import_bytes, "HOREN_MAX_IMPORT_BYTES"),
            imports.IMPORTS_PATH: (settings.max_import_facts_bytes, "HOREN_MAX_IMPORT_FACTS_BYTES"),
        },
    )
    app.include_router(router)
    app.include_router(transfer.router)
    app.include_router(imports.router)
    app.include_router(openai_compat.router)
    app.include_router(ops)
    console.install(app)
    app.openapi = lambda: _openapi(app, settings)
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's schema with the limits these settings set, and no 422 on /v1 (OpenAI answers 400)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    models = schema["components"]["schemas"]
    limit = settings.max_new_tokens_limit
    models["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] = limit
    models["EditBatchCreate"]["properties"]["edits"]["maxItems"] = min(100, settings.max_batch_edits)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        for field in ("max_tokens", "max_completion_tokens"):
            for option in models[name]["properties"].get(field, {}).get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = limit
    for path, item in schema["paths"].items():
        if path.startswith("/v1/"):
            for op in item.values():
                op.get("responses", {}).pop("422", None)
    models.pop("HTTPValidationError", None)
    models.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
