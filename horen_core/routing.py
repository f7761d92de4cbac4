"""Which codebook row, if any, each unit query reads.

A ``Router`` owns the codebook's keys (read through a ``KeysView``), the ``HopfieldRetriever`` and,
optionally, a ``CandidateIndex`` that narrows each query to a few rows before the retriever refines
and thresholds over them. The editor hands the router every ``CodebookChange`` its mutations return,
and the router passes them on, so an index follows the codebook without scanning it and never calls
back into the editor. Not thread-safe: the editor's lock serialises changes and routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from horen_core.codebook import Codebook, CodebookChange
from horen_core.retrieval import HopfieldRetriever, Routing


class KeysView:
    """Read-only access to a codebook's live keys: all a candidate index may read of it. Entry ids
    are stable; rows are positions in ``matrix`` and move when an entry is removed."""

    def __init__(self, codebook: Codebook) -> None:
        self._codebook = codebook

    def __len__(self) -> int:
        return len(self._codebook)

    @property
    def dim(self) -> int:
        return self._codebook.key_dim

    @property
    def matrix(self) -> torch.Tensor:
        """[N, d] the unit keys by row, on the codebook's device."""
        return self._codebook.keys

    @property
    def entry_ids(self) -> torch.Tensor:
        """[N] the entry id of each row."""
        return self._codebook.row_entry_ids

    def rows_of(self, entry_ids: torch.Tensor) -> torch.Tensor:
        """The rows of these entry ids (any shape, on the CPU), -1 for ids not in the codebook."""
        return self._codebook.rows_of(entry_ids)


class CandidateIndex(Protocol):
    """A prefilter over the keys: per query, a few rows that hold the ones routing would pick."""

    def reset(self, keys: KeysView) -> None:
        """Index exactly what ``keys`` holds (on attaching, and after a load replaced the codebook)."""

    def apply(self, changes: Sequence[CodebookChange], keys: KeysView) -> None:
        """Follow these changes, in order; ``keys`` is the codebook after all of them."""

    def candidates(self, queries: torch.Tensor, keys: KeysView, support: int) -> torch.Tensor | None:
        """[B, k] rows of ``keys`` that each unit query [B, d] is routed among (-1 pads), or None to
        route over every key. With ``support`` > 0 the retriever attends only each query's
        ``support`` nearest keys, so the rows may be just those."""


class Router:
    def __init__(self, codebook: Codebook, retriever: HopfieldRetriever) -> None:
        self.codebook = codebook
        self.retriever = retriever
        self.keys = KeysView(codebook)
        self.index: CandidateIndex | None = None

    def attach(self, index: CandidateIndex | None) -> None:
        """Route through ``index`` from now on (None: over every key), after it has indexed every key."""
        if index is not None:
            index.reset(self.keys)
        self.index = index

    def apply(self, changes: Sequence[CodebookChange]) -> None:
        """What the codebook's mutations returned, passed on to the index."""
        if self.index is not None and changes:
            self.index.apply(changes, self.keys)

    def reloaded(self) -> None:
        """The codebook was replaced as a whole (a load)."""
        if self.index is not None:
            self.index.reset(self.keys)

    def route(self, queries: torch.Tensor, runners_up: int = 0) -> Routing:
        """Unit queries [B, d] -> each one's row (-1: none cleared the threshold) and best cosine,
        with the ``runners_up`` next-best rows (``HopfieldRetriever.route``)."""
        cb = self.codebook
        keys = cb.keys
        index = self.index
        candidates = None
        if index is not None and len(cb):
            candidates = index.candidates(queries, self.keys, self.retriever.support)
        return self.retriever.route(queries.to(keys.device), keys, candidates, cb.row_entry_ids, runners_up)
