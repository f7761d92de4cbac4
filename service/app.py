"""`create_app(settings)`: the FastAPI application. The engine starts with the app (model loading
runs on the engine thread, so /healthz answers at once and /readyz turns 200 when ready)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.routes import router
from service.engine import Engine
from service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings)
        app.state.engine = engine
        engine.start()
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
    install_error_handlers(app)
    app.include_router(router)
    return app
