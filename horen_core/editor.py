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
import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

from horen_core import bulk
from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.edits import EditResult, EditStore, Fact, TrainedEdit
from horen_core.errors import InvalidInputError
from horen_core.gate import RelationGate
from horen_core.gating import GatedRouter
from horen_core.generation import Decoder, Generation, RowStream, unedited
from horen_core.layer import HorenLayer
from horen_core.modeling import ModelAdapter, Placement, freeze, model_fingerprint, module_dims
from horen_core.prompting import ChatFormat, Tokens, resolve_question
from horen_core.retrieval import HopfieldRetriever
from horen_core.routing import CandidateIndex, Router
from horen_core.training import ValueTrainer, question_contexts

__all__ = ["EditResult", "Fact", "Generation", "HorenEditor", "RowStream", "TrainedEdit"]


class HorenEditor:
    def __init__(self, model: nn.Module, tokenizer, config: HorenConfig | None = None) -> None:
        self.config = config or HorenConfig()
        self.config.validate()
        self.model = model
        self.tokenizer = tokenizer
        freeze(model)
        self.adapter = ModelAdapter.for_model(model, self.config.layer, self.config.module_template)
        try:
            self.layer = HorenLayer.wrap(model, self.adapter.module_path)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        key_dim, value_dim = module_dims(self.layer.base_layer)
        place = Placement.of(model, self.layer.base_layer)
        self.device, self.model_dtype, self.input_device = place.device, place.dtype, place.input_device
        self.multi_device, self.max_context = place.multi_device, place.max_context
        self.codebook = Codebook(key_dim, value_dim, device=self.device)
        # every codebook change goes to the router, which keeps an attached candidate index current
        self.router = Router(self.codebook, HopfieldRetriever.from_config(self.config))
        self.store = EditStore(self.codebook, self.router, self.device)  # the live edits' subjects and vectors
        self.fingerprint = model_fingerprint(model)
        self.tokens = Tokens(tokenizer, self.max_context)
        self.chat = ChatFormat(tokenizer)
        self.lock = threading.RLock()
        self.routing = GatedRouter(
            self.codebook, self.router, self.store, self.layer, self.config, self.chat, tokenizer, self.input_device
        )
        if self.config.relation_gate and not self.config.reference_procedure:
            self.set_gate(RelationGate.shipped(self.fingerprint))
        self.trainer = ValueTrainer(
            model, self.layer, self.adapter, self.config, value_dim, self.device, self.input_device, self.multi_device
        )
        plan = self.routing.question_plan
        parts = (model, tokenizer, self.codebook, plan, self.encode_prompt, self.lock, self.input_device)
        self.decoder = Decoder(*parts, repeat_run=self.config.repeat_guard)

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

    @property
    def gate(self) -> RelationGate | None:
        """The relation gate of edits made from now on (``set_gate``)."""
        return self.routing.gate

    # ---- tokens ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, reserve: int = 0) -> list[int]:
        """A prompt's ids; ``InvalidInputError`` unless it fits the context with ``reserve`` more."""
        return self.tokens.prompt(prompt, reserve)

    def encode_target(self, target: str) -> list[int]:
        """A target's ids as it continues a prompt."""
        return self.tokens.target(target)

    def check_edit(self, prompt: str, target: str, fmt: str = "auto") -> None:
        """Raise ``InvalidInputError`` for an edit that ``train`` would refuse, without training it."""
        question, _ = resolve_question(self.chat, prompt, fmt)
        question_contexts(self.tokens, self.chat, self.config, question, target)

    # ---- routing ----------------------------------------------------------------------------
    def set_gate(self, gate: RelationGate | None) -> None:
        """Use ``gate`` (None: none) for edits made from now on; edits made before keep their vectors."""
        if gate is not None and self.config.gate_threshold is not None:
            gate = RelationGate(gate.weight, gate.mean, self.config.gate_threshold)
        with self.lock:
            self.routing.gate = gate.to(self.device) if gate is not None else None

    def attach_index(self, index: CandidateIndex | None) -> None:
        """Route through ``index`` (a prefilter such as the service's FAISS index; None: over every
        key) from now on; it indexes the codebook first and then gets every change."""
        with self.lock:
            self.router.attach(index)

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
        (trained,) = bulk.train_many(self, [Fact(prompt, target, fmt, subject)])
        if isinstance(trained, InvalidInputError):
            raise trained
        return trained

    def apply(self, edit_id: int, trained: TrainedEdit, entry_id: int | None = None) -> CodebookChange:
        """Put ``trained`` in the codebook as edit ``edit_id``: in ``entry_id`` when the caller
        assigned it (a database), else in the entry it retrains or a new one."""
        entry_id = trained.entry_id if entry_id is None else entry_id
        with self.lock:
            if self.codebook.entry_of_edit(edit_id) is not None:
                raise InvalidInputError(f"edit id {edit_id} is already in use")
            t = trained
            if entry_id is not None:
                return self.apply_version(edit_id, entry_id, t.key, t.value, t.answer, t.subject, t.gate, t.trail)
            return self.store.add(edit_id, t.key, t.value, t.answer, t.subject, t.gate, t.trail)

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
                edit_id = self._next_edit_id()
            change = self.apply(edit_id, trained)
        fields = {**vars(trained), "entry_id": change.entry_id, "seconds": time.perf_counter() - t0}
        return EditResult(**fields, edit_id=edit_id)

    def _next_edit_id(self) -> int:
        return max(self.store.next_edit_id, max(self.codebook.edit_ids(), default=0) + 1)

    def train_many(self, facts: Sequence[Fact | tuple]) -> list[TrainedEdit | InvalidInputError]:
        """``train`` of many facts (``Fact`` or (prompt, target[, fmt[, subject]]) tuples), their
        values trained together after one batched lower pass. The result covers a prefix of
        ``facts``; the caller applies it in order and calls again for the rest. Applied so, each
        fact ends as ``train`` then ``apply`` would leave it: the contract is ``bulk.train_many``'s."""
        return bulk.train_many(self, facts)

    def edit_many(self, facts: Sequence[Fact | tuple], batch: int = 32) -> list[EditResult | InvalidInputError]:
        """``edit`` of each fact in order, under the next free edit ids: ``train_many`` of up to
        ``batch`` facts at a time, each result applied before the next call (its contract). A fact
        ``train`` would refuse gets its ``InvalidInputError`` in its slot."""
        return bulk.edit_many(self, facts, batch)

    # ---- rollback & state -------------------------------------------------------------------
    def rollback(self, edit_id: int) -> CodebookChange:
        with self.lock:
            return self.store.rollback(edit_id)

    def apply_version(
        self,
        edit_id: int,
        entry_id: int,
        key: torch.Tensor,
        value: torch.Tensor,
        answer: Sequence[int],
        subject: str = "",
        gate: torch.Tensor | None = None,
        trail: torch.Tensor | None = None,
    ) -> CodebookChange:
        """Mirror an edit trained elsewhere (a log replay or another replica) without retraining."""
        with self.lock:
            return self.store.apply_version(edit_id, entry_id, key, value, answer, subject, gate, trail)

    def apply_versions(
        self,
        edit_ids: Sequence[int],
        entry_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[Sequence[int]],
        subjects: Sequence[str] | None = None,
        gates: Sequence[torch.Tensor | None] | None = None,
        trails: Sequence[torch.Tensor | None] | None = None,
    ) -> list[CodebookChange]:
        """``apply_version`` of many edits, in order (a log replay); see ``EditStore.apply_versions``."""
        with self.lock:
            return self.store.apply_versions(edit_ids, entry_ids, keys, values, answers, subjects, gates, trails)

    def save(self, path) -> None:
        with self.lock:
            self.store.save(path, self.identity, self.config.to_dict())

    def load(self, path) -> None:
        meta = EditStore.read_metadata(path, self.identity)
        with self.lock:
            self.store.load(path, meta)

    def unwrap(self) -> None:
        """Put the original module back."""
        self.layer.unwrap(self.model, self.adapter.module_path)
