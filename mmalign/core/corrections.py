"""RLHF-V's segment-level corrections: a response, the segments a human rewrote, and the corrected response.

Text-level only (any sequence policy's rows can carry them); every problem is a `DataError` naming the row and
the correction's field.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from mmalign.core.data import Row, require_text


def _response_text(row: Row, field: str) -> str:
    value = require_text(row, field, response=True)
    if not isinstance(value, str):
        raise row.error(field, "corrections apply to plain-string responses, not conversations")
    return value


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
    response = _response_text(row, response_field)
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
