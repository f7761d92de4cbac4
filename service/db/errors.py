"""Errors raised by the repository (an unknown edit id is horen_core's ``UnknownEditError``), and
what a database that is down raises."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

# what a database that is down, failing, full or read-only raises
DB_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DatabaseError, sa_exc.TimeoutError)


class EntryConflict(Exception):
    """The codebook entry changed since its version was read (another edit or rollback came first)."""
