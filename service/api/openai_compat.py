"""The OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

Requests become ordinary generate jobs (every active edit applied, as in /generate; `"edits": false`
answers with the unedited model). Unknown fields are ignored, as OpenAI does; options this service
cannot honour (n > 1, echo, logprobs, best_of > 1) are refused with a 400. With `stream: true` the
answer is Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`: the device thread
hands text to an asyncio queue with `call_soon_threadsafe`, and a client that goes away stops its row
of the batch. Each choice carries an extension field, `edit_id`: the edit that routed it, or null.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.api.errors import (
    ModelNotFoundError,
    UnsupportedOptionError,
    classify,
    error_responses,
    openai_error_body,
)
from service.api.routes import MetricsDep, Reader, RuntimeDep
from service.api.schemas import MAX_PROMPT_CHARS, TEXT, valid_unicode
from service.jobs import GenerateJob, GenerateResult
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings

router = APIRouter(
    prefix="/v1", tags=["openai"], responses=error_responses(400, 401, 403, 404, 413, 429, 503, openai=True)
)

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's is the rest of the context; this bounds a forgotten max_tokens
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- requests -------------------------------------------------------------------------------
class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: 0 is not false, "1" is not 1

    model: str | None = Field(default=None, description="optional: one model is served")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="default 1, as OpenAI's; below 0.001 greedy, as 0"
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the answer ends before one")
    n: int | None = Field(default=None, description="only 1")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="makes a sampled answer repeatable")
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None
    best_of: int | None = None
    edits: bool = Field(default=True, description="extension: false answers with the unedited model")

    def checked(self, settings: Settings, default_max: int) -> dict[str, Any]:
        """The generate job's options; refuses what this service does not do."""
        if self.n not in (None, 1):
            raise UnsupportedOptionError("n", "only n = 1 is supported")
        if self.best_of not in (None, 1):
            raise UnsupportedOptionError("best_of", "only best_of = 1 is supported")
        if self.logprobs:
            raise UnsupportedOptionError("logprobs", "logprobs are not supported")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise UnsupportedOptionError("stop", "at most 4 stop sequences")
        limit = settings.max_new_tokens_limit
        max_tokens = self.max_tokens or min(default_max, limit)
        if max_tokens > limit:
            raise UnsupportedOptionError("max_tokens", f"max_tokens must be <= {limit}")
        return {
            "max_new_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": stops,
            "seed": self.seed,
            "edits": self.edits,
        }


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str

    _check = field_validator("text")(valid_unicode)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        return valid_unicode(v) if isinstance(v, str) else v

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=TEXT)]


class CompletionRequest(_Options):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=100)] = Field(
        description="a prompt, or a list of 1 to 100 (one choice each)"
    )
    echo: bool | None = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        for p in [v] if isinstance(v, str) else v:
            valid_unicode(p)
        return v


# ---- responses (documented; the handlers build plain dicts) ---------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    edit_id: int | None = Field(description="extension: the edit that routed this answer, or null")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    edit_id: int | None = Field(description="extension: the edit that routed this answer, or null")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "horen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the model ------------------------------------------------------------------------------
def served_model_id(settings: Settings) -> str:
    """The id the /v1 routes answer to: HOREN_SERVED_MODEL_NAME, else the model folder's name or
    the GGUF file's stem."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model:
        path = Path(settings.model)
        return path.stem if path.suffix == ".gguf" else path.name
    try:
        from horen_core.modeling import default_model_path

        return default_model_path().stem
    except Exception:  # the bundled model's package is missing: loading will say so
        return "default"


def _model(request: Request, asked: str | None) -> str:
    served = request.app.state.model_id
    if asked and asked != served:
        raise ModelNotFoundError(f"the model {asked!r} does not exist; this service serves {served!r}")
    return served


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _who: Reader) -> dict:
    """The one model served, by the id requests may name."""
    return {"object": "list", "data": [_card(request)]}


@router.get("/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, _who: Reader) -> dict:
    _model(request, model_id)
    return _card(request)


def _card(request: Request) -> dict:
    return {
        "id": request.app.state.model_id,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "horen",
    }


# ---- streaming ------------------------------------------------------------------------------
_END = object()


class QueueSink:
    """A `TokenSink` that hands the device thread's text to the event loop's queue as (index, text);
    (index, _END) follows once the job's future is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> None:
        self.loop, self.queue, self.index = loop, queue, index
        self._cancelled = threading.Event()

    def put(self, text: str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, text))

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def ended(self, _future: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, _END))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Answer:
    """One /v1 request's jobs: submitted, then awaited whole or streamed."""

    def __init__(self, runtime: Runtime, options: dict, prompts: list[dict], stream: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sinks = [QueueSink(self.loop, self.queue, i) for i in range(len(prompts))] if stream else []
        self.futures = []
        try:
            for i, prompt in enumerate(prompts):
                sink = self.sinks[i] if stream else None
                self.futures.append(runtime.submit(GenerateJob(**prompt, **options, sink=sink)))
        except BaseException:
            self.cancel()
            raise
        for sink, fut in zip(self.sinks, self.futures):
            fut.add_done_callback(sink.ended)

    def cancel(self) -> None:
        for sink in self.sinks:
            sink.cancel()
        for fut in self.futures:
            fut.cancel()  # one still queued never runs; a running one stops at its next token

    async def results(self) -> list[GenerateResult]:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in self.futures)))

    async def started(self) -> list[tuple[int, Any]]:
        """Waits for the first job to start or fail, so that a refused prompt is an error response,
        not a broken stream. Returns the queue items read meanwhile."""
        first = await self.queue.get()
        if first[1] is _END and self.futures[first[0]].exception() is not None:
            self.cancel()
            raise self.futures[first[0]].exception()
        return [first]

    async def events(self, pending: list[tuple[int, Any]]) -> AsyncIterator[tuple[int, str | GenerateResult]]:
        """(index, text) as it is generated, then (index, result) when that choice is done."""
        open_ = len(self.futures)
        while open_:
            index, item = pending.pop(0) if pending else await self.queue.get()
            if item is _END:
                open_ -= 1
                yield index, self.futures[index].result()
            elif item:
                yield index, item


