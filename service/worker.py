"""The device worker: one thread owns the model and runs every job on it, in the order the jobs were
accepted. Requests reach it through a bounded queue and get their result back as a future, so the
event loop never blocks on torch; generate jobs waiting together run as one batch. The worker knows
nothing of the database: what each job does, and what to do between jobs, is its ``Device``'s."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Protocol

from service.jobs import GenerateJob, Job, StopJob
from service.metrics import Metrics

log = logging.getLogger("horen.engine")


class QueueFullError(Exception):
    """The worker's queue is full; the caller should retry later."""


class NotReadyError(Exception):
    """The model is still loading, failed to load, or the worker has stopped."""


class Device(Protocol):
    """What the worker's thread runs."""

    def load(self) -> None:
        """Load the model; an exception is kept as the worker's ``error`` and the thread ends."""

    def attach(self) -> bool:
        """Get ready to serve (the database, replay); False when the worker stopped meanwhile."""

    def generate(self, jobs: list[GenerateJob]) -> None:
        """Answer a batch of running generate jobs, setting each one's future."""

    def run(self, job: Job) -> Any:
        """Any other job; its result (or exception) goes to the job's future."""

    def wait_time(self) -> float:
        """Seconds to wait for a job before calling ``idle``."""

    def idle(self) -> None:
        """No job came within ``wait_time``."""

    def between_jobs(self) -> None:
        """Called after each job (or batch)."""


class DeviceWorker:
    def __init__(self, device: Device, queue_size: int, max_batch: int, metrics: Metrics) -> None:
        self.device = device
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._held: Job | None = None  # a job pulled while collecting a generate batch
        self._thread = threading.Thread(target=self._run, name="horen-engine", daemon=True)
        self.stopping = threading.Event()
        self.error: BaseException | None = None  # why the model failed to load

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        try:
            self._queue.put_nowait(StopJob())
        except queue.Full:
            pass
        self._thread.join(timeout)

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> Future:
        """Queue ``job`` and return its future; raises ``QueueFullError`` or ``NotReadyError`` at once."""
        if self.error is not None or self.stopping.is_set():
            raise NotReadyError("the engine is not running")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.inc()
            raise QueueFullError("the request queue is full") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job.future

    def _run(self) -> None:
        try:
            self.device.load()
        except BaseException as exc:  # reported by /readyz; the process keeps serving /healthz
            log.exception("engine failed to start")
            self.error = exc
            return
        if not self.device.attach():
            return
        while not self.stopping.is_set():
            try:
                job = self._next_job(self.device.wait_time())
            except queue.Empty:
                self.device.idle()
                continue
            if isinstance(job, StopJob):
                break
            if isinstance(job, GenerateJob):
                self._run_batch(job)
            else:
                self._run_one(job)
            self.metrics.queue_depth.set(self._queue.qsize())
            self.device.between_jobs()

    def _next_job(self, timeout: float) -> Job:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    def _run_one(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(self.device.run(job))
        except BaseException as exc:
            job.future.set_exception(exc)

    def _run_batch(self, first: GenerateJob) -> None:
        batch: list[GenerateJob] = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, GenerateJob):
                self._held = nxt  # keeps the total order: it runs right after this batch
                break
            batch.append(nxt)
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if batch:
            self.device.generate(batch)
