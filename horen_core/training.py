"""Training one edit's value. Only what can change is computed: the layers below the edited one
(and the edited layer itself) run once per edit, because their activations do not depend on the
value; each step then runs the layers above on that cached hidden state, with the value added at
the question's last token, and projects to logits only at the target positions. Models without
that fast path (and the reference procedure) run the full model each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from horen_core.config import HorenConfig
from horen_core.layer import HorenLayer, InjectPlan, activate, compute_queries
from horen_core.modeling import ModelAdapter
from horen_core.prompting import Rendered


@dataclass
class _Context:
    """One rendering of an edit's question and what training needs of it."""

    rendered: Rendered
    target: list[int]
    ids: list[int] = field(default_factory=list)  # prompt + target but its last token
    hidden: torch.Tensor | None = None
    query: torch.Tensor | None = None
    span_x: torch.Tensor | None = None  # the layer input over the question's span [n, dk]


class _StopForward(Exception):
    pass


class ValueTrainer:
    """Trains values for the edited layer of ``model``; holds the once-per-model checks of the fast
    path. Callers hold the editor's lock."""

    def __init__(
        self,
        model: nn.Module,
        layer: HorenLayer,
        adapter: ModelAdapter,
        config: HorenConfig,
        value_dim: int,
        device: torch.device,
        input_device: torch.device,
        multi_device: bool,
    ) -> None:
        self.model, self.layer, self.adapter, self.config = model, layer, adapter, config
        self.value_dim = value_dim
        self.device, self.input_device, self.multi_device = device, input_device, multi_device
        self.model_dtype = next(layer.base_layer.parameters()).dtype
        self._prefix_cache_ok: bool | None = None  # checked on the first fast-path edit
        self._batched_ok: bool | None = None  # checked on the first edit with several contexts

    @torch.no_grad()
    def layer_input(self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The edited layer's input [B, T, dk] over left-padded rows; the layers above do not run."""
        plan = InjectPlan(self.layer, capture=True)

        def stop(_module, _inputs, _output):
            raise _StopForward  # nothing above the edited layer is needed

        handle = self.adapter.layers[self.adapter.layer_index].register_forward_hook(stop)
        try:
            with activate(plan):
                self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return plan.captured

    def prepare(self, ctx: _Context) -> None:
        """Run the unedited layers below the edit once: the query over the question's span and
        the hidden states training starts from."""
        r = ctx.rendered
        ctx.ids = r.ids + ctx.target[:-1]
        ids = torch.tensor([ctx.ids], device=self.input_device)
        span = torch.zeros_like(ids)
        span[0, r.start : r.end] = 1
        found = self.lower_pass(ids)
        ctx.hidden = found.get("h")
        ctx.query = compute_queries(found["x"], span, self.config.query_strategy, self.config.query_fraction)[0]
        ctx.span_x = found["x"][0, r.start : r.end]

    @torch.no_grad()
    def lower_pass(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
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

    def train_value(self, contexts: list[_Context], init: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        """One value for every context: the mean cross-entropy of the target tokens over them.
        Stops once every context decodes the target greedily and the mean NLL is below
        ``stop_loss`` (or after ``max_steps``)."""
        cfg = self.config
        dv = self.value_dim
        value = (init.clone() if init is not None else torch.zeros(dv, device=self.device)).float()
        value.requires_grad_(True)
        opt = torch.optim.Adam([value], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        steps, loss_value = 0, float("nan")
        forward = self.contexts_forward(contexts)
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

    def contexts_forward(self, contexts: list[_Context]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
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
            return self.batched_forward(contexts, spans)
        singles = [self.step_forward(c.ids, p, first, m, c.hidden) for c, (p, first, m) in zip(contexts, spans)]

        def each(value: torch.Tensor) -> list[torch.Tensor]:
            return [f(value) for f in singles]

        if batchable and self._prefix_cache_ok:  # verify once that batching changes nothing
            batched = self.batched_forward(contexts, spans)
            with torch.no_grad():
                probe = torch.randn(self.value_dim, device=self.device) * 10
                ref, got = each(probe), batched(probe)
            tol = 1e-3 if self.model_dtype == torch.float32 else 5e-2
            self._batched_ok = all(
                torch.allclose(a.float(), b.float(), atol=tol * a.abs().max().item()) for a, b in zip(ref, got)
            )
            if self._batched_ok:
                return batched
        return each

    def batched_forward(
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

    def step_forward(
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
                    got = cached(torch.zeros(self.value_dim, device=self.device))
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                self._prefix_cache_ok = bool(
                    torch.allclose(ref.float(), got.float(), atol=tol * ref.abs().max().item())
                )
                if not self._prefix_cache_ok:
                    return self.step_forward(seq, p, first, count, hidden)
            return cached
        onehot = torch.zeros(1, s, 1, device=self.device, dtype=dtype)
        onehot[0, p] = 1

        def upper(value: torch.Tensor) -> torch.Tensor:
            return self.adapter.upper_logits(hidden + onehot * value.to(dtype), slice(first, first + count))[0]

        return upper
