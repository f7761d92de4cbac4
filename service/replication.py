"""Keeping this process's codebook equal to the database's event log: replay on start, applying the
events other processes commit (woken by PostgreSQL LISTEN/NOTIFY, and by polling), and a digest
chained over every event applied, equal on replicas that agree. Runs on the device thread, except
``in_sync`` (database only) and the listener's own thread."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from horen_core import HorenEditor
from horen_core.errors import UnknownEditError
from service.db import repository as repo
from service.db.errors import DB_ERRORS
from service.metrics import Metrics

log = logging.getLogger("horen.engine")

NOTIFY_CHANNEL = "horen_events"
_DIGEST_START = hashlib.sha256(b"horen").hexdigest()


def notify(session: Session, codebook_id: int, event_id: int) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": f"{codebook_id}:{event_id}"})


def psycopg_conninfo(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq connection string for a raw psycopg connection."""
    u = make_url(url)
    parts = {"host": u.host, "port": u.port, "user": u.username, "password": u.password, "dbname": u.database}
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


def start_listener(url: str, wake: Callable[[], None], stopping: threading.Event, interval: float) -> None:
    """On PostgreSQL, a thread that LISTENs and calls ``wake`` as soon as another replica commits an event."""
    if url.startswith("postgresql"):
        args = (psycopg_conninfo(url), wake, stopping, interval)
        threading.Thread(target=_listen, args=args, name="horen-listen", daemon=True).start()


def _listen(conninfo: str, wake: Callable[[], None], stopping: threading.Event, interval: float) -> None:
    import psycopg

    while not stopping.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                for _ in conn.notifies(timeout=interval * 5):
                    if stopping.is_set():
                        return
                    wake()
        except Exception:
            log.warning("LISTEN connection lost; retrying", exc_info=True)
            stopping.wait(1.0)


class Replication:
    def __init__(self, sessions: sessionmaker, metrics: Metrics) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.editor: HorenEditor | None = None
        self.codebook_id: int | None = None
        self.last_event_id = 0
        self.last_sync = 0.0
        self.log_digest = _DIGEST_START
        # why the device thread's last database access failed; None while the database answers
        self.db_error: str | None = None

    def attach(self, editor: HorenEditor) -> None:
        """Find this model's codebook in the database and replay its edits into ``editor``."""
        self.last_event_id, self.log_digest = 0, _DIGEST_START
        ident = editor.identity
        with self.sessions.begin() as session:
            cb = repo.get_or_create_codebook(
                session, ident["model"], ident["module"], editor.codebook.key_dim, editor.codebook.value_dim
            )
            self.codebook_id = cb.id
        self.editor = editor
        self._replay()

    def _replay(self) -> None:
        """Apply every active edit of this codebook, in order, and chain the whole log into the digest."""
        codebook = self.editor.codebook
        with self.sessions() as session:
            last = repo.last_event_id(session, self.codebook_id)
            # room for every entry at once: growing chunk by chunk would copy the matrices each time
            codebook.reserve(len(codebook) + repo.count_active_edits(session, self.codebook_id))
            for rows in repo.active_edit_vectors(session, self.codebook_id):
                self._apply_edit_rows(rows)
            after = 0
            while after < last:
                events = repo.events_after(session, self.codebook_id, after, limit=5000)
                if not events:
                    break
                for ev in events:
                    if ev.id > last:
                        break
                    self.record(ev.id, ev.kind, ev.edit_id)
                after = events[-1].id
        self.last_event_id = last
        self.sync()  # whatever was committed while we replayed
        self.changed()
        log.info("codebook rebuilt: %d entries from the database", len(codebook))

    def _apply_edit_rows(self, rows: Sequence[Any]) -> None:
        """Apply these edits (rows or ``Edit``s, in id order) at once, those not applied yet."""
        editor = self.editor
        rows = [r for r in rows if editor.codebook.entry_of_edit(r.id) is None]
        if rows:
            dk, dv = editor.codebook.key_dim, editor.codebook.value_dim
            editor.apply_versions(
                [r.id for r in rows],
                [r.entry_id for r in rows],
                repo.bytes_to_matrix([r.key for r in rows], dk),
                repo.bytes_to_matrix([r.value for r in rows], dv),
                [r.answer_ids for r in rows],
                [r.subject or "" for r in rows],
                [repo.optional_vector(r.gate) for r in rows],
                [repo.optional_rows(r.trail, dv) for r in rows],
            )

    def sync(self) -> int:
        """Apply the events other processes committed since the last one seen; returns how many."""
        with self.sessions() as session:
            applied = self.apply_events(session)
        self.last_sync = time.monotonic()
        return applied

    def apply_events(self, session: Session) -> int:
        events = repo.events_after(session, self.codebook_id, self.last_event_id)
        for ev in events:
            if ev.kind == "edit":
                edit = repo.get_edit(session, ev.edit_id)
                if edit is not None:
                    self._apply_edit_rows([edit])
            elif ev.kind == "rollback":
                self.apply_rollback(ev.edit_id)
            self.record(ev.id, ev.kind, ev.edit_id)
        if events:
            self.changed()
        return len(events)

    def apply_rollback(self, edit_id: int) -> None:
        try:
            self.editor.rollback(edit_id)
        except UnknownEditError:
            pass  # never applied here (e.g. rolled back before we replayed)

    def lock_and_catch_up(self, session: Session) -> None:
        """In a writing transaction: take the commit lock, then apply what other replicas committed
        first, so that this process's events follow theirs."""
        repo.serialize_commit_lock(session)
        self.apply_events(session)

    def announce(self, session: Session) -> int:
        """The id of the event this transaction wrote, notified to the other replicas at commit."""
        event_id = repo.last_event_id(session, self.codebook_id)
        notify(session, self.codebook_id, event_id)
        return event_id

    def record(self, event_id: int, kind: str, edit_id: int) -> None:
        self.last_event_id = event_id
        self.log_digest = hashlib.sha256(f"{self.log_digest}:{event_id}:{kind}:{edit_id}".encode()).hexdigest()

    def changed(self) -> None:
        """The codebook changed: update its size metric (the editor keeps its index current)."""
        if self.editor is not None:
            self.metrics.codebook_size.set(len(self.editor.codebook))

    def safe_sync(self) -> None:
        """``sync``, noting (not raising) a database that fails."""
        try:
            self.sync()
        except DB_ERRORS as exc:
            self.db_failed(exc)
        except Exception:
            log.exception("catch-up from the database failed; will retry")
        else:
            self.db_back()

    def db_failed(self, exc: BaseException) -> None:
        if self.db_error is None:  # one line per outage, not one per poll
            log.warning("the database is unavailable (%s); generation goes on from memory, retrying", exc)
        self.db_error = "database unavailable"

    def db_back(self) -> None:
        if self.db_error is not None:
            log.warning("the database answers again")
        self.db_error = None

    def in_sync(self) -> tuple[bool, int, int]:
        """(applied every committed event, last applied, last committed); reads the database only."""
        with self.sessions() as session:
            latest = repo.last_event_id(session, self.codebook_id)
        return self.last_event_id >= latest, self.last_event_id, latest
