"""Which edit, if any, each question reads: the router's row, kept only when the question names
the edit's subject (``horen_core.subjects``) and asks its relation (a fitted ``RelationGate`` over
the edited layer's input, where the model has one), and the route plans that do this inside a
forward pass. A question of several sentences is routed on the whole and on its last sentence, and
reads the better-scoring edit of the two. Not thread-safe: callers hold the editor's lock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from horen_core.codebook import Codebook
from horen_core.config import HorenConfig
from horen_core.edits import EditStore
from horen_core.gate import RelationGate, span_features
from horen_core.layer import HorenLayer, RoutePlan, compute_queries
from horen_core.prompting import ChatFormat, last_sentence_start
from horen_core.routing import Router
from horen_core.subjects import mentions, rules_out
from horen_core.training import _Context


class GatedRouter:
    def __init__(
        self,
        codebook: Codebook,
        router: Router,
        store: EditStore,
        layer: HorenLayer,
        config: HorenConfig,
        chat: ChatFormat,
        tokenizer,
        input_device: torch.device,
    ) -> None:
        self.codebook, self.router, self.store, self.layer, self.config = codebook, router, store, layer, config
        self.chat, self.tokenizer, self.input_device = chat, tokenizer, input_device
        self.gate: RelationGate | None = None  # the relation gate of edits made from now on (None: none)
        self._targets: dict[tuple[int, ...], str] = {}  # answer token ids -> their text

    def route(
        self,
        queries: torch.Tensor,
        texts: Sequence[str] | None = None,
        relation: Callable[[int, str], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[int | None], torch.Tensor]:
        """Route unit queries. With ``texts`` (each row's question), a row reads no entry whose
        subject it does not mention, nor (with ``negations``) one whose target it rules out
        (``rules_out``); with ``relation`` (row, subject -> the row's relation vector), none whose
        edit's vector is too far from the row's. A row below ``threshold`` (down to
        ``subject_threshold``) reads an entry only when both gates were checked, and an entry of
        an edit with no subject only from ``unnamed_threshold``. With ``texts``, a
        row turned down by its best entry reads the first of the ``runners_up`` next ones that its
        gates let through, then (with ``subject_lookup``) the entries of the edits whose subject it
        names, nearest first. Returns the values, entry ids (None: not routed) and cosines."""
        cb = self.codebook
        keys = cb.keys
        routing = self.router.route(queries, self.config.runners_up if texts is not None else 0)
        best, scores = routing.rows.tolist(), routing.scores.clone()
        nexts = [] if routing.next_rows is None else routing.next_rows.tolist()
        next_scores = [] if routing.next_scores is None else routing.next_scores.tolist()
        chosen = [-1] * len(best)
        for i, r in enumerate(best):
            options = [(r, float(scores[i]))]
            if nexts:
                options += [(a, b) for a, b in zip(nexts[i], next_scores[i]) if a >= 0]
            if texts is not None and self.config.subject_lookup:
                options += self._named_options(queries[i], texts[i], {a for a, _ in options})
            for row, score in options:
                if row >= 0 and self._keeps(cb.entry_id_at(row), score, i, texts, relation):
                    chosen[i] = row
                    scores[i] = score
                    break
        rows = torch.tensor(chosen, dtype=torch.long)
        hit = rows >= 0
        values = torch.zeros(queries.shape[0], cb.value_dim, device=keys.device, dtype=cb.dtype)
        if hit.any():
            values[hit] = cb.values[rows[hit].to(keys.device)]
        entry_ids = [cb.entry_id_at(int(r)) if r >= 0 else None for r in rows.tolist()]
        return values, entry_ids, scores

    def _named_options(self, query: torch.Tensor, text: str, seen: set[int]) -> list[tuple[int, float]]:
        """The rows, not in ``seen``, of the live entries whose subject ``text`` names, with the
        cosine of the unrefined ``query`` to their keys, best first, down to the retriever's floor:
        among thousands of keys a question's nearest are often other subjects' edits of its
        relation, and crowd out the one it names."""
        cb = self.codebook
        rows = []
        for edit_id in self.store.named(text):
            entry = cb.entry_of_edit(edit_id)
            if entry is not None and cb.owner_edit(entry) == edit_id:
                row = cb.row_of(entry)
                if row not in seen:
                    rows.append(row)
        if not rows:
            return []
        keys = cb.keys[torch.tensor(rows, device=cb.keys.device)]
        cos = (keys @ query.to(keys.device, keys.dtype)).tolist()
        floor = self.router.retriever.threshold
        return sorted(((r, c) for r, c in zip(rows, cos) if c >= floor), key=lambda rc: -rc[1])

    def _keeps(
        self,
        entry: int,
        score: float,
        i: int,
        texts: Sequence[str] | None,
        relation: Callable[[int, str], torch.Tensor | None] | None,
    ) -> bool:
        """Whether row ``i`` may read ``entry`` at cosine ``score`` (see ``route``)."""
        below = score < self.config.threshold
        if texts is None:
            return not below
        owner = self.codebook.owner_edit(entry)
        subject = self.store.subjects.get(owner, "")
        gated = bool(subject) and relation is not None and self.gate is not None and owner in self.store.gates
        return (
            (gated or not below)
            and (bool(subject) or score >= self.config.unnamed_threshold)
            and mentions(subject, texts[i])
            and not (self.config.negations and rules_out(self._target(entry), texts[i]))
            and self._same_relation(entry, relation, i, subject)
        )

    def _target(self, entry: int) -> str:
        """The text of an entry's answer (decoded once per answer)."""
        answer = self.codebook.entry(entry).answer
        text = self._targets.get(answer)
        if text is None:
            text = self._targets[answer] = self.tokenizer.decode(list(answer), skip_special_tokens=True).strip()
        return text

    def _same_relation(
        self, entry: int, relation: Callable[[int, str], torch.Tensor | None] | None, row: int, subject: str
    ) -> bool:
        """Whether the row asks the relation of any live edit of the entry (all retrain one answer)."""
        if relation is None or self.gate is None:
            return True
        gates = self.store.gates
        stored = [gates[v.edit_id] for v in self.codebook.entry(entry).versions if v.edit_id in gates]
        if not stored:
            return True
        mine = relation(row, subject)
        stored = [s for s in stored if mine is not None and s.shape == mine.shape]
        if not stored:  # a vector of another gate says nothing here
            return True
        return any(float(mine.to(s.device) @ s) >= self.gate.threshold for s in stored)

    def route_plan(
        self,
        prompt_mask: torch.Tensor,
        texts: Sequence[str] | None = None,
        spans: Sequence[_Span] | None = None,
        last: dict[int, tuple[str, _Span]] | None = None,
    ) -> RoutePlan:
        """Route each row over its ``prompt_mask`` tokens, gated by ``texts`` and ``spans`` (see
        ``route``); a row in ``last`` (row -> its last sentence's text and span) is routed on that
        sentence too and keeps whichever of the two routes scores higher."""

        def relation_of(rows: Sequence[int], row_spans: Sequence[_Span], x: torch.Tensor):
            if self.gate is None:
                return None

            def relation(i: int, subject: str) -> torch.Tensor:
                sp = row_spans[i]
                return self.relation_vector(x[rows[i], sp.start : sp.start + len(sp.ids)], sp.ids, subject)

            return relation

        def router(queries: torch.Tensor, x: torch.Tensor):
            rows = list(range(queries.shape[0]))
            relation = relation_of(rows, spans, x) if spans is not None else None
            values, entry_ids, scores = self.route(queries, texts, relation)
            if not last:
                return values, entry_ids, scores
            alt = sorted(last)
            mask = torch.zeros_like(prompt_mask)
            for r in alt:
                sp = last[r][1]
                mask[r, sp.start : sp.start + len(sp.ids)] = 1
            q = compute_queries(x[alt], mask[alt].to(x.device), self.config.query_strategy, self.config.query_fraction)
            alt_spans = [last[r][1] for r in alt]
            v2, e2, s2 = self.route(q, [last[r][0] for r in alt], relation_of(alt, alt_spans, x))
            for j, r in enumerate(alt):
                if e2[j] is not None and (entry_ids[r] is None or float(s2[j]) > float(scores[r])):
                    values[r], entry_ids[r], scores[r] = v2[j], e2[j], s2[j]
            return values, entry_ids, scores

        return RoutePlan(
            self.layer,
            prompt_mask,
            router,
            self.config.query_strategy,
            self.config.query_fraction,
            trail_of=self.store.trail_of,
        )

    def relation_vector(self, x: torch.Tensor, span_ids: Sequence[int], subject: str) -> torch.Tensor:
        """The unit relation vector of a question span (``x`` [n, dk] the layer input over it)."""
        feats = span_features(x, span_ids, subject, self.tokenizer)
        return self.gate.embed(feats[None])[0]

    def question_plan(self, seqs: Sequence[Sequence[int]], lengths: Sequence[int], width: int) -> RoutePlan:
        """The route plan of left-padded rows whose questions are the spans ``self.chat`` finds in
        their first ``lengths[i]`` tokens (the whole prompt unless it is chat-formatted): routed
        over those tokens, and over the question's last sentence where it has several, gated by
        the text and relation of what is routed."""
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        texts, spans, last = [], [], {}
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            a, b = self.chat.span(s[:n])
            off = width - len(s)
            mask[i, off + a : off + b] = 1
            texts.append(self.tokenizer.decode(list(s[a:b]), skip_special_tokens=True))
            spans.append(_Span(off + a, list(s[a:b])))
            c = last_sentence_start(self.tokenizer, s, a, b)
            if c > a:
                last[i] = (self.tokenizer.decode(list(s[c:b]), skip_special_tokens=True), _Span(off + c, list(s[c:b])))
        return self.route_plan(mask.to(self.input_device), texts, spans, last)

    def edit_relation(self, contexts: list[_Context], subject: str) -> torch.Tensor | None:
        """An edit's relation vector: the unit mean of its question's in every context it is trained in."""
        if self.gate is None or any(c.span_x is None for c in contexts):
            return None
        vecs = [
            self.relation_vector(c.span_x, c.rendered.ids[c.rendered.start : c.rendered.end], subject) for c in contexts
        ]
        return F.normalize(torch.stack(vecs).mean(0), dim=-1)


@dataclass
class _Span:
    """A question's tokens and where they start in a padded batch row."""

    start: int
    ids: list[int]
