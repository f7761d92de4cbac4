"""`horen serve`: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import logging


def serve_main(argv: list[str] | None = None) -> int:
    import uvicorn

    from service.app import create_app
    from service.db.session import upgrade_database
    from service.settings import Settings

    p = argparse.ArgumentParser(prog="horen serve", description="Run the HoReN editing service.")
    p.add_argument("--host", default=None, help="overrides HOREN_HOST")
    p.add_argument("--port", type=int, default=None, help="overrides HOREN_PORT")
    p.add_argument("--no-migrate", action="store_true", help="do not run database migrations on start")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    settings = Settings()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        upgrade_database(settings.resolved_database_url())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0
