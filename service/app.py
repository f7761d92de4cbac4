"""`create_app(settings)`: the FastAPI application. The engine starts with the app (model loading
runs on the engine thread, so /healthz answers at once and /readyz turns 200 when ready)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from service.api import openai_compat
from service.api.errors import install_error_handlers
from service.api.routes import router
from service.auth import KeyRing
from service.engine import Engine
from service.settings import Settings

log = logging.getLogger("horen.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings)
        app.state.engine = engine
        app.state.keys = KeyRing(settings, engine.sessions)
        engine.start()
        try:
            line = await run_in_threadpool(app.state.keys.describe_open_access)
            if line:
                log.warning(line)
        except Exception:  # e.g. the database not migrated yet: the routes will say so
            log.exception("could not read the API keys table")
        try:
            yield
        finally:
            engine.stop()

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
    app.include_router(router)
    app.include_router(openai_compat.router)
    return app
