"""Where rows come from: files, `save_to_disk` directories, directories of data files and hub datasets.

A data source (``data.train``, ``data.prompts``, ``eval.pairs``, ...) is a string or a mapping:

* a ``.jsonl``/``.json``/``.parquet`` file, read by :func:`mmalign.core.data.read_rows` (line-numbered);
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a directory of data files (parquet, jsonl, csv, ...), loaded by ``datasets``' packaged builders, whose
  file names give the splits (``train-00000.parquet``, ``test.jsonl``);
* otherwise a Hugging Face hub dataset id (``org/name``);
* a list of any of these: their rows concatenated in order (e.g. a world's pairs plus a file of extra pairs),
  each row still located in its own source (relative image paths resolve against their own file).

The mapping form is ``{path (or dataset_name), split, revision, name, data_files, streaming, format,
max_rows}``. ``split`` defaults to ``train``; a missing split is an error that lists the splits.
``revision`` and ``name`` (the config) apply to hub ids, ``data_files`` to hub ids and directories.
``streaming: true`` iterates the dataset instead of preparing it in the cache first (large hub datasets);
the rows are still held in memory for validation, so bound them with ``max_rows``. ``format`` picks an
adapter from :mod:`mmalign.core.formats` (default ``auto``).

Rows read through ``datasets`` are numbered from 1 in the selected split (unit "row") and their source
names the dataset and split (``hub:org/name[train]``, ``/data/pairs[test]``), so every later error is still
located. Image and audio columns are read undecoded (``{"bytes", "path"}``): decoding happens in the
modality loaders, whose checks name the row and field, instead of inside ``datasets``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.core import formats
from mmalign.core.data import JSONL_SUFFIXES, PARQUET_SUFFIXES, DataError, Row, read_rows

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SPLIT_SUFFIX = re.compile(r"^(.*)\[[^\[\]]*\]$")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict / Dataset)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source; see the module docstring for what each field means."""

    path: str
    split: str | None = None
    revision: str | None = None
    name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    streaming: bool = False
    format: str = "auto"
    max_rows: int | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike[str] | Mapping[str, Any] | DataSpec) -> DataSpec:
        """A spec from a string (the path) or a mapping; bad keys or values are a `DataError`."""
        if isinstance(spec, DataSpec):
            return spec
        if isinstance(spec, str | os.PathLike):
            return cls(os.fspath(spec))
        if not isinstance(spec, Mapping):
            got = type(spec).__name__
            raise DataError(
                "data source", None, None, f"expected a path, hub id, mapping or a list of them, got {got}"
            )
        values = dict(spec)
        if "dataset_name" in values:
            if "path" in values:
                raise DataError(
                    str(values["path"]), None, None, "give either `path` or `dataset_name`, not both"
                )
            values["path"] = values.pop("dataset_name")
        path = values.get("path")
        label = str(path) if path else "data source"
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DataError(label, None, None, f"unknown key(s) {unknown}; known: {', '.join(known)}")
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise DataError(
                label, None, None, "`path` (or `dataset_name`) is required: a file, directory or hub id"
            )
        values["path"] = os.fspath(path)
        for key in ("split", "revision", "name", "format"):
            if key in values and values[key] is not None and not isinstance(values[key], str):
                raise DataError(label, None, None, f"`{key}` must be a string, got {values[key]!r}")
        if not isinstance(values.get("streaming", False), bool):
            raise DataError(
                label, None, None, f"`streaming` must be true or false, got {values['streaming']!r}"
            )
        max_rows = values.get("max_rows")
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise DataError(label, None, None, f"`max_rows` must be a positive integer, got {max_rows!r}")
        if values.get("format") is None:
            values.pop("format", None)
        elif values["format"] not in ("auto", *formats.FORMATS):
            known_formats = ", ".join(["auto", *formats.FORMATS])
            raise DataError(
                label, None, None, f"unknown `format` {values['format']!r}; known: {known_formats}"
            )
        return cls(**values)


def is_hub_id(path: str) -> bool:
    """Whether a string has the shape of a hub dataset id (`name` or `org/name`), not a local path."""
    return _HUB_ID.fullmatch(path) is not None and not Path(path).exists()


def local_directory(source: str) -> Path | None:
    """The local dataset directory a row source names (`/data/pairs[train]` -> /data/pairs), if any."""
    if source.startswith(("hub:", "<")):
        return None
    match = _SPLIT_SUFFIX.match(source)
    path = Path(match.group(1) if match else source)
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------------------------- loading


def load_rows(
    spec: str | os.PathLike[str] | Mapping[str, Any] | DataSpec | list[Any] | tuple[Any, ...],
    resolve: Callable[[str], str] | None = None,
) -> formats.Rows:
    """Read a data source and convert it to mmalign's row shapes with its `format` adapter.

    A list of sources gives their rows concatenated in order. `resolve` maps the spec's path first (the recipe
    layer passes the zoo resolver for ``zoo://`` paths). Rows an adapter drops (Pick-a-Pic ties) are counted on the result's ``dropped`` and logged.
    """
    if isinstance(spec, list | tuple):
        if not spec:
            raise DataError("data source", None, None, "an empty list of sources has no rows")
        merged = formats.Rows()
        for one in spec:
            part = load_rows(one, resolve)
            merged.extend(part)
            for reason, lines in part.dropped.items():
                merged.dropped.setdefault(reason, []).extend(lines)
        return merged
    parsed = DataSpec.parse(spec)
    if resolve is not None:
        parsed = dataclasses.replace(parsed, path=resolve(parsed.path))
    rows = read_source(parsed)
    converted = formats.convert(rows, parsed.format)
    for reason, lines in converted.dropped.items():
        shown = ", ".join(str(line) for line in lines[:10]) + (", ..." if len(lines) > 10 else "")
        logger.warning(
            "%s: dropped %d of %d rows (%s): %s %s",
            rows[0].source,
            len(lines),
            len(rows),
            reason,
            rows[0].unit,
            shown,
        )
    if not converted:
        dropped = "; ".join(f"{len(lines)} dropped ({reason})" for reason, lines in converted.dropped.items())
        raise DataError(rows[0].source, None, None, f"no rows left after format {parsed.format!r}: {dropped}")
    return converted


