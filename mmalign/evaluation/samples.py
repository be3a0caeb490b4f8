"""Before/after sample tables of text responses, for the run report of any sequence policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_cell(value: Any) -> str:
    """A value as one Markdown table cell (floats to 4 significant digits, pipes and newlines escaped)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


class TextSamples:
    """A before/after table of greedy responses on held-out prompts (text samples are already JSON-safe)."""

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return samples

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
        before, after = samples.get("before", []), samples.get("after", [])
        if not before and not after:
            return []
        extra = [k for k in (after or before)[0] if k not in ("prompt", "response")]
        out = [
            "",
            "## Samples (greedy, held-out prompts)",
            "",
            "| prompt | before | after | " + " | ".join(extra) + " |",
            "|---|---|---|" + "---|" * len(extra),
        ]
        for b, a in zip(before, after, strict=False):
            cells = [b["prompt"], b["response"], a["response"]] + [
                f"{b.get(k, '')} → {a.get(k, '')}" for k in extra
            ]
            out.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
        return out
