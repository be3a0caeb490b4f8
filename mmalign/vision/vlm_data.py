"""Schemas of vision-language training rows (pairs, POVID triples, RLHF-V corrections), checked before training.

Rows are located (`Row`), so every problem is a `DataError` naming file, line and field. Image files themselves
are opened and checked by the policy when it encodes a row (missing, corrupt, wrong mode, wrong size).
"""

from __future__ import annotations

import json

from mmalign.core.corrections import apply_corrections
from mmalign.core.data import Row, image_identity, require_bool, require_image, require_text


def _text(row: Row, field: str) -> str:
    value = require_text(row, field, response=field != "prompt")
    if not isinstance(value, str):
        raise row.error(field, "vision-language rows use plain strings, not conversations")
    return value


def require_image_field(row: Row, field: str = "image") -> str:
    """A key for the row's image (a path, bytes or a `datasets` image mapping), for duplicate checks; the image
    itself is decoded and checked when the row is encoded."""
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
        image, prompt = require_image_field(row), _text(row, "prompt")
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


def validate_vlm_unpaired_rows(rows: list[Row]) -> list[Row]:
    """Check KTO rows (image, prompt, completion, label). A completion is judged for its image: the same text can be
    true of one image and false of another, so only the same image, prompt and completion may not repeat."""
    seen: dict[str, Row] = {}
    for row in rows:
        image, prompt, completion = require_image_field(row), _text(row, "prompt"), _text(row, "completion")
        label = require_bool(row, "label")
        key = json.dumps([image, prompt, completion], sort_keys=True)
        first = seen.setdefault(key, row)
        if first is not row:
            if first.data["label"] != label:
                raise row.error(
                    "label",
                    f"contradicts {first.unit} {first.line}, which has the same image, prompt and completion "
                    f"labelled {json.dumps(first.data['label'])}",
                )
            raise row.error(
                None, f"duplicate of {first.unit} {first.line} (same image, prompt and completion)"
            )
    return rows


def validate_correction_rows(rows: list[Row]) -> list[Row]:
    """Check RLHF-V rows (image, prompt, response, corrections) and that every correction applies."""
    seen: dict[str, Row] = {}
    for row in rows:
        image, prompt = require_image_field(row), _text(row, "prompt")
        corrected = apply_corrections(row)
        _not_duplicate(seen, row, [image, prompt, corrected.rejected, corrected.chosen])
    return rows
