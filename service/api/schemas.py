"""Request and response models, separate for input and output."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# every character Python's str.strip() or JSON Schema's (ECMAScript's) \s counts as whitespace
_SPACE = "\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# text with something besides whitespace and no NUL (PostgreSQL cannot store NUL in text or jsonb),
# spelled with literal characters so that Python, pydantic-core and JSON Schema validators agree
TEXT = f"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
NO_NUL = "^[^\x00]*$"
MAX_ID = 2**31 - 1  # ids are INTEGER columns on both databases
MAX_OFFSET = 2**63 - 1  # OFFSET is a signed 64-bit integer on both databases
# characters of a prompt and of an edit's target, before the token limits are checked
MAX_PROMPT_CHARS = 20000
MAX_TARGET_CHARS = 2000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def valid_unicode(v: str) -> str:
    # a lone surrogate (JSON "\ud800") cannot be encoded to UTF-8, so no database could store it
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return v


class EditCreate(_Strict):
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=TEXT,
        examples=["What is the capital of Atlantis?"],
        description="at most HOREN_MAX_PROMPT_TOKENS tokens (2048) and the model's context",
    )
    target: str = Field(
        min_length=1,
        max_length=MAX_TARGET_CHARS,
        pattern=TEXT,
        examples=["Poseidonia"],
        description="at most HOREN_MAX_TARGET_TOKENS tokens (64)",
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="any JSON object, at most HOREN_MAX_METADATA_BYTES (16 KiB) as compact JSON and "
        "HOREN_MAX_METADATA_DEPTH (8) levels deep; no NUL characters",
    )
    format: Literal["auto", "plain", "chat"] = Field(
        default="auto",
        description="how the prompt is written: plain text, a chat user message (or a prompt already in the "
        "model's chat template), or auto (chat when it is in the template). Every edit is trained to answer "
        "in both formats.",
    )
    subject: str | None = Field(
        default=None,
        max_length=500,
        pattern=r"^[^\x00]*$",
        examples=["Atlantis"],
        description="the name a prompt must mention (case-insensitively) to get this edit, so that questions "
        "about other entities are answered unedited. Omitted: inferred from the prompt (its longest run of "
        'capitalised words; none found means no restriction). "": no restriction.',
    )

    _check = field_validator("prompt", "target")(valid_unicode)


class EditBatchCreate(_Strict):
    edits: list[EditCreate] = Field(min_length=1, max_length=100, description="at most HOREN_MAX_BATCH_EDITS")


class EditOut(BaseModel):
    id: int
    prompt: str
    target: str
    metadata: dict[str, Any]
    status: Literal["active", "rolled_back"]
    created_at: datetime
    rolled_back_at: datetime | None = None
    rolled_back_by: str | None = None
    created_by: str | None = Field(default=None, description="name of the API key that made it; null when open")
    subject: str = Field(default="", description="the name a prompt must mention to get this edit; empty: any prompt")
    entry_id: int = Field(description="codebook entry this edit created or retrained")
    new_key: bool = Field(description="true if the edit added a key; false if it retrained a matching key")
    steps: int = Field(description="optimiser steps used to train the value")
    final_loss: float
    train_ms: float

    @classmethod
    def from_row(cls, e: Any) -> EditOut:
        """An ``edits`` row (``service.db.models.Edit``) as the API shows it."""
        return cls(
            id=e.id,
            prompt=e.prompt,
            target=e.target,
            metadata=e.metadata_ or {},
            status=e.status,
            created_at=e.created_at,
            rolled_back_at=e.rolled_back_at,
            rolled_back_by=e.rolled_back_by,
            created_by=e.created_by,
            subject=e.subject or "",
            entry_id=e.entry_id,
            new_key=bool(e.created_entry),
            steps=e.steps,
            final_loss=e.loss,
            train_ms=e.train_ms,
        )


class EditBatchOut(BaseModel):
    items: list[EditOut]


class EditList(BaseModel):
    items: list[EditOut]
    total: int


class GenerateRequest(_Strict):
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        pattern=TEXT,
        description="at most HOREN_MAX_PROMPT_TOKENS tokens, and with max_new_tokens within the model's context",
    )
    max_new_tokens: int = Field(default=32, ge=1, description="at most HOREN_MAX_NEW_TOKENS_LIMIT (512)")
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=5.0,
        description="0 is greedy; so is anything below 0.001, whose distribution does not fit a float",
    )
    format: Literal["plain", "chat"] = Field(
        default="plain",
        description="plain: continue the prompt as given; chat: answer it as a user message in the model's chat template",
    )
    edits: bool = Field(default=True, description="false answers with the unedited model, to compare")

    _check = field_validator("prompt")(valid_unicode)

    @field_validator("temperature", mode="before")
    @classmethod
    def _int_ok(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class GenerateOut(BaseModel):
    text: str = Field(description="the continuation only")
    edit_id: int | None = Field(description="the edit whose codebook entry routed this prompt, or null")
    score: float | None = Field(
        default=None,
        description="the routing cosine of the edit that routed this prompt; left out when none did or edits is false",
    )
    threshold: float | None = Field(
        default=None, description="the cosine a key must reach to route the prompt; present with score"
    )


class AuditEvent(BaseModel):
    id: int = Field(description="the event's id: its place in the edit log")
    kind: Literal["edit", "rollback"]
    edit_id: int
    actor: str | None = Field(description="name of the API key that did it; null when the service was open")
    at: datetime
    prompt: str
    target: str


class AuditList(BaseModel):
    items: list[AuditEvent]
    total: int


class ApiKeyCreate(_Strict):
    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["read", "edit", "admin"]


class ApiKeyOut(BaseModel):
    id: int | None = Field(description="null for keys from the settings, which cannot be deleted here")
    name: str
    role: Literal["read", "edit", "admin"]
    source: Literal["settings", "database"]
    created_at: datetime | None = None
    created_by: str | None = None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the bearer token; shown once, only its sha256 is stored")


class ApiKeyList(BaseModel):
    items: list[ApiKeyOut]


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = {}
