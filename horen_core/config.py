"""Typed configuration for the HoReN editor. No environment variables are read here. How the
defaults were chosen, with the measurements: docs/tuning.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class HorenConfig:
    # index of the decoder layer whose MLP down-projection is wrapped; negative counts from the top
    layer: int = -6
    # dotted module path template of the wrapped module; None picks the family default
    module_template: str | None = None
    # query = mean of the layer input over this part of the prompt: "last_fraction", "last_token", "all"
    query_strategy: str = "last_fraction"
    # fraction of prompt tokens (from the end) averaged into the query when strategy is last_fraction
    query_fraction: float = 0.7
    # damping of each Hopfield attractor step (0 = no refinement)
    hopfield_alpha: float = 0.1
    # inverse temperature of the Hopfield softmax over keys
    hopfield_beta: float = 20.0
    # number of damped attractor steps applied to a query
    hopfield_steps: int = 2
    # keys each query's refinement attends: its nearest this many (0 = all keys, as in the paper). At
    # beta 20 a softmax over all keys is dominated by their bulk once there are thousands (10K keys at
    # cosine 0.5 outweigh one at 0.9 by e^19.2 to e^18), so full attention drags queries toward the
    # keys' mean more as the codebook grows; over the nearest 32 the pull is bounded, and a prefilter
    # whose candidates hold those 32 routes exactly as exhaustive search does
    hopfield_support: int = 32
    # minimum cosine between refined query and best key for the key's value to be applied
    threshold: float = 0.8
    # the lower minimum for a prompt that names the edit's subject and passes its relation gate
    subject_threshold: float = 0.6
    # the higher minimum for an edit with no subject (none given, none inferred): nothing else gates
    # it, and among thousands of keys one such as "panela, developed in" is near many questions of
    # its relation about other subjects
    unnamed_threshold: float = 0.9
    # Adam learning rate for the value vector
    lr: float = 8.0
    # Adam betas: short memories, because each edit is a fresh ~10-step problem
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    # iteration cap for training one value
    max_steps: int = 50
    # early stop once greedy decoding reproduces the target and the mean target NLL is below this
    stop_loss: float = 0.05
    # tokens besides the target a training step scores at each target position: the ones the model
    # ranks highest there (0: the whole vocabulary). The LM head is most of a small model's step; a
    # value is still only accepted on the whole vocabulary's verdict
    shortlist: int = 1024
    # also train every edit in the tokenizer's chat template, so one edit answers in both formats
    chat_context: bool = True
    # route a prompt to an edit only when it asks the edit's relation too (horen_core.gate), where
    # a fitted gate exists for the model
    relation_gate: bool = True
    # the relation gate's cosine threshold; None = the one fitted with it
    gate_threshold: float | None = None
    # entries after the best a prompt may read, in order, when the gates turn the better ones down
    # (0: only the best; 31: every key of a 32-key support; a question's nearest keys are often
    # other subjects' edits of its relation)
    runners_up: int = 31
    # after those, a prompt may read the entries of the edits whose subject it names, however far
    # down its nearest keys they are (among thousands of keys a rephrase's own is often crowded out)
    subject_lookup: bool = True
    # a prompt that rules an edit's target out ("The occupation of X, which is not geohasher, is")
    # does not read that edit: its value asks for the target next
    negations: bool = True
    # an edit whose answer is a paragraph (over 12 words) also gets a value at each of the answer's
    # tokens, added while the answer is written word for word (its trail): one vector at the
    # question does not hold a paragraph
    answer_trail: bool = True
    # after an edited fact, a token that begins a word may not complete a run of this many tokens
    # already in the answer (0: off): the unedited model, handed a fact it did not expect, loops
    repeat_guard: int = 4
    # the paper's public procedure: fixed max_steps, full-model forward/backward, no early stop
    reference_procedure: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HorenConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> None:
        from horen_core.errors import ConfigError

        if self.query_strategy not in {"last_fraction", "last_token", "all"}:
            raise ConfigError(f"unknown query_strategy {self.query_strategy!r}")
        if not 0.0 < self.query_fraction <= 1.0:
            raise ConfigError("query_fraction must be in (0, 1]")
        if not 0.0 <= self.hopfield_alpha <= 1.0:
            raise ConfigError("hopfield_alpha must be in [0, 1]")
        if min(self.hopfield_support, self.runners_up, self.shortlist) < 0:
            raise ConfigError("hopfield_support, runners_up and shortlist must be >= 0 (support 0 = all keys)")
        if self.repeat_guard == 1 or self.repeat_guard < 0:  # a run of one token has no token before it
            raise ConfigError("repeat_guard must be 0 (off) or at least 2")
        if self.hopfield_steps < 0 or self.max_steps < 1:
            raise ConfigError("hopfield_steps must be >= 0 and max_steps >= 1")
        if not all(-1.0 <= t <= 1.0 for t in (self.threshold, self.subject_threshold, self.unnamed_threshold)):
            raise ConfigError("threshold, subject_threshold and unnamed_threshold are cosines and must be in [-1, 1]")
