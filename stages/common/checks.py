"""`require`: the one validation helper of the settings dataclasses (a ValueError with the message)."""
from __future__ import annotations

__all__ = ["require"]


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: settings name the key and the bad value in `message`."""
    if not ok:
        raise ValueError(message)
