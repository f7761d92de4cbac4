"""Training one edit's value. Only what can change is computed: the layers below the edited one
(and the edited layer itself) run once per edit, because their activations do not depend on the
value; each step then runs the layers above on that cached hidden state, with the value added at
the question's last token, and projects to logits only at the target positions. Models without
that fast path (and the reference procedure) run the full model each step. After the first step a
step scores each target position's shortlist of tokens instead of the whole vocabulary
(``_Scores``); a value is accepted only on the whole vocabulary's verdict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from horen_core.config import HorenConfig
from horen_core.layer import HorenLayer, InjectPlan, activate, compute_queries
from horen_core.modeling import Head, ModelAdapter
from horen_core.prompting import ChatFormat, Rendered, Tokens, long_form


@dataclass
class _Context:
    """One rendering of an edit's question and what training needs of it. With ``trail`` the
    edit's value is a matrix [1 + m, dv]: row 0 goes in at the question's last token, row 1 + j at
    target token j while the answer is being written (``layer.RoutePlan``), m one less than the
    longest context's target."""

    rendered: Rendered
    target: list[int]
    trail: bool = False
    ids: list[int] = field(default_factory=list)  # prompt + target but its last token
    hidden: torch.Tensor | None = None
    query: torch.Tensor | None = None
    span_x: torch.Tensor | None = None  # the layer input over the question's span [n, dk]


def question_contexts(
    tokens: Tokens, chat: ChatFormat, config: HorenConfig, question: str, target: str
) -> list[_Context]:
    """The question in each format an edit is trained in: plain first (its target tokens are the
    entry's answer), then the chat template when the tokenizer has one and the reply fits."""
    target_ids = tokens.target(target)
    plain = tokens.prompt(question, reserve=len(target_ids))
    trail = config.answer_trail and not config.reference_procedure and long_form(target)
    out = [_Context(Rendered(plain, 0, len(plain)), target_ids, trail)]
    if chat.available and config.chat_context and not config.reference_procedure:
        reply = tokens.tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
        rendered = chat.render(question)
        if reply and len(rendered.ids) + len(reply) <= tokens.max_context:
            out.append(_Context(rendered, list(reply), trail))
    return out


def trail_rows(contexts: Sequence[_Context]) -> int:
    """How many rows an edit's value has after its first (0: a vector, no trail)."""
    return max(len(c.target) for c in contexts) - 1 if any(c.trail for c in contexts) else 0


class _StopForward(Exception):
    pass


