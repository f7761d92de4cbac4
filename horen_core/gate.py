"""The relation gate: an edit applies to prompts that ask what its question asks, not to every
question about its subject.

The routing key (the mean of the edited layer's input over the question) is dominated by the
subject's tokens, so "Where was Lola Beeth born?" lands as close to "What voice type is Lola Beeth?"
as its rephrases do. The gate reads the same layer input another way: the mean over the question's
tokens outside the subject, and the question's last token, mapped by a fitted linear map to a unit
vector. An edit keeps its question's vector; a prompt routed to an entry keeps it only when its own
vector's cosine with the vector of one of the entry's live edits (edits of one answer share an
entry) clears the gate's threshold.

The map is fitted once per model from questions asked two ways (rephrases, and the chat form of
the same question: must pass) and questions about the same subject with another relation (must
not): ``scripts/fit_gate.py``. The fitted gate of the bundled model ships in ``horen_core/gates/``,
named by the model's fingerprint; a model without one routes on key and subject alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from horen_core.errors import CorruptStateError

if TYPE_CHECKING:
    from horen_core.editor import HorenEditor

GATES_DIR = Path(__file__).parent / "gates"


def subject_mask(span_ids: Sequence[int], subject: str, tokenizer) -> torch.Tensor:
    """[len(span_ids)] True at the tokens that spell ``subject`` (its last occurrence, written with
    or without a leading space); all False when it is not found token for token."""
    n = len(span_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    if not subject:
        return mask
    ids = list(span_ids)
    for text in (" " + subject, subject):
        sub = tokenizer(text, add_special_tokens=False)["input_ids"]
        k = len(sub)
        for i in range(n - k, -1, -1):
            if k and ids[i : i + k] == sub:
                mask[i : i + k] = True
                return mask
    return mask


def gate_features(x: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
    """x [n, dk]: the edited layer's input over a question's span; subject [n] marks the subject's
    tokens. Returns [2 dk]: the unit mean over the other tokens (all, if none are left) and the unit
    last token, scaled so that a fitted map sees inputs of order one."""
    x = x.float()
    rest = x[~subject.to(x.device)] if bool((~subject).any()) else x
    scale = x.shape[-1] ** 0.5 / 10
    return torch.cat([F.normalize(rest.mean(0), dim=-1), F.normalize(x[-1], dim=-1)]) * scale


def span_features(x: torch.Tensor, span_ids: Sequence[int], subject: str, tokenizer) -> torch.Tensor:
    """``gate_features`` of a question span given its token ids (x [n, dk] the layer input over them)."""
    return gate_features(x, subject_mask(span_ids, subject, tokenizer))


@dataclass
class RelationGate:
    weight: torch.Tensor  # [2 dk, r] the fitted map
    mean: torch.Tensor  # [2 dk] subtracted from features before the map
    threshold: float  # cosine a prompt's vector needs with an edit's to be routed to it

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, 2 dk] -> unit vectors [B, r]."""
        w = self.weight.to(features.device)
        return F.normalize((features.float() - self.mean.to(features.device)) @ w, dim=-1)

    def to(self, device: torch.device | str) -> RelationGate:
        return RelationGate(self.weight.to(device), self.mean.to(device), self.threshold)

    def save(self, path: str | Path, fingerprint: str) -> None:
        from safetensors.torch import save_file

        meta = {"horen_gate": "1", "threshold": repr(self.threshold), "model": fingerprint}
        save_file({"weight": self.weight.contiguous(), "mean": self.mean.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> RelationGate:
        """Read a gate file; with ``fingerprint``, refuse one fitted for another model."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                weight, mean = f.get_tensor("weight"), f.get_tensor("mean")
            threshold = float(meta["threshold"])
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CorruptStateError(f"cannot read relation gate {path}: {exc}") from exc
        if fingerprint is not None and meta.get("model") != fingerprint:
            raise CorruptStateError(f"relation gate {path} was fitted for another model")
        if weight.dim() != 2 or mean.shape != (weight.shape[0],):
            raise CorruptStateError(f"relation gate {path} has inconsistent shapes")
        return cls(weight.float(), mean.float(), threshold)

    @classmethod
    def shipped(cls, fingerprint: str) -> RelationGate | None:
        """The gate fitted for this model that ships with the package, if there is one."""
        path = GATES_DIR / f"{fingerprint}.safetensors"
        return cls.load(path, fingerprint) if path.exists() else None


def fit(
    a: torch.Tensor,
    b: torch.Tensor,
    same: torch.Tensor,
    rank: int = 64,
    epochs: int = 100,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the map on feature pairs a[i], b[i] [P, 2 dk] with ``same[i]`` 1 when they ask the same
    thing: a logistic loss on their scaled cosine, the two classes weighted equally. Returns
    (weight [2 dk, r], mean [2 dk])."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.cat([a, b]).mean(0)
    xa, xb, y = a - mean, b - mean, same.float()
    d = a.shape[1]
    weight = torch.nn.Parameter(torch.randn(d, rank, generator=gen) / d**0.5)
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-5.0))
    opt = torch.optim.Adam([weight, scale, bias], lr=3e-3)
    pos_weight = (1 - y).sum() / y.sum().clamp(min=1)
    for _ in range(epochs):
        cos = (F.normalize(xa @ weight, dim=-1) * F.normalize(xb @ weight, dim=-1)).sum(-1)
        loss = F.binary_cross_entropy_with_logits(scale * cos + bias, y, pos_weight=pos_weight)
        loss = loss + weight_decay * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach(), mean


@torch.no_grad()
def relation_features(editor: HorenEditor, questions: Sequence[str], subjects: Sequence[str], chat: bool = False):
    """[B, 2 dk] the gate's input features of each question (plain, or as the user's message in the
    chat template) with its subject, on ``editor``'s model: what ``fit`` learns from."""
    from horen_core.generation import pad_left, positions
    from horen_core.prompting import Rendered

    rendered = [
        editor.chat.render(q) if chat else Rendered(ids, 0, len(ids))
        for q in questions
        for ids in [editor.encode_prompt(q)]
    ]
    ids, mask = pad_left([r.ids for r in rendered], editor.tokenizer.pad_token_id, editor.input_device)
    with editor.lock:
        captured = editor.trainer.layer_input(ids, mask, positions(mask))
    width = ids.shape[1]
    out = []
    for i, (r, subject) in enumerate(zip(rendered, subjects)):
        off = width - len(r.ids)
        span = r.ids[r.start : r.end]
        out.append(span_features(captured[i, off + r.start : off + r.end], span, subject, editor.tokenizer))
    return torch.stack(out).cpu()
