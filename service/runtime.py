"""The runtime: builds the device worker, the editing service, replication and the import worker
from ``Settings``, and is the ``Device`` its worker thread runs (load the model, attach it to its
codebook in the database, dispatch jobs, catch up between them). Its public methods are what the
routes use; it knows nothing of HTTP."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

import torch

from horen_core import HorenEditor, load_model
from horen_core.gate import RelationGate
from service.db.errors import DB_ERRORS
from service.db.session import make_engine, make_session_factory
from service.editing import EditingService
from service.generation import Generator
from service.imports import ImportWorker
from service.index import KeyIndex
from service.jobs import EditJob, GenerateJob, Job, RollbackJob, SyncJob
from service.metrics import Metrics
from service.replication import Replication, start_listener
from service.settings import Settings
from service.worker import DeviceWorker, NotReadyError, QueueFullError

log = logging.getLogger("horen.engine")


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.db_engine = make_engine(settings.resolved_database_url())
        self.sessions = make_session_factory(self.db_engine)
        self.replication = Replication(self.sessions, self.metrics)
        self.imports = ImportWorker(self.sessions, settings.import_chunk, settings.sync_interval)
        self.worker = DeviceWorker(self, settings.queue_size, settings.max_batch, self.metrics)
        self.editor: HorenEditor | None = None  # loaded by the worker thread
        self.index: KeyIndex | None = None  # the editor's candidate index, once attached
        self.generator: Generator | None = None
        self.editing: EditingService | None = None
        self._ready = False  # attached to the database and replayed

    # ---- what the routes use ----------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.db_engine.dispose()

    def submit(self, job: Job) -> Future:
        """Queue a job for the device thread; ``NotReadyError`` before the model serves, ``QueueFullError``."""
        self.check_ready()
        return self.worker.submit(job)

    def check_ready(self) -> None:
        if self.worker.error is not None:
            raise NotReadyError(f"the model failed to load: {self.worker.error}")
        if not self._ready:
            raise NotReadyError(self.not_ready_reason())

    def not_ready_reason(self) -> str | None:
        """Why the model cannot serve yet; None once it can."""
        error = self.worker.error
        if error is not None:
            return f"the model failed to load: {type(error).__name__}: {error}"
        if self._ready:
            return None
        if self.editor is not None:
            db_error = self.replication.db_error
            return f"model loaded, waiting for the database: {db_error}" if db_error else "replaying edits"
        return "the model is still loading"

    def served_codebook(self) -> int:
        """The id of the codebook this process serves; ``NotReadyError`` before it is attached."""
        self.check_ready()
        return self.replication.codebook_id

    def in_sync(self) -> tuple[bool, int, int]:
        return self.replication.in_sync()

    def queue_depth(self) -> int:
        return self.worker.depth()

    def queue_import(self, import_id: int) -> None:
        """Have the device thread make a stored import's facts, starting now rather than at its next poll."""
        self.imports.add(import_id)
        self.wake()

    def wake(self) -> None:
        """Ask the device thread to apply committed events; its periodic catch-up does it otherwise."""
        try:
            self.worker.submit(SyncJob())
        except (QueueFullError, NotReadyError):
            pass

    def device_summary(self) -> dict[str, Any]:
        editor, index = self.editor, self.index
        if editor is None or not self._ready:
            return {}
        return {
            "device": str(editor.device),
            "module": editor.adapter.module_path,
            "codebook_device": str(editor.codebook.device),
            "entries": len(editor.codebook),
            "log_digest": self.replication.log_digest,
            "cuda": torch.cuda.is_available(),
            "index": index.kind if index is not None else None,
        }

    # ---- the device thread (service.worker.Device) -----------------------------------------
    def load(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(
            s.model or None,
            device=s.device,
            device_map=s.device_map or None,
            converted_dir=s.converted_dir or s.data_dir / "converted",
        )
        editor = HorenEditor(model, tokenizer, s.horen_config())
        if s.relation_gate:
            editor.set_gate(RelationGate.load(s.relation_gate, editor.fingerprint))
        self.editor = editor

    def attach(self) -> bool:
        stopping, replication = self.worker.stopping, self.replication
        while not stopping.is_set():
            try:
                self._attach_once()
                break
            except DB_ERRORS as exc:  # the database is down at start: wait for it, /readyz says so
                replication.db_failed(exc)
                stopping.wait(self.settings.sync_interval)
        if stopping.is_set():
            return False
        replication.db_back()
        s, editor = self.settings, self.editor
        self.generator = Generator(editor, self.metrics, s.max_prompt_tokens)
        self.editing = EditingService(editor, self.sessions, replication, self.metrics, s)
        try:
            self.imports.resume(replication.codebook_id)
        except DB_ERRORS as exc:  # picked up by the next start; the import's status says it waits
            replication.db_failed(exc)
        self._ready = True
        start_listener(s.resolved_database_url(), self.wake, stopping, s.sync_interval)
        return True

    def _attach_once(self) -> None:
        s, editor = self.settings, self.editor
        index = KeyIndex(
            editor.codebook.key_dim,
            top_k=s.index_top_k,
            scan_k=s.index_scan_k,
            code_dims=s.index_code_dims,
            min_keys=s.index_min_keys,
            use_gpu=editor.device.type == "cuda",
            scan_threads=s.index_threads,
        )
        self.replication.attach(editor)
        editor.attach_index(index)  # built once over the replayed codebook, then fed its changes
        self.index = index

    def generate(self, jobs: list[GenerateJob]) -> None:
        self.generator.run(jobs)

    def run(self, job: Job) -> Any:
        if isinstance(job, EditJob):
            return self.editing.edit(job)
        if isinstance(job, RollbackJob):
            return self.editing.rollback(job.edit_id, job.by)
        if isinstance(job, SyncJob):
            return self.replication.sync()
        raise TypeError(f"no handler for {type(job).__name__}")

    def wait_time(self) -> float:
        return 0 if self.imports.active else self.settings.sync_interval  # an import takes the idle turns

    def idle(self) -> None:
        if self.imports.active:
            self._import_step()
        else:
            self.replication.safe_sync()

    def between_jobs(self) -> None:
        if self.imports.active:  # one chunk between requests: neither starves the other
            self._import_step()
        if time.monotonic() - self.replication.last_sync > self.settings.sync_interval:
            self.replication.safe_sync()

    def _import_step(self) -> None:
        try:
            self.imports.step(self.editing)
        except DB_ERRORS as exc:
            self.replication.db_failed(exc)
            self.imports.wait()
        except Exception:
            log.exception("an import step failed; will retry")
            self.imports.wait()
