"""The recipes that ship with mmalign: `mmalign recipes` lists them, `mmalign recipes copy NAME` copies one out.

`text/`, `vision/` and `speech/` here are the repository's recipe directories themselves (symbolic links in a
source checkout; a wheel holds their `*.yaml` files and the data files they reference), so the README's
`mmalign train text/dpo.yaml` and the packaged `text/dpo` are one file. A recipe is named `group/stem`, or by its
stem alone when that is unique.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from mmalign.core.config import load_yaml
from mmalign.core.errors import MmalignError, RecipeError

GROUPS = ("text", "vision", "speech")


class CopyError(MmalignError, FileExistsError):
    """A copy would overwrite an existing file."""

    label = "copy error"


def _root() -> Path:
    return Path(str(resources.files(__name__)))


def recipe_files() -> dict[str, Path]:
    """Every packaged recipe by name (`text/dpo`), sorted."""
    root = _root()
    return {
        f"{group}/{path.stem}": path
        for group in GROUPS
        if (root / group).is_dir()
        for path in sorted((root / group).glob("*.yaml"))
    }


def describe(path: Path) -> dict[str, Any]:
    """A recipe's model kind, algorithm and first comment line (what it is for)."""
    text = path.read_text()
    recipe = load_yaml(text) or {}
    about = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    return {
        "model": (recipe.get("model") or {}).get("kind", "causal_lm"),
        "algorithm": (recipe.get("algorithm") or {}).get("name", "dpo"),
        "about": about,
    }


def find(name: str) -> tuple[str, Path]:
    """The recipe `name` names (`text/dpo`, `text/dpo.yaml` or a unique stem such as `dpo`)."""
    files = recipe_files()
    key = name.removesuffix(".yaml")
    if key in files:
        return key, files[key]
    matches = [k for k in files if k.split("/", 1)[1] == key]
    if len(matches) == 1:
        return matches[0], files[matches[0]]
    if matches:
        raise RecipeError(f"recipe {name!r} is ambiguous: {', '.join(matches)}")
    raise RecipeError(f"no packaged recipe {name!r}; `mmalign recipes` lists them: {', '.join(files)}")


def _data_files(key: str, path: Path) -> list[str]:
    """Files a recipe names by a path relative to the recipes' root that ship with it (e.g. a prompt list)."""
    root = _root()
    found = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.split("/", 1)[0] in GROUPS and (root / value).is_file():
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(load_yaml(path.read_text()))
    return sorted(set(found))


def copy(name: str, dest: str | Path | None = None, *, cwd: Path | None = None) -> dict[str, Any]:
    """Copy a packaged recipe to `dest` (default `./<stem>.yaml`; a directory gets `<stem>.yaml` inside) and the
    data files it names relative to the recipes' root to the same relative path under `cwd`, where
    `mmalign train` resolves them. Never overwrites: an existing target is an error naming it."""
    key, source = find(name)
    cwd = cwd or Path.cwd()
    target = Path(dest) if dest is not None else cwd / source.name
    if target.is_dir():
        target = target / source.name
    data = [(cwd / rel, _root() / rel) for rel in _data_files(key, source)]
    for path in [target, *(t for t, _ in data)]:
        if path.exists():
            raise CopyError(
                f"{path} exists; mmalign recipes copy never overwrites (choose another destination)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    for to, src in data:
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, to)
    return {"recipe": key, "copied": str(target), "data": [str(t) for t, _ in data]}
