"""Read dataset rows and validate their schema before any training starts.

Every problem is reported as a :class:`DataError` that names the file, the line (JSONL) or row
(Parquet, in-memory records) and the field, so a bad dataset fails in seconds instead of hours into a
run. Nothing is silently dropped: rows are returned unchanged, extra fields included. Tokenisation
happens elsewhere; this module does not know about modalities.

Rules worth knowing:

* JSONL (``.jsonl`` and ``.json``): one JSON object per line, UTF-8. Blank lines are skipped but still
  counted, so reported line numbers match what an editor shows. A key repeated inside one object is an
  error (``json`` would otherwise keep only the last value).
* A field whose value is ``null``/``None`` counts as absent, because Parquet and ``datasets`` fill
  missing columns with nulls.
* A text field is a non-empty string or a conversation (a non-empty list of ``{"role", "content"}``
  turns); one dataset must use one of the two formats throughout.
* An image field is a file path, encoded image bytes, a ``{"bytes", "path"}`` mapping (how ``datasets``
  stores images) or a PIL image; the pixels are decoded and checked when a model encodes the row.
* Files are read here; directories (``save_to_disk``, data files) and hub ids go through ``datasets``
  (:mod:`mmalign.core.hf_data`), and :func:`mmalign.core.hf_data.load_rows` also converts known
  formats (trl, Pick-a-Pic, RLAIF-V, RLHF-V; :mod:`mmalign.core.formats`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmalign.core.errors import MmalignError

Unit = Literal["line", "row"]

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROLES = ("system", "user", "assistant")


class DataError(MmalignError, ValueError):
    """A dataset problem located at a file, line/row and field, so users can fix it directly."""

    label = "data error"

    def __init__(
        self, source: str, line: int | None, field: str | None, message: str, unit: Unit = "line"
    ) -> None:
        # All constructor arguments go to args so the error survives pickling (e.g. from worker processes).
        super().__init__(source, line, field, message, unit)
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        self.unit = unit

    def __str__(self) -> str:
        location = [self.source]
        if self.line is not None:
            location.append(f"{self.unit} {self.line}")
        if self.field is not None:
            location.append(f"field {self.field!r}")
        return f"{', '.join(location)}: {self.message}"


@dataclass(frozen=True)
class Row:
    """One record plus where it came from, so any later check can report its location.

    ``renamed`` maps a field a format adapter created to the field it was read from (``image_w`` ->
    ``jpg_1``), so errors name the column the user has in their data.
    """

    source: str
    line: int
    data: dict[str, Any]
    unit: Unit = "line"
    renamed: tuple[tuple[str, str], ...] = ()

    def error(self, field: str | None, message: str) -> DataError:
        """Build an error located at this row (raise it yourself)."""
        original = dict(self.renamed).get(field) if field is not None else None
        if original is not None:
            return DataError(self.source, self.line, original, f"{message} (read as {field!r})", self.unit)
        return DataError(self.source, self.line, field, message, self.unit)


# --------------------------------------------------------------------------------------------- reading


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Read a JSONL or Parquet file into located rows, failing on the first unreadable line.

    A directory (``save_to_disk`` output or data files) or a hub dataset id is read through ``datasets``
    (train split, rows as stored); :func:`mmalign.core.hf_data.load_rows` takes the full source spec.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(source)
    elif suffix in PARQUET_SUFFIXES:
        rows = _read_parquet(source)
    else:
        from mmalign.core import hf_data

        if Path(source).is_dir() or hf_data.is_hub_id(source):
            return hf_data.read_source(hf_data.DataSpec.parse(source))
        supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
        raise DataError(
            source,
            None,
            None,
            f"unsupported file extension {suffix!r}; supported: {supported}, "
            "a directory (save_to_disk or data files) or a hub dataset id",
        )
    if not rows:
        raise DataError(source, None, None, "the file contains no rows")
    return rows


def rows_from_records(records: Iterable[Mapping[str, Any]], source: str = "<memory>") -> list[Row]:
    """Wrap in-memory records (lists of dicts, ``datasets.Dataset``) as rows numbered from 1."""
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            raise DataError(source, number, None, f"expected a mapping, got {_type_name(record)}", "row")
        rows.append(Row(source, number, dict(record), "row"))
    if not rows:
        raise DataError(source, None, None, "no records given")
    return rows


class _DuplicateKeyError(Exception):
    """Raised from the JSON decoder hook; turned into a located DataError by the reader."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook that rejects repeated keys instead of keeping the last one."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _read_jsonl(source: str) -> list[Row]:
    """Parse one JSON object per line; blank lines are skipped but keep their line number."""
    is_json = Path(source).suffix.lower() == ".json"
    hint = " (.json files are read as JSON Lines: one object per line)" if is_json else ""
    rows = []
    try:
        with open(source, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(source, number, None, f"not valid UTF-8 ({exc.reason})") from exc
                if not text.strip():
                    continue
                try:
                    data = json.loads(text, object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as exc:
                    message = f"invalid JSON: {exc.msg} (column {exc.colno}){hint}"
                    raise DataError(source, number, None, message) from exc
                except _DuplicateKeyError as exc:
                    raise DataError(source, number, exc.key, "key appears twice in one JSON object") from exc
                if not isinstance(data, dict):
                    message = f"expected a JSON object, got {_type_name(data)}{hint}"
                    raise DataError(source, number, None, message)
                rows.append(Row(source, number, data))
    except OSError as exc:
        raise DataError(source, None, None, f"cannot read file: {exc}") from exc
    return rows


def _read_parquet(source: str) -> list[Row]:
    """Read a Parquet file with pyarrow (installed with ``datasets``); rows are numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(source).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(source, None, None, f"cannot read file: {exc}") from exc
    return [Row(source, number, record, "row") for number, record in enumerate(records, start=1)]


# ------------------------------------------------------------------------------------------ field checks


def require_text(row: Row, field: str, *, response: bool = False) -> str | list[dict[str, Any]]:
    """Return a text field that is a non-empty string or a well-formed conversation.

    ``response=True`` is for model outputs (chosen, rejected, completion): a conversation may then
    hold only assistant turns. Otherwise (prompts) its last turn must not be an assistant turn.
    """
    value = _require_present(row, field)
    if isinstance(value, str):
        if not value.strip():
            got = "an empty string" if not value else "a whitespace-only string"
            raise row.error(field, f"expected a non-empty string, got {got}")
        return value
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise row.error(field, f"expected a non-empty string or a list of role/content turns, got {got}")
    require_conversation(row, field)
    roles = [turn["role"] for turn in value]
    if response and set(roles) != {"assistant"}:
        raise row.error(
            field, f"a response conversation must contain only assistant turns, got roles {roles}"
        )
    if not response and roles[-1] == "assistant":
        raise row.error(field, "a prompt conversation must not end with an assistant turn")
    return value


def require_conversation(row: Row, field: str) -> list[dict[str, Any]]:
    """Return a field that is a non-empty list of well-formed ``{"role", "content"}`` turns (any order)."""
    value = _require_present(row, field)
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise row.error(field, f"expected a non-empty list of role/content turns, got {got}")
    for number, turn in enumerate(value, start=1):
        _check_turn(row, field, number, turn)
    return value


def require_image(row: Row, field: str) -> Any:
    """Return an image field: a file path, encoded bytes, a ``{"bytes", "path"}`` mapping or a PIL image.

    Only the shape is checked here; decoding (corrupt data, mode, size, decompression bombs) happens in
    :mod:`mmalign.vision.images` when the row is encoded.
    """
    value = row.data.get(field)
    if is_image_value(value):
        return value
    if value is None:
        got = "missing (or null)"
    elif isinstance(value, Mapping):
        got = "a mapping with neither non-empty 'bytes' nor a 'path'"
    else:
        empty: dict[type, str] = {str: "an empty string", bytes: "empty bytes"}
        got = empty.get(type(value)) or _type_name(value)
    raise row.error(
        field, f"expected an image file path (or image bytes, a {{'bytes', 'path'}} mapping), got {got}"
    )


def is_image_value(value: Any) -> bool:
    """Whether a value has the shape of an image reference (see :func:`require_image`)."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) > 0
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        return (isinstance(data, bytes | bytearray) and len(data) > 0) or (
            isinstance(path, str) and bool(path.strip())
        )
    return type(value).__module__.startswith("PIL.")  # a PIL image (core does not import PIL)


def image_identity(value: Any) -> str:
    """A key under which two references to the same image compare equal (paths, bytes, PIL pixels)."""
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") else value["path"]
    if isinstance(value, str):
        return f"path:{value}"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"bytes:{hashlib.sha256(value).hexdigest()}"
    pixels = hashlib.sha256(value.tobytes()).hexdigest()
    return f"pixels:{value.mode}:{value.size}:{pixels}"


def require_number(row: Row, field: str) -> float:
    """Return a finite int/float field (bools are rejected although Python treats them as ints)."""
    value = _require_present(row, field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise row.error(field, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise row.error(field, f"expected a finite number, got {value}")
    return float(value)


def require_bool(row: Row, field: str) -> bool:
    """Return a strict boolean field: 0/1 or "true" are rejected, as they usually hide a data bug."""
    value = _require_present(row, field)
    if not isinstance(value, bool):
        raise row.error(field, f"expected true or false, got {_type_name(value)}")
    return value


def _require_present(row: Row, field: str) -> Any:
    """Return the field's value; absent and null are both 'missing'."""
    value = row.data.get(field)
    if value is None:
        raise row.error(field, "required field is missing (or null)")
    return value


def _check_turn(row: Row, field: str, number: int, turn: Any) -> None:
    """Check one conversation turn; errors name the turn by its 1-based position."""
    if not isinstance(turn, Mapping):
        raise row.error(
            field, f"turn {number}: expected a {{'role', 'content'}} object, got {_type_name(turn)}"
        )
    role = turn.get("role")
    if role not in ROLES:
        raise row.error(field, f"turn {number}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
    content = turn.get("content")
    if not isinstance(content, str) or not content.strip():
        got = repr(content) if isinstance(content, str) else _type_name(content)
        raise row.error(field, f"turn {number}: 'content' must be a non-empty string, got {got}")


def _type_name(value: Any) -> str:
    """Name a value's type the way a JSON user would recognise it."""
    return "null" if value is None else type(value).__name__


class _SameFormat:
    """Remembers the first text field's format so every later text field must use the same one."""

    def __init__(self) -> None:
        self._first: tuple[Row, str, str] | None = None

    def check(self, row: Row, field: str, value: str | list[dict[str, Any]]) -> None:
        """Raise if ``value`` is a string where the dataset uses conversations, or vice versa."""
        fmt = "string" if isinstance(value, str) else "conversation"
        if self._first is None:
            self._first = (row, field, fmt)
            return
        first_row, first_field, first_fmt = self._first
        if fmt != first_fmt:
            raise row.error(
                field,
                f"is a {fmt} but {first_row.unit} {first_row.line} field {first_field!r} is a {first_fmt}; "
                "use one format (all strings or all conversations) for the whole dataset",
            )


def _canonical(*values: Any) -> str:
    """A key under which equal JSON values compare equal regardless of dict key order."""
    return json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- schemas


def validate_preference_rows(rows: list[Row], *, allow_scores: bool = True) -> list[Row]:
    """Check paired preference data (DPO-style): prompt, chosen, rejected, optional scores.

    With scores, ``score_chosen`` must not be below ``score_rejected`` (that would contradict the
    label). ``allow_scores=False`` is for objectives that ignore scores, so they are not dropped unnoticed.
    """
    same_format = _SameFormat()
    first_seen: dict[str, Row] = {}
    for row in rows:
        texts = {}
        for field, response in (("prompt", False), ("chosen", True), ("rejected", True)):
            texts[field] = require_text(row, field, response=response)
            same_format.check(row, field, texts[field])
        if _canonical(texts["chosen"]) == _canonical(texts["rejected"]):
            raise row.error("rejected", "is identical to 'chosen'; the pair carries no preference")
        _check_scores(row, allow_scores)
        _check_not_duplicate(row, _canonical(*texts.values()), first_seen, "prompt, chosen and rejected")
    return rows


def validate_image_pair_rows(rows: list[Row]) -> list[Row]:
    """Check image preference rows: a text prompt, two different images, optional ordered scores.

    Images are paths, bytes, ``{"bytes", "path"}`` mappings or PIL images (see :func:`require_image`).
    """
    for row in rows:
        prompt = require_text(row, "prompt")
        if not isinstance(prompt, str):
            raise row.error("prompt", "image pairs need a plain-string prompt, got a conversation")
        image_w, image_l = require_image(row, "image_w"), require_image(row, "image_l")
        if image_identity(image_w) == image_identity(image_l):
            same = "file" if isinstance(image_w, str) else "image"
            raise row.error("image_l", f"is the same {same} as 'image_w'; the pair carries no preference")
        has = [k for k in ("score_chosen", "score_rejected") if row.data.get(k) is not None]
        if len(has) == 1:
            raise row.error(has[0], "score_chosen and score_rejected come together")
        if has and require_number(row, "score_chosen") < require_number(row, "score_rejected"):
            raise row.error("score_rejected", "is above score_chosen, which contradicts the preference")
    return rows


def validate_unpaired_rows(rows: list[Row]) -> list[Row]:
    """Check unpaired preference data (KTO-style): prompt, completion and a boolean label."""
    same_format = _SameFormat()
    first_seen: dict[str, Row] = {}
    for row in rows:
        prompt = require_text(row, "prompt")
        same_format.check(row, "prompt", prompt)
        completion = require_text(row, "completion", response=True)
        same_format.check(row, "completion", completion)
        label = require_bool(row, "label")
        key = _canonical(prompt, completion)
        first = first_seen.get(key)
        if first is not None and first.data["label"] != label:
            raise row.error(
                "label",
                f"contradicts {first.unit} {first.line}, which has the same prompt and completion "
                f"labelled {json.dumps(first.data['label'])}",
            )
        _check_not_duplicate(row, key, first_seen, "prompt, completion and label")
    return rows


def validate_prompt_rows(rows: list[Row]) -> list[Row]:
    """Check prompt-only data (online RL, evaluation): a prompt text field; other fields are kept."""
    same_format = _SameFormat()
    for row in rows:
        same_format.check(row, "prompt", require_text(row, "prompt"))
    return rows


def _check_scores(row: Row, allow_scores: bool) -> None:
    """Scores come in pairs, are finite numbers, and agree with which response was chosen."""
    present = [field for field in ("score_chosen", "score_rejected") if row.data.get(field) is not None]
    if not present:
        return
    if not allow_scores:
        raise row.error(present[0], "this objective does not use scores; remove the score fields")
    if len(present) == 1:
        missing = "score_rejected" if present == ["score_chosen"] else "score_chosen"
        raise row.error(missing, f"required because {present[0]!r} is present")
    chosen = require_number(row, "score_chosen")
    rejected = require_number(row, "score_rejected")
    if chosen < rejected:
        raise row.error(
            "score_chosen", f"is {chosen:g}, below score_rejected {rejected:g}; the label is inverted"
        )


def _check_not_duplicate(row: Row, key: str, first_seen: dict[str, Row], what: str) -> None:
    """Raise on a repeated row, naming where it first occurred; duplicates silently reweight training."""
    first = first_seen.setdefault(key, row)
    if first is not row:
        raise row.error(None, f"duplicate of {first.unit} {first.line} (same {what})")


# --------------------------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSON lines atomically, so readers never see a half-written dataset."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            for number, record in enumerate(records, start=1):
                if not isinstance(record, Mapping):
                    raise TypeError(f"record {number}: expected a mapping, got {_type_name(record)}")
                handle.write(json.dumps(dict(record), ensure_ascii=False, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
