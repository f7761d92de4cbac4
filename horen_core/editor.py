"""HorenEditor: wraps one MLP down-projection of a causal LM with a HoReN codebook and offers edits
(``train`` a value, ``apply`` it to the codebook; ``edit`` does both), rollback, routed generation
and scoring. Torch + transformers only; knows nothing of HTTP or databases. All public methods take
the editor's lock, so one editor may be shared by threads.

Editing trains one value vector. Only what can change is computed: the layers below the edited one
(and the edited layer itself) run once per edit, because their activations do not depend on the
value; each step then runs the layers above on that cached hidden state, with the value added at
the question's last token, and projects to logits only at the target positions.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import LogitsProcessor, StoppingCriteria

from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.errors import CorruptStateError, InvalidInputError
from horen_core.gate import RelationGate, gate_features, subject_mask
from horen_core.layer import HorenLayer, InjectPlan, RoutePlan, activate, compute_queries
from horen_core.modeling import ModelAdapter, model_fingerprint, module_dims
from horen_core.prompting import ChatFormat, Rendered, resolve_question
from horen_core.retrieval import HopfieldRetriever
from horen_core.routing import CandidateIndex, Router
from horen_core.subjects import mentions, resolve_subject

# called by generate per row and step with the row's newly final tokens; False stops the row
RowStream = Callable[[int, list[int]], bool]

_UNEDITED: ContextVar[bool] = ContextVar("horen_unedited", default=False)


@dataclass(frozen=True)
class TrainedEdit:
    """An edit's trained key and value, not yet in the codebook (``HorenEditor.train``)."""

    entry_id: int | None  # the entry it retrains (its key routes there, same answer); None: a new entry
    created: bool  # a new entry (True), or a new value for the entry its key routes to
    steps: int
    loss: float
    seconds: float
    key: torch.Tensor  # this edit's query (unit), on cpu
    value: torch.Tensor  # the trained value, on cpu
    answer: tuple[int, ...]
    subject: str = ""  # the name a prompt must mention to be routed to this edit ("" = any prompt)
    gate: torch.Tensor | None = None  # the question's relation vector, on cpu (None: no relation gate)


@dataclass(frozen=True, kw_only=True)
class EditResult(TrainedEdit):
    """An edit trained and applied (``HorenEditor.edit``): ``entry_id`` is the entry it is in."""

    edit_id: int


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    entry_id: int | None  # the codebook entry that routed this prompt
    edit_id: int | None  # the newest live edit of that entry
    score: float  # cosine of the refined query with its best key (0 when the codebook is empty)


