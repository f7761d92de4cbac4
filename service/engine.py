"""The engine: one thread owns the model, the HoReN editor, the FAISS index and all device work.

Requests reach it through a bounded queue and get their results back as futures, so the event loop
never blocks on torch. Jobs run in the order they were accepted; generate jobs waiting together run
as one batch. The database is the source of truth: an edit is trained, then committed (with the
codebook change) and only then applied to the in-memory codebook and acknowledged. Changes
committed by other replicas are applied from the event log without retraining. The engine knows
nothing about HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from sqlalchemy import exc as sa_exc

from horen_core import HorenEditor, load_model
from horen_core.errors import InvalidInputError, UnknownEditError
from service import imports
from service.db import repository as repo
from service.db.session import make_engine, make_session_factory
from service.imports import ImportWorker
from service.index import KeyIndex
from service.metrics import Metrics
from service.replication import NOTIFY_CHANNEL, edit_to_dict, notify, psycopg_conninfo
from service.settings import Settings

log = logging.getLogger("horen.engine")

# below this a temperature's distribution does not fit a float (logits / t overflow to inf, then NaN):
# such temperatures are answered greedily, the limit they approach
MIN_SAMPLING_TEMPERATURE = 1e-3


class QueueFullError(Exception):
    """The engine's queue is full; the caller should retry later."""


class NotReadyError(Exception):
    """The model is still loading or the engine has stopped."""


class EditConflictError(Exception):
    """Another replica kept changing the same codebook entry; the edit was not stored."""


@dataclass
class Job:
    kind: str  # "edit" | "edits" | "generate" | "rollback" | "sync"
    payload: dict[str, Any]
    future: Future = field(default_factory=Future)
    accepted: float = field(default_factory=time.perf_counter)


@dataclass
class GenerateResult:
    text: str
    edit_id: int | None
    finish_reason: str = "length"  # "stop": end of text or a stop string; "length": max_new_tokens reached
    prompt_tokens: int = 0
    completion_tokens: int = 0
    score: float | None = None  # routing cosine of the prompt with its best key; None when answered unedited
    threshold: float | None = None  # the cosine routing must reach; None when answered unedited


class TokenSink(Protocol):
    """Where a streamed generate job's text goes, called on the engine thread: neither may block.
    Everything ``put`` is called with, in order, is the job's final ``GenerateResult.text``."""

    def put(self, text: str) -> None: ...

    def cancelled(self) -> bool: ...


