"""The error a user's bad input raises, and how a value is shown in its one line.

Here, not in ``platform.config``, so that the modules ``config`` itself calls on to check a
setting (``platform.objectives``) can raise it without importing ``config``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value: the message is one line, fit for the user."""


def shown(value) -> str:
    """``value`` for a one-line message: as it is, or quoted with escapes when it holds a newline or
    another character a terminal would not show as itself; a long one cut short."""
    text = str(value)
    text = text if len(text) <= 200 else f"{text[:60]}...({len(text)} characters)"
    return text if text.isprintable() else repr(text)
