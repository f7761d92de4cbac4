"""The wrapped down-projection and the per-call plans that drive it.

The wrapper keeps the original module as ``base_layer`` and, with no plan active, is exactly that
module. What a forward pass should do (route and inject, inject a value being trained, capture the
layer input) is a plan object that lives in a ``ContextVar`` for the duration of one call: it is
never stored on the module, so two threads' requests cannot see each other's routing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVE_PLAN: ContextVar[Plan | None] = ContextVar("horen_active_plan", default=None)


@contextlib.contextmanager
def activate(plan: Plan | None) -> Iterator[Plan | None]:
    """Runs the wrapped layers with ``plan`` (``None``: they pass through, the unedited model)."""
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE_PLAN.reset(token)


def query_weights(prompt_mask: torch.Tensor, strategy: str, fraction: float) -> torch.Tensor:
    """[B, T] averaging weights over the last part of each row's prompt tokens (padding either side)."""
    mask = prompt_mask.to(torch.float32)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    if strategy == "last_token":
        n = torch.ones_like(lengths)
    elif strategy == "all":
        n = lengths
    else:
        n = torch.ceil(lengths * fraction).clamp(min=1)
    rank = torch.cumsum(mask, dim=1)  # 1..len at the row's prompt tokens
    sel = (mask > 0) & (rank > lengths - n)
    return sel.to(torch.float32) / n


def last_prompt_index(prompt_mask: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last prompt token."""
    t = prompt_mask.shape[1]
    idx = torch.arange(t, device=prompt_mask.device).expand_as(prompt_mask)
    return torch.where(prompt_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


def compute_queries(x: torch.Tensor, prompt_mask: torch.Tensor, strategy: str, fraction: float) -> torch.Tensor:
    w = query_weights(prompt_mask, strategy, fraction).to(x.device)
    return F.normalize(torch.einsum("bt,btd->bd", w, x.float()), dim=-1)


class Plan:
    """What the wrapped layer does during one call."""

    layer: HorenLayer

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# (unit queries [B, dk], the layer input [B, T, dk]) -> (values [B, dv], entry ids, scores)
Router = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[int | None], torch.Tensor]]


@dataclass
class RoutePlan(Plan):
    """Route each row's prompt on the first (prefill) call and add the routed value at its last
    prompt token. Later calls (decode steps over a KV cache, one token each) pass through, except
    for a row routed to an entry with a trail (``trail_of``; a long-form edit's values at its
    answer's tokens): while the row is in ``on_track`` (its text so far begins the answer, kept by
    the caller after every token), decode step k adds the trail's row k. A teacher-forced call
    gives ``forced`` (row -> where its forced tokens start, and the tokens) and ``track`` (how many
    of them begin an entry's answer): the trail goes in at those tokens in the prefill."""

    layer: HorenLayer
    prompt_mask: torch.Tensor  # [B, T] 1 at prompt tokens
    router: Router
    strategy: str
    fraction: float
    trail_of: Callable[[int], torch.Tensor | None] | None = None
    done: bool = False
    entry_ids: list[int | None] = field(default_factory=list)
    scores: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    trails: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> its entry's trail
    on_track: set[int] = field(default_factory=set)
    decoded: int = 0  # decode steps so far
    forced: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    track: Callable[[int, list[int]], int] | None = None

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.done:
            return self._trail(out) if self.trails and x.shape[1] == 1 else out
        if x.shape[1] != self.prompt_mask.shape[1]:
            return out
        self.done = True
        mask = self.prompt_mask.to(x.device)
        self.queries = compute_queries(x, mask, self.strategy, self.fraction)
        values, self.entry_ids, self.scores = self.router(self.queries, x)
        if self.trail_of is not None:
            found = {i: self.trail_of(e) for i, e in enumerate(self.entry_ids) if e is not None}
            self.trails = {i: t for i, t in found.items() if t is not None}
            self.on_track = set(self.trails)
        if all(e is None for e in self.entry_ids):
            return out
        pos = last_prompt_index(mask)
        rows = torch.arange(x.shape[0], device=out.device)
        out = out.clone()
        out[rows, pos.to(out.device)] += values.to(device=out.device, dtype=out.dtype)
        for r, trail in self.trails.items():
            if r in self.forced and self.track is not None:
                start, tokens = self.forced[r]
                n = min(self.track(self.entry_ids[r], tokens), len(trail))
                out[r, start : start + n] += trail[:n].to(device=out.device, dtype=out.dtype)
        return out

    def _trail(self, out: torch.Tensor) -> torch.Tensor:
        k, self.decoded = self.decoded, self.decoded + 1
        rows = [r for r, t in self.trails.items() if r in self.on_track and k < len(t)]
        if not rows:
            return out
        out = out.clone()
        for r in rows:
            out[r, -1] += self.trails[r][k].to(device=out.device, dtype=out.dtype)
        return out


@dataclass
class InjectPlan(Plan):
    """Add given values at given positions (training on the full model); optionally record the input."""

    layer: HorenLayer
    positions: torch.Tensor | None = None  # [B]
    values: torch.Tensor | None = None  # [B, dv]
    captured: torch.Tensor | None = None
    capture: bool = False
    delta: torch.Tensor | None = None  # [B, T, dv] added as it is (instead of values at positions)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.captured = x.detach()
        if self.delta is not None:
            return out + self.delta.to(out.dtype)
        if self.values is None:
            return out
        rows = torch.arange(x.shape[0], device=out.device)
        onehot = torch.zeros(out.shape[:2] + (1,), device=out.device, dtype=out.dtype)
        onehot[rows, self.positions.to(out.device)] = 1
        return out + onehot * self.values.to(out.dtype)[:, None, :]


class HorenLayer(nn.Module):
    """A down-projection with a HoReN codebook in front of its output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.disabled = False

    @classmethod
    def wrap(cls, model: nn.Module, module_path: str) -> HorenLayer:
        """Put a wrapper in place of ``model``'s module at ``module_path``; ``ValueError`` when that
        module is wrapped already (one editor per module)."""
        parent, child = _parent(model, module_path)
        base = getattr(parent, child)
        if isinstance(base, HorenLayer):
            raise ValueError(f"{module_path} is already wrapped by another editor")
        layer = cls(base)
        setattr(parent, child, layer)
        return layer

    def unwrap(self, model: nn.Module, module_path: str) -> None:
        """Put the original module back in ``model``."""
        parent, child = _parent(model, module_path)
        setattr(parent, child, self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = _ACTIVE_PLAN.get()
        if plan is None or self.disabled or plan.layer is not self:
            return out
        return plan.apply(x, out)


def _parent(model: nn.Module, module_path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child
