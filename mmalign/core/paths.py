"""Paths in recipes: `scheme://...` names (e.g. `zoo://image/base`) resolved by whoever registered the scheme.

Adapters resolve every path a recipe gives them through `resolve`, so they need not know where the offline worlds
live; `mmalign.zoo` registers `zoo://` (building a world on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_SCHEMES: dict[str, Callable[[str], str]] = {}


def register_scheme(prefix: str, handler: Callable[[str], str]) -> None:
    """Resolve paths starting with `prefix` (e.g. "zoo://") with `handler`."""
    _SCHEMES[prefix] = handler


def resolve(path: Any) -> Any:
    """A recipe path with its scheme resolved; other values (plain paths, hub ids, None) pass unchanged."""
    if isinstance(path, str):
        for prefix, handler in _SCHEMES.items():
            if path.startswith(prefix):
                return handler(path)
    return path
