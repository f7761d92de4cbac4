"""Edits and rollbacks on the device thread. An edit is trained, then committed (its row, entry
version and event in one transaction), and only then applied to the in-memory codebook; a commit
that lost a race for its entry with another replica is retrained and tried again. Returns the
committed database rows."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy.orm import sessionmaker

from horen_core import Fact, HorenEditor, TrainedEdit
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


class StaleTrainingError(Exception):
    """An edit of a batch was trained before other replicas' events that its commit caught up with."""


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
        t0 = time.perf_counter()
        for _attempt in range(self.settings.conflict_retries + 1):
            replication.sync()
            trained = editor.train(prompt, target, fmt=format, subject=subject)
            try:
                return self.commit_and_apply(trained, prompt, target, metadata, by, item, started=t0)
            except repo.EntryConflict:
                continue  # catch up with what the other replica did, then train again
        raise EditConflictError("the codebook entry kept changing under concurrent edits; try again")

    def commit_and_apply(
        self,
        trained: TrainedEdit,
        prompt: str,
        target: str,
        metadata: dict,
        by: str | None = None,
        item: tuple[int, int] | None = None,
        started: float | None = None,
        trained_at: int | None = None,
    ) -> Edit | None:
        """Commit ``trained`` (its row, entry version and event in one transaction, with ``item``
        marked done in it) and only then apply it to the codebook; returns its row, or None when
        ``item`` is no longer pending. Raises ``repo.EntryConflict`` when another replica changed the
        entry it retrains since it was read; with ``trained_at`` (the last event id applied when it
        was trained, ours included) ``StaleTrainingError`` when the commit had to catch up with
        events of other replicas first. Either way nothing is stored and the edit should be trained
        again. ``started`` is when making it began (the latency metric)."""
        editor, replication = self.editor, self.replication
        codebook_id = replication.codebook_id
        expected = None
        if trained.entry_id is not None:
            with self.sessions() as session:
                expected = repo.entry_version(session, codebook_id, trained.entry_id)
        with self.sessions.begin() as session:
            replication.lock_and_catch_up(session)
            if trained_at is not None and replication.last_event_id != trained_at:
                raise StaleTrainingError("other replicas changed the codebook since this edit was trained")
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
                trail=repo.tensor_to_bytes(trained.trail) if trained.trail is not None else None,
            )
            session.flush()
            if item is not None:
                imports.finish_item(session, *item, row.id)
            event_id = replication.announce(session)
        editor.apply(row.id, trained, entry_id=row.entry_id)
        replication.record(event_id, "edit", row.id)
        replication.changed()
        self.metrics.edits.inc()
        if started is not None:
            self.metrics.edit_latency.observe(time.perf_counter() - started)
        return row

    def make_many(
        self, facts: Sequence[imports.ImportFact], by: str | None = None
    ) -> list[Edit | None | InvalidInputError]:
        """``make`` of each fact in order (an import's chunk), their values trained together: each
        fact ends as ``make`` one after another would leave it. Facts are checked, then trained by
        ``HorenEditor.train_many`` and committed and applied one by one in order, as its contract
        says; what it did not return (a fact that retrains an entry of an earlier one) is trained by
        the next call, after those are applied. A commit that conflicts on its entry falls back to
        ``make`` for that fact; one that had to catch up with other replicas' events first stores
        nothing; either way the facts after it are trained again. Returns each fact's row, None
        where its item was no longer pending, or the ``InvalidInputError`` that refused it."""
        out: list[Edit | None | InvalidInputError] = [None] * len(facts)
        todo: list[int] = []
        for i, f in enumerate(facts):
            try:
                self.check(f.prompt, f.target, f.format)
                todo.append(i)
            except InvalidInputError as exc:
                out[i] = exc
        replication, stale = self.replication, 0
        while todo:
            replication.sync()
            started, trained_at = time.perf_counter(), replication.last_event_id
            results = self.editor.train_many(
                [Fact(facts[i].prompt, facts[i].target, facts[i].format, facts[i].subject) for i in todo]
            )
            done = 0
            for i, trained in zip(todo, results):
                f = facts[i]
                if isinstance(trained, InvalidInputError):
                    out[i] = trained
                    done += 1
                    continue
                try:
                    out[i] = self.commit_and_apply(
                        trained, f.prompt, f.target, f.metadata, by, f.item, started=started, trained_at=trained_at
                    )
                except repo.EntryConflict:
                    out[i] = self.make(f.prompt, f.target, f.metadata, f.format, by, f.subject, f.item)
                    done += 1
                    break
                except StaleTrainingError:
                    stale += 1
                    if stale > self.settings.conflict_retries:  # others keep committing: one by one
                        out[i] = self.make(f.prompt, f.target, f.metadata, f.format, by, f.subject, f.item)
                        done, stale = done + 1, 0
                    break
                done, stale = done + 1, 0
                trained_at = replication.last_event_id  # our own event
            todo = todo[done:]
        return out

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