class HorenEditor:
    def __init__(self, model: nn.Module, tokenizer, config: HorenConfig | None = None) -> None:
        self.config = config or HorenConfig()
        self.config.validate()
        self.model = model
        self.tokenizer = tokenizer
        # the base weights are never trained: freeze them so no edit leaves gradients behind
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.adapter = ModelAdapter.for_model(model, self.config.layer, self.config.module_template)
        parent_path, _, child = self.adapter.module_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        if isinstance(base, HorenLayer):
            raise InvalidInputError(f"{self.adapter.module_path} is already wrapped by another editor")
        key_dim, value_dim = module_dims(base)
        self.layer = HorenLayer(base)
        setattr(parent, child, self.layer)
        weight = next(base.parameters())
        # the codebook lives with the edited layer; inputs go to the embedding's device (they differ
        # when a device map spreads the model over several GPUs)
        self.device, self.model_dtype = weight.device, weight.dtype
        self.input_device = model.get_input_embeddings().weight.device
        self.multi_device = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
        self.codebook = Codebook(key_dim, value_dim, device=self.device)
        retriever = HopfieldRetriever(
            self.config.hopfield_alpha,
            self.config.hopfield_beta,
            self.config.hopfield_steps,
            min(self.config.threshold, self.config.subject_threshold),
            support=self.config.hopfield_support,
        )
        # every codebook change goes to the router, which keeps an attached candidate index current
        self.router = Router(self.codebook, retriever)
        self.subjects: dict[int, str] = {}  # edit id -> its subject; an entry is gated by its owner edit's
        self.gate: RelationGate | None = None
        self.gates: dict[int, torch.Tensor] = {}  # edit id -> its relation vector (see horen_core.gate)
        self.fingerprint = model_fingerprint(model)
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        )
        self.chat = ChatFormat(tokenizer)
        self.lock = threading.RLock()
        if self.config.relation_gate and not self.config.reference_procedure:
            self.set_gate(RelationGate.shipped(self.fingerprint))
        self._next_edit_id = 1
        self._prefix_cache_ok: bool | None = None  # checked on the first fast-path edit
        self._batched_ok: bool | None = None  # checked on the first edit with several contexts
        self._continues_word: torch.Tensor | None = None  # vocabulary mask, built on the first hand-over

    # ---- identity ---------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, str]:
        """What a saved codebook must match to be used with this editor."""
        return {
            "model": self.fingerprint,
            "module": self.adapter.module_path,
            "key_dim": str(self.codebook.key_dim),
            "value_dim": str(self.codebook.value_dim),
        }

    # ---- tokens -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, reserve: int = 0) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        ids = list(self.tokenizer(prompt)["input_ids"])
        self.check_length(ids, reserve)
        return ids

    def check_length(self, ids: Sequence[int], reserve: int = 0) -> None:
        if len(ids) + reserve > self.max_context:
            raise InvalidInputError(
                f"prompt is {len(ids)} tokens; with {reserve} more it exceeds the model's context of {self.max_context}"
            )

    def check_edit(self, prompt: str, target: str, fmt: str = "auto") -> None:
        """Raise ``InvalidInputError`` for an edit that ``train`` would refuse, without training it."""
        question, _ = resolve_question(self.chat, prompt, fmt)
        self._contexts(question, target)

    def encode_target(self, target: str) -> list[int]:
        if not isinstance(target, str) or not target.strip():
            raise InvalidInputError("target must be a non-empty string")
        text = target if target[0].isspace() else " " + target
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInputError("target has no tokens")
        return list(ids)

    # ---- routing ----------------------------------------------------------------------------
    def set_gate(self, gate: RelationGate | None) -> None:
        """Use ``gate`` (None: none) for edits made from now on; edits made before keep their vectors."""
        if gate is not None and self.config.gate_threshold is not None:
            gate = RelationGate(gate.weight, gate.mean, self.config.gate_threshold)
        with self.lock:
            self.gate = gate.to(self.device) if gate is not None else None

    def attach_index(self, index: CandidateIndex | None) -> None:
        """Route through ``index`` (a prefilter such as the service's FAISS index; None: over every
        key) from now on; it indexes the codebook first and then gets every change."""
        with self.lock:
            self.router.attach(index)

    def _router(
        self,
        queries: torch.Tensor,
        texts: Sequence[str] | None = None,
        relation: Callable[[int, str], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[int | None], torch.Tensor]:
        """Route unit queries. With ``texts`` (each row's question), a row whose best entry's subject
        it does not mention is not routed; with ``relation`` (row, subject -> the row's relation
        vector), nor is a row whose vector is too far from the entry's edit's. A row below
        ``threshold`` (down to ``subject_threshold``) is routed only when both gates were checked."""
        cb = self.codebook
        keys = cb.keys
        routing = self.router.route(queries)
        rows = routing.rows
        hit = rows >= 0
        values = torch.zeros(queries.shape[0], cb.value_dim, device=keys.device, dtype=cb.dtype)
        if hit.any():
            values[hit] = cb.values[rows[hit]]
        entry_ids = [cb.entry_id_at(int(r)) if r >= 0 else None for r in rows.tolist()]
        threshold = self.config.threshold
        for i, e in enumerate(entry_ids):
            if e is None:
                continue
            below = float(routing.scores[i]) < threshold
            if texts is None:
                keep = not below
            else:
                owner = cb.owner_edit(e)
                subject = self.subjects.get(owner, "")
                gated = bool(subject) and relation is not None and self.gate is not None and owner in self.gates
                keep = (
                    (gated or not below)
                    and mentions(subject, texts[i])
                    and self._same_relation(owner, relation, i, subject)
                )
            if not keep:
                entry_ids[i] = None
                values[i] = 0
        return values, entry_ids, routing.scores

    def _same_relation(
        self, owner: int, relation: Callable[[int, str], torch.Tensor | None] | None, row: int, subject: str
    ) -> bool:
        stored = self.gates.get(owner)
        if stored is None or relation is None or self.gate is None:
            return True
        mine = relation(row, subject)
        if mine is None or mine.shape != stored.shape:  # a vector of another gate says nothing here
            return True
        return float(mine.to(stored.device) @ stored) >= self.gate.threshold

    def _route_plan(
        self, prompt_mask: torch.Tensor, texts: Sequence[str] | None = None, spans: Sequence[_Span] | None = None
    ) -> RoutePlan:
        def router(queries: torch.Tensor, x: torch.Tensor):
            relation = None
            if spans is not None and self.gate is not None:

                def relation(row: int, subject: str) -> torch.Tensor:
                    sp = spans[row]
                    return self._relation_vector(x[row, sp.start : sp.start + len(sp.ids)], sp.ids, subject)

            return self._router(queries, texts, relation)

        return RoutePlan(self.layer, prompt_mask, router, self.config.query_strategy, self.config.query_fraction)

    @torch.no_grad()
    def relation_features(self, questions: Sequence[str], subjects: Sequence[str], chat: bool = False) -> torch.Tensor:
        """[B, 2 dk] the relation gate's input features of each question (plain, or as the user's
        message in the chat template) with its subject: what ``horen_core.gate.fit`` learns from."""
        rendered = [
            self.chat.render(q) if chat else Rendered(ids, 0, len(ids))
            for q in questions
            for ids in [self.encode_prompt(q)]
        ]
        ids, mask = self._pad_left([r.ids for r in rendered])
        plan = InjectPlan(self.layer, capture=True)

        def stop(_module, _inputs, _output):
            raise _StopForward  # nothing above the edited layer is needed

        handle = self.adapter.layers[self.adapter.layer_index].register_forward_hook(stop)
        try:
            with self.lock, activate(plan):
                self.model(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask), logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            handle.remove()
        width = ids.shape[1]
        out = []
        for i, (r, subject) in enumerate(zip(rendered, subjects)):
            off = width - len(r.ids)
            span = r.ids[r.start : r.end]
            out.append(
                gate_features(
                    plan.captured[i, off + r.start : off + r.end], subject_mask(span, subject, self.tokenizer)
                )
            )
        return torch.stack(out).cpu()

    def _relation_vector(self, x: torch.Tensor, span_ids: Sequence[int], subject: str) -> torch.Tensor:
        """The unit relation vector of a question span (``x`` [n, dk] the layer input over it)."""
        feats = gate_features(x, subject_mask(span_ids, subject, self.tokenizer))
        return self.gate.embed(feats[None])[0]

    def _question_plan(self, seqs: Sequence[Sequence[int]], lengths: Sequence[int], width: int) -> RoutePlan:
        """The route plan of left-padded rows whose questions are the spans ``self.chat`` finds in
        their first ``lengths[i]`` tokens (the whole prompt unless it is chat-formatted): routed
        over those tokens, gated by those questions' text and relation."""
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        texts, spans = [], []
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            a, b = self.chat.span(s[:n])
            off = width - len(s)
            mask[i, off + a : off + b] = 1
            texts.append(self.tokenizer.decode(list(s[a:b]), skip_special_tokens=True))
            spans.append(_Span(off + a, list(s[a:b])))
        return self._route_plan(mask.to(self.input_device), texts, spans)

    def _pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, t - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s) :] = 1
        return ids.to(self.input_device), mask.to(self.input_device)

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
        without the value), so what follows the edited fact reads as the model's own text. A row
        that has not stated the target a few tokens past its length is answered by the unedited
        model from the prompt: the edit did not apply to it.

        ``stream(row, ids)``, when given, is called on this thread after every decoding step, for
        every row, with that row's tokens that have become final (often none): the concatenation
        of a row's calls is its ``token_ids``. A routed row's tokens are held back until it has
        stated its target (a row that misses it is answered again, so its start is never sent).
        ``stream`` returning False stops that row; its result is then what it was sent."""
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
            plan = self._question_plan(seqs, [len(q) for q in seqs], ids.shape[1])
            stop = _TargetStated(self, plan, ids.shape[1])
            kwargs = {**gen_kwargs, "max_new_tokens": budget, "min_new_tokens": min(min_new_tokens, budget)}
            rows = list(range(len(seqs)))
            edited = not _UNEDITED.get()
            watch = [stop] if edited else []
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
                ends = _WordEnds(self._word_continuations(), more.shape[1], self._mid_word(rest, new, stop.missed))
                tail = self.model.generate(
                    input_ids=more, attention_mask=more_mask, stopping_criteria=watch, logits_processor=[ends], **kwargs
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

    def _mid_word(self, rows: list[int], new: list[list[int]], missed: set[int]) -> list[int]:
        """Positions in ``rows`` whose stated target ends in a letter or digit."""
        out = []
        for b, i in enumerate(rows):
            text = self.tokenizer.decode(new[i], skip_special_tokens=True) if i not in missed else ""
            if text[-1:].isalnum():
                out.append(b)
        return out

    def _word_continuations(self) -> torch.Tensor:
        """[vocab] True for tokens that extend the word before them: their text starts with neither
        whitespace nor closing punctuation."""
        if self._continues_word is None:
            # decoded after an anchor word: tokenizers that drop a piece's leading space alone keep it here
            n = self.model.get_output_embeddings().weight.shape[0]
            anchor = self.tokenizer("a", add_special_tokens=False)["input_ids"][:1]
            base = self.tokenizer.decode(anchor)
            texts = self.tokenizer.batch_decode([anchor + [i] for i in range(min(n, len(self.tokenizer)))])
            flags = [t.startswith(base) and _extends(t[len(base) : len(base) + 1]) for t in texts]
            self._continues_word = torch.tensor(flags + [False] * (n - len(flags)), dtype=torch.bool)
        return self._continues_word

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
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": self._positions(mask)}
        if keep_last:
            kwargs["logits_to_keep"] = keep_last
        with self.lock:
            plan = self._question_plan(seqs, prompt_lengths, ids.shape[1])
            with activate(None if _UNEDITED.get() else plan):
                logits = self.model(**kwargs).logits
        return logits, mask, plan.entry_ids or [None] * len(seqs)

    @torch.no_grad()
    def greedy(self, seqs: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Exactly ``n`` greedy tokens after each row of token ids, routed once in the prefill and
        never handed over: the decoding the paper's metrics score."""
        ids, mask = self._pad_left(seqs)
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        with self.lock:
            plan = self._question_plan(seqs, [len(q) for q in seqs], ids.shape[1])
            with activate(None if _UNEDITED.get() else plan):
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, pad_token_id=self.tokenizer.pad_token_id, **kwargs
                )
        return out[:, ids.shape[1] :].tolist()

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """Within this block (on this thread or task) generation and scoring use the unedited model."""
        token = _UNEDITED.set(True)
        try:
            yield
        finally:
            _UNEDITED.reset(token)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    # ---- editing ----------------------------------------------------------------------------
    def train(self, prompt: str, target: str, fmt: str = "auto", subject: str | None = None) -> TrainedEdit:
        """Train prompt -> target without changing the codebook: reuse the key the prompt matches
        when its answer is the same (``entry_id``), otherwise a new key; the value is trained until
        greedy decoding reproduces the target. ``apply`` puts the result in the codebook.

        ``fmt`` says how ``prompt`` is written: ``plain`` text, ``chat`` (the user message, or a prompt
        already in the chat template), or ``auto`` (chat when it is in the template). Either way the
        question is trained in every context the model has (plain, and its chat template when the
        tokenizer has one) and the key is the unit mean of its queries in those contexts.

        ``subject`` is the name a prompt must mention to be routed to this edit (``horen_core.subjects``);
        None infers it from the question, "" applies the edit wherever its key routes.
        """
        t0 = time.perf_counter()
        question, _ = resolve_question(self.chat, prompt, fmt)
        contexts = self._contexts(question, target)
        subject = resolve_subject(question, subject)
        target_ids = contexts[0].target
        with self.lock:
            for ctx in contexts:
                self._prepare(ctx)
            query = F.normalize(torch.stack([c.query for c in contexts]).mean(0), dim=-1)
            gate = self._edit_relation(contexts, subject)
            _, entry_ids, _ = self._router(
                query[None], [question], (lambda _row, _subject: gate) if gate is not None else None
            )
            reuse = entry_ids[0]
            if reuse is not None and self.codebook.entry(reuse).answer != tuple(target_ids):
                reuse = None  # a conflicting edit gets its own key
            init = self.codebook.values[self.codebook.row_of(reuse)].clone() if reuse is not None else None
            value, steps, loss = self._train_value(contexts, init)
        return TrainedEdit(
            entry_id=reuse,
            created=reuse is None,
            steps=steps,
            loss=loss,
            seconds=time.perf_counter() - t0,
            key=query.detach().cpu(),
            value=value.detach().cpu(),
            answer=tuple(target_ids),
            subject=subject,
            gate=gate.detach().cpu() if gate is not None else None,
        )

    def apply(self, edit_id: int, trained: TrainedEdit, entry_id: int | None = None) -> CodebookChange:
        """Put ``trained`` in the codebook as edit ``edit_id``: in ``entry_id`` when the caller
        assigned it (a database), else in the entry it retrains or a new one."""
        entry_id = trained.entry_id if entry_id is None else entry_id
        with self.lock:
            if self.codebook.entry_of_edit(edit_id) is not None:
                raise InvalidInputError(f"edit id {edit_id} is already in use")
            if entry_id is not None:
                return self.apply_version(
                    edit_id, entry_id, trained.key, trained.value, trained.answer, trained.subject, trained.gate
                )
            change = self.codebook.add(edit_id, trained.key, trained.value, trained.answer)
            self.router.apply([change])
            self._own(edit_id, trained.subject, trained.gate)
            return change

    def edit(
        self,
        prompt: str,
        target: str,
        edit_id: int | None = None,
        fmt: str = "auto",
        subject: str | None = None,
    ) -> EditResult:
        """``train`` and ``apply`` in one step, as edit ``edit_id`` (None: the next free id)."""
        t0 = time.perf_counter()
        with self.lock:
            trained = self.train(prompt, target, fmt=fmt, subject=subject)
            if edit_id is None:
                edit_id = max(self._next_edit_id, max(self.codebook.edit_ids(), default=0) + 1)
            change = self.apply(edit_id, trained)
        fields = {**vars(trained), "entry_id": change.entry_id, "seconds": time.perf_counter() - t0}
        return EditResult(**fields, edit_id=edit_id)

    def _edit_relation(self, contexts: list[_Context], subject: str) -> torch.Tensor | None:
        """An edit's relation vector: the unit mean of its question's in every context it is trained in."""
        if self.gate is None or any(c.span_x is None for c in contexts):
            return None
        vecs = [
            self._relation_vector(c.span_x, c.rendered.ids[c.rendered.start : c.rendered.end], subject)
            for c in contexts
        ]
        return F.normalize(torch.stack(vecs).mean(0), dim=-1)

    def _own(self, edit_id: int, subject: str, gate: torch.Tensor | None) -> None:
        """What the editor keeps of an edit that is now in the codebook, beside it."""
        self._next_edit_id = max(self._next_edit_id, edit_id + 1)
        self.subjects[edit_id] = subject
        self._set_relation(edit_id, gate)

    def _set_relation(self, edit_id: int, gate: torch.Tensor | None) -> None:
        if gate is None:
            self.gates.pop(edit_id, None)
        else:
            self.gates[edit_id] = gate.to(self.device, torch.float32)

    def _contexts(self, question: str, target: str) -> list[_Context]:
        """The question in each format it is trained in: plain first (its target tokens are the
        entry's answer), then the chat template when there is one."""
        target_ids = self.encode_target(target)
        plain = self.encode_prompt(question, reserve=len(target_ids))
        out = [_Context(Rendered(plain, 0, len(plain)), target_ids)]
        if self.chat.available and self.config.chat_context and not self.config.reference_procedure:
            reply = self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
            rendered = self.chat.render(question)
            if reply and len(rendered.ids) + len(reply) <= self.max_context:
                out.append(_Context(rendered, list(reply)))
        return out

    def _prepare(self, ctx: _Context) -> None:
        """Run the unedited layers below the edit once: the query over the question's span and
        the hidden states training starts from."""
        r = ctx.rendered
        ctx.ids = r.ids + ctx.target[:-1]
        ids = torch.tensor([ctx.ids], device=self.input_device)
        span = torch.zeros_like(ids)
        span[0, r.start : r.end] = 1
        found = self._lower_pass(ids)
        ctx.hidden = found.get("h")
        ctx.query = compute_queries(found["x"], span, self.config.query_strategy, self.config.query_fraction)[0]
        ctx.span_x = found["x"][0, r.start : r.end]

    @torch.no_grad()
    def _lower_pass(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One unedited forward that records the edited layer's input and its decoder layer's output."""
        plan = InjectPlan(self.layer, capture=True)
        found: dict[str, torch.Tensor] = {}
        handle = None
        if self.adapter.supports_fast_path and not self.config.reference_procedure and not self.multi_device:

            def hook(_module, _inputs, output):
                found["h"] = (output[0] if isinstance(output, tuple) else output).detach()
                raise _StopForward

            handle = self.adapter.layers[self.adapter.layer_index].register_forward_hook(hook)
        try:
            with activate(plan):
                self.model(input_ids=ids)
        except _StopForward:
            pass  # nothing above the edited layer is needed from this pass
        finally:
            if handle is not None:
                handle.remove()
        found["x"] = plan.captured
        return found

    def _train_value(self, contexts: list[_Context], init: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        """One value for every context: the mean cross-entropy of the target tokens over them.
        Stops once every context decodes the target greedily and the mean NLL is below
        ``stop_loss`` (or after ``max_steps``)."""
        cfg = self.config
        dv = self.codebook.value_dim
        value = (init.clone() if init is not None else torch.zeros(dv, device=self.device)).float()
        value.requires_grad_(True)
        opt = torch.optim.Adam([value], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        steps, loss_value = 0, float("nan")
        forward = self._contexts_forward(contexts)
        targets = [torch.tensor(c.target, device=self.device) for c in contexts]
        for step in range(cfg.max_steps + 1):
            losses, solved = [], True
            for logits, target in zip(forward(value), targets):
                logits = logits.float()
                losses.append(F.cross_entropy(logits, target))
                solved &= bool((logits.argmax(-1) == target).all())
            loss = torch.stack(losses).mean()
            loss_value = float(loss.detach())
            if step == cfg.max_steps:
                break
            if solved and loss_value < cfg.stop_loss and not cfg.reference_procedure:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        del opt, forward
        return value.detach(), steps, loss_value

    def _contexts_forward(self, contexts: list[_Context]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """value -> each context's logits at its target positions: one batched pass over the layers
        above when every context can use the prefix cache (checked once against separate passes),
        else one pass per context."""
        spans = [(c.rendered.end - 1, len(c.rendered.ids) - 1, len(c.target)) for c in contexts]
        batchable = (
            len(contexts) > 1
            and all(c.hidden is not None and p > 0 for c, (p, _, _) in zip(contexts, spans))
            and self._prefix_cache_ok is not False
            and self._batched_ok is not False
        )
        if batchable and self._batched_ok:
            return self._batched_forward(contexts, spans)
        singles = [self._step_forward(c.ids, p, first, m, c.hidden) for c, (p, first, m) in zip(contexts, spans)]

        def each(value: torch.Tensor) -> list[torch.Tensor]:
            return [f(value) for f in singles]

        if batchable and self._prefix_cache_ok:  # verify once that batching changes nothing
            batched = self._batched_forward(contexts, spans)
            with torch.no_grad():
                probe = torch.randn(self.codebook.value_dim, device=self.device) * 10
                ref, got = each(probe), batched(probe)
            tol = 1e-3 if self.model_dtype == torch.float32 else 5e-2
            self._batched_ok = all(
                torch.allclose(a.float(), b.float(), atol=tol * a.abs().max().item()) for a, b in zip(ref, got)
            )
            if self._batched_ok:
                return batched
        return each

    def _batched_forward(
        self, contexts: list[_Context], spans: list[tuple[int, int, int]]
    ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        dtype = self.model_dtype
        caches = [self.adapter.prefix_cache(c.hidden[:, :p]) for c, (p, _, _) in zip(contexts, spans)]
        suffixes = [c.hidden[:, p:] for c, (p, _, _) in zip(contexts, spans)]
        positions = [slice(first - p, first - p + m) for p, first, m in spans]
        batch = self.adapter.suffix_batch(caches, [p for p, _, _ in spans], [x.shape[1] for x in suffixes])

        onehots = []
        for x in suffixes:  # the value goes in at each suffix's first position
            onehot = torch.zeros(1, x.shape[1], 1, device=self.device, dtype=dtype)
            onehot[0, 0] = 1
            onehots.append(onehot)

        def batched(value: torch.Tensor) -> list[torch.Tensor]:
            v = value.to(dtype)
            rows = [x + onehot * v for x, onehot in zip(suffixes, onehots)]
            return self.adapter.upper_logits_batched(rows, batch, positions)

        return batched

    def _step_forward(
        self, seq: list[int], p: int, first: int, count: int, hidden: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """value (added at position ``p``) -> logits [count, vocab] at positions first.., by the
        cheapest exact route."""
        dtype = self.model_dtype
        ids = torch.tensor([seq], device=self.input_device)
        if hidden is None:  # the full model (reference procedure, or a family without a fast path)

            def full(value: torch.Tensor) -> torch.Tensor:
                plan = InjectPlan(self.layer, positions=torch.tensor([p]), values=value[None])
                with activate(plan):
                    return self.model(input_ids=ids).logits[0, first : first + count]

            return full
        s = hidden.shape[1]
        if p > 0 and self._prefix_cache_ok is not False:
            cache = self.adapter.prefix_cache(hidden[:, :p])
            suffix = hidden[:, p:]
            onehot = torch.zeros(1, s - p, 1, device=self.device, dtype=dtype)
            onehot[0, 0] = 1
            lo = first - p

            def cached(value: torch.Tensor) -> torch.Tensor:
                out = self.adapter.upper_logits_suffix(
                    suffix + onehot * value.to(dtype), p, cache, slice(lo, lo + count)
                )
                return out[0]

            if self._prefix_cache_ok is None:  # verify once that this model honours the cache
                with torch.no_grad():
                    ref = self.adapter.upper_logits(hidden, slice(first, first + count))[0]
                    got = cached(torch.zeros(self.codebook.value_dim, device=self.device))
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                self._prefix_cache_ok = bool(
                    torch.allclose(ref.float(), got.float(), atol=tol * ref.abs().max().item())
                )
                if not self._prefix_cache_ok:
                    return self._step_forward(seq, p, first, count, hidden)
            return cached
        onehot = torch.zeros(1, s, 1, device=self.device, dtype=dtype)
        onehot[0, p] = 1

        def upper(value: torch.Tensor) -> torch.Tensor:
            return self.adapter.upper_logits(hidden + onehot * value.to(dtype), slice(first, first + count))[0]

        return upper

    # ---- rollback & state -------------------------------------------------------------------
    def rollback(self, edit_id: int) -> CodebookChange:
        with self.lock:
            change = self.codebook.rollback(edit_id)
            self.router.apply([change])
            self.subjects.pop(edit_id, None)
            self.gates.pop(edit_id, None)
            return change

    def apply_version(
        self,
        edit_id: int,
        entry_id: int,
        key: torch.Tensor,
        value: torch.Tensor,
        answer: Sequence[int],
        subject: str = "",
        gate: torch.Tensor | None = None,
    ) -> CodebookChange:
        """Mirror an edit trained elsewhere (a log replay or another replica) without retraining."""
        with self.lock:
            if not self.codebook.has_entry(entry_id):
                change = self.codebook.add(edit_id, key, value, answer, entry_id=entry_id)
            elif self.codebook.entry(entry_id).answer != tuple(answer):
                raise CorruptStateError(f"edit {edit_id} retrains entry {entry_id} with another answer")
            else:
                change = self.codebook.retrain(edit_id, entry_id, key, value)
            self.router.apply([change])
            self._own(edit_id, subject, gate)
            return change

    def apply_versions(
        self,
        edit_ids: Sequence[int],
        entry_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[Sequence[int]],
        subjects: Sequence[str] | None = None,
        gates: Sequence[torch.Tensor | None] | None = None,
    ) -> list[CodebookChange]:
        """``apply_version`` of many edits, in order (a log replay): each run of edits that create
        entries goes into the codebook at once (``Codebook.add_many``), retrains one by one."""
        subjects = list(subjects) if subjects is not None else [""] * len(edit_ids)
        gates = list(gates) if gates is not None else [None] * len(edit_ids)
        with self.lock:
            changes: list[CodebookChange] = []
            run: list[int] = []  # positions of consecutive edits creating entries, not yet added
            created: set[int] = set()

            def flush() -> None:
                if run:
                    pick = torch.tensor(run)
                    added = self.codebook.add_many(
                        [edit_ids[i] for i in run],
                        keys[pick],
                        values[pick],
                        [answers[i] for i in run],
                        [entry_ids[i] for i in run],
                    )
                    self.router.apply(added)
                    changes.extend(added)
                    for i in run:
                        self._own(edit_ids[i], subjects[i], gates[i])
                    run.clear()

            for i, entry_id in enumerate(entry_ids):
                if entry_id in created or self.codebook.has_entry(entry_id):
                    flush()
                    changes.append(
                        self.apply_version(edit_ids[i], entry_id, keys[i], values[i], answers[i], subjects[i], gates[i])
                    )
                else:
                    run.append(i)
                    created.add(entry_id)
            flush()
            return changes

    def save(self, path) -> None:
        with self.lock:
            live = {str(e): self.subjects[e] for e in self.codebook.edit_ids() if self.subjects.get(e)}
            meta = {**self.identity, "config": _json(self.config.to_dict()), "subjects": _json(live)}
            gated = [e for e in self.codebook.edit_ids() if e in self.gates]
            extra = {}
            if gated:
                extra = {
                    "gate_edit_ids": torch.tensor(gated, dtype=torch.long),
                    "gate_vectors": torch.stack([self.gates[e].cpu() for e in gated]),
                }
            self.codebook.save(path, metadata=meta, extra=extra)

    def load(self, path) -> None:
        try:
            meta = Codebook.read_metadata(path)
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise CorruptStateError(f"cannot read codebook file {path}: {exc}") from exc
        for k, v in self.identity.items():
            if meta.get(k) != v:
                raise CorruptStateError(f"codebook belongs to another {k}: {meta.get(k)!r} != {v!r}")
        with self.lock:
            self.codebook.load(path)
            self.subjects = {int(k): v for k, v in json.loads(meta.get("subjects", "{}")).items()}
            self.gates = {}
            with safe_open(str(path), framework="pt") as f:
                if "gate_edit_ids" in f.keys():
                    vectors = f.get_tensor("gate_vectors")
                    for i, e in enumerate(f.get_tensor("gate_edit_ids").tolist()):
                        self._set_relation(e, vectors[i])
            self._next_edit_id = max(self.codebook.edit_ids(), default=0) + 1
            self.router.reloaded()

    def unwrap(self) -> None:
        """Put the original module back."""
        parent_path, _, child = self.adapter.module_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, self.layer.base_layer)


_WORD_ENDERS = set(".,;:!?)]}\"'")


def _extends(first: str) -> bool:
    return bool(first) and not first.isspace() and first not in _WORD_ENDERS


class _WordEnds(LogitsProcessor):
    """The unedited model's first token after a stated target does not extend its last word: an
    edited "AS Togo-Port" is not continued into "AS Togo-Porto" or "AS Togo-Port-Lavo", nor "1793"
    into "17931"; it goes on with a space, punctuation or the end of the answer."""

    def __init__(self, continues_word: torch.Tensor, width: int, rows: list[int]) -> None:
        self.continues_word, self.width, self.rows = continues_word, width, rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.width or not self.rows:
            return scores
        ban = self.continues_word.to(scores.device)
        rows = torch.tensor(self.rows, device=scores.device)
        scores[rows[:, None], ban.nonzero().view(1, -1)] = float("-inf")
        return scores


class _StopForward(Exception):
    pass


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
    must run first), a routed row's tokens are final only once it has stated its target."""

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
            else:  # held: it may yet miss its target and be answered again
                self.release.offer(i, None)
            done[b] = self.release.stopped(i)
        return done


_PATIENCE = 8


class _TargetStated(StoppingCriteria):
    """Stops each routed row once its generated text contains its edit's target, or once it has run
    ``_PATIENCE`` tokens past the target's length without it (those rows are in ``missed``);
    ``stated`` maps the stopped rows to how many tokens they had then."""

    def __init__(self, editor: HorenEditor, plan: RoutePlan, prompt_width: int) -> None:
        self.editor, self.plan, self.width = editor, plan, prompt_width
        self.answers: dict[int, str] | None = None
        self.patience: dict[int, int] = {}
        self.stated: dict[int, int] = {}
        self.missed: set[int] = set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.answers is None:  # routing happened in the prefill that produced the first token
            tok, cb = self.editor.tokenizer, self.editor.codebook
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
            elif answer and answer in self.editor.tokenizer.decode(input_ids[i, self.width :].tolist()):
                self.stated[i] = n
                done[i] = True
            elif n >= self.patience[i]:
                self.stated[i] = n
                self.missed.add(i)
                done[i] = True
        return done


@dataclass
class _Span:
    """A question's tokens and where they start in a padded batch row."""

    start: int
    ids: list[int]


@dataclass
class _Context:
    """One rendering of an edit's question and what training needs of it."""

    rendered: Rendered
    target: list[int]
    ids: list[int] = field(default_factory=list)  # prompt + target but its last token
    hidden: torch.Tensor | None = None
    query: torch.Tensor | None = None
    span_x: torch.Tensor | None = None  # the layer input over the question's span [n, dk]


def _json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
