"""Name and option checks for objectives looked up by name, so a recipe typo is an error naming the key."""

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def lookup(kind: str, registry: Mapping[str, Any], name: str) -> Any:
    """registry[name], or a ValueError listing the known names of this kind."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def check_options(
    kind: str, name: str, factory: Callable[..., Any], options: Mapping[str, Any], skip: int = 0
) -> None:
    """Reject options `factory` does not take and required ones that are missing (its first `skip` parameters
    are inputs, not options)."""
    params = dict(list(inspect.signature(factory).parameters.items())[skip:])
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = ", ".join(params) or "none"
        raise ValueError(f"{kind} {name!r} has no option {', '.join(unknown)}; its options: {known}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"{kind} {name!r} needs option {', '.join(missing)}")
