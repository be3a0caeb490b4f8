"""The method × model matrix, read off the registries: which algorithm runs on which model kind, and why not."""

from __future__ import annotations

from mmalign import plugins
from mmalign.core.registry import ALGORITHMS, FAMILIES, MODEL_KINDS, why_not


def cells() -> list[tuple[str, str, str, str | None]]:
    """(family, algorithm, model kind, reason it does not fit or None) for every algorithm × model kind."""
    plugins.load()
    out = []
    for name in sorted(
        ALGORITHMS, key=lambda n: (FAMILIES.index(next(iter(ALGORITHMS[n].values())).family), n)
    ):
        family = next(iter(ALGORITHMS[name].values())).family
        for kind in MODEL_KINDS.values():
            out.append((family, name, kind.name, why_not(name, kind)))
    return out


def matrix_markdown(reasons: bool = False) -> str:
    """A Markdown table: rows are algorithms grouped by family, columns model kinds, ✓ where the cell runs."""
    table = cells()
    kinds = list(MODEL_KINDS)
    lines = ["| family | algorithm | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    rows: dict[tuple[str, str], dict[str, str | None]] = {}
    for family, name, kind, reason in table:
        rows.setdefault((family, name), {})[kind] = reason
    for (family, name), by_kind in rows.items():
        marks = ["✓" if by_kind[k] is None else "·" for k in kinds]
        lines.append(f"| {family} | {name} | " + " | ".join(marks) + " |")
    fitting = sum(reason is None for *_, reason in table)
    lines += ["", f"{fitting} of {len(table)} cells run (✓); · = does not fit."]
    if reasons:
        lines += ["", "Why a cell does not fit:", ""]
        lines += [f"- {name} × {kind}: {reason}" for _, name, kind, reason in table if reason is not None]
    return "\n".join(lines)
