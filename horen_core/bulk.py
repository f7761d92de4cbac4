"""Training many edits at once (``HorenEditor.train_many``): every fact is routed as ``train``
would route it, against a scratch copy of the entries near the facts with the earlier facts of the
call played on it, and their values are trained together (``ValueTrainer.train_values``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from horen_core.edits import EditResult, EditStore, Fact, TrainedEdit
from horen_core.errors import InvalidInputError
from horen_core.gating import GatedRouter
from horen_core.prompting import resolve_question
from horen_core.routing import Router
from horen_core.subjects import resolve_subject
from horen_core.training import _Context, question_contexts

if TYPE_CHECKING:
    from horen_core.editor import HorenEditor


def train_many(editor: HorenEditor, facts: Sequence[Fact | tuple]) -> list[TrainedEdit | InvalidInputError]:
    """``HorenEditor.train_many``: ``train`` of many facts, their values trained together
    (``ValueTrainer.train_values``) after one batched lower pass.

    Contract. The result covers a prefix of ``facts``, at least the first fact: it stops before
    the first fact that would retrain an entry that an earlier fact of this call creates or
    retrains, because its value starts from that one's, which is not in the codebook yet. A fact
    ``train`` would refuse gets its ``InvalidInputError`` in its slot and stops nothing. The
    caller applies the returned edits in order (``apply``, each under the next edit id, or the
    id and entry a database gave it) and calls again with the facts after them. Applied so,
    each fact ends as ``train`` then ``apply`` one after another would leave it: its key is
    routed against the codebook with the earlier facts of the call already in it (the same
    router, gates and threshold, on a scratch copy of the entries near the call's queries),
    so it retrains the entry of an earlier fact with the same answer in order (in a later
    call) and gets its own key where that answer differs; a retrain starts from the entry's
    value; each value trains with ``train``'s steps and early stop (equal up to the
    floating-point noise of batched passes). A caller that applies only some of the returned
    edits, or whose codebook changes otherwise before they are all applied, calls again for
    the rest instead of applying them. ``seconds`` is the call's time shared among its edits."""
    facts = [f if isinstance(f, Fact) else Fact(*f) for f in facts]
    if not facts:
        return []
    t0 = time.perf_counter()
    with editor.lock:
        parsed: list[tuple[str, list[_Context], str] | InvalidInputError] = []
        for f in facts:
            try:
                question, _ = resolve_question(editor.chat, f.prompt, f.fmt)
                parsed.append(
                    (
                        question,
                        question_contexts(editor.tokens, editor.chat, editor.config, question, f.target),
                        resolve_subject(question, f.subject),
                    )
                )
            except InvalidInputError as exc:
                parsed.append(exc)
        valid = [p for p in parsed if not isinstance(p, InvalidInputError)]
        editor.trainer.prepare_many([c for _, contexts, _ in valid for c in contexts])
        queries = [F.normalize(torch.stack([c.query for c in p[1]]).mean(0), dim=-1) for p in valid]
        # a lone fact routes against the codebook itself: no later fact needs it played on a copy
        scratch = _scratch(editor, torch.stack(queries), len(valid)) if len(valid) > 1 else editor.routing
        touched: set[int] = set()  # entries the call's facts so far create or retrain
        planned: list[tuple | InvalidInputError] = []
        query_of = iter(queries)
        for p in parsed:
            if isinstance(p, InvalidInputError):
                planned.append(p)
                continue
            question, contexts, subject = p
            query, answer = next(query_of), tuple(contexts[0].target)
            gate = editor.routing.edit_relation(contexts, subject)
            # the same decision as ``train``, against the codebook with the earlier facts in it
            _, entry_ids, _ = scratch.route(query[None], [question])
            reuse = entry_ids[0]
            if reuse is not None and scratch.codebook.entry(reuse).answer != answer:
                reuse = None  # a conflicting edit gets its own key
            if reuse is not None and reuse in touched:
                break  # its value starts from an earlier fact's: the caller applies that first
            planned.append((contexts, subject, query, answer, gate, reuse))
            if scratch is editor.routing:
                continue
            placeholder = torch.zeros(editor.codebook.value_dim, device=editor.device)
            if reuse is None:
                change = scratch.store.add(-len(planned), query, placeholder, answer, subject, gate)
            else:
                change = scratch.store.apply_version(-len(planned), reuse, query, placeholder, answer, subject, gate)
            touched.add(change.entry_id)
        jobs = [p for p in planned if not isinstance(p, InvalidInputError)]
        inits = [_live_value(editor, reuse) if reuse is not None else None for _, _, _, _, _, reuse in jobs]
        values = iter(editor.trainer.train_values([(p[0], init) for p, init in zip(jobs, inits)]))
    seconds = (time.perf_counter() - t0) / len(planned)
    out: list[TrainedEdit | InvalidInputError] = []
    for p in planned:
        if isinstance(p, InvalidInputError):
            out.append(p)
            continue
        _, subject, query, answer, gate, reuse = p
        value, steps, loss = next(values)
        trail = value[1:].detach().cpu() if value.dim() == 2 else None
        value = value[0] if value.dim() == 2 else value
        out.append(
            TrainedEdit(
                entry_id=reuse,
                created=reuse is None,
                steps=steps,
                loss=loss,
                seconds=seconds,
                key=query.detach().cpu(),
                value=value.detach().cpu(),
                answer=answer,
                subject=subject,
                gate=gate.detach().cpu() if gate is not None else None,
                trail=trail,
            )
        )
    return out


