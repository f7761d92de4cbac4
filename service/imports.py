"""Bulk imports: a JSONL upload of facts becomes an ``imports`` row and one ``import_items`` row per
fact, committed before POST /imports answers. The device thread then makes the edits a chunk at a
time between other jobs, so generation keeps being served. Each fact is committed exactly as a
POST /edits commits one, and its item is marked done in the same transaction: after a crash or a
restart the import resumes from its pending items and never makes a fact twice, on any replica.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from horen_core.errors import InvalidInputError
from service.api.schemas import EditCreate
from service.db.models import ITEM_DONE, ITEM_FAILED, ITEM_PENDING, Import, ImportItem, utcnow

if TYPE_CHECKING:
    from service.editing import EditingService

log = logging.getLogger("horen.imports")

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class ImportFact:
    """A fact to make (``EditingService.make_many``): an edit's fields and, for an import's, its
    item (import id, line)."""

    prompt: str
    target: str
    metadata: dict
    format: str = "auto"
    subject: str | None = None
    item: tuple[int, int] | None = None


class ImportNotFoundError(LookupError):
    """No import with that id in this codebook."""


class ImportFinishedError(Exception):
    """The import has ended (done or failed): there is nothing left to cancel."""


MAX_ERRORS_SHOWN = 100


def parse_jsonl(data: bytes, limit: int, check: Callable[[dict | None], None]) -> list[tuple[int, EditCreate]]:
    """Each non-blank line of ``data`` (with its 1-based number) as an edit (``prompt``, ``target``, optional ``metadata``,
    ``subject``, ``format``), validated as POST /edits validates one; ``check`` checks metadata.
    Raises ``InvalidInputError`` naming the first bad line; nothing is stored then."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("the import must be UTF-8 text, one JSON object per line") from None
    facts: list[tuple[int, EditCreate]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(facts) >= limit:
            raise InvalidInputError(f"at most {limit} facts in one import (HOREN_MAX_IMPORT_FACTS)")
        try:
            fact = EditCreate.model_validate_json(line)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or "line"
            raise InvalidInputError(f"line {n}: {where}: {err['msg']}") from None
        try:
            check(fact.metadata)
        except InvalidInputError as exc:
            raise InvalidInputError(f"line {n}: {exc}") from None
        facts.append((n, fact))
    if not facts:
        raise InvalidInputError("the import has no facts: send one JSON object per line")
    return facts


def create_import(
    session: Session, codebook_id: int, facts: Iterable[tuple[int, EditCreate]], by: str | None
) -> Import:
    """Store an import and its facts, each under its line number (the caller commits)."""
    facts = list(facts)
    job = Import(codebook_id=codebook_id, status="queued", total=len(facts), done=0, failed=0, created_by=by)
    session.add(job)
    session.flush()
    session.add_all(
        ImportItem(
            import_id=job.id,
            line=i,
            prompt=f.prompt,
            target=f.target,
            metadata_=f.metadata or {},
            subject=f.subject,
            format=f.format,
            status=ITEM_PENDING,
        )
        for i, f in facts
    )
    return job


def get_import(session: Session, import_id: int, codebook_id: int) -> Import | None:
    job = session.get(Import, import_id)
    return job if job is not None and job.codebook_id == codebook_id else None


def cancel_import(session: Session, job: Import, by: str | None) -> None:
    """Stop a queued or running import: what it committed stays, the rest is not made. Cancelling
    a cancelled import changes nothing; one that has ended raises ``ImportFinishedError``."""
    if job.status in ("done", "failed"):
        raise ImportFinishedError(f"import {job.id} has ended ({job.status}); nothing is left to cancel")
    if job.status in ACTIVE:
        job.status, job.finished_at, job.cancelled_by = "cancelled", utcnow(), by


def active_imports(session: Session, codebook_id: int) -> list[int]:
    rows = session.scalars(
        select(Import.id).where(Import.codebook_id == codebook_id, Import.status.in_(ACTIVE)).order_by(Import.id)
    )
    return list(rows)


def claim_item(session: Session, import_id: int, line: int) -> bool:
    """Inside an edit's transaction: True if the item is still pending (no replica made it yet)
    and its import still runs."""
    status = session.scalar(
        select(ImportItem.status)
        .join(Import, Import.id == ImportItem.import_id)
        .where(ImportItem.import_id == import_id, ImportItem.line == line, Import.status.in_(ACTIVE))
    )
    return status == ITEM_PENDING


def finish_item(session: Session, import_id: int, line: int, edit_id: int | None, error: str | None = None) -> None:
    """Mark an item done (with its edit) or failed (with why), and count it on its import."""
    status = ITEM_DONE if error is None else ITEM_FAILED
    session.execute(
        update(ImportItem)
        .where(ImportItem.import_id == import_id, ImportItem.line == line)
        .values(status=status, edit_id=edit_id, error=error)
    )
    counter = Import.done if error is None else Import.failed
    session.execute(update(Import).where(Import.id == import_id).values({counter: counter + 1}))


def import_to_dict(session: Session, job: Import, now: datetime | None = None) -> dict[str, Any]:
    """The API's view of an import: counts, the first failures with their lines, rate and ETA."""
    now = now or utcnow()
    errors = session.execute(
        select(ImportItem.line, ImportItem.error)
        .where(ImportItem.import_id == job.id, ImportItem.status == ITEM_FAILED)
        .order_by(ImportItem.line)
        .limit(MAX_ERRORS_SHOWN)
    ).all()
    pending = job.total - job.done - job.failed
    rate = eta = None
    if job.started_at is not None and job.done + job.failed:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
        if elapsed > 0:
            rate = (job.done + job.failed) / elapsed
            eta = pending / rate if job.status in ACTIVE else None
    message = None
    if job.status == "cancelled":
        message = f"cancelled: the {job.done} edits committed before it stay; {pending} facts were not made"
    return {
        "id": job.id,
        "status": job.status,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "pending": pending,
        "errors": [{"line": line, "error": error} for line, error in errors],
        "rate": rate,
        "eta_seconds": eta,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "created_by": job.created_by,
        "message": message,
    }


class ImportWorker:
    """Runs on the device thread: ``step`` makes up to ``chunk`` pending facts of the oldest active
    import (trained together, ``EditingService.make_many``) and returns; the runtime calls it
    between jobs while ``active``, so generation is served between chunks."""

    def __init__(self, sessions: Any, chunk: int, retry_after: float) -> None:
        self.sessions = sessions
        self.chunk = chunk
        self.retry_after = retry_after
        self.queue: deque[int] = deque()
        self._not_before = 0.0

    @property
    def active(self) -> bool:
        return bool(self.queue) and time.monotonic() >= self._not_before

    def add(self, import_id: int) -> None:
        if import_id not in self.queue:
            self.queue.append(import_id)

    def resume(self, codebook_id: int) -> None:
        """Queue the imports a stop left queued or running."""
        with self.sessions() as session:
            for import_id in active_imports(session, codebook_id):
                self.add(import_id)

    def wait(self) -> None:
        """The database failed: try again after ``retry_after`` seconds."""
        self._not_before = time.monotonic() + self.retry_after

    def step(self, editing: EditingService) -> None:
        """Make the next chunk; database errors propagate (the caller calls ``wait``)."""
        import_id = self.queue[0]
        with self.sessions.begin() as session:
            job = session.get(Import, import_id)
            if job is None or job.status not in ACTIVE:
                self.queue.popleft()
                return
            if job.status == "queued":
                job.status, job.started_at = "running", utcnow()
            by = job.created_by
            items = session.execute(
                select(
                    ImportItem.line,
                    ImportItem.prompt,
                    ImportItem.target,
                    ImportItem.metadata_,
                    ImportItem.format,
                    ImportItem.subject,
                )
                .where(ImportItem.import_id == import_id, ImportItem.status == ITEM_PENDING)
                .order_by(ImportItem.line)
                .limit(self.chunk)
            ).all()
        facts = [
            ImportFact(prompt, target, metadata or {}, fmt, subject, item=(import_id, line))
            for line, prompt, target, metadata, fmt, subject in items
        ]
        # the chunk's values train together; each fact is committed and applied in order
        for fact, outcome in zip(facts, editing.make_many(facts, by)):
            if isinstance(outcome, InvalidInputError):
                with self.sessions.begin() as session:
                    if claim_item(session, *fact.item):
                        finish_item(session, *fact.item, None, str(outcome))
        if len(items) < self.chunk:
            self._finish(import_id)

    def _finish(self, import_id: int) -> None:
        with self.sessions.begin() as session:
            job = session.get(Import, import_id)
            left = session.scalar(
                select(func.count())
                .select_from(ImportItem)
                .where(ImportItem.import_id == import_id, ImportItem.status == ITEM_PENDING)
            )
            if job is not None and job.status in ACTIVE and not left:
                job.status = "failed" if job.done == 0 and job.failed else "done"
                job.finished_at = utcnow()
                log.info("import %d %s: %d done, %d failed", import_id, job.status, job.done, job.failed)
        if not left or job is None or job.status not in ACTIVE:
            self.queue.popleft()
