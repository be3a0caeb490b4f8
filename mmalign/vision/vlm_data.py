"""Schemas of vision-language training rows (pairs, POVID triples, RLHF-V corrections), checked before training.

Rows are located (`Row`), so every problem is a `DataError` naming file, line and field. Image files themselves
are opened and checked by the policy when it encodes a row (missing, corrupt, wrong mode, wrong size).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from mmalign.core.data import Row, image_identity, require_image, require_text


def _text(row: Row, field: str) -> str:
    value = require_text(row, field, response=field != "prompt")
    if not isinstance(value, str):
        raise row.error(field, "vision-language rows use plain strings, not conversations")
    return value


def _image(row: Row, field: str = "image") -> str:
    """A key for the row's image (a path, bytes or a `datasets` image mapping), for duplicate checks."""
    return image_identity(require_image(row, field))


def _not_duplicate(rows_seen: dict[str, Row], row: Row, key: object) -> None:
    first = rows_seen.setdefault(json.dumps(key, sort_keys=True), row)
    if first is not row:
        raise row.error(None, f"duplicate of {first.unit} {first.line} (same image, prompt and responses)")


def validate_vlm_preference_rows(rows: list[Row], *, noisy: bool = False) -> list[Row]:
    """Check (image, prompt, chosen, rejected) rows; with `noisy`, the optional POVID field `rejected_noisy`.

    A pair is a duplicate only when its image is also the same (one prompt is typically asked of many images).
    """
    seen: dict[str, Row] = {}
    for row in rows:
        image, prompt = _image(row), _text(row, "prompt")
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        if chosen == rejected:
            raise row.error("rejected", "is identical to 'chosen'; the pair carries no preference")
        extra = None
        if noisy and row.data.get("rejected_noisy") is not None:
            extra = _text(row, "rejected_noisy")
            if extra == chosen:
                raise row.error("rejected_noisy", "is identical to 'chosen'; use null when there is none")
        _not_duplicate(seen, row, [image, prompt, chosen, rejected, extra])
    return rows


@dataclass(frozen=True)
class Corrected:
    """A response and its corrected version, with the character spans that changed in each."""

    rejected: str
    chosen: str
    rejected_spans: list[tuple[int, int]]
    chosen_spans: list[tuple[int, int]]


def apply_corrections(row: Row, response_field: str = "response") -> Corrected:
    """Apply a row's segment-level corrections (RLHF-V format) to its response.

    `corrections` is a non-empty list of `{"original", "corrected", "start"?}`: `original` must be the text of
    the response at `start` (or, without `start`, occur exactly once in it); segments must not overlap.
    """
    response = _text(row, response_field)
    items = row.data.get("corrections")
    if not isinstance(items, list) or not items:
        raise row.error("corrections", "expected a non-empty list of {original, corrected} segments")
    segments = []
    for i, item in enumerate(items):
        field = f"corrections[{i}]"
        if not isinstance(item, dict):
            raise row.error(field, f"expected an object, got {type(item).__name__}")
        original, corrected = item.get("original"), item.get("corrected")
        if not isinstance(original, str) or not original:
            raise row.error(f"{field}.original", "expected the non-empty original segment text")
        if not isinstance(corrected, str):
            raise row.error(f"{field}.corrected", "expected a string (empty to delete the segment)")
        if corrected == original:
            raise row.error(f"{field}.corrected", "equals the original; a correction must change something")
        start = item.get("start")
        if start is None:
            count = response.count(original)
            if count != 1:
                raise row.error(
                    f"{field}.original",
                    f"{original!r} occurs {count} times in the {response_field}; give its 'start' offset",
                )
            start = response.index(original)
        elif isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise row.error(f"{field}.start", f"expected a character offset >= 0, got {start!r}")
        if response[start : start + len(original)] != original:
            found = response[start : start + len(original)]
            raise row.error(
                f"{field}.original",
                f"does not match the {response_field}: {original!r} expected at offset {start}, found {found!r}",
            )
        segments.append((start, start + len(original), corrected, field))
    segments.sort()
    for (_, end, _, a), (start, _, _, b) in itertools.pairwise(segments):
        if start < end:
            raise row.error(b, f"overlaps {a}")
    chosen, chosen_spans, rejected_spans, cursor = "", [], [], 0
    for start, end, corrected, _ in segments:
        chosen += response[cursor:start]
        chosen_spans.append((len(chosen), len(chosen) + len(corrected)))
        chosen += corrected
        rejected_spans.append((start, end))
        cursor = end
    chosen += response[cursor:]
    if not chosen.strip():
        raise row.error("corrections", "the corrected response is empty")
    return Corrected(response, chosen, rejected_spans, chosen_spans)


def validate_correction_rows(rows: list[Row]) -> list[Row]:
    """Check RLHF-V rows (image, prompt, response, corrections) and that every correction applies."""
    seen: dict[str, Row] = {}
    for row in rows:
        image, prompt = _image(row), _text(row, "prompt")
        corrected = apply_corrections(row)
        _not_duplicate(seen, row, [image, prompt, corrected.rejected, corrected.chosen])
    return rows
