"""Errors raised by the repository; the engine maps them to its own."""

from __future__ import annotations


class EntryConflict(Exception):
    """The codebook entry changed since its version was read (another edit or rollback came first)."""


class EditNotFound(LookupError):
    """No edit with that id."""
