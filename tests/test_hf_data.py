"""Data sources through `datasets` (saved directories, data-file directories, hub ids, streaming), the format
adapters (trl, Pick-a-Pic, RLAIF-V, RLHF-V) and in-memory images, on tiny datasets made here, offline."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from mmalign.core.data import (
    DataError,
    Row,
    read_rows,
    rows_from_records,
    validate_image_pair_rows,
    validate_preference_rows,
)
from mmalign.core.formats import (
    TIE,
    convert,
    corrections_between,
    detect,
    implicit_prompt,
    pick_a_pic,
    rlaif_v,
    rlhf_v,
    rlhf_v_corrections,
)
from mmalign.core.hf_data import DataSpec, load_rows, local_directory
from mmalign.vision.images import load_image, load_image_tensor
from mmalign.vision.vlm_data import apply_corrections, validate_correction_rows, validate_vlm_preference_rows

PAIRS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "3+3=", "chosen": "6", "rejected": "7"},
]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No hub access (fail at once instead of retrying) and a private `datasets` cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def saved_dict(tmp_path: Path, splits: dict[str, list[dict]], name: str = "saved") -> Path:
    path = tmp_path / name
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(path)
    return path


def png_bytes(color: tuple[int, int, int] | np.ndarray, size: int = 16, mode: str = "RGB") -> bytes:
    array = color if isinstance(color, np.ndarray) else np.full((size, size, 3), color, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
    return buffer.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose header claims width×height pixels (a few dozen bytes: the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def rows_of(*records: dict, source: str = "mem") -> list[Row]:
    return rows_from_records(records, source)


# ------------------------------------------------------------------------------------------ data sources


def test_saved_dataset_dict_defaults_to_train_and_rows_are_located(tmp_path):
    path = saved_dict(tmp_path, {"train": PAIRS, "test": PAIRS[:1]})
    for rows in (load_rows(str(path)), read_rows(path)):  # the plain string recipes use today works too
        assert [(r.source, r.line, r.unit) for r in rows] == [(f"{path}[train]", i, "row") for i in (1, 2, 3)]
        assert [r.data for r in rows] == PAIRS
    test = load_rows({"path": str(path), "split": "test"})
    assert [(r.source, r.data) for r in test] == [(f"{path}[test]", PAIRS[0])]
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits: train, test"):
        load_rows({"path": str(path), "split": "validation"})


def test_saved_dataset_dict_without_train_split_names_its_splits(tmp_path):
    path = saved_dict(tmp_path, {"dev": PAIRS})
    with pytest.raises(DataError, match=r"has no split 'train'; its splits: dev \(set `split`\)") as info:
        load_rows(str(path))
    assert info.value.source == str(path)


def test_saved_single_dataset_has_no_splits(tmp_path):
    path = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(path)
    rows = load_rows(str(path))
    assert [(r.source, r.line, r.data) for r in rows] == [(str(path), i + 1, p) for i, p in enumerate(PAIRS)]
    with pytest.raises(DataError, match="single Dataset without splits"):
        load_rows({"path": str(path), "split": "test"})
    with pytest.raises(DataError, match=r"`revision` do\(es\) not apply to a save_to_disk directory"):
        load_rows({"path": str(path), "revision": "main"})


def test_validation_errors_name_the_dataset_split_row_and_field(tmp_path):
    bad = [*PAIRS[:1], {"prompt": "2+2=", "chosen": "", "rejected": "5"}]
    path = saved_dict(tmp_path, {"train": bad})
    with pytest.raises(DataError) as info:
        validate_preference_rows(load_rows(str(path)))
    assert str(info.value).startswith(f"{path}[train], row 2, field 'chosen': expected a non-empty string")


def test_directory_of_parquet_and_jsonl_files(tmp_path):
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    datasets.Dataset.from_list(PAIRS[:2]).to_parquet(parquet / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(PAIRS[2:]).to_parquet(parquet / "test-00000-of-00001.parquet")
    assert [r.data for r in load_rows(str(parquet))] == PAIRS[:2]
    assert [(r.source, r.data) for r in load_rows({"path": str(parquet), "split": "test"})] == [
        (f"{parquet}[test]", PAIRS[2])
    ]
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (jsonl / "extra.jsonl").write_text(json.dumps(PAIRS[0]) + "\n")
    only = load_rows({"path": str(jsonl), "data_files": {"train": "pairs.jsonl"}})
    assert [(r.source, r.line, r.data) for r in only] == [
        (f"{jsonl}[train]", i + 1, p) for i, p in enumerate(PAIRS)
    ]


def test_streaming_gives_the_same_rows_bounded_by_max_rows(tmp_path):
    saved = saved_dict(tmp_path, {"train": PAIRS})
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    for path in (saved, files):
        streamed = load_rows({"path": str(path), "streaming": True})
        assert [(r.source, r.line, r.data) for r in streamed] == [
            (r.source, r.line, r.data) for r in load_rows(str(path))
        ]
        for streaming in (True, False):
            bounded = load_rows({"path": str(path), "streaming": streaming, "max_rows": 2})
            assert [r.data for r in bounded] == PAIRS[:2]


def test_unavailable_hub_dataset_is_a_named_error_saying_what_was_tried():
    with pytest.raises(DataError) as info:
        load_rows({"dataset_name": "some-org/not-here", "split": "test", "revision": "v1.0"})
    err = info.value
    assert err.source == "hub:some-org/not-here@v1.0" and err.line is None
    message = str(err)
    for fragment in ("not a local file or directory", "split 'test'", "revision 'v1.0'", "save_to_disk(DIR)"):
        assert fragment in message
    with pytest.raises(DataError, match="hub:trl-lib/ultrafeedback_binarized: is not a local file"):
        read_rows("trl-lib/ultrafeedback_binarized")  # the plain-string form


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"path": "x", "splt": "train"}, r"unknown key\(s\) \['splt'\]"),
        ({"path": "x", "dataset_name": "y"}, "either `path` or `dataset_name`"),
        ({"split": "train"}, "`path` .* is required"),
        ({"path": "x", "max_rows": 0}, "`max_rows` must be a positive integer"),
        ({"path": "x", "streaming": "yes"}, "`streaming` must be true or false"),
        ({"path": "x", "format": "pickapic"}, "unknown `format` 'pickapic'; known: auto, native"),
        (3, "expected a path, hub id, mapping or a list of them, got int"),
    ],
)
def test_bad_source_specs_are_named(spec, message):
    with pytest.raises(DataError, match=message):
        DataSpec.parse(spec)


def test_file_sources_reject_datasets_options_and_missing_paths(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert [r.data for r in load_rows({"path": str(path), "max_rows": 1})] == PAIRS[:1]
    with pytest.raises(DataError, match=r"`split` do\(es\) not apply to a file"):
        load_rows({"path": str(path), "split": "train"})
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(str(tmp_path / "nowhere"))


def test_a_list_of_sources_concatenates_their_rows_each_located_in_its_own_source(tmp_path):
    first, other = tmp_path / "a" / "pairs.jsonl", tmp_path / "b" / "more.jsonl"
    for path, records in ((first, PAIRS[:2]), (other, PAIRS[2:])):
        path.parent.mkdir()
        Image.new("RGB", (4, 4), (0, 0, 9 * len(records))).save(path.parent / "im.png")
        path.write_text("".join(json.dumps({**r, "image": "im.png"}) + "\n" for r in records))
    rows = load_rows([str(first), {"path": str(other)}, {"path": str(first), "max_rows": 1}])
    assert [r.data["prompt"] for r in rows] == ["1+1=", "2+2=", "3+3=", "1+1="]
    assert [(r.source, r.line) for r in rows] == [
        (str(first), 1),
        (str(first), 2),
        (str(other), 1),
        (str(first), 1),
    ]
    # a relative image path is read next to its own file
    blues = [load_image(r, "image", Path(r.source).parent).getpixel((0, 0))[2] for r in rows]
    assert blues == [18, 18, 9, 18]
    with pytest.raises(DataError, match="an empty list of sources has no rows"):
        load_rows([])
    with pytest.raises(DataError, match=r"(?i)no such file or directory"):
        load_rows([str(first), str(tmp_path / "nowhere.jsonl")])


def test_image_columns_are_read_undecoded_and_decoded_with_named_errors(tmp_path):
    good, corrupt = png_bytes((200, 10, 10)), b"\x89PNG not really"
    records = {"image": [{"bytes": good, "path": None}, {"bytes": corrupt, "path": None}], "q": ["a", "b"]}
    path = tmp_path / "images"
    datasets.Dataset.from_dict(records).cast_column("image", datasets.Image()).save_to_disk(path)
    rows = load_rows(str(path))  # a corrupt image does not break loading ...
    assert rows[0].data["image"] == {"bytes": good, "path": None}
    assert load_image(rows[0], "image", Path(".")).getpixel((0, 0)) == (200, 10, 10)
    with pytest.raises(DataError) as info:  # ... it is named when the row is encoded
        load_image(rows[1], "image", Path("."))
    assert str(info.value).startswith(
        f"{path}, row 2, field 'image': cannot read image bytes (15 bytes): not in an image format"
    )


def test_relative_image_paths_are_taken_from_the_dataset_directory(tmp_path):
    path = tmp_path / "with-paths"
    path.mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(path / "blue.png")
    (path / "train.jsonl").write_text(json.dumps({"image": "blue.png", "q": "x"}) + "\n")
    (row,) = load_rows(str(path))
    assert row.source == f"{path}[train]" and local_directory(row.source) == path
    assert load_image(row, "image", Path(row.source).parent).getpixel((3, 3)) == (0, 0, 255)
    assert (
        local_directory("hub:org/name[train]") is None and local_directory(str(path / "train.jsonl")) is None
    )


# ------------------------------------------------------------------------------------------------- images


def test_an_image_field_can_be_a_path_bytes_a_mapping_or_a_pil_image(tmp_path):
    data = png_bytes((10, 200, 30))
    (tmp_path / "img.png").write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    row = Row(
        str(tmp_path / "d.jsonl"),
        1,
        {"path": "img.png", "bytes": data, "mapping": {"bytes": None, "path": "img.png"}, "pil": pil},
    )
    tensors = [load_image_tensor(row, field, tmp_path, 16) for field in ("path", "bytes", "mapping", "pil")]
    for tensor in tensors:
        assert tensor.shape == (3, 16, 16)
        assert tensor[:, 0, 0].tolist() == pytest.approx([10 / 127.5 - 1, 200 / 127.5 - 1, 30 / 127.5 - 1])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"not an image", "cannot read image bytes (12 bytes)"),
        ({"bytes": None, "path": "missing.png"}, "image file not found"),
        (png_bytes((1, 2, 3), mode="CMYK"), "unsupported image mode 'CMYK'"),
        (png_bytes((1, 2, 3), size=32), "image is 32×32, the model expects 16×16"),
        (7, "expected an image file path (or image bytes"),
        (b"", "got empty bytes"),
    ],
)
def test_bad_in_memory_images_are_named(tmp_path, value, message):
    row = Row("hub:org/pics[train]", 4, {"jpg_0": value}, "row")
    with pytest.raises(DataError) as info:
        load_image_tensor(row, "jpg_0", tmp_path, 16)
    assert str(info.value).startswith("hub:org/pics[train], row 4, field 'jpg_0': ")
    assert message in str(info.value)


def test_decompression_bomb_is_a_named_error_before_decoding():
    row = Row("hub:org/pics[train]", 2, {"image": bomb_png(60000, 60000)})
    with pytest.raises(DataError) as info:
        load_image(row, "image", Path("."))
    err = info.value
    assert (err.source, err.line, err.field) == ("hub:org/pics[train]", 2, "image")
    assert "decompression bomb" in str(err) and "3600000000 pixels" in str(err)


def test_image_pair_rows_accept_in_memory_images_and_reject_identical_ones():
    a, b = png_bytes((0, 0, 0)), png_bytes((255, 255, 255))
    ok = rows_of({"prompt": "p", "image_w": a, "image_l": {"bytes": b, "path": None}})
    assert validate_image_pair_rows(ok) == ok
    with pytest.raises(DataError, match="field 'image_l': is the same image as 'image_w'"):
        validate_image_pair_rows(rows_of({"prompt": "p", "image_w": a, "image_l": {"bytes": a, "path": "x"}}))
    with pytest.raises(DataError, match="field 'image_w': expected an image file path"):
        validate_image_pair_rows(rows_of({"prompt": "p", "image_w": 3, "image_l": b}))
    black, copy = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(a))  # PIL images compare by pixels
    assert validate_image_pair_rows(rows_of({"prompt": "p", "image_w": black, "image_l": b}))
    with pytest.raises(DataError, match="is the same image"):
        validate_image_pair_rows(rows_of({"prompt": "p", "image_w": black, "image_l": copy}))


# ---------------------------------------------------------------------------------- trl implicit prompt


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # trl's own example
        ("2+2=4", "2+2=5", ("2+2=", "4", "5")),
        ("2+2=4", "2+2=45", ("2+2=", "4", "45")),  # the shared "4" is part of a differing number
        ("The cat sat.", "The car sat.", ("The", " cat sat.", " car sat.")),  # never cut inside a word
    ],
)
def test_implicit_prompt_strings(chosen, rejected, expected):
    (row,) = implicit_prompt(rows_of({"chosen": chosen, "rejected": rejected, "id": 7}))
    assert (row.data["prompt"], row.data["chosen"], row.data["rejected"]) == expected
    assert row.data["id"] == 7 and row.data["prompt"] + row.data["chosen"] == chosen


def test_implicit_prompt_conversations_split_at_the_shared_turns():
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}
    a4, a5 = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    (row,) = implicit_prompt(rows_of({"chosen": [system, user, a4], "rejected": [system, user, a5]}))
    assert row.data == {"prompt": [system, user], "chosen": [a4], "rejected": [a5]}
    assert validate_preference_rows([row]) == [row]
    # a shared assistant turn at the end of the shared part goes to both responses
    (row,) = implicit_prompt(rows_of({"chosen": [user, a4, a4], "rejected": [user, a4, a5]}))
    assert (
        row.data["prompt"] == [user] and row.data["chosen"] == [a4, a4] and row.data["rejected"] == [a4, a5]
    )


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"chosen": "Blue sky.", "rejected": "Green sky."}, "chosen", "shares no prompt with 'rejected'"),
        ({"chosen": "Same.", "rejected": "Same."}, "rejected", "is identical to 'chosen'"),
        ({"chosen": "Yes.", "rejected": "Yes. And more."}, "chosen", "is only the shared prompt"),
        (
            {"chosen": "a b", "rejected": [{"role": "user", "content": "a"}]},
            "rejected",
            "must both be strings or both",
        ),
        (
            {"prompt": "p", "chosen": "p a", "rejected": "p b"},
            "prompt",
            "implicit-prompt rows hold no prompt",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "a"}],
            },
            "chosen",
            "shares no prompt",
        ),
        (
            {
                "chosen": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "b"},
                ],
                "rejected": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "chosen",
            "differs from the other response at turn 2, before its last non-assistant turn",
        ),
        ({"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "b"}]}, "chosen", "turn 1"),
    ],
)
def test_implicit_prompt_errors_name_row_and_field(record, field, message):
    rows = rows_of({"chosen": "x y", "rejected": "x z"}, record, source="pairs.jsonl")
    with pytest.raises(DataError) as info:
        implicit_prompt(rows)
    assert (info.value.source, info.value.line, info.value.field) == ("pairs.jsonl", 2, field)
    assert message in str(info.value)


def test_auto_detection_only_when_unambiguous():
    assert detect(rows_of({"chosen": "a b", "rejected": "a c"})) == "implicit_prompt"
    assert detect(rows_of(*PAIRS)) == "native"
    assert detect(rows_of({"chosen": "a b", "rejected": "a c"}, PAIRS[0])) == "native"  # one row has a prompt
    assert detect(rows_of({"caption": "c", "jpg_0": b"1", "jpg_1": b"2", "label_0": 1})) == "pick_a_pic"
    assert detect(rows_of({"image": "i.png", "question": "q", "chosen": "a", "rejected": "b"})) == "rlaif_v"
    assert detect(rows_of({"prompt": "p", "completion": "c", "label": True})) == "native"  # trl unpaired
    assert detect(rows_of({"prompt": "p"})) == "native"  # trl prompt-only
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        convert(rows_of(*PAIRS), "nope")


# ------------------------------------------------------------------------------------------ Pick-a-Pic


def test_pick_a_pic_orders_each_pair_by_label_and_counts_ties():
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    rows = rows_of(
        {"caption": "red", "jpg_0": red, "jpg_1": blue, "label_0": 1, "label_1": 0, "model_0": "m"},
        {"caption": "blue", "jpg_0": red, "jpg_1": blue, "label_0": 0.0},
        {"caption": "tie", "jpg_0": red, "jpg_1": blue, "label_0": 0.5, "label_1": 0.5},
        {"caption": "path", "jpg_0": "b.png", "jpg_1": "a.png", "label_0": 0},
        source="pickapic[train]",
    )
    out = pick_a_pic(rows)
    assert [r.line for r in out] == [1, 2, 4] and out.dropped == {TIE: [3]}
    assert out[0].data == {"prompt": "red", "image_w": red, "image_l": blue, "model_0": "m"}
    assert out[1].data == {"prompt": "blue", "image_w": blue, "image_l": red}
    assert out[2].data == {"prompt": "path", "image_w": "a.png", "image_l": "b.png"}
    assert validate_image_pair_rows(out[:2]) == out[:2]


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"label_0": 0.7}, "label_0", "expected 1 (image 0 preferred), 0 (image 1) or 0.5 (tie), got 0.7"),
        ({"label_0": True}, "label_0", "expected a number, got bool"),
        ({"label_0": None}, "label_0", "missing"),
        ({"label_0": 1, "label_1": 1}, "label_1", "must sum to 1"),
        ({"label_0": 1, "prompt": "other"}, "prompt", "already exists"),
    ],
)
def test_pick_a_pic_label_errors(record, field, message):
    rows = rows_of({"caption": "c", "jpg_0": b"1", "jpg_1": b"2", **record}, source="pickapic[train]")
    with pytest.raises(DataError) as info:
        pick_a_pic(rows)
    assert (info.value.line, info.value.field) == (1, field) and message in str(info.value)


def test_pick_a_pic_errors_after_conversion_name_the_original_column():
    rows = rows_of({"caption": "", "jpg_0": png_bytes((0, 0, 0)), "jpg_1": b"garbage", "label_0": 0})
    (row,) = pick_a_pic(rows)  # label 0: jpg_1 is the preferred image
    with pytest.raises(DataError) as info:
        load_image(row, "image_w", Path("."))
    assert info.value.field == "jpg_1" and "(read as 'image_w')" in str(info.value)
    with pytest.raises(DataError) as info:
        validate_image_pair_rows([row])
    assert info.value.field == "caption" and "(read as 'prompt')" in str(info.value)


def test_all_ties_leave_no_rows(tmp_path, caplog):
    record = {"caption": "c", "jpg_0": b"1", "jpg_1": b"2", "label_0": 0.5}
    path = saved_dict(tmp_path, {"train": [record, {**record, "label_0": 1.0}, record]})
    with caplog.at_level(logging.WARNING, logger="mmalign.core.hf_data"):
        rows = load_rows(str(path))
    assert len(rows) == 1 and rows.dropped == {TIE: [1, 3]}
    assert f"{path}[train]: dropped 2 of 3 rows (tie: label_0 = 0.5): row 1, 3" in caplog.text
    path = saved_dict(tmp_path, {"train": [record]}, name="ties")
    with pytest.raises(DataError, match=r"no rows left after format 'auto': 1 dropped \(tie"):
        load_rows(str(path))


# ----------------------------------------------------------------------------------- RLAIF-V and RLHF-V


def test_rlaif_v_rows_become_vision_language_pairs(tmp_path):
    image = png_bytes((9, 9, 9))
    record = {"ds_name": "x", "image": {"bytes": image, "path": None}, "question": "What digit?"}
    record |= {"chosen": "A seven.", "rejected": "A one.", "origin_dataset": "d", "idx": "0"}
    path = tmp_path / "rlaif"
    datasets.Dataset.from_list([record]).cast_column("image", datasets.Image()).save_to_disk(path)
    (row,) = validate_vlm_preference_rows(load_rows(str(path)))  # detected as rlaif_v
    assert row.data["prompt"] == "What digit?" and "question" not in row.data
    assert row.data["image"]["bytes"] == image and row.data["ds_name"] == "x"
    with pytest.raises(DataError, match=r"field 'question': expected a non-empty string.*read as 'prompt'"):
        validate_vlm_preference_rows(rlaif_v(rows_of({**record, "question": ""})))


RLHF_V_TEXT = {
    "question": "Describe the image.",
    "chosen": "A cat sits on a red mat.",
    "rejected": "A dog sits on a mat next to a ball.",
}


def test_rlhf_v_rows_become_pairs_or_correction_rows():
    record = {
        "image": {"bytes": png_bytes((1, 1, 1)), "path": None},
        "text": json.dumps(RLHF_V_TEXT),
        "idx": 3,
    }
    (pair,) = validate_vlm_preference_rows(rlhf_v(rows_of(record)))
    assert (pair.data["prompt"], pair.data["chosen"], pair.data["rejected"]) == tuple(RLHF_V_TEXT.values())
    (row,) = validate_correction_rows(rlhf_v_corrections(rows_of(record)))
    assert row.data["response"] == RLHF_V_TEXT["rejected"] and row.data["idx"] == 3
    # "A dog sits on a mat next to a ball." -> "A cat sits on a red mat.": a replacement, an insertion
    # (attached to the word before it) and a deletion, at their character offsets in the original
    assert row.data["corrections"] == [
        {"original": "dog", "corrected": "cat", "start": 2},
        {"original": "a ", "corrected": "a red ", "start": 14},
        {"original": " next to a ball", "corrected": "", "start": 19},
    ]
    assert apply_corrections(row).chosen == RLHF_V_TEXT["chosen"]


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("{not json", "text", "invalid JSON"),
        (json.dumps(["q", "a", "b"]), "text", "expected a JSON object"),
        (json.dumps({**RLHF_V_TEXT, "question": ""}), "text.question", "expected a non-empty string"),
        (json.dumps({**RLHF_V_TEXT, "chosen": RLHF_V_TEXT["rejected"]}), "text.chosen", "was not corrected"),
    ],
)
def test_rlhf_v_errors_name_the_text_field(text, field, message):
    with pytest.raises(DataError) as info:
        rlhf_v_corrections(rows_of({"image": "x.png", "text": text}))
    assert info.value.field == field and message in str(info.value)


@pytest.mark.parametrize(
    ("original", "corrected"),
    [
        ("A dog on a mat.", "A big dog on a mat."),  # insertion in the middle
        ("dog on a mat.", "A dog on a mat."),  # insertion at the start
        ("A dog on a mat.", "A dog on a mat, sleeping."),  # insertion at the end
        ("A dog on a red mat.", "A dog on a mat."),  # deletion
        ("There are two cats and one dog here.", "There is one cat and no dog here!"),  # several edits
        ("One. Two. Three.", "Zero. One. Two. Three. Four."),  # insertions at both ends
        ("a  b", "a b"),  # whitespace only
    ],
)
def test_derived_corrections_rebuild_the_corrected_response(original, corrected):
    corrections = corrections_between(original, corrected)
    assert corrections and all(c["original"] for c in corrections)
    row = Row(
        "c.jsonl", 1, {"image": "x.png", "prompt": "p", "response": original, "corrections": corrections}
    )
    result = apply_corrections(row)
    assert result.chosen == corrected and result.rejected == original


# ---------------------------------------------------------------------------- end to end (recipe path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _text_recipe(train, max_length: int = 24) -> dict:
    return {
        "seed": 0,
        "model": {"name_or_path": "zoo://text-tiny/base", "max_length": max_length, "max_new_tokens": 4},
        "data": {"train": train},
        "algorithm": {"name": "dpo", "beta": 0.5},
        "eval": {},
        "train": {"max_steps": 12, "batch_size": 16, "lr": 3e-3, "progress": False},
    }


def _margin(algorithm) -> float:
    import torch

    with torch.no_grad():
        return algorithm.loss(algorithm.train_examples)[1]["rewards/margin"].item()


def test_text_dpo_trains_from_a_saved_dataset_directory(tiny_world, tmp_path):
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer

    pairs = _read_jsonl(tiny_world / "train_pairs.jsonl")[:32]
    path = saved_dict(tmp_path, {"train": pairs, "test": pairs[:4]})
    policy, algorithm, cfg, _, _ = build_run(_text_recipe(str(path)))  # data.train: the directory
    _, from_jsonl, _, _, _ = build_run(_text_recipe(str(tiny_world / "train_pairs.jsonl")))
    assert algorithm.train_examples == from_jsonl.train_examples[:32]  # the same tokens as the file gives
    _, test_split, _, _, _ = build_run(_text_recipe({"path": str(path), "split": "test"}))
    assert test_split.train_examples == algorithm.train_examples[:4]
    start = _margin(algorithm)
    Trainer(policy, algorithm, cfg, tmp_path / "run").train()
    assert _margin(algorithm) > start + 0.5


def test_trl_implicit_prompt_conversations_train_dpo(tiny_world, tmp_path):
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer
    from mmalign.zoo.tokenizer import CHAT_TEMPLATE

    def turns(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    pairs = _read_jsonl(tiny_world / "train_pairs.jsonl")[:32]
    implicit = [
        {"chosen": turns(p["prompt"], p["chosen"]), "rejected": turns(p["prompt"], p["rejected"])}
        for p in pairs
    ]
    path = saved_dict(tmp_path, {"train": implicit})
    policy, algorithm, cfg, _, _ = build_run(_text_recipe(str(path), max_length=48))  # format detected
    assert policy.tokenizer.chat_template == CHAT_TEMPLATE
    first = algorithm.train_examples[0]
    rendered = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": pairs[0]["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert policy.tokenizer.decode(first["prompt_ids"]) == rendered  # the prompt is the shared user turn
    assert policy.tokenizer.decode(first["chosen_ids"]) == f"{pairs[0]['chosen']}<eos>"
    explicit = build_run(_text_recipe({"path": str(path), "format": "implicit_prompt"}, max_length=48))[1]
    assert explicit.train_examples == algorithm.train_examples
    start = _margin(algorithm)
    Trainer(policy, algorithm, cfg, tmp_path / "run").train()
    assert _margin(algorithm) > start + 0.5


def test_pick_a_pic_dataset_trains_offline_diffusion_dpo(tmp_path):
    import torch

    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

    pipeline_dir = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(pipeline_dir)
    rng = np.random.default_rng(0)
    # each fits the tiny text encoder's 24 tokens: a longer prompt is an error now, where it was silently cut (this one
    # was "a drawing of the number 3", which the encoder saw as these words)
    prompts = ["a handwritten seven", "the digit one", "a drawing of the number", "the number 5"]
    records, images = [], []
    for i in range(10):  # the bright image is preferred; its position and the label vary, two pairs are ties
        light, dark = (
            png_bytes(np.clip(rng.normal(v, 20, (16, 16, 3)), 0, 255).astype(np.uint8)) for v in (200, 40)
        )
        first = i % 2 == 0
        label = 0.5 if i in (3, 8) else (1.0 if first else 0.0)
        jpg_0, jpg_1 = (light, dark) if first else (dark, light)
        records.append({"caption": prompts[i % 4], "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label})
        images.append({"prompt": prompts[i % 4], "image_w": light, "image_l": dark})
    path = saved_dict(tmp_path, {"train": records}, name="pickapic")
    recipe = {
        "seed": 0,
        "model": {
            "kind": "diffusion_image",
            "name_or_path": str(pipeline_dir),
            "num_steps": 4,
            "lora": {"r": 4, "alpha": 8},
        },
        "data": {"train": str(path)},
        "algorithm": {"name": "diffusion_dpo", "beta": 500},
        "train": {"max_steps": 15, "batch_size": 8, "lr": 3e-3, "progress": False, "scheduler": "constant"},
    }
    policy, algorithm, cfg, _, _ = build_run(recipe)
    assert len(algorithm.train_examples) == 8  # 10 pairs, 2 ties dropped
    kept = [i for i in range(10) if i not in (3, 8)]
    for example, i in zip(algorithm.train_examples, kept, strict=True):  # the bright image won every pair
        expected = policy.encode_pair(Row("mem", 1, images[i]))
        assert example["prompt"] == prompts[i % 4]
        torch.testing.assert_close(example["latents_w"], expected["latents_w"])
        torch.testing.assert_close(example["latents_l"], expected["latents_l"])

    def margin() -> float:  # mean implicit-reward margin over all pairs, averaged over fixed noise draws
        torch.manual_seed(7)
        with torch.no_grad():
            return float(
                np.mean(
                    [algorithm.loss(algorithm.train_examples)[1]["rewards/margin"].item() for _ in range(4)]
                )
            )

    start = margin()
    Trainer(policy, algorithm, cfg, tmp_path / "run").train()
    assert margin() > start + 0.05