def _usage(results: list[GenerateResult]) -> dict:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _stream(answer: _Answer, chat: bool, meta: dict, include_usage: bool, metrics: Metrics) -> StreamingResponse:
    pending = await answer.started()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra: Any) -> str:
        return _sse({**meta, "object": obj, "choices": choices, **extra})

    async def body() -> AsyncIterator[str]:
        done: list[GenerateResult] = []
        try:
            if chat:
                for i in range(len(answer.futures)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for index, item in answer.events(pending):
                if isinstance(item, GenerateResult):
                    done.append(item)
                    end = {"index": index, "finish_reason": item.finish_reason, "edit_id": item.edit_id}
                    yield chunk([{**end, "delta": {}} if chat else {**end, "text": "", "logprobs": None}])
                elif chat:
                    yield chunk([{"index": index, "delta": {"content": item}, "finish_reason": None}])
                else:
                    yield chunk([{"index": index, "text": item, "finish_reason": None, "logprobs": None}])
            metrics.generates.inc(len(done))
            if include_usage:
                yield chunk([], usage=_usage(done))
        except Exception as exc:  # the device thread failed mid-answer: say so in the stream, then end it
            status, kind, message = classify(exc)
            yield _sse(openai_error_body(status, kind, message))
        finally:
            answer.cancel()  # the client went away (or we are done): free the rows
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _meta(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _include_usage(body: _Options) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


# ---- routes ---------------------------------------------------------------------------------
@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "a chat.completion, or SSE chunks"}},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, runtime: RuntimeDep, metrics: MetricsDep, _who: Reader
) -> Any:
    """Answer the messages (in the model's chat template; routed by the last user message)."""
    model = _model(request, body.model)
    limit = request.app.state.settings.max_new_tokens_limit
    if body.max_completion_tokens and body.max_completion_tokens > limit:
        raise UnsupportedOptionError("max_completion_tokens", f"max_completion_tokens must be <= {limit}")
    if body.max_completion_tokens and not body.max_tokens:
        body.max_tokens = body.max_completion_tokens
    options = body.checked(request.app.state.settings, DEFAULT_CHAT_MAX_TOKENS)
    answer = _Answer(runtime, options, [{"messages": [m.plain() for m in body.messages]}], bool(body.stream))
    meta = _meta("chatcmpl", model)
    if body.stream:
        return await _stream(answer, True, meta, _include_usage(body), metrics)
    results = await answer.results()
    metrics.generates.inc(len(results))
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "finish_reason": r.finish_reason,
            "logprobs": None,
            "edit_id": r.edit_id,
        }
        for i, r in enumerate(results)
    ]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(results)}


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "a text_completion, or SSE chunks"}},
)
async def completions(
    body: CompletionRequest, request: Request, runtime: RuntimeDep, metrics: MetricsDep, _who: Reader
) -> Any:
    """Continue the prompt (or each of a list of prompts: one choice each) as plain text."""
    model = _model(request, body.model)
    if body.echo:
        raise UnsupportedOptionError("echo", "echo is not supported")
    if body.suffix:
        raise UnsupportedOptionError("suffix", "suffix is not supported")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > 100:
        raise UnsupportedOptionError("prompt", "give between 1 and 100 prompts")
    if any(not p.strip() for p in prompts):
        raise UnsupportedOptionError("prompt", "a prompt must not be empty")
    options = body.checked(request.app.state.settings, DEFAULT_COMPLETION_MAX_TOKENS)
    answer = _Answer(runtime, options, [{"prompt": p, "format": "plain"} for p in prompts], bool(body.stream))
    meta = _meta("cmpl", model)
    if body.stream:
        return await _stream(answer, False, meta, _include_usage(body), metrics)
    results = await answer.results()
    metrics.generates.inc(len(results))
    choices = [
        {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None, "edit_id": r.edit_id}
        for i, r in enumerate(results)
    ]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(results)}