class _RowText:
    """One generate job's answer while it is generated: decodes its tokens, cuts it at the first
    stop string, and hands the text that can no longer change to the job's sink (if any). Its
    ``push`` is the job's row hook for ``HorenEditor.generate``: False once the row needs no more."""

    def __init__(self, tokenizer: Any, payload: dict, metrics: Metrics) -> None:
        self.tokenizer, self.metrics = tokenizer, metrics
        self.sink: TokenSink | None = payload.get("sink")
        self.stops: list[str] = [s for s in payload.get("stop") or [] if s]
        self.limit = payload["max_new_tokens"]
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, ids: list[int]) -> bool:
        if self.sink is not None and self.sink.cancelled():
            self.metrics.streams_stopped.inc()
            self.done = True
            return False
        if not ids or self.done:
            return not self.done
        self.ids = (self.ids + ids)[: self.limit]
        self.done = len(self.ids) >= self.limit
        text, stopped = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        self.done = self.done or stopped
        self._send(text if self.done else text[: len(text) - self._unsettled(text)])
        return not self.done

    def _unsettled(self, text: str) -> int:
        """How many trailing characters may still change: a partial UTF-8 character, or the start of a stop string."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def _send(self, text: str) -> None:
        if self.sink is None or len(text) <= len(self.sent):
            return
        if not text.startswith(self.sent):  # a tokenizer whose decode of a prefix is not a prefix
            log.warning("streamed text diverged from the decoded answer; the rest is not sent")
            return
        self.sink.put(text[len(self.sent) :])
        self.sent = text

    def finish(self, text: str) -> None:
        """Send what is left of the final answer."""
        if self.sink is not None and not self.sink.cancelled():
            self._send(text)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` in it, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# what a database that is down, failing, full or read-only raises
DB_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DatabaseError, sa_exc.TimeoutError)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=settings.queue_size)
        self._held: Job | None = None  # a job pulled while collecting a generate batch
        self._thread = threading.Thread(target=self._run, name="horen-engine", daemon=True)
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        # why the last database access of the engine thread failed; None while the database answers
        self.db_error: str | None = None
        self.editor: HorenEditor | None = None
        self._model_editor: HorenEditor | None = None  # loaded, not yet attached to its codebook
        self.index: KeyIndex | None = None
        self.codebook_id: int | None = None
        self.last_event_id = 0
        self.last_sync = 0.0
        # a hash chained over every event applied here, in order: equal on replicas that agree
        self.log_digest = hashlib.sha256(b"horen").hexdigest()
        self.db_engine = make_engine(settings.resolved_database_url())
        self.sessions = make_session_factory(self.db_engine)
        self._listener: threading.Thread | None = None
        self.imports = ImportWorker(self.sessions, self._edit_one, settings.import_chunk, settings.sync_interval)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(Job("stop", {}))
        except queue.Full:
            pass
        self._thread.join(timeout)
        self.db_engine.dispose()

    @property
    def model_loaded(self) -> bool:
        return self._model_editor is not None

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, kind: str, **payload: Any) -> Future:
        if self.load_error is not None or self._stop.is_set():
            raise NotReadyError("the engine is not running")
        job = Job(kind, payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.inc()
            raise QueueFullError("the request queue is full") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load_model()
        except BaseException as exc:  # reported by /readyz; the process keeps serving /healthz
            log.exception("engine failed to start")
            self.load_error = exc
            return
        while not self._stop.is_set():
            try:
                self._attach()
                break
            except DB_ERRORS as exc:  # the database is down at start: wait for it, /readyz says so
                self._db_failed(exc)
                self._stop.wait(self.settings.sync_interval)
        if self._stop.is_set():
            return
        self._db_back()
        self._resume_imports()
        self.ready.set()
        self._start_listener()
        while not self._stop.is_set():
            try:
                # while an import runs, it takes the turns no request wants
                job = self._next_job(timeout=0 if self.imports.active else self.settings.sync_interval)
            except queue.Empty:
                if self.imports.active:
                    self._import_step()
                else:
                    self._safe_sync()
                continue
            if job.kind == "stop":
                break
            if job.kind == "generate":
                self._run_generate_batch(job)
            else:
                self._run_one(job)
            if self.imports.active:  # one chunk between requests: neither starves the other
                self._import_step()
            self.metrics.queue_depth.set(self._queue.qsize())
            if time.monotonic() - self.last_sync > self.settings.sync_interval:
                self._safe_sync()

    def _next_job(self, timeout: float) -> Job:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    def _resume_imports(self) -> None:
        try:
            self.imports.resume(self.codebook_id)
        except DB_ERRORS as exc:  # picked up by the next start; the import's status says it waits
            self._db_failed(exc)

    def _import_step(self) -> None:
        try:
            self.imports.step(self._check_edit)
        except DB_ERRORS as exc:
            self._db_failed(exc)
            self.imports.wait()
        except Exception:
            log.exception("an import step failed; will retry")
            self.imports.wait()

    def _run_one(self, job: Job) -> None:
        handler: Callable[..., Any] = getattr(self, f"_do_{job.kind}")
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(handler(**job.payload))
        except BaseException as exc:
            job.future.set_exception(exc)

    def _run_generate_batch(self, first: Job) -> None:
        batch = [first]
        while len(batch) < self.settings.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt.kind != "generate":
                self._held = nxt  # keeps the total order: it runs right after this batch
                break
            batch.append(nxt)
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        groups: dict[tuple, list[Job]] = {}
        for j in batch:
            temperature = float(j.payload["temperature"])
            if temperature < MIN_SAMPLING_TEMPERATURE:
                temperature = 0.0
            top_p = float(j.payload.get("top_p", 1.0)) if temperature > 0 else 1.0
            seed = j.payload.get("seed") if temperature > 0 else None
            # a seeded sample runs alone, so that its draws do not depend on what it was batched with
            alone = id(j) if seed is not None else None
            key = (temperature, bool(j.payload.get("edits", True)), top_p, seed, alone)
            groups.setdefault(key, []).append(j)
        for (temperature, edited, top_p, seed, _), jobs in groups.items():
            self._generate_group(jobs, temperature, edited, top_p=top_p, seed=seed)

    def _prompt_ids(self, payload: dict) -> list[int]:
        editor = self.editor
        if payload.get("messages") is not None:
            ids = self._chat_ids(payload["messages"])
        elif payload.get("format", "plain") == "chat":
            ids = editor.chat.render(payload["prompt"]).ids
        else:
            ids = editor.encode_prompt(payload["prompt"])
        self._check_prompt_tokens(len(ids))
        editor.check_length(ids, payload["max_new_tokens"])
        return ids

    def _check_prompt_tokens(self, n: int) -> None:
        limit = self.settings.max_prompt_tokens
        if n > limit:
            raise InvalidInputError(f"prompt is {n} tokens; the limit is {limit} (HOREN_MAX_PROMPT_TOKENS)")

    def _check_edit(self, prompt: str, target: str, format: str) -> None:
        """Raise ``InvalidInputError`` for an edit over the service's token limits or one the editor refuses."""
        self._check_prompt_tokens(len(self.editor.tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        n, limit = len(self.editor.encode_target(target)), self.settings.max_target_tokens
        if n > limit:
            raise InvalidInputError(f"target is {n} tokens; the limit is {limit} (HOREN_MAX_TARGET_TOKENS)")
        self.editor.check_edit(prompt, target, format)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """Messages in the model's chat template, ready for the assistant's answer (the template's
        own special tokens included, so none are added)."""
        tok = self.editor.tokenizer
        if not self.editor.chat.available:
            raise InvalidInputError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (role order, ...) raise plain exceptions
            raise InvalidInputError(f"the chat template refused these messages: {exc}") from exc
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def _generate_group(
        self, jobs: list[Job], temperature: float, edited: bool = True, top_p: float = 1.0, seed: int | None = None
    ) -> None:
        editor = self.editor
        assert editor is not None
        ok: list[tuple[Job, list[int]]] = []
        for j in jobs:
            try:
                ok.append((j, self._prompt_ids(j.payload)))
            except Exception as exc:
                j.future.set_exception(exc)
        if not ok:
            return
        n = max(j.payload["max_new_tokens"] for j, _ in ok)
        rows = [_RowText(editor.tokenizer, j.payload, self.metrics) for j, _ in ok]
        # the row hook costs a decode per step, so only batches that stream or stop early get it
        hook = any(r.sink is not None or r.stops for r in rows)
        for r in rows:
            if r.sink is not None:
                r.sink.put("")  # the job has started: its prompt was accepted
        t0 = time.perf_counter()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with contextlib.nullcontext() if edited else editor.unedited():
                gens = editor.generate(
                    [],
                    max_new_tokens=n,
                    temperature=temperature,
                    prompt_ids=[ids for _, ids in ok],
                    top_p=top_p,
                    stream=(lambda i, ids: rows[i].push(ids)) if hook else None,
                )
        except Exception as exc:
            for j, _ in ok:
                j.future.set_exception(exc)
            return
        self.metrics.generate_batch.observe(len(ok))
        for (j, ids), g, row in zip(ok, gens, rows):
            limit = j.payload["max_new_tokens"]
            toks = g.token_ids[:limit]
            text, stopped = cut_at_stop(editor.tokenizer.decode(toks, skip_special_tokens=True), row.stops)
            row.finish(text)
            finish = "stop" if stopped or len(toks) < limit else "length"
            routing = (g.score, editor.config.threshold) if edited else (None, None)
            j.future.set_result(GenerateResult(text, g.edit_id, finish, len(ids), len(toks), *routing))
            self.metrics.generate_latency.observe(time.perf_counter() - j.accepted)
        log.debug("generated %d in %.3fs", len(ok), time.perf_counter() - t0)

    # ---- loading and sync --------------------------------------------------------------------
    def _load(self) -> None:
        self._load_model()
        self._attach()

    def _load_model(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(
            s.model or None,
            device=s.device,
            device_map=s.device_map or None,
            converted_dir=s.converted_dir or s.data_dir / "converted",
        )
        self._model_editor = HorenEditor(model, tokenizer, s.horen_config())

    def _attach(self) -> None:
        """Find this model's codebook in the database and replay its edits (retried while the database is down)."""
        s, editor = self.settings, self._model_editor
        self.last_event_id = 0
        self.log_digest = hashlib.sha256(b"horen").hexdigest()
        ident = editor.identity
        with self.sessions.begin() as session:
            cb = repo.get_or_create_codebook(
                session, ident["model"], ident["module"], editor.codebook.key_dim, editor.codebook.value_dim
            )
            self.codebook_id = cb.id
        self.editor = editor
        use_gpu = editor.device.type == "cuda"
        self.index = KeyIndex(
            editor.codebook.key_dim,
            top_k=s.index_top_k,
            scan_k=s.index_scan_k,
            code_dims=s.index_code_dims,
            min_keys=s.index_min_keys,
            use_gpu=use_gpu,
            scan_threads=s.index_threads,
        )
        editor.candidate_provider = self.index.candidate_provider(editor.codebook, editor.retriever.support)
        self._rebuild()

    def _rebuild(self) -> None:
        """Replay every active edit of this codebook, in order, from the database."""
        editor = self.editor
        assert editor is not None
        with self.sessions() as session:
            last = repo.last_event_id(session, self.codebook_id)
            # room for every entry at once: growing chunk by chunk would copy the matrices each time
            editor.codebook.reserve(len(editor.codebook) + repo.count_active_edits(session, self.codebook_id))
            for rows in repo.active_edit_vectors(session, self.codebook_id):
                self._apply_edit_rows(rows)
            after = 0
            while after < last:  # the digest covers the whole log, so it survives restarts
                events = repo.events_after(session, self.codebook_id, after, limit=5000)
                if not events:
                    break
                for ev in events:
                    if ev.id > last:
                        break
                    self._advance(ev.id, ev.kind, ev.edit_id)
                after = events[-1].id
        self.last_event_id = last
        self._sync()  # whatever was committed while we replayed
        self._after_change()
        log.info("codebook rebuilt: %d entries from the database", len(editor.codebook))

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
            )

    def _sync(self) -> int:
        """Apply events committed by other processes since the last one seen. Returns how many."""
        applied = 0
        with self.sessions() as session:
            applied = self._apply_events(session)
        self.last_sync = time.monotonic()
        return applied

    def _apply_events(self, session: Any) -> int:
        editor = self.editor
        events = repo.events_after(session, self.codebook_id, self.last_event_id)
        for ev in events:
            edit = repo.get_edit(session, ev.edit_id)
            if ev.kind == "edit":
                if edit is not None:
                    self._apply_edit_rows([edit])
            elif ev.kind == "rollback":
                try:
                    editor.rollback(ev.edit_id)
                except UnknownEditError:
                    pass  # never applied here (e.g. rolled back before we replayed)
            self._advance(ev.id, ev.kind, ev.edit_id)
        if events:
            self._after_change()
        return len(events)

    def _advance(self, event_id: int, kind: str, edit_id: int) -> None:
        self.last_event_id = event_id
        self.log_digest = hashlib.sha256(f"{self.log_digest}:{event_id}:{kind}:{edit_id}".encode()).hexdigest()

    def _safe_sync(self) -> None:
        try:
            self._sync()
        except DB_ERRORS as exc:
            self._db_failed(exc)
        except Exception:
            log.exception("catch-up from the database failed; will retry")
        else:
            self._db_back()

    def _db_failed(self, exc: BaseException) -> None:
        if self.db_error is None:  # one line per outage, not one per poll
            log.warning("the database is unavailable (%s); generation goes on from memory, retrying", exc)
        self.db_error = "database unavailable"

    def _db_back(self) -> None:
        if self.db_error is not None:
            log.warning("the database answers again")
        self.db_error = None

    def _after_change(self) -> None:
        if self.index is not None and self.editor is not None:
            self.index.sync(self.editor.codebook)
        if self.editor is not None:
            self.metrics.codebook_size.set(len(self.editor.codebook))

    def _do_sync(self) -> int:
        return self._sync()

    def _start_listener(self) -> None:
        url = self.settings.resolved_database_url()
        if not url.startswith("postgresql"):
            return
        self._listener = threading.Thread(target=self._listen, args=(url,), name="horen-listen", daemon=True)
        self._listener.start()

    def _listen(self, url: str) -> None:
        """PostgreSQL LISTEN: wake the engine as soon as another replica commits an event."""
        import psycopg

        conninfo = psycopg_conninfo(url)
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    for _ in conn.notifies(timeout=self.settings.sync_interval * 5):
                        if self._stop.is_set():
                            return
                        try:
                            self.submit("sync")
                        except (QueueFullError, NotReadyError):
                            pass  # the periodic catch-up will get it
            except Exception:
                log.warning("LISTEN connection lost; retrying", exc_info=True)
                self._stop.wait(1.0)

    # ---- handlers ----------------------------------------------------------------------------
    def _do_edit(
        self,
        prompt: str,
        target: str,
        metadata: dict | None = None,
        format: str = "auto",
        by: str | None = None,
        subject: str | None = None,
    ) -> Any:
        self._check_edit(prompt, target, format)
        return self._edit_one(prompt, target, metadata or {}, format, by, subject)

    def _do_edits(self, edits: list[dict], by: str | None = None) -> list[Any]:
        for e in edits:  # validate all before storing any
            self._check_edit(e["prompt"], e["target"], e.get("format", "auto"))
        return [
            self._edit_one(
                e["prompt"], e["target"], e.get("metadata") or {}, e.get("format", "auto"), by, e.get("subject")
            )
            for e in edits
        ]

    def _edit_one(
        self,
        prompt: str,
        target: str,
        metadata: dict,
        format: str = "auto",
        by: str | None = None,
        subject: str | None = None,
        item: tuple[int, int] | None = None,
    ) -> Any:
        """Train, commit and apply one edit; returns its row as a dict. With ``item`` (an import's
        id and line) the edit is made only if that item is still pending, and the item is marked
        done in the edit's transaction; None when it was not pending."""
        editor = self.editor
        t0 = time.perf_counter()
        for _attempt in range(self.settings.conflict_retries + 1):
            self._sync()
            res = editor.edit(prompt, target, edit_id=0, apply=False, fmt=format, subject=subject)
            expected = None
            if res.entry_id is not None:
                with self.sessions() as session:
                    expected = repo.entry_version(session, self.codebook_id, res.entry_id)
            try:
                with self.sessions.begin() as session:
                    repo.serialize_commit_lock(session)
                    self._apply_events(session)  # commits of other replicas come first in the order
                    if item is not None and not imports.claim_item(session, *item):
                        return None
                    row = repo.insert_edit(
                        session,
                        self.codebook_id,
                        prompt=prompt,
                        target=target,
                        metadata=metadata,
                        entry_id=res.entry_id,
                        created_entry=res.created,
                        steps=res.steps,
                        loss=res.loss,
                        train_ms=res.seconds * 1000,
                        answer_ids=list(res.answer),
                        key=repo.tensor_to_bytes(res.key),
                        value=repo.tensor_to_bytes(res.value),
                        expected_entry_version=expected,
                        created_by=by,
                        subject=res.subject,
                    )
                    session.flush()
                    if item is not None:
                        imports.finish_item(session, *item, row.id)
                    event_id = repo.last_event_id(session, self.codebook_id)
                    notify(session, self.codebook_id, event_id)
                    out = edit_to_dict(row)
            except repo.EntryConflict:
                continue  # catch up with what the other replica did, then train again
            editor.apply_version(out["id"], out["entry_id"], res.key, res.value, res.answer, res.subject)
            self._advance(event_id, "edit", out["id"])
            self._after_change()
            self.metrics.edits.inc()
            self.metrics.edit_latency.observe(time.perf_counter() - t0)
            return out
        raise EditConflictError("the codebook entry kept changing under concurrent edits; try again")

    def _do_rollback(self, edit_id: int, by: str | None = None) -> Any:
        self._sync()
        with self.sessions.begin() as session:
            repo.serialize_commit_lock(session)
            self._apply_events(session)
            edit = repo.get_edit(session, edit_id)
            if edit is None or edit.codebook_id != self.codebook_id:
                raise UnknownEditError(f"no edit with id {edit_id}")
            edit, changed = repo.rollback_edit(session, edit_id, by)
            event_id = None
            if changed:
                session.flush()
                event_id = repo.last_event_id(session, self.codebook_id)
                notify(session, self.codebook_id, event_id)
            out = edit_to_dict(edit)
        if changed:
            try:
                self.editor.rollback(edit_id)
            except UnknownEditError:
                pass
            self._advance(event_id, "rollback", edit_id)
            self._after_change()
            self.metrics.rollbacks.inc()
        return out

    def _do_generate(self, prompt: str, max_new_tokens: int, temperature: float) -> GenerateResult:
        raise AssertionError("generate jobs are batched")  # pragma: no cover

    # ---- read-only helpers used by routes (database only; safe from any thread) ---------------
    def in_sync(self) -> tuple[bool, int, int]:
        with self.sessions() as session:
            latest = repo.last_event_id(session, self.codebook_id)
        return self.last_event_id >= latest, self.last_event_id, latest

    def device_summary(self) -> dict[str, Any]:
        editor = self.editor
        if editor is None:
            return {}
        return {
            "device": str(editor.device),
            "module": editor.adapter.module_path,
            "codebook_device": str(editor.codebook.device),
            "entries": len(editor.codebook),
            "log_digest": self.log_digest,
            "cuda": torch.cuda.is_available(),
            "index": self.index.kind if self.index is not None else None,
        }
