"""Edits and rollbacks on the device thread. An edit is trained, then committed (its row, entry
version and event in one transaction), and only then applied to the in-memory codebook; a commit
that lost a race for its entry with another replica is retrained and tried again. Returns the
committed database rows."""

from __future__ import annotations

import time

from sqlalchemy.orm import sessionmaker

from horen_core import HorenEditor
from horen_core.errors import InvalidInputError
from service import imports
from service.db import repository as repo
from service.db.models import Edit
from service.generation import check_prompt_tokens
from service.jobs import EditJob
from service.metrics import Metrics
from service.replication import Replication
from service.settings import Settings


class EditConflictError(Exception):
    """Another replica kept changing the same codebook entry; the edit was not stored."""


class EditingService:
    def __init__(
        self,
        editor: HorenEditor,
        sessions: sessionmaker,
        replication: Replication,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.editor = editor
        self.sessions = sessions
        self.replication = replication
        self.metrics = metrics
        self.settings = settings

    def check(self, prompt: str, target: str, format: str) -> None:
        """Raise ``InvalidInputError`` for an edit over the service's token limits or one the editor refuses."""
        check_prompt_tokens(
            len(self.editor.tokenizer(prompt, add_special_tokens=False)["input_ids"]), self.settings.max_prompt_tokens
        )
        n, limit = len(self.editor.encode_target(target)), self.settings.max_target_tokens
        if n > limit:
            raise InvalidInputError(f"target is {n} tokens; the limit is {limit} (HOREN_MAX_TARGET_TOKENS)")
        self.editor.check_edit(prompt, target, format)

    def edit(self, job: EditJob) -> list[Edit]:
        """Every edit of the job, in order; all are checked before any is stored."""
        for e in job.edits:
            self.check(e.prompt, e.target, e.format)
        return [self.make(e.prompt, e.target, e.metadata or {}, e.format, job.by, e.subject) for e in job.edits]

    def make(
        self,
        prompt: str,
        target: str,
        metadata: dict,
        format: str = "auto",
        by: str | None = None,
        subject: str | None = None,
        item: tuple[int, int] | None = None,
    ) -> Edit | None:
        """Train, commit and apply one edit; returns its row. With ``item`` (an import's id and
        line) the edit is made only if that item is still pending, and the item is marked done in
        the edit's transaction; None when it was not pending."""
        editor, replication = self.editor, self.replication
        codebook_id = replication.codebook_id
        t0 = time.perf_counter()
        for _attempt in range(self.settings.conflict_retries + 1):
            replication.sync()
            trained = editor.train(prompt, target, fmt=format, subject=subject)
            expected = None
            if trained.entry_id is not None:
                with self.sessions() as session:
                    expected = repo.entry_version(session, codebook_id, trained.entry_id)
            try:
                with self.sessions.begin() as session:
                    replication.lock_and_catch_up(session)
                    if item is not None and not imports.claim_item(session, *item):
                        return None
                    row = repo.insert_edit(
                        session,
                        codebook_id,
                        prompt=prompt,
                        target=target,
                        metadata=metadata,
                        entry_id=trained.entry_id,
                        created_entry=trained.created,
                        steps=trained.steps,
                        loss=trained.loss,
                        train_ms=trained.seconds * 1000,
                        answer_ids=list(trained.answer),
                        key=repo.tensor_to_bytes(trained.key),
                        value=repo.tensor_to_bytes(trained.value),
                        expected_entry_version=expected,
                        created_by=by,
                        subject=trained.subject,
                        gate=repo.tensor_to_bytes(trained.gate) if trained.gate is not None else None,
                    )
                    session.flush()
                    if item is not None:
                        imports.finish_item(session, *item, row.id)
                    event_id = replication.announce(session)
            except repo.EntryConflict:
                continue  # catch up with what the other replica did, then train again
            editor.apply(row.id, trained, entry_id=row.entry_id)
            replication.record(event_id, "edit", row.id)
            replication.changed()
            self.metrics.edits.inc()
            self.metrics.edit_latency.observe(time.perf_counter() - t0)
            return row
        raise EditConflictError("the codebook entry kept changing under concurrent edits; try again")

    def rollback(self, edit_id: int, by: str | None = None) -> Edit:
        """Roll back one edit (idempotent); ``UnknownEditError`` if this codebook has no such edit."""
        replication = self.replication
        replication.sync()
        with self.sessions.begin() as session:
            replication.lock_and_catch_up(session)
            repo.codebook_edit(session, replication.codebook_id, edit_id)
            edit, changed = repo.rollback_edit(session, edit_id, by)
            if changed:
                session.flush()
                event_id = replication.announce(session)
        if changed:
            replication.apply_rollback(edit_id)
            replication.record(event_id, "rollback", edit_id)
            replication.changed()
            self.metrics.rollbacks.inc()
        return edit