def read_source(spec: DataSpec) -> list[Row]:
    """The rows of a data source as stored (no format conversion), at most `max_rows` of them."""
    path = Path(spec.path)
    if path.is_dir():
        saved = any((path / marker).exists() for marker in _SAVED_MARKERS)
        return _read_saved(spec) if saved else _read_builder(spec, spec.path)
    if path.is_file() or path.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        _only(spec, "a file", ())
        return read_rows(spec.path)[: spec.max_rows]
    if is_hub_id(spec.path):
        return _read_builder(spec, f"hub:{spec.path}" + (f"@{spec.revision}" if spec.revision else ""))
    raise DataError(spec.path, None, None, "no such file or directory (and not a hub dataset id)")


def _only(spec: DataSpec, what: str, allowed: tuple[str, ...]) -> None:
    """Reject `datasets` options that do not apply to this kind of source, naming them."""
    options: dict[str, Any] = {
        "split": spec.split,
        "revision": spec.revision,
        "name": spec.name,
        "data_files": spec.data_files,
    }
    options["streaming"] = spec.streaming or None
    bad = [key for key, value in options.items() if value is not None and key not in allowed]
    if bad:
        raise DataError(spec.path, None, None, f"`{'`, `'.join(bad)}` do(es) not apply to {what}")


def _read_saved(spec: DataSpec) -> list[Row]:
    """A `save_to_disk` directory: one Dataset, or a DatasetDict from which `split` is taken."""
    import datasets

    _only(spec, "a save_to_disk directory", ("split", "streaming"))
    try:
        loaded = datasets.load_from_disk(spec.path)
    except Exception as exc:  # datasets raises many types for a damaged directory; keep the cause
        raise DataError(spec.path, None, None, f"cannot load the save_to_disk directory: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = _pick_split(spec, spec.path, list(loaded))
        dataset, source = loaded[split], f"{spec.path}[{split}]"
    else:
        if spec.split is not None and spec.split != str(loaded.split):
            raise DataError(
                spec.path, None, None, f"is a single Dataset without splits; remove `split: {spec.split}`"
            )
        dataset, source = loaded, spec.path
    if spec.streaming:
        dataset = dataset.to_iterable_dataset()
    return _rows(dataset, source, spec.max_rows)


def _read_builder(spec: DataSpec, label: str) -> list[Row]:
    """A hub id or a directory of data files, through the `datasets` builder for it."""
    import datasets

    hub = label.startswith("hub:")
    if not hub:
        _only(spec, "a directory of data files", ("split", "name", "data_files", "streaming"))
    try:
        builder = datasets.load_dataset_builder(
            spec.path, name=spec.name, revision=spec.revision, data_files=spec.data_files
        )
        split = _pick_split(
            spec, label, [str(s) for s in (builder.config.data_files or builder.info.splits or [])]
        )
        if spec.streaming:
            dataset = builder.as_streaming_dataset(split=split)
        else:
            builder.download_and_prepare()
            dataset = builder.as_dataset(split=split)
    except DataError:
        raise
    except Exception as exc:  # offline, not found, bad config: datasets raises many types; keep the cause
        raise DataError(label, None, None, _load_failure(spec, hub, exc)) from exc
    return _rows(dataset, f"{label}[{split}]", spec.max_rows)


def _pick_split(spec: DataSpec, label: str, splits: list[str]) -> str:
    split = spec.split or "train"
    if split not in splits:
        listed = ", ".join(splits) or "none"
        raise DataError(label, None, None, f"has no split {split!r}; its splits: {listed} (set `split`)")
    return split


def _load_failure(spec: DataSpec, hub: bool, exc: Exception) -> str:
    """Say what was tried and how to load a local copy instead."""
    tried = [f"split {spec.split or 'train'!r}"]
    tried += [
        f"{key} {value!r}" for key, value in (("revision", spec.revision), ("config", spec.name)) if value
    ]
    if not hub:
        return f"cannot load the data files ({', '.join(tried)}): {type(exc).__name__}: {exc}"
    return (
        f"is not a local file or directory, and loading it as a Hugging Face hub dataset "
        f"({', '.join(tried)}) failed: {type(exc).__name__}: {exc}. Without network access, save a copy "
        f"where the hub is reachable (datasets.load_dataset({spec.path!r}).save_to_disk(DIR)) and set the "
        "data source to DIR, or to a directory of its data files"
    )


def _rows(dataset: Any, source: str, max_rows: int | None) -> list[Row]:
    """Located rows from a Dataset or IterableDataset, with media columns left undecoded."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.decode(False)
        if max_rows is not None:
            dataset = dataset.take(max_rows)
    else:
        for column, feature in dataset.features.items():
            if getattr(feature, "decode", False):
                dataset = dataset.cast_column(column, dataclasses.replace(feature, decode=False))
        if max_rows is not None:
            dataset = dataset.select(range(min(max_rows, len(dataset))))
    rows = [Row(source, number, dict(record), "row") for number, record in enumerate(dataset, start=1)]
    if not rows:
        raise DataError(source, None, None, "the dataset contains no rows")
    return rows
