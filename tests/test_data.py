"""Tests for mmalign.core.data: every bad input must fail with its file, line and field named."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from mmalign.core.data import (
    DataError,
    Row,
    read_rows,
    require_bool,
    require_number,
    require_text,
    rows_from_records,
    validate_preference_rows,
    validate_prompt_rows,
    validate_unpaired_rows,
    write_jsonl,
)

PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
CONVERSATION_PAIR = {
    "prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def write_text(tmp_path: Path, text: str, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_records(tmp_path: Path, records: list[Any], name: str = "train.jsonl") -> Path:
    return write_text(tmp_path, "".join(json.dumps(record) + "\n" for record in records), name)


def check_error(
    err: DataError, source: Path | str, line: int | None, field: str | None, *fragments: str
) -> None:
    assert err.source == str(source)
    assert err.line == line
    assert err.field == field
    text = str(err)
    assert text.startswith(str(source))
    if line is not None:
        assert f"{err.unit} {line}" in text
    if field is not None:
        assert f"field {field!r}" in text
    for fragment in fragments:
        assert fragment in text


def validate_file_error(tmp_path: Path, records: list[Any], validate=validate_preference_rows) -> DataError:
    path = write_records(tmp_path, records)
    with pytest.raises(DataError) as info:
        validate(read_rows(path))
    return info.value


# ----------------------------------------------------------------------------------------------- DataError


def test_error_message_format_matches_documented_shape() -> None:
    err = DataError("data/train.jsonl", 7, "chosen", "expected a non-empty string, got int")
    assert str(err) == "data/train.jsonl, line 7, field 'chosen': expected a non-empty string, got int"
    assert isinstance(err, ValueError)
    assert str(DataError("x.parquet", 3, None, "boom", "row")) == "x.parquet, row 3: boom"
    assert str(DataError("x.jsonl", None, None, "boom")) == "x.jsonl: boom"


def test_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DataError("a.jsonl", 2, "prompt", "bad", "row")))
    assert (err.source, err.line, err.field, err.unit, str(err)) == (
        "a.jsonl",
        2,
        "prompt",
        "row",
        "a.jsonl, row 2, field 'prompt': bad",
    )


def test_row_error_is_located_at_the_row() -> None:
    err = Row("imgs.jsonl", 4, {"image_w": "missing.png"}).error("image_w", "file not found")
    check_error(err, "imgs.jsonl", 4, "image_w", "file not found")


# ------------------------------------------------------------------------------------------------- reading


def test_read_jsonl_keeps_line_numbers_across_blank_lines(tmp_path: Path) -> None:
    path = write_text(tmp_path, '{"a": 1}\n\n   \n{"a": 2, "extra": [1]}\n')
    rows = read_rows(path)
    assert [(row.source, row.line, row.data) for row in rows] == [
        (str(path), 1, {"a": 1}),
        (str(path), 4, {"a": 2, "extra": [1]}),
    ]


def test_read_json_suffix_and_crlf_line_endings(tmp_path: Path) -> None:
    path = write_text(tmp_path, '{"a": "x"}\r\n{"a": "y"}\r\n', name="train.JSON")
    assert [row.data["a"] for row in read_rows(path)] == ["x", "y"]


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = write_text(tmp_path, '{"a": 1}\n{"a": \n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, 2, None, "invalid JSON")


def test_json_array_file_gets_a_jsonl_hint(tmp_path: Path) -> None:
    path = write_text(tmp_path, '[{"a": 1}]\n', name="train.json")
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, 1, None, "expected a JSON object, got list", "one object per line")


def test_non_object_line_is_named(tmp_path: Path) -> None:
    path = write_text(tmp_path, '{"a": 1}\n"just a string"\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, 2, None, "expected a JSON object, got str")


def test_repeated_key_is_not_silently_overwritten(tmp_path: Path) -> None:
    path = write_text(tmp_path, '{"chosen": "a", "chosen": "b"}\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, 1, "chosen", "appears twice")


def test_invalid_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, 2, None, "not valid UTF-8")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, None, None, "No such file or directory")


def test_unknown_extension(tmp_path: Path) -> None:
    path = write_text(tmp_path, "a,b\n", name="train.csv")
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, None, None, "'.csv'", ".jsonl", ".parquet")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write_text(tmp_path, text)
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, None, None, "no rows")


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR, {**PAIR, "chosen": ""}]), path)
    rows = read_rows(path)
    assert [(row.line, row.unit, row.data) for row in rows[:1]] == [(1, "row", PAIR)]
    with pytest.raises(DataError) as info:
        validate_preference_rows(rows)
    check_error(info.value, path, 2, "chosen", "row 2", "got an empty string")


def test_parquet_conversations_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([CONVERSATION_PAIR]), path)
    assert validate_preference_rows(read_rows(path))[0].data == CONVERSATION_PAIR


def test_corrupt_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = write_text(tmp_path, "not parquet", name="train.parquet")
    with pytest.raises(DataError) as info:
        read_rows(path)
    check_error(info.value, path, None, None, "cannot read file")


def test_rows_from_records_numbers_rows_from_one() -> None:
    rows = rows_from_records(iter([PAIR, {**PAIR, "chosen": "four"}]), source="hf:train")
    assert [(row.source, row.line, row.unit) for row in rows] == [
        ("hf:train", 1, "row"),
        ("hf:train", 2, "row"),
    ]
    assert validate_preference_rows(rows) is rows


def test_rows_from_records_rejects_non_mappings_and_empty_input() -> None:
    with pytest.raises(DataError) as info:
        rows_from_records([PAIR, ["not", "a", "dict"]])
    check_error(info.value, "<memory>", 2, None, "row 2", "expected a mapping, got list")
    with pytest.raises(DataError) as info:
        rows_from_records([])
    check_error(info.value, "<memory>", None, None, "no records")


def test_rows_from_records_accepts_a_dataset_like_iterable() -> None:
    class FakeDataset:
        def __iter__(self):
            yield from ({"prompt": p} for p in ("a", "b"))

    assert [row.data for row in validate_prompt_rows(rows_from_records(FakeDataset()))] == [
        {"prompt": "a"},
        {"prompt": "b"},
    ]


# ------------------------------------------------------------------------------------------- field checks


def test_require_helpers_return_values() -> None:
    row = Row("m", 1, {"t": "hi", "n": 3, "b": False, "c": [{"role": "user", "content": "hi"}]})
    assert require_text(row, "t") == "hi"
    assert require_text(row, "c") == [{"role": "user", "content": "hi"}]
    assert require_number(row, "n") == 3.0
    assert require_bool(row, "b") is False


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "missing"),
        (3, "got int"),
        ("", "got an empty string"),
        ("  \n", "got a whitespace-only string"),
        ([], "got an empty list"),
        (["hi"], "turn 1: expected a {'role', 'content'} object, got str"),
        (
            [{"role": "bot", "content": "x"}],
            "turn 1: 'role' must be one of system, user, assistant, got 'bot'",
        ),
        ([{"role": "user"}], "turn 1: 'content' must be a non-empty string, got null"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": " "}], "turn 2: 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "must not end with an assistant",
        ),
    ],
)
def test_require_text_rejects(value: Any, fragment: str) -> None:
    row = Row("f.jsonl", 9, {"prompt": value})
    with pytest.raises(DataError) as info:
        require_text(row, "prompt")
    check_error(info.value, "f.jsonl", 9, "prompt", fragment)


def test_require_text_response_allows_only_assistant_turns() -> None:
    row = Row(
        "f.jsonl", 2, {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    )
    with pytest.raises(DataError) as info:
        require_text(row, "chosen", response=True)
    check_error(info.value, "f.jsonl", 2, "chosen", "only assistant turns", "['user', 'assistant']")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(True, "expected a number, got bool"), ("1.0", "got str"), (float("nan"), "finite"), (None, "missing")],
)
def test_require_number_rejects(value: Any, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        require_number(Row("f.jsonl", 3, {"score": value}), "score")
    check_error(info.value, "f.jsonl", 3, "score", fragment)


@pytest.mark.parametrize(("value", "fragment"), [(1, "got int"), ("true", "got str"), (None, "missing")])
def test_require_bool_rejects(value: Any, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        require_bool(Row("f.jsonl", 5, {"label": value}), "label")
    check_error(info.value, "f.jsonl", 5, "label", fragment)


# ----------------------------------------------------------------------------------------- preference rows


def test_preference_happy_paths_keep_rows_and_extra_fields(tmp_path: Path) -> None:
    records = [
        {**PAIR, "image_w": "w.png", "score_chosen": 8, "score_rejected": 2.5},
        {**PAIR, "prompt": "Another?"},
    ]
    rows = read_rows(write_records(tmp_path, records))
    assert validate_preference_rows(rows) is rows
    assert [row.data for row in rows] == records
    conversational = read_rows(write_records(tmp_path, [CONVERSATION_PAIR], name="chat.jsonl"))
    assert validate_preference_rows(conversational)[0].data == CONVERSATION_PAIR


@pytest.mark.parametrize(
    ("bad", "field", "fragment"),
    [
        ({"chosen": 4}, "chosen", "expected a non-empty string or a list of role/content turns, got int"),
        ({"rejected": "   "}, "rejected", "whitespace-only"),
        ({"prompt": None}, "prompt", "missing"),
        ({"chosen": "5"}, "rejected", "identical to 'chosen'"),
        ({"score_chosen": 1}, "score_rejected", "required because 'score_chosen' is present"),
        ({"score_chosen": 1, "score_rejected": "2"}, "score_rejected", "expected a number, got str"),
        ({"score_chosen": True, "score_rejected": 0}, "score_chosen", "got bool"),
        ({"score_chosen": 1, "score_rejected": 2}, "score_chosen", "below score_rejected"),
    ],
)
def test_preference_errors_name_line_and_field(
    tmp_path: Path, bad: dict[str, Any], field: str, fragment: str
) -> None:
    err = validate_file_error(tmp_path, [PAIR, {**PAIR, "prompt": "Other?", **bad}])
    check_error(err, tmp_path / "train.jsonl", 2, field, fragment)


def test_preference_reports_the_first_error_in_row_order(tmp_path: Path) -> None:
    err = validate_file_error(tmp_path, [PAIR, {"prompt": "x", "chosen": "", "rejected": 1}, {"chosen": "a"}])
    check_error(err, tmp_path / "train.jsonl", 2, "chosen", "empty string")


def test_preference_scores_can_be_disallowed(tmp_path: Path) -> None:
    path = write_records(tmp_path, [PAIR, {**PAIR, "prompt": "b", "score_rejected": 1.0}])
    rows = read_rows(path)
    with pytest.raises(DataError) as info:
        validate_preference_rows(rows, allow_scores=False)
    check_error(info.value, path, 2, "score_rejected", "does not use scores")


def test_null_scores_count_as_absent() -> None:
    rows = rows_from_records([{**PAIR, "score_chosen": None, "score_rejected": None}])
    assert validate_preference_rows(rows, allow_scores=False) is rows


def test_preference_response_conversation_must_be_assistant_only(tmp_path: Path) -> None:
    bad = {**CONVERSATION_PAIR, "rejected": [{"role": "user", "content": "5"}]}
    err = validate_file_error(tmp_path, [CONVERSATION_PAIR, bad])
    check_error(err, tmp_path / "train.jsonl", 2, "rejected", "only assistant turns")


def test_preference_mixed_formats_are_rejected(tmp_path: Path) -> None:
    within_row = {**CONVERSATION_PAIR, "chosen": "4"}
    err = validate_file_error(tmp_path, [within_row])
    check_error(
        err, tmp_path / "train.jsonl", 1, "chosen", "is a string but line 1 field 'prompt' is a conversation"
    )
    err = validate_file_error(tmp_path, [PAIR, CONVERSATION_PAIR])
    check_error(
        err, tmp_path / "train.jsonl", 2, "prompt", "is a conversation but line 1 field 'prompt' is a string"
    )


def test_preference_duplicates_name_both_lines(tmp_path: Path) -> None:
    reordered = {"rejected": "5", "chosen": "4", "prompt": "What is 2+2?", "note": "extra fields ignored"}
    path = write_text(
        tmp_path,
        json.dumps(PAIR)
        + "\n\n"
        + json.dumps({**PAIR, "chosen": "four"})
        + "\n"
        + json.dumps(reordered)
        + "\n",
    )
    with pytest.raises(DataError) as info:
        validate_preference_rows(read_rows(path))
    check_error(info.value, path, 4, None, "duplicate of line 1")


def test_conversation_duplicates_ignore_key_order() -> None:
    reordered = {
        **CONVERSATION_PAIR,
        "chosen": [{"content": "4", "role": "assistant"}],
    }
    with pytest.raises(DataError) as info:
        validate_preference_rows(rows_from_records([CONVERSATION_PAIR, reordered]))
    check_error(info.value, "<memory>", 2, None, "duplicate of row 1")


# ------------------------------------------------------------------------------------------ unpaired rows

KTO = {"prompt": "Hi", "completion": "Hello!", "label": True}


def test_unpaired_happy_path(tmp_path: Path) -> None:
    records = [KTO, {**KTO, "completion": "Go away.", "label": False}]
    rows = read_rows(write_records(tmp_path, records))
    assert [row.data for row in validate_unpaired_rows(rows)] == records


@pytest.mark.parametrize(
    ("bad", "field", "fragment"),
    [
        ({"label": 1}, "label", "expected true or false, got int"),
        ({"label": None}, "label", "missing"),
        ({"completion": ""}, "completion", "empty string"),
        ({"prompt": 3}, "prompt", "got int"),
    ],
)
def test_unpaired_errors_name_line_and_field(
    tmp_path: Path, bad: dict[str, Any], field: str, fragment: str
) -> None:
    err = validate_file_error(tmp_path, [KTO, {**KTO, "completion": "Other", **bad}], validate_unpaired_rows)
    check_error(err, tmp_path / "train.jsonl", 2, field, fragment)


def test_unpaired_duplicates_and_contradictions(tmp_path: Path) -> None:
    err = validate_file_error(tmp_path, [KTO, {**KTO, "completion": "Yo"}, KTO], validate_unpaired_rows)
    check_error(err, tmp_path / "train.jsonl", 3, None, "duplicate of line 1")
    err = validate_file_error(tmp_path, [KTO, {**KTO, "label": False}], validate_unpaired_rows)
    check_error(err, tmp_path / "train.jsonl", 2, "label", "contradicts line 1", "labelled true")


# -------------------------------------------------------------------------------------------- prompt rows


def test_prompt_rows_keep_other_fields() -> None:
    records = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": 4}]
    assert [row.data for row in validate_prompt_rows(rows_from_records(records))] == records


def test_prompt_rows_errors(tmp_path: Path) -> None:
    err = validate_file_error(
        tmp_path, [{"prompt": "ok"}, {"question": "where is prompt?"}], validate_prompt_rows
    )
    check_error(err, tmp_path / "train.jsonl", 2, "prompt", "missing")


# ------------------------------------------------------------------------------------------------- writing


def test_write_jsonl_round_trip_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")
    records = [{"prompt": "héllo", "chosen": "a", "rejected": "b"}, CONVERSATION_PAIR]
    write_jsonl(path, records)
    assert [row.data for row in read_rows(path)] == records
    assert "héllo" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_write_jsonl_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [PAIR])

    def records():
        yield {**PAIR, "prompt": "new"}
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        write_jsonl(path, records())
    with pytest.raises(ValueError):
        write_jsonl(path, [{"score": float("nan")}])
    with pytest.raises(TypeError, match="record 1: expected a mapping, got list"):
        write_jsonl(path, [["not", "a", "dict"]])
    assert [row.data for row in read_rows(path)] == [PAIR]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
