"""Typed errors raised by horen_core. Callers (the service) map them to responses in one place."""


class HorenError(Exception):
    """Base class of every error horen_core raises on purpose."""


class InvalidInputError(HorenError, ValueError):
    """A prompt or target the editor cannot use (empty, too long for the model's context)."""


class ConfigError(HorenError, ValueError):
    """A configuration value outside its allowed range."""


class CorruptStateError(HorenError, ValueError):
    """A saved codebook that is malformed, non-finite, or belongs to another model or layer."""


class UnknownEditError(HorenError, KeyError):
    """An edit id that is not there: not in the codebook, or (raised by the service) not stored."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(HorenError, ValueError):
    """A model whose edited module cannot be located."""
