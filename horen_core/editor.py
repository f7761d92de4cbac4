"""HorenEditor: wraps one MLP down-projection of a causal LM with a HoReN codebook and offers edits
(``train`` a value, ``apply`` it to the codebook; ``edit`` does both), rollback, routed generation
and scoring. Torch + transformers only; knows nothing of HTTP or databases. All public methods take
the editor's lock, so one editor may be shared by threads.

The editor owns the model, the codebook and routing (which entry a question reads, through the
subject and relation gates); training a value is ``horen_core.training``'s and generating with the
routed values is ``horen_core.generation``'s.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.errors import CorruptStateError, InvalidInputError
from horen_core.gate import RelationGate, gate_features, subject_mask
from horen_core.generation import Decoder, Generation, RowStream, pad_left, positions, unedited
from horen_core.layer import HorenLayer, RoutePlan
from horen_core.modeling import ModelAdapter, model_fingerprint, module_dims
from horen_core.prompting import ChatFormat, Rendered, resolve_question
from horen_core.retrieval import HopfieldRetriever
from horen_core.routing import CandidateIndex, Router
from horen_core.subjects import mentions, resolve_subject
from horen_core.training import ValueTrainer, _Context

__all__ = ["EditResult", "Generation", "HorenEditor", "RowStream", "TrainedEdit"]


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
        self.trainer = ValueTrainer(
            model, self.layer, self.adapter, self.config, value_dim, self.device, self.input_device, self.multi_device
        )
        self.decoder = Decoder(
            model, tokenizer, self.codebook, self._question_plan, self.encode_prompt, self.lock, self.input_device
        )

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
        ids, mask = pad_left([r.ids for r in rendered], self.tokenizer.pad_token_id, self.input_device)
        with self.lock:
            captured = self.trainer.layer_input(ids, mask, positions(mask))
        width = ids.shape[1]
        out = []
        for i, (r, subject) in enumerate(zip(rendered, subjects)):
            off = width - len(r.ids)
            span = r.ids[r.start : r.end]
            out.append(
                gate_features(captured[i, off + r.start : off + r.end], subject_mask(span, subject, self.tokenizer))
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

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int | Sequence[int] = 32,
        temperature: float = 0.0,
        min_new_tokens: int = 0,
        top_p: float = 1.0,
        stream: RowStream | None = None,
    ) -> list[Generation]:
        """Routed generation for a batch, each routed row handed to the unedited model once it has
        stated its edit's target; see ``Decoder.generate``."""
        return self.decoder.generate(prompts, max_new_tokens, temperature, min_new_tokens, top_p, stream)

    def forward_logits(
        self, seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int], keep_last: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
        """Routed teacher-forced logits; see ``Decoder.forward_logits``."""
        return self.decoder.forward_logits(seqs, prompt_lengths, keep_last)

    def greedy(self, seqs: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Exactly ``n`` routed greedy tokens after each row, never handed over; see ``Decoder.greedy``."""
        return self.decoder.greedy(seqs, n)

    def unedited(self) -> contextlib.AbstractContextManager[None]:
        """Within this block (on this thread or task) generation and scoring use the unedited model."""
        return unedited()

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
                self.trainer.prepare(ctx)
            query = F.normalize(torch.stack([c.query for c in contexts]).mean(0), dim=-1)
            gate = self._edit_relation(contexts, subject)
            _, entry_ids, _ = self._router(
                query[None], [question], (lambda _row, _subject: gate) if gate is not None else None
            )
            reuse = entry_ids[0]
            if reuse is not None and self.codebook.entry(reuse).answer != tuple(target_ids):
                reuse = None  # a conflicting edit gets its own key
            init = self.codebook.values[self.codebook.row_of(reuse)].clone() if reuse is not None else None
            value, steps, loss = self.trainer.train_value(contexts, init)
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


@dataclass
class _Span:
    """A question's tokens and where they start in a padded batch row."""

    start: int
    ids: list[int]


def _json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
