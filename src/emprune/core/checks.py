"""Argument checks shared by every layer: one wording for one kind of mistake."""
from __future__ import annotations

from typing import Any, Iterable


def one_of(name: str, value: Any, choices: Iterable[Any], *, none_ok: bool = False) -> None:
    """Raise ``ValueError("NAME must be one of A, B; got 'x'")`` unless ``value`` is among
    ``choices`` (or None, with ``none_ok``)."""
    choices = tuple(choices)
    if (none_ok and value is None) or value in choices:
        return
    raise ValueError(f"{name} must be {'None or ' if none_ok else ''}one of {', '.join(map(str, choices))}; "
                     f"got {value!r}")
