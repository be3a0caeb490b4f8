"""Format adapters: the dataset layouts users bring (trl, Pick-a-Pic, RLAIF-V, RLHF-V) as mmalign's rows.

mmalign's row shapes are trl's standard and conversational formats (strings, or lists of
``{"role", "content"}`` turns): preference ``{prompt, chosen, rejected}``, unpaired ``{prompt, completion,
label}``, prompt-only ``{prompt}``; plus image pairs ``{prompt, image_w, image_l}``, vision-language pairs
``{image, prompt, chosen, rejected}`` and RLHF-V correction rows ``{image, prompt, response, corrections}``.

Each adapter is a pure function ``rows -> rows`` that renames, splits and filters fields; it decodes nothing
(images stay bytes or paths until a model encodes them). Converted rows keep their source and row number and
remember which column each new field was read from, so later errors name the user's column
(``field 'jpg_1': cannot read image bytes ... (read as 'image_w')``). Fields an adapter does not consume are
kept. Rows dropped on purpose (Pick-a-Pic ties) are counted on the result's ``dropped``, never silently.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mmalign.core.data import DataError, Row, require_conversation, require_number

logger = logging.getLogger(__name__)


class Rows(list[Row]):
    """Converted rows, plus the row numbers an adapter dropped on purpose, by reason."""

    def __init__(self, rows: Iterable[Row] = (), dropped: dict[str, list[int]] | None = None) -> None:
        super().__init__(rows)
        self.dropped: dict[str, list[int]] = dropped or {}


def _derived(row: Row, data: dict[str, Any], **renamed: str) -> Row:
    """A converted row at the same location; `renamed` maps each new field to the column it came from."""
    for field, original in renamed.items():
        if field != original and row.data.get(field) is not None and field not in renamed.values():
            raise row.error(field, f"already exists, and this format reads it from {original!r}; remove one")
    return Row(row.source, row.line, data, row.unit, row.renamed + tuple(renamed.items()))


def _without(row: Row, *fields: str) -> dict[str, Any]:
    return {key: value for key, value in row.data.items() if key not in fields}


# ------------------------------------------------------------------------------------------------- trl


def native(rows: list[Row]) -> Rows:
    """Rows already in mmalign's shapes (trl's standard and conversational formats), unchanged."""
    return Rows(rows)


def implicit_prompt(rows: list[Row]) -> Rows:
    """trl's implicit-prompt preference rows: the shared start of `chosen` and `rejected` is the prompt.

    ``{"chosen": "The sky is blue.", "rejected": "The sky is green."}`` becomes ``{"prompt": "The sky is",
    "chosen": " blue.", "rejected": " green."}``. Conversations share their leading turns; the prompt ends
    before the first turn in which they differ and never ends with an assistant turn (shared assistant turns
    at its end move into both responses), as trl's ``extract_prompt`` does. Strings share their longest
    common prefix, cut back to a word boundary when it ends inside a word (trl cuts there and only moves one
    space), with the whitespace at the cut going to the responses. A pair with nothing shared is an error.
    """
    converted = []
    for row in rows:
        if row.data.get("prompt") is not None:
            raise row.error(
                "prompt", "is present, but implicit-prompt rows hold no prompt (use format native)"
            )
        chosen, rejected = row.data.get("chosen"), row.data.get("rejected")
        prompt: str | list[Any]
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_strings(row, chosen, rejected)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_conversations(row, chosen, rejected)
        else:
            kinds = f"{type(chosen).__name__} and {type(rejected).__name__}"
            raise row.error(
                "rejected", f"chosen and rejected must both be strings or both conversations, got {kinds}"
            )
        data = {**row.data, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        converted.append(Row(row.source, row.line, data, row.unit, row.renamed))
    return Rows(converted)


def _split_strings(row: Row, chosen: str, rejected: str) -> tuple[str, str, str]:
    if chosen == rejected:
        raise row.error("rejected", "is identical to 'chosen'; the pair carries no preference")
    pairs = zip(chosen, rejected, strict=False)
    cut = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(chosen), len(rejected)))
    if (
        cut
        and chosen[cut - 1].isalnum()
        and (chosen[cut : cut + 1].isalnum() or rejected[cut : cut + 1].isalnum())
    ):
        while cut and chosen[cut - 1].isalnum():  # the prefix ends inside a word: the word is a response's
            cut -= 1
    while cut and chosen[cut - 1].isspace():
        cut -= 1
    if not chosen[:cut].strip():
        raise row.error("chosen", "shares no prompt with 'rejected' (they differ from their first word)")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise row.error(field, "is only the shared prompt; there is no response after it")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_conversations(row: Row, chosen: list[Any], rejected: list[Any]) -> tuple[list, list, list]:
    require_conversation(row, "chosen")
    require_conversation(row, "rejected")
    if chosen == rejected:
        raise row.error("rejected", "is identical to 'chosen'; the pair carries no preference")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if not shared:
        raise row.error("chosen", "shares no prompt with 'rejected' (they differ from their first turn)")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        rest = turns[shared:]
        if not rest:
            raise row.error(field, "is only the shared prompt; there is no response after it")
        roles = [turn["role"] for turn in rest]
        if set(roles) != {"assistant"}:
            raise row.error(
                field,
                f"differs from the other response at turn {shared + 1}, before its last non-assistant turn "
                f"(roles after the shared prompt: {roles}); only the final assistant turns may differ",
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ------------------------------------------------------------------------------------------ Pick-a-Pic

PICK_A_PIC_FIELDS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
TIE = "tie: label_0 = 0.5"


def pick_a_pic(rows: list[Row]) -> Rows:
    """Pick-a-Pic rows ``{caption, jpg_0, jpg_1, label_0}`` as image pairs ``{prompt, image_w, image_l}``.

    ``label_0`` is 1 when image 0 was preferred, 0 when image 1 was, 0.5 for a tie; ties are dropped and
    counted (as the Diffusion-DPO training script drops Pick-a-Pic's split decisions). An optional
    ``label_1`` must equal ``1 - label_0``. Images may be encoded bytes (the dataset's ``binary`` columns),
    ``{"bytes", "path"}`` mappings or paths; they are decoded when the pair is encoded.
    """
    kept, ties = [], []
    for row in rows:
        label = require_number(row, "label_0")
        if label not in (0.0, 0.5, 1.0):
            raise row.error(
                "label_0", f"expected 1 (image 0 preferred), 0 (image 1) or 0.5 (tie), got {label:g}"
            )
        if row.data.get("label_1") is not None and require_number(row, "label_1") != 1.0 - label:
            raise row.error(
                "label_1", f"is {row.data['label_1']:g} but label_0 is {label:g}; they must sum to 1"
            )
        if label == 0.5:
            ties.append(row.line)
            continue
        win, lose = ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")
        data = _without(row, *PICK_A_PIC_FIELDS)
        data.update(prompt=row.data.get("caption"), image_w=row.data.get(win), image_l=row.data.get(lose))
        kept.append(_derived(row, data, prompt="caption", image_w=win, image_l=lose))
    return Rows(kept, {TIE: ties} if ties else {})


# ----------------------------------------------------------------------------------- RLAIF-V and RLHF-V


def rlaif_v(rows: list[Row]) -> Rows:
    """RLAIF-V rows ``{image, question, chosen, rejected, ...}`` as vision-language pairs (question -> prompt)."""
    converted = []
    for row in rows:
        data = _without(row, "question")
        data["prompt"] = row.data.get("question")
        converted.append(_derived(row, data, prompt="question"))
    return Rows(converted)


def rlhf_v(rows: list[Row]) -> Rows:
    """RLHF-V rows ``{image, text}``, `text` a JSON object of question/chosen/rejected, as pairs.

    In RLHF-V-Dataset, `chosen` is the human-corrected response and `rejected` the model's original one.
    """
    converted = []
    for row in rows:
        question, chosen, rejected = _rlhf_v_text(row)
        data = {**_without(row, "text"), "prompt": question, "chosen": chosen, "rejected": rejected}
        converted.append(
            _derived(row, data, prompt="text.question", chosen="text.chosen", rejected="text.rejected")
        )
    return Rows(converted)


def rlhf_v_corrections(rows: list[Row]) -> Rows:
    """RLHF-V rows as correction rows ``{image, prompt, response, corrections}`` for dense DPO.

    The corrected segments are recovered from the word-level difference between the original response
    (`rejected`) and its human correction (`chosen`): applying them to `response` gives `chosen` exactly.
    """
    converted = []
    for row in rows:
        question, chosen, rejected = _rlhf_v_text(row)
        if chosen == rejected:
            raise row.error("text.chosen", "equals text.rejected; the response was not corrected")
        data = {**_without(row, "text"), "prompt": question, "response": rejected}
        data["corrections"] = corrections_between(rejected, chosen)
        converted.append(
            _derived(row, data, prompt="text.question", response="text.rejected", corrections="text.chosen")
        )
    return Rows(converted)


def _rlhf_v_text(row: Row) -> tuple[str, str, str]:
    value = row.data.get("text")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row.error("text", f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(value, Mapping):
        got = "missing (or null)" if value is None else type(value).__name__
        raise row.error("text", f"expected a JSON object with question, chosen and rejected, got {got}")
    texts = []
    for key in ("question", "chosen", "rejected"):
        text = value.get(key)
        if not isinstance(text, str) or not text.strip():
            raise row.error(f"text.{key}", f"expected a non-empty string, got {type(text).__name__}")
        texts.append(text)
    return texts[0], texts[1], texts[2]


_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


def corrections_between(original: str, corrected: str) -> list[dict[str, Any]]:
    """Segment corrections `{original, corrected, start}` that turn `original` into `corrected`.

    Segments come from a word-level diff; an insertion is attached to the word before it (or after it, at
    the start), since a correction replaces a non-empty segment; segments separated only by whitespace merge.
    """
    a, b = _TOKENS.findall(original), _TOKENS.findall(corrected)
    opcodes = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    spans: list[list[int]] = []
    for k, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        if tag == "equal":
            continue
        if i1 == i2 and k > 0:  # insertion: widen back to the last word of the equal run before it
            e1 = opcodes[k - 1][1]
            words = [i for i in range(e1, i1) if not a[i].isspace()]
            start = words[-1] if words else e1
            i1, j1 = start, j1 - (i1 - start)
        elif i1 == i2:  # insertion at the very start: widen forward to the first word after it
            e2 = opcodes[k + 1][2]
            words = [i for i in range(i2, e2) if not a[i].isspace()]
            end = words[0] + 1 if words else e2
            i2, j2 = end, j2 + (end - i2)
        if spans and all(token.isspace() for token in a[spans[-1][1] : i1]):
            spans[-1][1], spans[-1][3] = i2, j2
        else:
            spans.append([i1, i2, j1, j2])
    offsets = [0]
    for token in a:
        offsets.append(offsets[-1] + len(token))
    return [
        {"original": "".join(a[i1:i2]), "corrected": "".join(b[j1:j2]), "start": offsets[i1]}
        for i1, i2, j1, j2 in spans
    ]


# --------------------------------------------------------------------------------------------- selection

FORMATS: dict[str, Callable[[list[Row]], Rows]] = {
    "native": native,
    "implicit_prompt": implicit_prompt,
    "pick_a_pic": pick_a_pic,
    "rlaif_v": rlaif_v,
    "rlhf_v": rlhf_v,
    "rlhf_v_corrections": rlhf_v_corrections,
}


def detect(rows: list[Row]) -> str:
    """The format whose columns every row has and no other format could explain; `native` otherwise."""

    def every(*fields: str) -> bool:
        return all(all(field in row.data for field in fields) for row in rows)

    def none(*fields: str) -> bool:
        return not any(row.data.get(field) is not None for row in rows for field in fields)

    if every("jpg_0", "jpg_1", "label_0") and none("image_w", "image_l"):
        return "pick_a_pic"
    if every("image", "question", "chosen", "rejected") and none("prompt"):
        return "rlaif_v"
    if every("chosen", "rejected") and none("prompt", "question", "image"):
        return "implicit_prompt"
    return "native"


def convert(rows: list[Row], format: str = "auto") -> Rows:
    """Apply the named adapter (`auto`: the one :func:`detect` finds) to rows read from one source."""
    if format == "auto":
        format = detect(rows)
        if format != "native":
            logger.info("%s: read as format %r (detected from its columns)", rows[0].source, format)
    if format not in FORMATS:
        known = ", ".join(["auto", *FORMATS])
        raise DataError(rows[0].source, None, None, f"unknown data format {format!r}; known: {known}")
    return FORMATS[format](rows)
