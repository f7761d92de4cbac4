"""Answering a batch of generate jobs on the device thread: prompts to token ids (plain, chat
template, chat messages), one ``HorenEditor.generate`` per group of jobs that sample alike, stop
strings, and streaming the text of each row as it settles."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from horen_core import HorenEditor
from horen_core.errors import InvalidInputError
from service.jobs import GenerateJob, GenerateResult, TokenSink
from service.metrics import Metrics

log = logging.getLogger("horen.engine")

# below this a temperature's distribution does not fit a float (logits / t overflow to inf, then NaN):
# such temperatures are answered greedily, the limit they approach
MIN_SAMPLING_TEMPERATURE = 1e-3


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` in it, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def check_prompt_tokens(n: int, limit: int) -> None:
    if n > limit:
        raise InvalidInputError(f"prompt is {n} tokens; the limit is {limit} (HOREN_MAX_PROMPT_TOKENS)")


class _RowText:
    """One generate job's answer while it is generated: decodes its tokens, cuts it at the first
    stop string, and hands the text that can no longer change to the job's sink (if any). Its
    ``push`` is the job's row hook for ``HorenEditor.generate``: False once the row needs no more."""

    def __init__(self, tokenizer: Any, job: GenerateJob, metrics: Metrics) -> None:
        self.tokenizer, self.metrics = tokenizer, metrics
        self.sink: TokenSink | None = job.sink
        self.stops: list[str] = [s for s in job.stop or [] if s]
        self.limit = job.max_new_tokens
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


class Generator:
    """Runs on the device thread; sets each job's future to a ``GenerateResult`` or an error."""

    def __init__(self, editor: HorenEditor, metrics: Metrics, max_prompt_tokens: int) -> None:
        self.editor = editor
        self.metrics = metrics
        self.max_prompt_tokens = max_prompt_tokens

    def run(self, jobs: list[GenerateJob]) -> None:
        groups: dict[tuple, list[GenerateJob]] = {}
        for j in jobs:
            temperature = float(j.temperature)
            if temperature < MIN_SAMPLING_TEMPERATURE:
                temperature = 0.0
            top_p = float(j.top_p) if temperature > 0 else 1.0
            seed = j.seed if temperature > 0 else None
            # a seeded sample runs alone, so that its draws do not depend on what it was batched with
            alone = id(j) if seed is not None else None
            groups.setdefault((temperature, bool(j.edits), top_p, seed, alone), []).append(j)
        for (temperature, edited, top_p, seed, _), group in groups.items():
            self._generate(group, temperature, edited, top_p, seed)

    def _prompt_ids(self, job: GenerateJob) -> list[int]:
        editor = self.editor
        if job.messages is not None:
            ids = self._chat_ids(job.messages)
        elif job.format == "chat":
            ids = editor.chat.render(job.prompt).ids
        else:
            ids = editor.encode_prompt(job.prompt)
        check_prompt_tokens(len(ids), self.max_prompt_tokens)
        editor.tokens.check_length(ids, job.max_new_tokens)
        return ids

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

    def _generate(
        self, jobs: list[GenerateJob], temperature: float, edited: bool, top_p: float, seed: int | None
    ) -> None:
        editor = self.editor
        ok: list[tuple[GenerateJob, list[int]]] = []
        for j in jobs:
            try:
                ok.append((j, self._prompt_ids(j)))
            except Exception as exc:
                j.future.set_exception(exc)
        if not ok:
            return
        rows = [_RowText(editor.tokenizer, j, self.metrics) for j, _ in ok]
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
                    [ids for _, ids in ok],
                    max_new_tokens=[j.max_new_tokens for j, _ in ok],
                    temperature=temperature,
                    top_p=top_p,
                    stream=(lambda i, ids: rows[i].push(ids)) if hook else None,
                )
        except Exception as exc:
            for j, _ in ok:
                j.future.set_exception(exc)
            return
        self.metrics.generate_batch.observe(len(ok))
        for (j, ids), g, row in zip(ok, gens, rows):
            text, stopped = cut_at_stop(g.text, row.stops)
            row.finish(text)
            finish = "stop" if stopped or len(g.token_ids) < j.max_new_tokens else "length"
            routing = (g.score, editor.config.threshold) if edited else (None, None)
            j.future.set_result(GenerateResult(text, g.edit_id, finish, len(ids), len(g.token_ids), *routing))
            self.metrics.generate_latency.observe(time.perf_counter() - j.accepted)
        log.debug("generated %d in %.3fs", len(ok), time.perf_counter() - t0)
