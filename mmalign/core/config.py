"""Recipes: YAML files that fully describe a run, with dotted `key=value` overrides from the command line."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmalign.core.errors import RecipeError

__all__ = [
    "DTYPES",
    "RecipeError",
    "apply_overrides",
    "check_dtype",
    "dump_recipe",
    "load_recipe",
    "load_yaml",
    "to_dataclass",
]

T = TypeVar("T")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-4` and `5E3` are numbers (PyYAML's 1.1 resolver reads them as strings)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(value: str, where: str = "model.dtype") -> None:
    """Refuse a weights dtype name torch would not know (checked before any model loads)."""
    if value not in DTYPES:
        raise ValueError(f"{where} must be one of {', '.join(DTYPES)}, got {value!r}")


def load_yaml(text: str) -> Any:
    """Parse recipe YAML the way users write numbers (`lr: 1e-4` is a float)."""
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass: no arbitrary objects


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe file and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        recipe = load_yaml(path.read_text())
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(recipe).__name__}")
    return apply_overrides(recipe, overrides or [])


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `recipe` with each `a.b.c=value` set (intermediate sections are created)."""
    out = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form section.key=value")
        value = load_yaml(raw) if raw else None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override {item!r}: '{part}' is a value, not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


def to_dataclass(cls: type[T], section: dict[str, Any] | None, where: str, ignore: tuple[str, ...] = ()) -> T:
    """Build a config dataclass from a recipe section, rejecting unknown keys by name."""
    section = {k: v for k, v in (section or {}).items() if k not in ignore}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - known)
    if unknown:
        raise RecipeError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        section[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**section)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from err


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept YAML's spellings of numbers (`5e-4` is a string to YAML 1.1) and reject wrong types by name."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise RecipeError(f"{where} must not be null")
    if float in allowed and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise RecipeError(f"{where} must be a number, got {value!r}") from None
    wrong_int = isinstance(value, bool) or not isinstance(value, int)
    if (
        int in allowed
        and bool not in allowed
        and wrong_int
        and not (str in allowed and isinstance(value, str))
    ):
        raise RecipeError(f"{where} must be an integer, got {value!r}")
    if bool in allowed and not isinstance(value, bool):
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if str in allowed and isinstance(value, bool):  # YAML 1.1 reads `no`/`off` as false, `yes`/`on` as true
        return "yes" if value else "no"
    if str in allowed and len(allowed) == 1 and not isinstance(value, str):
        raise RecipeError(f"{where} must be a string, got {value!r}")
    return value


def dump_recipe(recipe: dict[str, Any], path: Path) -> None:
    """Write the resolved recipe into the run directory."""
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
