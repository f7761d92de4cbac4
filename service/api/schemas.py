"""Request and response models, separate for input and output."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class EditCreate(_Strict):
    prompt: str = Field(min_length=1, max_length=20000, examples=["What is the capital of Atlantis?"])
    target: str = Field(min_length=1, max_length=2000, examples=["Poseidonia"])
    metadata: dict[str, Any] | None = None
    format: Literal["auto", "plain", "chat"] = Field(
        default="auto",
        description="how the prompt is written: plain text, a chat user message (or a prompt already in the "
        "model's chat template), or auto (chat when it is in the template). Every edit is trained to answer "
        "in both formats.",
    )

    _check = field_validator("prompt", "target")(_not_blank)


class EditBatchCreate(_Strict):
    edits: list[EditCreate] = Field(min_length=1, max_length=100)


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
    entry_id: int = Field(description="codebook entry this edit created or retrained")
    new_key: bool = Field(description="true if the edit added a key; false if it retrained a matching key")
    steps: int = Field(description="optimiser steps used to train the value")
    final_loss: float
    train_ms: float


class EditBatchOut(BaseModel):
    items: list[EditOut]


class EditList(BaseModel):
    items: list[EditOut]
    total: int


class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=20000)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    format: Literal["plain", "chat"] = Field(
        default="plain",
        description="plain: continue the prompt as given; chat: answer it as a user message in the model's chat template",
    )
    edits: bool = Field(default=True, description="false answers with the unedited model, to compare")

    _check = field_validator("prompt")(_not_blank)

    @field_validator("temperature", mode="before")
    @classmethod
    def _int_ok(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class GenerateOut(BaseModel):
    text: str = Field(description="the continuation only")
    edit_id: int | None = Field(description="the edit whose codebook entry routed this prompt, or null")


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
