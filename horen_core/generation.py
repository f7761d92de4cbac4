"""Routed generation: each row of a batch is routed once, in the prefill, by the editor's route
plan; a routed row runs with its edit's value until it has stated the edit's target, and the
unedited model writes the rest. Streams each row's final tokens to an optional hook. Knows nothing
of how values are trained or stored beyond reading the codebook's answers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

from horen_core.codebook import Codebook
from horen_core.errors import CorruptStateError, InvalidInputError
from horen_core.layer import RoutePlan, activate
from horen_core.prompting import long_form

# called by generate per row and step with the row's newly final tokens; False stops the row
RowStream = Callable[[int, list[int]], bool]
# (left-padded rows, how many of each row's first tokens hold its question, padded width) -> plan
QuestionPlan = Callable[[Sequence[Sequence[int]], Sequence[int], int], RoutePlan]

_UNEDITED: ContextVar[bool] = ContextVar("horen_unedited", default=False)


@contextlib.contextmanager
def unedited() -> Iterator[None]:
    """Within this block (on this thread or task) generation and scoring use the unedited model."""
    token = _UNEDITED.set(True)
    try:
        yield
    finally:
        _UNEDITED.reset(token)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    entry_id: int | None  # the codebook entry that routed this prompt
    edit_id: int | None  # the newest live edit of that entry
    score: float  # cosine of the refined query with its best key (0 when the codebook is empty)


def pad_left(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``seqs`` left-padded with ``pad`` to the longest, on ``device``."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows (padding at 0)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


class Decoder:
    """Generation and scoring over the wrapped model, routed by ``plan`` (the editor's question
    plan) unless the caller is inside ``unedited()``; every model call holds ``lock``."""

    def __init__(
        self,
        model,
        tokenizer,
        codebook: Codebook,
        plan: QuestionPlan,
        encode_prompt: Callable[..., list[int]],
        lock: threading.RLock,
        input_device: torch.device,
        repeat_run: int = 0,
    ) -> None:
        self.model, self.tokenizer, self.codebook = model, tokenizer, codebook
        self.plan, self.encode_prompt, self.lock = plan, encode_prompt, lock
        self.input_device = input_device
        self._word_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # built on the first hand-over
        self._word_edges: tuple[torch.Tensor, torch.Tensor] | None = None
        self.repeat_run = repeat_run

    def _pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_left(seqs, self.tokenizer.pad_token_id, self.input_device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int | Sequence[int] = 32,
        temperature: float = 0.0,
        min_new_tokens: int = 0,
        top_p: float = 1.0,
        stream: RowStream | None = None,
    ) -> list[Generation]:
        """Generate continuations for a batch; each row is routed on its own, once, in the prefill.
        A prompt is text or token ids (a list or tuple, used as they are); ``max_new_tokens`` is
        every row's budget or each row's (the batch runs to the largest, each row is cut at its own).

        A routed row runs with its edit's value until the text states the edit's target; from
        there the unedited model continues it (the prompt and the text so far prefilled again
        without the value), so what follows the edited fact reads as the model's own text, kept from
        looping on it (``_NoRepeat``, runs of ``repeat_run`` tokens; 0: off). A row that has not
        stated the target a few tokens past its length is answered by the unedited model from the
        prompt: the edit did not apply to it.

        ``stream(row, ids)``, when given, is called on this thread after every decoding step, for
        every row, with that row's tokens that have become final (often none): the concatenation
        of a row's calls is its ``token_ids``. A routed row's tokens are held back until it has
        stated its target (a row that misses it is answered again, so its start is never sent),
        unless the target is long-form: a paragraph streams as it is written. ``stream``
        returning False stops that row; its result is then what it was sent."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise InvalidInputError(f"{len(limits)} budgets for {len(prompts)} prompts")
        seqs = [
            list(p) if isinstance(p, list | tuple) else self.encode_prompt(p, reserve=n)
            for p, n in zip(prompts, limits)
        ]
        gen_kwargs = {
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_k=0, top_p=top_p)
        ids, mask = self._pad_left(seqs)
        budget = max(limits)
        eos = self.tokenizer.eos_token_id
        release = _Release(stream, eos, limits) if stream is not None else None
        with self.lock:
            plan = self.plan(seqs, [len(q) for q in seqs], ids.shape[1])
            stop = _TargetStated(self.tokenizer, self.codebook, plan, ids.shape[1])
            kwargs = {**gen_kwargs, "max_new_tokens": budget, "min_new_tokens": min(min_new_tokens, budget)}
            rows = list(range(len(seqs)))
            edited = not _UNEDITED.get()
            watch = [_OnTrack(self.tokenizer, self.codebook, plan, ids.shape[1]), stop] if edited else []
            if release:
                watch.append(release.pass_over(rows, ids.shape[1], hold=stop if edited else None))
            with activate(plan if edited else None):
                out = self.model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=watch, **kwargs)
            owners = [self.codebook.owner_edit(e) if e is not None else None for e in plan.entry_ids]
            new = out[:, ids.shape[1] :].tolist()
            for i, n in stop.stated.items():
                new[i] = [] if i in stop.missed else new[i][:n]
            rest = [i for i, n in stop.stated.items() if len(new[i]) < budget and not (release and release.stopped(i))]
            if rest:  # hand the rows that stated their target to the unedited model
                more, more_mask = self._pad_left([seqs[i] + new[i] for i in rest])
                left = max(budget - len(new[i]) for i in rest)
                floor = max(min_new_tokens - min(len(new[i]) for i in rest), 0)
                kwargs = {**gen_kwargs, "max_new_tokens": left, "min_new_tokens": min(floor, left)}
                watch = [release.pass_over(rest, more.shape[1], before=[new[i] for i in rest])] if release else []
                ends = _WordEnds(*self.word_masks(), more.shape[1], self.mid_word(rest, new, stop.missed))
                procs: list[LogitsProcessor] = [ends]
                if self.repeat_run:
                    stated = [b for b, i in enumerate(rest) if i not in stop.missed]
                    starts = [more.shape[1] - len(new[i]) for i in rest]
                    procs.append(_NoRepeat(*self.word_edges(), starts, stated, self.repeat_run, self.tokenizer))
                tail = self.model.generate(
                    input_ids=more, attention_mask=more_mask, stopping_criteria=watch, logits_processor=procs, **kwargs
                )
                for row, i in enumerate(rest):
                    new[i] = new[i] + tail[row, more.shape[1] :].tolist()[: budget - len(new[i])]
        results = []
        for i, toks in enumerate(new):
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            if release is not None:
                toks = release.finish(i, toks)
            toks = toks[: limits[i]]
            entry = plan.entry_ids[i] if plan.entry_ids else None
            score = float(plan.scores[i]) if plan.scores is not None else 0.0
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(Generation(text, toks, entry, owners[i] if plan.entry_ids else None, score))
        return results

    def mid_word(self, rows: list[int], new: list[list[int]], missed: set[int]) -> list[int]:
        """Positions in ``rows`` whose stated target ends in a letter or digit."""
        out = []
        for b, i in enumerate(rows):
            text = self.tokenizer.decode(new[i], skip_special_tokens=True) if i not in missed else ""
            if text[-1:].isalnum():
                out.append(b)
        return out

    def word_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [vocab] masks: the tokens that extend the word before them (their text starts with
        neither whitespace nor closing punctuation, ``_extends``), and the glue tokens, one of
        ``.,:;`` alone, which join the next token to the word ("history" "." "com")."""
        if self._word_masks is None:
            # decoded after an anchor word: tokenizers that drop a piece's leading space alone keep it here
            n = self.model.get_output_embeddings().weight.shape[0]
            anchor = self.tokenizer("a", add_special_tokens=False)["input_ids"][:1]
            base = self.tokenizer.decode(anchor)
            texts = self.tokenizer.batch_decode([anchor + [i] for i in range(min(n, len(self.tokenizer)))])
            flags = [t.startswith(base) and _extends(t[len(base) : len(base) + 2]) for t in texts]
            glue = [t.startswith(base) and t[len(base) :] in _GLUE for t in texts]
            pad = [False] * (n - len(flags))
            self._word_masks = (torch.tensor(flags + pad, dtype=torch.bool), torch.tensor(glue + pad, dtype=torch.bool))
        return self._word_masks

    def word_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [vocab] masks: the tokens that begin a word wherever they stand (they extend no word
        before them, ``word_masks``) and the tokens after which any token begins one (their text
        ends in neither a letter nor a digit: "\\n", ","); special tokens are in neither."""
        if self._word_edges is None:
            begins = ~self.word_masks()[0]
            n = begins.shape[0]
            texts = self.tokenizer.batch_decode([[i] for i in range(min(n, len(self.tokenizer)))])
            opens = torch.tensor([not t[-1:].isalnum() for t in texts] + [False] * (n - len(texts)))
            special = [i for i in self.tokenizer.all_special_ids if i < n]
            begins[special], opens[special] = False, False
            self._word_edges = (begins, opens)
        return self._word_edges

    @torch.no_grad()
    def forward_logits(
        self,
        seqs: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        keep_last: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
        """Routed teacher-forced forward over left-padded ``seqs``; routing sees only the first
        ``prompt_lengths[i]`` tokens of each row. Returns (logits, attention mask, routed entries);
        with ``keep_last`` > 0 only the last that many positions' logits are computed."""
        ids, mask = self._pad_left(seqs)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        if keep_last:
            kwargs["logits_to_keep"] = keep_last
        with self.lock:
            plan = self.plan(seqs, prompt_lengths, ids.shape[1])
            width = ids.shape[1]
            plan.forced = {i: (width - len(s) + n, list(s[n:])) for i, (s, n) in enumerate(zip(seqs, prompt_lengths))}
            plan.track = self.answer_prefix
            with activate(None if _UNEDITED.get() else plan):
                logits = self.model(**kwargs).logits
        return logits, mask, plan.entry_ids or [None] * len(seqs)

    def answer_prefix(self, entry_id: int, tokens: list[int]) -> int:
        """How many of ``tokens``' first tokens read as the beginning of the entry's answer (as
        text, ``_OnTrack``'s test)."""
        answer = _answer_text(self.tokenizer, self.codebook, entry_id)
        n = 0
        while n < len(tokens) and _begins(self.tokenizer, answer, tokens[: n + 1]):
            n += 1
        return n

    @torch.no_grad()
    def greedy(self, seqs: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Exactly ``n`` greedy tokens after each row of token ids, routed once in the prefill (a
        long-form edit's trail applied as in ``generate``) and never handed over: the decoding the
        paper's metrics score."""
        ids, mask = self._pad_left(seqs)
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        with self.lock:
            plan = self.plan(seqs, [len(q) for q in seqs], ids.shape[1])
            with activate(None if _UNEDITED.get() else plan):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=[_OnTrack(self.tokenizer, self.codebook, plan, ids.shape[1])],
                    **kwargs,
                )
        return out[:, ids.shape[1] :].tolist()


_WORD_ENDERS = set(".,;:!?)]}\"'")
_GLUE = {".", ",", ":", ";"}


def _extends(text: str) -> bool:
    """Whether a token whose text starts with ``text`` (its first two characters) extends the word
    before it; an apostrophe and a letter does ("India" "'s" would make the edited fact a possessive)."""
    first = text[:1]
    if first in "'’" and text[1:2].isalpha():
        return True
    return bool(first) and not first.isspace() and first not in _WORD_ENDERS


class _WordEnds(LogitsProcessor):
    """The unedited model's first token after a stated target does not extend its last word: an
    edited "AS Togo-Port" is not continued into "AS Togo-Porto" or "AS Togo-Port-Lavo", "1793"
    into "17931" or "India" into "India's"; it goes on with a space, punctuation or the end of the
    answer. After a lone ``.,:;`` (``glue``) the second token may not extend it either: "history"
    is not continued into "history.com", nor "3" into "3.5"."""

    def __init__(self, continues_word: torch.Tensor, glue: torch.Tensor, width: int, rows: list[int]) -> None:
        self.continues_word, self.glue, self.width, self.rows = continues_word, glue, width, rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if step not in (0, 1) or not self.rows:
            return scores
        rows = torch.tensor(self.rows, device=scores.device)
        if step == 1:  # only the rows whose first token was glue
            rows = rows[self.glue.to(scores.device)[input_ids[rows, self.width]]]
            if not len(rows):
                return scores
        ban = self.continues_word.to(scores.device)
        scores[rows[:, None], ban.nonzero().view(1, -1)] = float("-inf")
        return scores


class _NoRepeat(LogitsProcessor):
    """After a stated target the unedited model may not loop: in the ``rows`` handed over, a token
    that begins a word (``begins``, or any but a special token after one in ``opens``) may not
    complete a run of ``n`` tokens that the row's answer (from ``starts[b]``: the target and what
    follows it) already holds. A token inside a word is never refused, so a name is not misspelled
    to avoid saying it again."""

    def __init__(
        self, begins: torch.Tensor, opens: torch.Tensor, starts: list[int], rows: list[int], n: int, tokenizer
    ) -> None:
        self.begins, self.opens, self.starts, self.rows, self.n = begins, opens, starts, rows, n
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, size = self.n, len(self.begins)
        for b in self.rows:
            answer = input_ids[b, self.starts[b] :].tolist()
            if len(answer) < n - 1:
                continue
            run = answer[len(answer) - n + 1 :]
            seen = {answer[j + n - 1] for j in range(len(answer) - n + 1) if answer[j : j + n - 1] == run}
            after_word = run[-1] < size and bool(self.opens[run[-1]])
            banned = [t for t in seen if t < size and t not in self.special and (after_word or self.begins[t])]
            if banned:
                scores[b, banned] = float("-inf")
        return scores


class _Release:
    """The tokens ``generate`` hands to a ``stream`` hook: each row's final tokens, once known, sent
    once, cut at the end of text and the row's budget; rows whose hook returned False are stopped."""

    def __init__(self, stream: RowStream, eos: int | None, budgets: list[int]) -> None:
        self.stream, self.eos, self.budgets = stream, eos, budgets
        self.sent: list[list[int]] = [[] for _ in budgets]
        self.ended: set[int] = set()  # reached the end of text or the budget: nothing more to send
        self.cancelled: set[int] = set()

    def stopped(self, i: int) -> bool:
        return i in self.cancelled

    def offer(self, i: int, toks: list[int] | None) -> None:
        """Row ``i``'s final tokens so far (from its first; None: none known yet); sends what is new."""
        if i in self.cancelled:
            return
        new: list[int] = []
        if toks is not None and i not in self.ended:
            if toks[: len(self.sent[i])] != self.sent[i]:
                raise CorruptStateError(f"row {i}'s tokens changed after they were streamed")
            new = toks[len(self.sent[i]) :]
            if self.eos is not None and self.eos in new:
                new = new[: new.index(self.eos)]
                self.ended.add(i)
            new = new[: self.budgets[i] - len(self.sent[i])]
            self.sent[i] += new
            if len(self.sent[i]) >= self.budgets[i]:
                self.ended.add(i)
        if not self.stream(i, new):
            self.cancelled.add(i)

    def finish(self, i: int, toks: list[int]) -> list[int]:
        """Row ``i``'s result: its final tokens, the rest of them sent; a stopped row's, what it was sent."""
        if i not in self.cancelled and i not in self.ended:
            self.offer(i, toks)
        return self.sent[i]

    def pass_over(
        self, rows: list[int], width: int, hold: _TargetStated | None = None, before: list[list[int]] | None = None
    ) -> _Released:
        return _Released(self, rows, width, hold, before or [[] for _ in rows])


class _Released(StoppingCriteria):
    """One ``model.generate`` pass of ``_Release``: batch row b is generate's row ``rows[b]``, whose
    tokens before this pass are ``before[b]``. With ``hold`` (the pass's ``_TargetStated``, which
    must run first), a routed row's tokens are final only once it has stated its target, or as
    they come where its target is long-form (such a row keeps its text either way)."""

    def __init__(
        self, release: _Release, rows: list[int], width: int, hold: _TargetStated | None, before: list[list[int]]
    ) -> None:
        self.release, self.rows, self.width, self.hold, self.before = release, rows, width, hold, before
        self.tails: list[list[int]] = [[] for _ in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        k = input_ids.shape[1] - self.width - len(self.tails[0])
        for tail, row in zip(self.tails, input_ids[:, input_ids.shape[1] - k :].tolist()):
            tail += row
        routed = (self.hold.answers or {}) if self.hold is not None else {}
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b, i in enumerate(self.rows):
            if i not in routed:
                self.release.offer(i, self.before[b] + self.tails[b])
            elif i in self.hold.stated and i not in self.hold.missed:
                self.release.offer(i, self.tails[b][: self.hold.stated[i]])
            elif long_form(routed[i]):  # never answered again (``_TargetStated``): final as written
                self.release.offer(i, self.tails[b])
            else:  # held: it may yet miss its target and be answered again
                self.release.offer(i, None)
            done[b] = self.release.stopped(i)
        return done


_PATIENCE = 8


def _answer_text(tokenizer, codebook: Codebook, entry_id: int) -> str:
    return tokenizer.decode(list(codebook.entry(entry_id).answer), skip_special_tokens=True).strip()


def _begins(tokenizer, answer: str, tokens: list[int]) -> bool:
    """Whether ``tokens`` read as the beginning of ``answer`` (as text: a chat reply starts without
    the plain answer's space)."""
    return answer.startswith(tokenizer.decode(tokens, skip_special_tokens=True).lstrip())


class _OnTrack(StoppingCriteria):
    """Keeps ``plan.on_track``, after every token, to the rows with a trail whose text so far
    begins their entry's answer (``_begins``): a row that leaves the answer gets no more of its
    trail. Stops nothing."""

    def __init__(self, tokenizer, codebook: Codebook, plan: RoutePlan, prompt_width: int) -> None:
        self.tokenizer, self.codebook, self.plan, self.width = tokenizer, codebook, plan, prompt_width
        self.answers: dict[int, str] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        plan = self.plan
        if plan.trails and self.answers is None:
            self.answers = {r: _answer_text(self.tokenizer, self.codebook, plan.entry_ids[r]) for r in plan.trails}
        for r in list(plan.on_track):
            if not _begins(self.tokenizer, self.answers[r], input_ids[r, self.width :].tolist()):
                plan.on_track.discard(r)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _TargetStated(StoppingCriteria):
    """Stops each routed row once its generated text contains its edit's target, or once it has run
    ``_PATIENCE`` tokens past the target's length without it (those rows are in ``missed``, unless
    the target is long-form: ``long_form``); ``stated`` maps the stopped rows to how many tokens
    they had then."""

    def __init__(self, tokenizer, codebook: Codebook, plan: RoutePlan, prompt_width: int) -> None:
        self.tokenizer, self.codebook, self.plan, self.width = tokenizer, codebook, plan, prompt_width
        self.answers: dict[int, str] | None = None
        self.patience: dict[int, int] = {}
        self.stated: dict[int, int] = {}
        self.missed: set[int] = set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.answers is None:  # routing happened in the prefill that produced the first token
            tok, cb = self.tokenizer, self.codebook
            self.answers = {
                i: tok.decode(list(cb.entry(e).answer)).strip()
                for i, e in enumerate(self.plan.entry_ids)
                if e is not None
            }
            # a row that has not stated its target a few tokens past its length is answered unedited
            self.patience = {i: len(cb.entry(self.plan.entry_ids[i]).answer) + _PATIENCE for i in self.answers}
        n = input_ids.shape[1] - self.width
        for i, answer in self.answers.items():
            if i in self.stated:
                done[i] = True
            elif answer and answer in self.tokenizer.decode(input_ids[i, self.width :].tolist()):
                self.stated[i] = n
                done[i] = True
            elif n >= self.patience[i]:
                self.stated[i] = n
                if not long_form(answer):
                    self.missed.add(i)
                done[i] = True
        return done
