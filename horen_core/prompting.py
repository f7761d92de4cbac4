"""Prompt formats: a question as plain text, or as a user message in the model's chat template.

An edit's key is computed over the question's own tokens (its *span*) and its value is added at the
span's last token, wherever the question sits: the whole prompt for plain text, the last user
message for a chat-formatted prompt. So the same question routes to the same edit in both formats.
A span of several sentences is also routed on its last sentence (``last_sentence_start``): text
before a question is context, not the question.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from horen_core.errors import InvalidInputError

FORMATS = ("auto", "plain", "chat")
_SENTINEL = "\x00HOREN\x00"


@dataclass(frozen=True)
class Rendered:
    """Token ids of a prompt and the half-open span [start, end) of its question."""

    ids: list[int]
    start: int
    end: int


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def last_sentence_start(
    tokenizer, ids: Sequence[int], start: int, end: int, min_tokens: int = 3, window: int = 128
) -> int:
    """Where the last sentence of ``ids[start:end]`` begins: after the last line break, or the last
    ``.``, ``!`` or ``?`` followed by a space, that leaves at least ``min_tokens`` tokens (looked for in
    the span's last ``window`` tokens); ``start`` when there is none."""
    lo = max(start, end - window)
    after = None
    for j in range(end - min_tokens, lo, -1):
        before = tokenizer.decode([ids[j - 1]])
        if after is None:
            after = tokenizer.decode([ids[j]])
        if before.endswith("\n") or (_SENTENCE_END.search(before) and after[:1].isspace()):
            return j
        after = before  # the next boundary looked at is one token earlier: this token comes after it
    return start


def _find_last(seq: Sequence[int], sub: Sequence[int], before: int) -> int:
    n = len(sub)
    for i in range(min(before, len(seq)) - n, -1, -1):
        if list(seq[i : i + n]) == list(sub):
            return i
    return -1


class ChatFormat:
    """The tokenizer's chat template around a single user message (system prompt included, as
    ``apply_chat_template`` builds it with ``add_generation_prompt=True``)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.available = bool(getattr(tokenizer, "chat_template", None))
        self.prefix_text = self.suffix_text = ""
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        self.user_marker: list[int] = []  # tokens that open a user message
        if not self.available:
            return
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        self.prefix_text, _, self.suffix_text = text.partition(_SENTINEL)
        self.prefix = self._tok(self.prefix_text)
        self.suffix = self._tok(self.suffix_text)
        self.user_marker = _user_marker(tokenizer, self.prefix)

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, question: str) -> Rendered:
        if not self.available:
            raise InvalidInputError("this model's tokenizer has no chat template; use format 'plain'")
        q = self._tok(question)
        return Rendered(self.prefix + q + self.suffix, len(self.prefix), len(self.prefix) + len(q))

    def question_of(self, text: str) -> str | None:
        """The last user message of a prompt written in this chat template, or None if it is not one."""
        if not self.available or not text.endswith(self.suffix_text):
            return None
        ids = self._tok(text)
        a, b = self.span(ids)
        return self.tokenizer.decode(ids[a:b]).strip() if (a, b) != (0, len(ids)) else None

    def span(self, ids: Sequence[int]) -> tuple[int, int]:
        """The question span of a token sequence: its last user message when the sequence ends in
        this template's generation prompt, else the whole sequence."""
        n = len(ids)
        if not self.available or not self.user_marker or n < len(self.suffix):
            return 0, n
        if list(ids[n - len(self.suffix) :]) != self.suffix:
            return 0, n
        end = n - len(self.suffix)
        at = _find_last(ids, self.user_marker, end)
        if at < 0:
            return 0, n
        start = at + len(self.user_marker)
        return (start, end) if end > start else (0, n)


def _user_marker(tokenizer, prefix: list[int]) -> list[int]:
    """The tokens that open the user message: the prefix's tail from its last special token whose
    tail names a role (ChatML ``<|im_start|>user\\n``; Llama 3 ``<|start_header_id|>user...``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for j in range(len(prefix) - 1, -1, -1):
        if prefix[j] in special and any(c.isalpha() for c in tokenizer.decode(prefix[j + 1 :])):
            return prefix[j:]
    return prefix


def resolve_question(chat: ChatFormat, prompt: str, fmt: str) -> tuple[str, str]:
    """(question text, the format it was given in) for an edit's prompt. ``auto`` treats a prompt
    written in the chat template as chat (its last user message) and anything else as plain."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}")
    if fmt == "chat" and not chat.available:
        raise InvalidInputError("this model's tokenizer has no chat template; use format 'plain'")
    if fmt in ("auto", "chat"):
        inner = chat.question_of(prompt)
        if inner is not None:
            return inner, "chat"
    return prompt, "chat" if fmt == "chat" else "plain"


class Tokens:
    """Text to token ids as the editor takes it: a prompt must fit the model's context with room
    for what follows it; a target is encoded as it continues a prompt (with a leading space)."""

    def __init__(self, tokenizer, max_context: int) -> None:
        self.tokenizer, self.max_context = tokenizer, max_context

    def prompt(self, prompt: str, reserve: int = 0) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        ids = list(self.tokenizer(prompt)["input_ids"])
        self.check_length(ids, reserve)
        return ids

    def check_length(self, ids: Sequence[int], reserve: int = 0) -> None:
        if len(ids) + reserve > self.max_context:
            raise InvalidInputError(
                f"prompt is {len(ids)} tokens; with {reserve} more it exceeds the model's context of {self.max_context}"
            )

    def target(self, target: str) -> list[int]:
        if not isinstance(target, str) or not target.strip():
            raise InvalidInputError("target must be a non-empty string")
        text = target if target[0].isspace() else " " + target
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInputError("target has no tokens")
        return list(ids)


LONG_FORM_WORDS = 12  # an answer of more words is a paragraph


def long_form(answer: str) -> bool:
    """Whether ``answer`` is a paragraph rather than a fact (over ``LONG_FORM_WORDS`` words): one
    value at the question holds it only approximately, so its edit also gets a trail
    (``training._Context``) and a routed row keeps its text even where it never states it verbatim."""
    return len(answer.split()) > LONG_FORM_WORDS
