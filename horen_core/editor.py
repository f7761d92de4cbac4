"""HorenEditor: wraps one MLP down-projection of a causal LM with a HoReN codebook and offers edit,
rollback, routed generation and scoring. Torch + transformers only; knows nothing of HTTP or
databases. All public methods take the editor's lock, so one editor may be shared by threads.

Editing trains one value vector. Only what can change is computed: the layers below the edited one
(and the edited layer itself) run once per edit, because their activations do not depend on the
value; each step then runs the layers above on that cached hidden state, with the value added at
the last prompt token, and projects to logits only at the target positions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.errors import CorruptStateError, InvalidInputError
from horen_core.layer import HorenLayer, InjectPlan, RoutePlan, activate, compute_queries
from horen_core.modeling import ModelAdapter, model_fingerprint, module_dims
from horen_core.retrieval import HopfieldRetriever

CandidateProvider = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class EditResult:
    edit_id: int
    entry_id: int | None  # None only for a new entry not yet applied (apply=False)
    created: bool  # a new key, or the retrained value of a key with the same answer
    steps: int
    loss: float
    seconds: float
    key: torch.Tensor  # this edit's query (unit), on cpu
    value: torch.Tensor  # the trained value, on cpu
    answer: tuple[int, ...]


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
        self.retriever = HopfieldRetriever(
            self.config.hopfield_alpha,
            self.config.hopfield_beta,
            self.config.hopfield_steps,
            self.config.threshold,
            support=self.config.hopfield_support,
        )
        self.candidate_provider: CandidateProvider | None = None
        self.fingerprint = model_fingerprint(model)
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        )
        self.lock = threading.RLock()
        self._next_edit_id = 1
        self._prefix_cache_ok: bool | None = None  # checked on the first fast-path edit

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
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) + reserve > self.max_context:
            raise InvalidInputError(
                f"prompt is {len(ids)} tokens; with {reserve} more it exceeds the model's context of {self.max_context}"
            )
        return list(ids)

    def encode_target(self, target: str) -> list[int]:
        if not isinstance(target, str) or not target.strip():
            raise InvalidInputError("target must be a non-empty string")
        text = target if target[0].isspace() else " " + target
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInputError("target has no tokens")
        return list(ids)

    # ---- routing ----------------------------------------------------------------------------
    def _router(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[int | None], torch.Tensor]:
        cb = self.codebook
        keys = cb.keys
        candidates = self.candidate_provider(queries) if (self.candidate_provider and len(cb)) else None
        routing = self.retriever.route(queries.to(keys.device), keys, candidates, order=cb.row_entry_ids)
        rows = routing.rows
        hit = rows >= 0
        values = torch.zeros(queries.shape[0], cb.value_dim, device=keys.device, dtype=cb.dtype)
        if hit.any():
            values[hit] = cb.values[rows[hit]]
        entry_ids = [cb.entry_id_at(int(r)) if r >= 0 else None for r in rows.tolist()]
        return values, entry_ids, routing.scores

    def _route_plan(self, prompt_mask: torch.Tensor) -> RoutePlan:
        return RoutePlan(self.layer, prompt_mask, self._router, self.config.query_strategy, self.config.query_fraction)

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
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        edited: bool = True,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[Generation]:
        """Generate continuations for a batch; each row is routed on its own, once, in the prefill."""
        seqs = (
            [list(s) for s in prompt_ids]
            if prompt_ids is not None
            else [self.encode_prompt(p, reserve=max_new_tokens) for p in prompts]
        )
        ids, mask = self._pad_left(seqs)
        gen_kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        with self.lock:
            plan = self._route_plan(mask)
            if edited:
                with activate(plan):
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            else:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            owners = [self.codebook.owner_edit(e) if e is not None else None for e in plan.entry_ids]
        new = out[:, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        results = []
        for i, toks in enumerate(new):
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            entry = plan.entry_ids[i] if plan.entry_ids else None
            score = float(plan.scores[i]) if plan.scores is not None else 0.0
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(Generation(text, toks, entry, owners[i] if plan.entry_ids else None, score))
        return results

    @torch.no_grad()
    def forward_logits(
        self,
        seqs: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        edited: bool = True,
        keep_last: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
        """Routed teacher-forced forward over left-padded ``seqs``; routing sees only the first
        ``prompt_lengths[i]`` tokens of each row. Returns (logits, attention mask, routed entries);
        with ``keep_last`` > 0 only the last that many positions' logits are computed."""
        ids, mask = self._pad_left(seqs)
        prompt_mask = mask.clone()
        t = ids.shape[1]
        for i, (s, n) in enumerate(zip(seqs, prompt_lengths)):
            start = t - len(s)
            prompt_mask[i, start + n :] = 0
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": self._positions(mask)}
        if keep_last:
            kwargs["logits_to_keep"] = keep_last
        with self.lock:
            plan = self._route_plan(prompt_mask)
            if edited:
                with activate(plan):
                    logits = self.model(**kwargs).logits
            else:
                logits = self.model(**kwargs).logits
        return logits, mask, plan.entry_ids or [None] * len(seqs)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    # ---- editing ----------------------------------------------------------------------------
    def edit(self, prompt: str, target: str, edit_id: int | None = None, apply: bool = True) -> EditResult:
        """Insert prompt -> target: reuse the key the prompt matches when its answer is the same,
        otherwise add a key; train the value until greedy decoding reproduces the target.

        With ``apply=False`` the codebook is left unchanged (``entry_id`` is the reused entry or
        None for a new one); the caller persists the result first and then calls ``apply_version``.
        """
        t0 = time.perf_counter()
        target_ids = self.encode_target(target)
        prompt_ids = self.encode_prompt(prompt, reserve=len(target_ids))
        with self.lock:
            if edit_id is None:
                edit_id = max(self._next_edit_id, max(self.codebook.edit_ids(), default=0) + 1)
            if apply:
                self._next_edit_id = max(self._next_edit_id, edit_id + 1)
            if apply and self.codebook.entry_of_edit(edit_id) is not None:
                raise InvalidInputError(f"edit id {edit_id} is already in use")
            seq = prompt_ids + target_ids[:-1]
            p = len(prompt_ids) - 1
            ids = torch.tensor([seq], device=self.input_device)
            prompt_mask = torch.zeros_like(ids)
            prompt_mask[0, : len(prompt_ids)] = 1
            hidden = self._lower_pass(ids)
            capture = hidden["x"]
            query = compute_queries(capture, prompt_mask, self.config.query_strategy, self.config.query_fraction)[0]
            _, entry_ids, _ = self._router(query[None])
            reuse = entry_ids[0]
            if reuse is not None and self.codebook.entry(reuse).answer != tuple(target_ids):
                reuse = None  # a conflicting edit gets its own key
            init = self.codebook.values[self.codebook.row_of(reuse)].clone() if reuse is not None else None
            value, steps, loss = self._train_value(ids, p, target_ids, hidden.get("h"), init)
            entry_id = reuse
            if apply:
                if reuse is None:
                    entry_id = self.codebook.add(edit_id, query, value, target_ids).entry_id
                else:
                    self.codebook.retrain(edit_id, reuse, query, value)
        return EditResult(
            edit_id=edit_id,
            entry_id=entry_id,
            created=reuse is None,
            steps=steps,
            loss=loss,
            seconds=time.perf_counter() - t0,
            key=query.detach().cpu(),
            value=value.detach().cpu(),
            answer=tuple(target_ids),
        )

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

    def _train_value(
        self,
        ids: torch.Tensor,
        p: int,
        target_ids: list[int],
        hidden: torch.Tensor | None,
        init: torch.Tensor | None,
    ) -> tuple[torch.Tensor, int, float]:
        cfg = self.config
        dv = self.codebook.value_dim
        value = (init.clone() if init is not None else torch.zeros(dv, device=self.device)).float()
        value.requires_grad_(True)
        opt = torch.optim.Adam([value], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        target = torch.tensor(target_ids, device=self.device)
        m = len(target_ids)
        forward = self._step_forward(ids, p, m, hidden)
        steps, loss_value = 0, float("nan")
        for step in range(cfg.max_steps + 1):
            logits = forward(value)
            loss = F.cross_entropy(logits.float(), target)
            loss_value = float(loss.detach())
            if step == cfg.max_steps:
                break
            solved = bool((logits.argmax(-1) == target).all()) and loss_value < cfg.stop_loss
            if solved and not cfg.reference_procedure:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        del opt, forward
        return value.detach(), steps, loss_value

    def _step_forward(
        self, ids: torch.Tensor, p: int, m: int, hidden: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """value -> logits [m, vocab] at the target positions, by the cheapest exact route."""
        dtype = self.model_dtype
        if hidden is None:  # the full model (reference procedure, or a family without a fast path)

            def full(value: torch.Tensor) -> torch.Tensor:
                plan = InjectPlan(self.layer, positions=torch.tensor([p]), values=value[None])
                with activate(plan):
                    return self.model(input_ids=ids).logits[0, p : p + m]

            return full
        s = hidden.shape[1]
        if p > 0 and self._prefix_cache_ok is not False:
            cache = self.adapter.prefix_cache(hidden[:, :p])
            suffix = hidden[:, p:]
            onehot = torch.zeros(1, s - p, 1, device=self.device, dtype=dtype)
            onehot[0, 0] = 1

            def cached(value: torch.Tensor) -> torch.Tensor:
                return self.adapter.upper_logits_suffix(suffix + onehot * value.to(dtype), p, cache)[0, :m]

            if self._prefix_cache_ok is None:  # verify once that this model honours the cache
                with torch.no_grad():
                    ref = self.adapter.upper_logits(hidden, slice(p, p + m))[0]
                    got = cached(torch.zeros(self.codebook.value_dim, device=self.device))
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                self._prefix_cache_ok = bool(
                    torch.allclose(ref.float(), got.float(), atol=tol * ref.abs().max().item())
                )
                if not self._prefix_cache_ok:
                    return self._step_forward(ids, p, m, hidden)
            return cached
        onehot = torch.zeros(1, s, 1, device=self.device, dtype=dtype)
        onehot[0, p] = 1

        def upper(value: torch.Tensor) -> torch.Tensor:
            return self.adapter.upper_logits(hidden + onehot * value.to(dtype), slice(p, p + m))[0]

        return upper

    # ---- rollback & state -------------------------------------------------------------------
    def rollback(self, edit_id: int) -> CodebookChange:
        with self.lock:
            return self.codebook.rollback(edit_id)

    def apply_version(
        self, edit_id: int, entry_id: int, key: torch.Tensor, value: torch.Tensor, answer: Sequence[int]
    ) -> CodebookChange:
        """Mirror an edit trained elsewhere (a log replay or another replica) without retraining."""
        with self.lock:
            self._next_edit_id = max(self._next_edit_id, edit_id + 1)
            if not self.codebook.has_entry(entry_id):
                return self.codebook.add(edit_id, key, value, answer, entry_id=entry_id)
            if self.codebook.entry(entry_id).answer != tuple(answer):
                raise CorruptStateError(f"edit {edit_id} retrains entry {entry_id} with another answer")
            return self.codebook.retrain(edit_id, entry_id, key, value)

    def apply_versions(
        self,
        edit_ids: Sequence[int],
        entry_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[Sequence[int]],
    ) -> list[CodebookChange]:
        """``apply_version`` of many edits, in order (a log replay): each run of edits that create
        entries goes into the codebook at once (``Codebook.add_many``), retrains one by one."""
        with self.lock:
            changes: list[CodebookChange] = []
            run: list[int] = []  # positions of consecutive edits creating entries, not yet added
            created: set[int] = set()

            def flush() -> None:
                if run:
                    pick = torch.tensor(run)
                    changes.extend(
                        self.codebook.add_many(
                            [edit_ids[i] for i in run],
                            keys[pick],
                            values[pick],
                            [answers[i] for i in run],
                            [entry_ids[i] for i in run],
                        )
                    )
                    self._next_edit_id = max(self._next_edit_id, max(edit_ids[i] for i in run) + 1)
                    run.clear()

            for i, entry_id in enumerate(entry_ids):
                if entry_id in created or self.codebook.has_entry(entry_id):
                    flush()
                    changes.append(self.apply_version(edit_ids[i], entry_id, keys[i], values[i], answers[i]))
                else:
                    run.append(i)
                    created.add(entry_id)
            flush()
            return changes

    def save(self, path) -> None:
        with self.lock:
            self.codebook.save(path, metadata={**self.identity, "config": _json(self.config.to_dict())})

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
            self._next_edit_id = max(self.codebook.edit_ids(), default=0) + 1

    def unwrap(self) -> None:
        """Put the original module back."""
        parent_path, _, child = self.adapter.module_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, self.layer.base_layer)


class _StopForward(Exception):
    pass


def _json(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True)
