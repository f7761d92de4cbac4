"""Errors raised by the repository (an unknown edit id is horen_core's ``UnknownEditError``)."""

from __future__ import annotations


class EntryConflict(Exception):
    """The codebook entry changed since its version was read (another edit or rollback came first)."""
