"""Model directories checked from their files alone, before any weights load: layout and weight-file integrity.

A model path is a local directory or a hub id. A local directory must hold what `save_pretrained` writes (a
config, tokenizer files, weights; for a diffusers pipeline, `model_index.json` and one directory per component);
every `.safetensors` file's header must describe exactly the bytes the file has, so a truncated download is named
here instead of failing inside a loader. A path that looks local (absolute, `./`, `~`, several `/`) but does not
exist is an error; a hub id is left to the loader, whose errors `mmalign.core.errors.library_error` names.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from mmalign.core.errors import ModelError

CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
WEIGHT_STEMS = ("model", "diffusion_pytorch_model", "adapter_model", "pytorch_model")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers


def local_model_dir(path: str, where: str) -> Path | None:
    """The local directory `path` names, or None for a hub id (checked by the loader).

    A path that looks local but does not exist, or exists as a file, is a `ModelError` naming `where`.
    """
    if not isinstance(path, str) or not path:
        raise ModelError(f"{where} is required")
    target = Path(path).expanduser()
    if target.is_dir():
        return target
    if target.exists():
        raise ModelError(f"{where} {path!r} is a file; a model is a directory (as save_pretrained writes it)")
    looks_local = (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or path.endswith(("/", "\\"))
    )
    if looks_local:
        raise ModelError(f"{where} {path!r}: no such directory")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except ValueError as err:
        raise ModelError(
            f"{where} {path!r} is neither an existing local directory nor a valid hub id ({err})"
        ) from None
    return None


def check_transformers_dir(directory: Path, where: str, *, tokenizer: bool = True) -> None:
    """A transformers model directory: `config.json` (or a peft adapter's `adapter_config.json`, which names its
    base model), tokenizer files (if `tokenizer`) and intact weights."""
    adapter = directory / "adapter_config.json"
    _require_json(directory, adapter.name if adapter.exists() else "config.json", where)
    if tokenizer and not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{where} {str(directory)!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer into the model directory (tokenizer.save_pretrained)"
        )
    check_weights(directory, where)


def check_weights(directory: Path, where: str) -> None:
    """The directory holds weights (a single file, or an index whose shards all exist), each safetensors intact."""
    found = [directory / f"{stem}{ext}" for stem in WEIGHT_STEMS for ext in (".safetensors", ".bin")]
    indexes = [
        directory / f"{stem}{ext}.index.json" for stem in WEIGHT_STEMS for ext in (".safetensors", ".bin")
    ]
    present = [p for p in found if p.exists()]
    for index in (p for p in indexes if p.exists()):
        shards = set(_read_json(index, where).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (directory / s).exists())
        if missing:
            raise ModelError(
                f"{where}: {index} lists weight shards that are missing: {', '.join(missing[:5])}"
            )
        present += [directory / s for s in sorted(shards)]
    if not present:
        raise ModelError(
            f"{where} {str(directory)!r} has no weights (model.safetensors, diffusion_pytorch_model.safetensors or "
            "a sharded index)"
        )
    for file in present:
        if file.suffix == ".safetensors":
            check_safetensors(file, where)


def check_safetensors(file: Path, where: str) -> None:
    """The file's header parses and describes exactly the bytes the file has (else truncated or corrupt)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > _MAX_HEADER or 8 + n > size:
            raise ModelError(
                f"{where}: {file} is not a complete safetensors file ({size} bytes; its header is cut off or "
                "unreadable): save or download it again"
            )
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            raise ModelError(
                f"{where}: {file} has an unreadable safetensors header: save or download it again"
            ) from None
    if 8 + n + end != size:
        state = "truncated" if size < 8 + n + end else "longer than its header says"
        raise ModelError(
            f"{where}: {file} is {state} ({size} bytes, its header describes {8 + n + end}): save or download it "
            "again"
        )


def check_pipeline_dir(directory: Path, where: str) -> None:
    """A diffusers pipeline directory: `model_index.json`, and for each component it lists a directory with its
    config (and intact weights for networks), of a class its library has."""
    index = _require_json(directory, "model_index.json", where)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        library, cls = entry
        _check_class(library, cls, f"{where}: model_index.json component {name!r}")
        sub = directory / name
        if not sub.is_dir():
            raise ModelError(f"{where}: component {name!r} listed in model_index.json has no directory {sub}")
        if name.startswith("scheduler") or cls.endswith("Scheduler"):
            _require_json(sub, "scheduler_config.json", where)
        elif name.startswith("tokenizer"):
            if not any((sub / f).exists() for f in TOKENIZER_FILES):
                raise ModelError(f"{where}: the tokenizer directory {sub} has no tokenizer files")
        elif not name.startswith(("feature_extractor", "processor", "image_processor")):
            _require_json(sub, "config.json", where)
            check_weights(sub, where)


def _check_class(library: str, cls: str, where: str) -> None:
    """`library.cls` exists (a scheduler or model class name with a typo is named, with close matches)."""
    try:
        module = importlib.import_module(library)
    except ImportError:
        return  # a library mmalign does not use; its loader says what is missing
    if hasattr(module, cls):
        return
    close = difflib.get_close_matches(cls, [n for n in dir(module) if not n.startswith("_")], n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ModelError(f"{where} names {library}.{cls}, which {library} does not have{hint}")


def _require_json(directory: Path, name: str, where: str) -> dict[str, Any]:
    path = directory / name
    if not path.exists():
        raise ModelError(
            f"{where} {str(directory)!r} has no {name}; a model directory is what save_pretrained writes "
            f"({name}, weights and, for text models, tokenizer files)"
        )
    return _read_json(path, where)


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{where}: {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where}: {path} must hold a JSON object")
    return data