def _live_value(editor: HorenEditor, entry_id: int) -> torch.Tensor:
    """An entry's live value, a retrain's start: its vector, and below it its trail where it has one."""
    value = editor.codebook.values[editor.codebook.row_of(entry_id)].clone()
    trail = editor.store.trail_of(entry_id)
    return torch.cat([value[None], trail.to(value.device, value.dtype)]) if trail is not None else value


def edit_many(editor: HorenEditor, facts: Sequence[Fact | tuple], batch: int) -> list[EditResult | InvalidInputError]:
    """See ``HorenEditor.edit_many``."""
    if batch < 1:
        raise InvalidInputError("batch must be at least 1")
    facts = list(facts)
    out: list[EditResult | InvalidInputError] = []
    while len(out) < len(facts):
        with editor.lock:
            for trained in train_many(editor, facts[len(out) : len(out) + batch]):
                if isinstance(trained, InvalidInputError):
                    out.append(trained)
                    continue
                edit_id = editor._next_edit_id()
                change = editor.apply(edit_id, trained)
                out.append(EditResult(**{**vars(trained), "entry_id": change.entry_id}, edit_id=edit_id))
    return out


def _scratch(editor: HorenEditor, queries: torch.Tensor, n: int) -> GatedRouter:
    """Routing over a scratch copy of the entries that ``n`` edits with these unit queries can
    reach (each query's nearest ``hopfield_support`` + ``n`` keys: the ones it attends however
    those edits change the keys; every entry when the support is all keys), gated like
    ``the editor's routing``; the edits are played on it without touching the codebook."""
    cb = editor.codebook
    support = editor.config.hopfield_support
    if not len(cb):
        ids: list[int] = []
    elif not support or len(cb) <= support + n:
        ids = cb.row_entry_ids.tolist()
    else:
        k = support + n
        rows = None
        if editor.router.index is not None:
            rows = editor.router.index.candidates(queries, editor.router.keys, k)
        if rows is None:
            rows = (queries.to(cb.keys.device, cb.dtype) @ cb.keys.T).topk(k, dim=-1).indices
        ids = [cb.entry_id_at(r) for r in rows[rows >= 0].unique().tolist()]
    sub = cb.subset(ids)
    router = Router(sub, editor.router.retriever)
    store = EditStore(sub, router, editor.device)
    edits = [v.edit_id for e in ids for v in cb.entry(e).versions]
    store.subjects = {e: editor.store.subjects[e] for e in edits if e in editor.store.subjects}
    store.gates = {e: editor.store.gates[e] for e in edits if e in editor.store.gates}
    routing = GatedRouter(
        sub, router, store, editor.layer, editor.config, editor.chat, editor.tokenizer, editor.input_device
    )
    routing.gate = editor.routing.gate
    return routing
