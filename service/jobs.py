"""The typed jobs that cross from the API to the device thread, and what a generate job returns.
Each job carries the future its result or error is set on."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol


class TokenSink(Protocol):
    """Where a streamed generate job's text goes, called on the device thread: neither may block.
    Everything ``put`` is called with, in order, is the job's final ``GenerateResult.text``."""

    def put(self, text: str) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(eq=False, kw_only=True)
class Job:
    future: Future = field(default_factory=Future, init=False, repr=False)
    accepted: float = field(default_factory=time.perf_counter, init=False, repr=False)


@dataclass(eq=False, kw_only=True)
class GenerateJob(Job):
    """Continue ``prompt``, or answer chat ``messages``; runs batched with the generate jobs queued beside it."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # in the model's chat template, routed by the last user message
    format: str = "plain"  # "chat": the prompt is a user message in the chat template
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None  # the answer ends before the first of these
    edits: bool = True  # False: answered by the unedited model
    sink: TokenSink | None = None  # streams the answer's text as it settles


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    target: str
    metadata: dict[str, Any] | None = None
    format: str = "auto"
    subject: str | None = None  # None: inferred from the prompt


@dataclass(eq=False, kw_only=True)
class EditJob(Job):
    """Make these edits in order, each committed on its own; all are validated before any is stored."""

    edits: list[EditRequest]
    by: str | None = None  # the API key's name


@dataclass(eq=False, kw_only=True)
class RollbackJob(Job):
    edit_id: int
    by: str | None = None


@dataclass(eq=False, kw_only=True)
class SyncJob(Job):
    """Apply the events other processes committed; the result is how many there were."""


@dataclass(eq=False, kw_only=True)
class StopJob(Job):
    """Wakes the device thread so that it sees it must stop."""


@dataclass
class GenerateResult:
    text: str
    edit_id: int | None
    finish_reason: str = "length"  # "stop": end of text or a stop string; "length": max_new_tokens reached
    prompt_tokens: int = 0
    completion_tokens: int = 0
    score: float | None = None  # routing cosine of the prompt with its best key; None when answered unedited
    threshold: float | None = None  # the cosine routing must reach; None when answered unedited
