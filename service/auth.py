"""Who may do what: bearer API keys with roles.

Keys come from the settings (``HOREN_API_KEYS``; ``HOREN_ADMIN_TOKEN`` is the admin key named
``admin``) and from the ``api_keys`` table (made through the admin routes, stored by sha256 only).
Roles are ordered: ``read`` (generate, chat, completions, models, listing edits) < ``edit`` (also
making edits) < ``admin`` (also rollback, audit, key management, codebook export and import).

With no API keys at all (the admin token alone does not count) the service keeps its old, open
behaviour: anyone may read and, on a loopback host only, edit; a valid key presented anyway is
still recorded as the actor. While the database is unavailable, the last answers it gave (is any
key stored, which key a token is) stand in for it, so that reads served from memory keep working;
a token never seen before then raises the database's error. Knows nothing of HTTP: it raises the
errors below, which the API maps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc

from service.db import repository as repo
from service.db.models import ROLES
from service.settings import Settings

KEY_PREFIX = "horen-"


class UnauthorizedError(Exception):
    """No valid API key where one is needed."""


class ForbiddenError(Exception):
    """A valid key whose role does not allow this."""


class AdminDisabledError(Exception):
    """No admin key exists, so admin routes are off."""


class EditsDisabledError(Exception):
    """No API keys are configured and the service listens beyond loopback: anonymous edits are refused."""


@dataclass(frozen=True)
class Principal:
    name: str | None  # the key's name; None for an anonymous caller of an open service
    role: str


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits), shown once to whoever creates it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyRing:
    """Resolves a bearer token to a `Principal` and checks its role. ``sessions`` is a session
    factory for the ``api_keys`` table; lookups there are by sha256, compared in constant time."""

    def __init__(self, settings: Settings, sessions: Any) -> None:
        self.sessions = sessions
        self.loopback = is_loopback(settings.host)
        self.host = settings.host
        # (name, key bytes, role); every one is compared, so the time does not say which matched
        self._static = [(k.name, k.key.get_secret_value().encode(), k.role) for k in settings.api_keys]
        self.has_admin_token = bool(settings.admin_token)
        if settings.admin_token:
            self._static.append(("admin", settings.admin_token.encode(), "admin"))
        self.has_settings_keys = bool(settings.api_keys)
        self._any_stored: bool | None = None  # the table's last answer, used while it cannot be read
        self._stored: dict[str, Principal | None] = {}  # sha256 -> the table's last answer for that token

    def static_names(self) -> list[tuple[str, str]]:
        return [(name, role) for name, _, role in self._static]

    def lookup(self, token: str) -> Principal | None:
        given = token.encode()
        found = None
        for name, key, role in self._static:
            if hmac.compare_digest(given, key) and found is None:
                found = Principal(name, role)
        if found is not None:
            return found
        digest = sha256_hex(token)
        try:
            with self.sessions() as session:
                row = repo.api_key_by_sha256(session, digest)
                found = Principal(row.name, row.role) if row and hmac.compare_digest(row.key_sha256, digest) else None
        except sa_exc.DBAPIError:
            if digest not in self._stored:
                raise
            return self._stored[digest]
        if len(self._stored) >= 4096:  # bounded: random tokens must not grow it without end
            self._stored.clear()
        self._stored[digest] = found
        return found

    def keys_configured(self) -> bool:
        """True once any API key exists (in the settings or the table): then every route needs one."""
        if self.has_settings_keys:
            return True
        try:
            with self.sessions() as session:
                self._any_stored = repo.any_api_key(session)
        except sa_exc.DBAPIError:
            if self._any_stored is None:
                raise
        return self._any_stored

    def authorize(self, authorization: str | None, needed: str) -> Principal:
        """The caller behind an ``Authorization`` header, if it may act with role ``needed``."""
        token = bearer(authorization)
        who = self.lookup(token) if token else None
        if who is not None:
            if not allows(who.role, needed):
                raise ForbiddenError(f"the key {who.name!r} has role {who.role!r}; this needs {needed!r}")
            return who
        if self.keys_configured():
            raise UnauthorizedError("a valid API key is required (Authorization: Bearer <key>)")
        if needed == "admin":
            if self.has_admin_token:
                raise UnauthorizedError("a valid admin bearer token is required")
            raise AdminDisabledError(
                "admin routes are disabled: set HOREN_ADMIN_TOKEN or HOREN_API_KEYS with an admin key"
            )
        if needed == "edit" and not self.loopback:
            raise EditsDisabledError(
                f"edits are refused: the service listens on {self.host} without API keys; "
                "set HOREN_API_KEYS (a key with role edit or admin) to allow them"
            )
        return Principal(None, needed)

    def describe_open_access(self) -> str | None:
        """A line for the start-up log when no API keys exist (None when they do)."""
        if self.keys_configured():
            return None
        admin = "admin routes need HOREN_ADMIN_TOKEN" if self.has_admin_token else "admin routes are disabled"
        if self.loopback:
            return (
                f"no API keys configured (HOREN_API_KEYS): generate, chat and edits are open to anyone who can "
                f"reach {self.host}; {admin}"
            )
        return (
            f"no API keys configured (HOREN_API_KEYS) and listening on {self.host}: generate and chat are open, "
            f"edits are refused; {admin}"
        )