class ValueTrainer:
    """Trains values for the edited layer of ``model``: runs the layers below once per edit, then
    steps each value through ``ValueForwards``. Callers hold the editor's lock."""

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
        self.forwards = ValueForwards(model, layer, adapter, value_dim, device, input_device, self.model_dtype)

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

    def prepare_many(self, contexts: Sequence[_Context], rows: int = 64) -> None:
        """``prepare`` of many contexts, up to ``rows`` at a time in one lower pass each where the
        fast path holds: right-padded to the longest (causal attention keeps the padding out of
        every real position, so no mask is needed), rows of like length together (``_groups``)."""
        fast = self.adapter.supports_fast_path and not self.config.reference_procedure and not self.multi_device
        if not fast or len(contexts) < 2:
            for ctx in contexts:
                self.prepare(ctx)
            return
        lengths = [len(c.rendered.ids) + len(c.target) - 1 for c in contexts]
        for indices in _groups(lengths, rows):
            group = [contexts[i] for i in indices]
            for ctx in group:
                ctx.ids = ctx.rendered.ids + ctx.target[:-1]
            width = max(len(c.ids) for c in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            span = torch.zeros_like(ids)
            for i, ctx in enumerate(group):
                # no real position attends the padding, so any token will do: the row's last one
                # (not the pad token, which would make transformers warn about a missing mask)
                ids[i] = ctx.ids[-1]
                ids[i, : len(ctx.ids)] = torch.tensor(ctx.ids)
                span[i, ctx.rendered.start : ctx.rendered.end] = 1
            found = self.lower_pass(ids.to(self.input_device))
            queries = compute_queries(found["x"], span, self.config.query_strategy, self.config.query_fraction)
            for i, ctx in enumerate(group):
                ctx.hidden = found["h"][i : i + 1, : len(ctx.ids)]
                ctx.query = queries[i]
                ctx.span_x = found["x"][i, ctx.rendered.start : ctx.rendered.end]

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

    def shortlists(self, contexts: Sequence[_Context]) -> int:
        """How many tokens besides the target a training step of these contexts scores per target
        position: ``HorenConfig.shortlist``; 0 (the whole vocabulary) where the layers above give
        no features (the full model's route) or the LM head is not a linear map."""
        head = self.adapter.lm_head
        if not self.config.shortlist or self.config.reference_procedure or not isinstance(head, nn.Linear):
            return 0
        if any(c.hidden is None for c in contexts):
            return 0
        return min(self.config.shortlist, head.out_features - 1)

    def train_value(self, contexts: list[_Context], init: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        """One value for every context: the mean cross-entropy of the target tokens over them.
        Stops once every context decodes the target greedily and the mean NLL is below
        ``stop_loss`` (or after ``max_steps``); with a shortlist (``_Scores``) that verdict is
        taken on the whole vocabulary. A long-form edit's value is [1 + ``trail_rows``, dv]
        (``_Context``); ``init`` fills its first rows, the rest start at zero."""
        cfg = self.config
        dv = self.value_dim
        rows = trail_rows(contexts)
        value = torch.zeros((1 + rows, dv) if rows else (dv,), device=self.device)
        if init is not None:  # a vector, or a vector and its trail
            init = init.to(self.device).reshape(-1, dv)[: 1 + rows]
            value.view(-1, dv)[: len(init)] = init
        value = value.float()
        value.requires_grad_(True)
        opt = torch.optim.Adam([value], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        steps, loss_value = 0, float("nan")
        forward = self.forwards.contexts(contexts)
        scores = _Scores(self.adapter.lm_head, contexts, [0] * len(contexts), self.shortlists(contexts), self.device)
        head = _FEATURES if scores.k else None
        for step in range(cfg.max_steps + 1):
            out = torch.cat(forward(value, head))
            losses, solved = scores(out)
            last, early = step == cfg.max_steps, not cfg.reference_procedure
            done, loss = scores.finished(out.detach(), losses, solved, last, cfg.stop_loss, early)
            loss_value = loss[0]
            if done:
                break
            opt.zero_grad(set_to_none=True)
            losses[0].backward()
            opt.step()
            scores.advance()
            steps += 1
        del opt, forward
        return value.detach(), steps, loss_value

    def train_values(
        self, edits: Sequence[tuple[list[_Context], torch.Tensor | None]]
    ) -> list[tuple[torch.Tensor, int, float]]:
        """``train_value`` of several edits (each its contexts and its initial value) at once: every
        context of every edit is a row of one padded pass over the layers above, with its own edit's
        value added, and one Adam moves a [K, dv] parameter (elementwise, so K Adams). The loss is the
        sum of the edits' mean cross-entropies, so each value gets its own edit's gradient. Each edit
        stops as ``train_value`` stops it: once solved (or at ``max_steps``) its value, step count and
        loss are kept and its rows leave the batch, the others go on. Where the batched fast path is
        unavailable (the reference procedure, a model without the prefix cache, a device map) or
        disagrees with separate passes (checked once), each edit is trained by ``train_value``."""
        trails = {i for i, (contexts, _) in enumerate(edits) if trail_rows(contexts)}
        if trails:  # each long-form edit on its own (its value is a matrix), the others together
            rest = iter(self.train_values([e for i, e in enumerate(edits) if i not in trails]))
            return [self.train_value(*edits[i]) if i in trails else next(rest) for i in range(len(edits))]
        if len(edits) < 2 or not self.forwards.batchable(edits, self.config):
            return [self.train_value(contexts, init) for contexts, init in edits]
        cfg = self.config
        dv = self.value_dim
        out: list[tuple[torch.Tensor, int, float] | None] = [None] * len(edits)
        caches = {id(c): self.forwards.prefix(c) for contexts, _ in edits for c in contexts}
        active = list(range(len(edits)))  # the edits still training, by position in ``edits``
        inits = [
            init.reshape(-1, dv)[0] if init is not None else torch.zeros(dv, device=self.device) for _, init in edits
        ]
        value = torch.stack(inits).float().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        k = self.shortlists([c for cs, _ in edits for c in cs])
        drawn: dict[int, torch.Tensor] = {}  # each context's shortlist, by id, once drawn
        packed = _Packed(self.forwards, [edits[a][0] for a in active], caches)
        scores = _Scores(self.adapter.lm_head, packed.contexts, packed.owner_list, k, self.device, drawn)
        for step in range(cfg.max_steps + 1):
            feats = packed.features(value) if k else packed.logits(value)
            losses, solved = scores(feats)
            finished, loss_of = scores.finished(feats.detach(), losses, solved, step == cfg.max_steps, cfg.stop_loss)
            for a in finished:
                out[active[a]] = (value[a].detach().clone(), step, loss_of[a])
            if len(finished) == len(active):
                break
            gone = set(finished)
            keep = [a for a in range(len(active)) if a not in gone]
            loss = losses[keep].sum() if finished else losses.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            scores.advance()
            if finished:  # the solved values leave: the others go on with their own Adam state
                pick = torch.tensor(keep, device=value.device)
                kept = value.detach().index_select(0, pick).requires_grad_(True)
                kept.grad = value.grad.index_select(0, pick)
                state = opt.state.get(value, {})
                opt = torch.optim.Adam([kept], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
                if state:
                    opt.state[kept] = {
                        k: v.index_select(0, pick.to(v.device)) if v.dim() and v.shape[0] == len(active) else v.clone()
                        for k, v in state.items()
                    }
                value, active = kept, [active[a] for a in keep]
                packed = _Packed(self.forwards, [edits[a][0] for a in active], caches)
                scores = _Scores(self.adapter.lm_head, packed.contexts, packed.owner_list, k, self.device, drawn)
            opt.step()
        del opt, packed, scores
        return [r for r in out if r is not None]


_FEATURES = nn.Identity()  # as the head of the layers above: their final-normed states


class _Scores:
    """Each edit's loss (the mean over its contexts of the target's mean cross-entropy) and
    whether greedy decoding gives the target in every context of it, from the final-normed states
    at the contexts' target positions, packed in order (or from their logits, ``k`` 0).

    With ``k`` > 0 a step scores each target position's shortlist: the target and the ``k`` tokens
    the model ranked highest there when it was drawn (from the full logits of the first step, and
    again wherever the whole vocabulary overturns a verdict). A step then costs [n, k + 1] logits
    instead of [n, vocab], most of a small model's step (its LM head is the largest matrix it
    reads). ``confirm`` takes a verdict on the whole vocabulary, so a value is only ever accepted
    as it is without a shortlist; the shortlist changes the path to it, not the test."""

    def __init__(
        self,
        lm_head: nn.Module,
        contexts: Sequence[_Context],
        owners: Sequence[int],
        k: int,
        device: torch.device,
        drawn: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.lm_head, self.contexts, self.k = lm_head, list(contexts), k
        self.drawn = {} if drawn is None else drawn  # each context's shortlist [m, k + 1], by id
        lengths = [len(c.target) for c in self.contexts]
        self.n_edits = max(owners) + 1
        self.targets = torch.tensor([t for c in self.contexts for t in c.target], device=device)
        self.rows = torch.tensor([i for i, m in enumerate(lengths) for _ in range(m)], device=device)
        self.owner = torch.tensor(list(owners), device=device)
        self.ctx_len = torch.tensor(lengths, device=device, dtype=torch.float32)
        self.n_ctx = torch.bincount(self.owner, minlength=self.n_edits).to(torch.float32)
        self.bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        self.weight = self.bias = self.columns = None
        self._last: torch.Tensor | None = None  # the full logits of the step before, to draw from
        self._gather()

    @property
    def shortlisted(self) -> bool:
        return self.weight is not None

    def _gather(self) -> None:
        """The head's rows the shortlists name (their union: every position's restricted logits are
        columns of one product, which is never larger than the full head's)."""
        if not self.k or any(id(c) not in self.drawn for c in self.contexts):
            self.weight = self.bias = self.columns = None
            return
        tokens = torch.cat([self.drawn[id(c)] for c in self.contexts])
        weight, bias = self.lm_head.weight, self.lm_head.bias
        union, self.columns = torch.unique(tokens, return_inverse=True)
        if 10 * len(union) > 9 * weight.shape[0]:  # nearly the whole vocabulary: read the head as it is
            self.weight, self.bias, self.columns = weight, bias, tokens
            return
        self.weight = weight.index_select(0, union)
        self.bias = bias.index_select(0, union) if bias is not None else None

    def _draw(self, logits: torch.Tensor, contexts: Sequence[int], row_of: Sequence[int] | None = None) -> None:
        """Shortlists of these contexts (by position) from full logits at their target positions
        (``row_of``: each target position's row in ``logits``, where it holds only some)."""
        for i in contexts:
            lo, hi = self.bounds[i], self.bounds[i + 1]
            at = lo if row_of is None else row_of[lo]
            target = self.targets[lo:hi, None]
            others = logits[at : at + hi - lo].detach().float().scatter(1, target, float("-inf"))
            self.drawn[id(self.contexts[i])] = torch.cat([target, others.topk(self.k, dim=-1).indices], dim=1)

    def __call__(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K] losses (with grad) and [K] solved (bool) from this step's states (logits, ``k`` 0)."""
        if self.weight is None:
            logits = (self.lm_head(out) if self.k else out).float()
            target = self.targets
            if self.k:
                self._last = logits.detach()
        else:
            logits = F.linear(out, self.weight, self.bias).gather(1, self.columns).float()
            target = torch.zeros_like(self.targets)  # the target is each shortlist's first token
        token_loss = F.cross_entropy(logits, target, reduction="none")
        return self._per_edit(token_loss, (logits.argmax(-1) != target).float())

    def _per_edit(self, token_loss: torch.Tensor, wrong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_ctx = len(self.contexts)
        ctx_loss = torch.zeros(n_ctx, device=token_loss.device).index_add_(0, self.rows, token_loss) / self.ctx_len
        ctx_wrong = torch.zeros(n_ctx, device=token_loss.device).index_add_(0, self.rows, wrong)
        edit_loss = torch.zeros(self.n_edits, device=token_loss.device).index_add_(0, self.owner, ctx_loss)
        edit_wrong = torch.zeros(self.n_edits, device=token_loss.device).index_add_(0, self.owner, ctx_wrong)
        return edit_loss / self.n_ctx, edit_wrong == 0

    def finished(
        self,
        feats: torch.Tensor,
        losses: torch.Tensor,
        solved: torch.Tensor,
        last: bool,
        stop_loss: float,
        early: bool = True,
    ) -> tuple[list[int], list[float]]:
        """The edits (by position) whose training stops after this step, and every edit's loss:
        all of them at the ``last`` step, else (with ``early``) those solved with a loss below
        ``stop_loss``. Where shortlisted, the verdict and the stopping edits' losses are the whole
        vocabulary's (``confirm``)."""
        loss, ok = torch.stack([losses.detach(), solved.float()]).cpu().tolist()
        done = [a for a in range(len(loss)) if last or (early and ok[a] and loss[a] < stop_loss)]
        if done and self.shortlisted:  # the shortlist's verdict, taken on the whole vocabulary
            full_loss, full_ok = self.confirm(feats, done, stop_loss)
            for a, value in zip(done, full_loss):
                loss[a] = value
            done = [a for a, value, good in zip(done, full_loss, full_ok) if last or (good and value < stop_loss)]
        return done, loss

    def advance(self) -> None:
        """After a step on the full vocabulary, draw every shortlist from its logits."""
        if self.k and self.weight is None and self._last is not None:
            self._draw(self._last, [i for i, c in enumerate(self.contexts) if id(c) not in self.drawn])
            self._last = None
            self._gather()

    @torch.no_grad()
    def confirm(self, feats: torch.Tensor, edits: Sequence[int], stop_loss: float) -> tuple[list[float], list[bool]]:
        """The whole vocabulary's loss and verdict (greedy gives the target) for these edits (by
        position) from this step's states, over their rows only; the contexts of an edit that
        fails it (not solved, or a loss not below ``stop_loss``) get new shortlists."""
        asked = torch.zeros(self.n_edits, dtype=torch.bool, device=self.owner.device)
        asked[list(edits)] = True
        sel = asked[self.owner][self.rows]  # the asked edits' target positions
        logits = self.lm_head(feats[sel]).float()
        token_loss, wrong = torch.zeros(len(sel), device=logits.device), torch.ones(len(sel), device=logits.device)
        token_loss[sel] = F.cross_entropy(logits, self.targets[sel], reduction="none")
        wrong[sel] = (logits.argmax(-1) != self.targets[sel]).float()
        losses, solved = (t.cpu().tolist() for t in self._per_edit(token_loss, wrong))
        overturned = {e for e in edits if not (solved[e] and losses[e] < stop_loss)}
        redraw = [i for i, e in enumerate(self.owner.tolist()) if e in overturned]
        if redraw:  # the logits hold the asked rows only, each context's contiguous and in order
            self._draw(logits, redraw, (sel.cumsum(0) - 1).tolist())
            self._gather()
        return [losses[e] for e in edits], [solved[e] for e in edits]


def _groups(lengths: Sequence[int], rows: int, slack: float = 1.25) -> list[list[int]]:
    """Indices of rows for padded passes, each group padded to its longest: sorted by length, a
    group closes at ``rows`` members or where one more would pad it past ``slack`` times its real
    length (a pass costs its padded length; a mixed batch of short and long rows wastes most)."""
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if group and (len(group) >= rows or (len(group) + 1) * n > slack * (total + n)):
            groups.append(group)
            group, total = [], 0
        group.append(i)
        total += n
    return [*groups, group] if group else groups


class _Packed:
    """Every context of several edits as the rows of padded passes over the layers above (each
    row's prefix from the cache, its suffix right-padded; rows of like suffix length together,
    ``_groups``), built once per set of edits: values [K, dv] -> the final-normed states (or
    logits) at every context's target positions, packed in order (``_Scores`` takes them from
    there)."""

    def __init__(self, forwards: ValueForwards, edits: list[list[_Context]], caches: dict[int, object]) -> None:
        self.forwards = forwards
        self.contexts = [c for cs in edits for c in cs]
        self.owner_list = [k for k, cs in enumerate(edits) for _ in cs]  # each context's edit
        starts = [c.rendered.end - 1 for c in self.contexts]
        widths = [c.hidden.shape[1] - p for c, p in zip(self.contexts, starts)]
        offsets = torch.tensor([0, *(len(c.target) for c in self.contexts)]).cumsum(0).tolist()
        self.passes, placed = [], []
        for group in _groups(widths, rows=len(widths)):
            self.passes.append(self._pass(group, starts, caches))
            placed += [offsets[i] + j for i in group for j in range(len(self.contexts[i].target))]
        # the passes' target positions, concatenated, back in the contexts' order
        self.order = torch.tensor(placed).argsort().to(forwards.device)

    def _pass(self, group: list[int], starts: list[int], caches: dict[int, object]) -> tuple:
        device, dtype = self.forwards.device, self.forwards.model_dtype
        contexts = [self.contexts[i] for i in group]
        starts = [starts[i] for i in group]
        suffixes = [c.hidden[0, p:] for c, p in zip(contexts, starts)]
        batch = self.forwards.adapter.suffix_batch(
            [caches[id(c)] for c in contexts], starts, [len(x) for x in suffixes]
        )
        width = max(len(x) for x in suffixes)
        base = suffixes[0].new_zeros(len(suffixes), width, suffixes[0].shape[-1])
        for i, x in enumerate(suffixes):
            base[i, : len(x)] = x
        onehot = torch.zeros(len(suffixes), width, 1, device=device, dtype=dtype)
        onehot[:, 0] = 1  # each value goes in at its row's first suffix position
        rows, cols = [], []
        for i, (c, p) in enumerate(zip(contexts, starts)):
            first = len(c.rendered.ids) - 1 - p
            rows += [i] * len(c.target)
            cols += range(first, first + len(c.target))
        owner = torch.tensor([self.owner_list[i] for i in group], device=device)
        return base, onehot, owner, batch, torch.tensor(rows, device=device), torch.tensor(cols, device=device)

    def logits(self, values: torch.Tensor, head: Head | None = None) -> torch.Tensor:
        """[sum of target lengths, vocab]: each context's logits (or ``head`` of its final-normed
        states) at its target positions, in order."""
        out = []
        for base, onehot, owner, batch, rows, cols in self.passes:
            h = base + onehot * values.to(base.dtype).index_select(0, owner)[:, None, :]
            out.append(self.forwards.adapter.upper_logits_padded(h, batch, rows, cols, head))
        return torch.cat(out).index_select(0, self.order)

    def features(self, values: torch.Tensor) -> torch.Tensor:
        return self.logits(values, _FEATURES)


class ValueForwards:
    """A value to the logits at an edit's target positions, by the cheapest exact route: the layers
    above the edit on cached hidden states (prefix cache, several contexts in one padded pass) where
    the model allows, else the full model; holds the once-per-model checks of those routes."""

    def __init__(
        self,
        model: nn.Module,
        layer: HorenLayer,
        adapter: ModelAdapter,
        value_dim: int,
        device: torch.device,
        input_device: torch.device,
        model_dtype: torch.dtype,
    ) -> None:
        self.model, self.layer, self.adapter, self.value_dim = model, layer, adapter, value_dim
        self.device, self.input_device, self.model_dtype = device, input_device, model_dtype
        self._prefix_cache_ok: bool | None = None  # checked on the first fast-path edit
        self._batched_ok: bool | None = None  # checked on the first edit with several contexts

    def prefix(self, ctx: _Context):
        """The prefix cache of a context's hidden states up to its question's last token."""
        p = ctx.rendered.end - 1
        return self.adapter.prefix_cache(ctx.hidden[:, :p])

    def batchable(self, edits: Sequence[tuple[list[_Context], torch.Tensor | None]], config: HorenConfig) -> bool:
        """Whether ``ValueTrainer.train_values`` may batch these edits: every context has the fast path's hidden
        state and a prefix, the prefix cache works on this model and batching matches separate
        passes (both checked on first use)."""
        contexts = [c for cs, _ in edits for c in cs]
        if config.reference_procedure or not contexts:
            return False
        if any(c.hidden is None or c.rendered.end - 1 <= 0 for c in contexts):
            return False
        if self._prefix_cache_ok is None:  # step_forward checks it on its first call
            c = contexts[0]
            self.step(c.ids, c.rendered.end - 1, len(c.rendered.ids) - 1, len(c.target), c.hidden)
        if not self._prefix_cache_ok or self._batched_ok is False:
            return False
        if self._batched_ok is None:  # verify once that batching changes nothing
            caches = {id(c): self.prefix(c) for c in contexts}
            packed = _Packed(self, [cs for cs, _ in edits], caches)
            with torch.no_grad():
                probe = torch.randn(len(edits), self.value_dim, device=self.device) * 10
                got = packed.logits(probe).split([len(c.target) for c in packed.contexts])
                ref = [
                    self.step(c.ids, c.rendered.end - 1, len(c.rendered.ids) - 1, len(c.target), c.hidden)(probe[k])
                    for c, k in zip(packed.contexts, packed.owner_list)
                ]
            tol = 1e-3 if self.model_dtype == torch.float32 else 5e-2
            self._batched_ok = all(
                torch.allclose(a.float(), b.float(), atol=tol * a.abs().max().item()) for a, b in zip(ref, got)
            )
        return bool(self._batched_ok)

    def contexts(self, contexts: list[_Context]) -> Callable[..., list[torch.Tensor]]:
        """(value, head=None) -> each context's logits (or ``head`` of the final-normed states,
        where every context has the fast path's hidden state) at its target positions: one batched pass over the layers
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
            return self.batched(contexts, spans)
        singles = [self.step(c.ids, p, first, m, c.hidden) for c, (p, first, m) in zip(contexts, spans)]

        def each(value: torch.Tensor, head: Head | None = None) -> list[torch.Tensor]:
            return [f(value, head) for f in singles]

        if batchable and self._prefix_cache_ok:  # verify once that batching changes nothing
            batched = self.batched(contexts, spans)
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

    def batched(self, contexts: list[_Context], spans: list[tuple[int, int, int]]) -> Callable[..., list[torch.Tensor]]:
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

        def batched(value: torch.Tensor, head: Head | None = None) -> list[torch.Tensor]:
            v = value.to(dtype)
            if v.dim() == 1:
                rows = [x + onehot * v for x, onehot in zip(suffixes, onehots)]
            else:
                rows = [
                    x + _spread(v, x.shape[1], 0, at.start + 1, at.stop - at.start, dtype)
                    for x, at in zip(suffixes, positions)
                ]
            return self.adapter.upper_logits_batched(rows, batch, positions, head)

        return batched

    def step(
        self, seq: list[int], p: int, first: int, count: int, hidden: torch.Tensor | None
    ) -> Callable[..., torch.Tensor]:
        """(value added at position ``p``, head=None) -> logits [count, vocab] at positions first..
        (or ``head`` of the final-normed states, where ``hidden`` is given), by the cheapest exact route."""
        dtype = self.model_dtype
        ids = torch.tensor([seq], device=self.input_device)
        if hidden is None:  # the full model (reference procedure, or a family without a fast path)

            def full(value: torch.Tensor, head: Head | None = None) -> torch.Tensor:
                if head is not None:
                    raise ValueError("the full model's route gives logits only")
                if value.dim() == 2:
                    delta = _spread(value, ids.shape[1], p, first + 1, count, self.model_dtype)
                    plan = InjectPlan(self.layer, delta=delta)
                else:
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

            def cached(value: torch.Tensor, head: Head | None = None) -> torch.Tensor:
                added = onehot * value.to(dtype) if value.dim() == 1 else _spread(value, s - p, 0, lo + 1, count, dtype)
                out = self.adapter.upper_logits_suffix(suffix + added, p, cache, slice(lo, lo + count), head)
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
                    return self.step(seq, p, first, count, hidden)
            return cached
        onehot = torch.zeros(1, s, 1, device=self.device, dtype=dtype)
        onehot[0, p] = 1

        def upper(value: torch.Tensor, head: Head | None = None) -> torch.Tensor:
            added = onehot * value.to(dtype) if value.dim() == 1 else _spread(value, s, p, first + 1, count, dtype)
            h = hidden + added
            return self.adapter.upper_logits(h, slice(first, first + count), head)[0]

        return upper


def _spread(value: torch.Tensor, width: int, at: int, answer_at: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, width, dv]: a long-form edit's value [1 + m, dv] laid out over a row, its first row at
    position ``at`` (the question's last token), row 1 + j at ``answer_at + j``, where target token
    j is read (for j < ``count`` - 1: the last target token is read by nothing scored)."""
    n = min(value.shape[0] - 1, count - 1, width - answer_at)
    added = value.new_zeros(width, value.shape[1]).to(dtype)
    index = torch.tensor([at, *range(answer_at, answer_at + n)], device=value.device)
    return added.index_add(0, index, value[: 1 + n].to(dtype))[None]
