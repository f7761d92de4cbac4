"""Keeping replicas in step: PostgreSQL NOTIFY on every committed event (LISTEN is in the engine),
and the plain-dict form of an edit row that crosses from the engine to the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

NOTIFY_CHANNEL = "horen_events"


def notify(session: Session, codebook_id: int, event_id: int) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": f"{codebook_id}:{event_id}"})


def psycopg_conninfo(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq connection string for a raw psycopg connection."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    parts = {
        "host": u.host,
        "port": u.port,
        "user": u.username,
        "password": u.password,
        "dbname": u.database,
    }
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


def edit_to_dict(e: Any) -> dict[str, Any]:
    return {
        "id": e.id,
        "prompt": e.prompt,
        "target": e.target,
        "metadata": e.metadata_ or {},
        "status": e.status,
        "created_at": e.created_at,
        "rolled_back_at": e.rolled_back_at,
        "rolled_back_by": e.rolled_back_by,
        "created_by": e.created_by,
        "subject": e.subject or "",
        "entry_id": e.entry_id,
        "new_key": bool(e.created_entry),
        "steps": e.steps,
        "final_loss": e.loss,
        "train_ms": e.train_ms,
    }
