"""Images in datasets, loaded and checked with errors that name the source, row and field.

An image field is a file path, encoded bytes, a ``{"bytes", "path"}`` mapping (how ``datasets`` stores an
``Image`` column) or a PIL image. Relative paths are taken from the dataset file's directory, or from the
dataset directory itself for rows read through ``datasets`` from a local directory. Every image is checked
the same way: missing, undecodable, an unsupported mode, a header claiming more pixels than PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), and (for tensors) a size other than the model's.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmalign.core.data import Row, require_image
from mmalign.core.hf_data import local_directory

MODES = ("RGB", "RGBA", "L", "P")


def resolve_image_path(row: Row, field: str, base: Path) -> Path:
    """A row's image path; relative paths are taken from `base` (or the row's dataset directory)."""
    value = row.data.get(field)
    if isinstance(value, Mapping):
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise row.error(field, f"expected an image file path, got {type(value).__name__}")
    path = Path(value)
    return path if path.is_absolute() else (local_directory(row.source) or base) / path


def load_image(row: Row, field: str, base: Path) -> Image.Image:
    """A row's image as RGB; a missing, unreadable, wrong-mode or oversized image is a `DataError`."""
    value = require_image(row, field)
    if isinstance(value, Image.Image):
        return _checked_rgb(row, field, value, "in-memory image")
    data = value.get("bytes") if isinstance(value, Mapping) else value
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > 0:
        return _open(row, field, io.BytesIO(data), f"image bytes ({len(data)} bytes)")
    path = resolve_image_path(row, field, base)
    if not path.exists():
        raise row.error(field, f"image file not found: {path}")
    return _open(row, field, path, f"image {path}")


def check_image_header(row: Row, field: str, base: Path, size: int | None = None) -> None:
    """What `load_image_tensor` would refuse, read from the image's header alone (no pixel is decoded): a missing
    or unreadable file, an unsupported mode, a decompression bomb, a size other than `size`."""
    value = require_image(row, field)
    if isinstance(value, Image.Image):
        mode, dims, what = value.mode, value.size, "in-memory image"
    else:
        data = value.get("bytes") if isinstance(value, Mapping) else value
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > 0:
            source, what = io.BytesIO(data), f"image bytes ({len(data)} bytes)"
        else:
            source = resolve_image_path(row, field, base)
            if not source.exists():
                raise row.error(field, f"image file not found: {source}")
            what = f"image {source}"
        try:
            with Image.open(source) as img:  # reads the header; the bomb check happens here
                mode, dims = img.mode, img.size
        except Image.DecompressionBombError as err:
            raise row.error(
                field, f"refusing to decode {what}, a possible decompression bomb: {err}"
            ) from None
        except UnidentifiedImageError:
            raise row.error(field, f"cannot read {what}: not in an image format PIL recognises") from None
        except OSError as err:
            raise row.error(field, f"cannot read {what}: {err}") from None
    if mode not in MODES:
        raise row.error(field, f"{what}: unsupported image mode {mode!r} (use RGB or grayscale)")
    if size is not None and dims != (size, size):
        raise row.error(field, f"image is {dims[0]}×{dims[1]}, the model expects {size}×{size}")


def _open(row: Row, field: str, source: Path | io.BytesIO, what: str) -> Image.Image:
    """Decode an image file or buffer, turning every failure into a located error."""
    try:
        with Image.open(source) as img:
            img.load()
            return _checked_rgb(row, field, img, what)
    except Image.DecompressionBombError as err:  # raised from the header, before any pixel is decoded
        raise row.error(field, f"refusing to decode {what}, a possible decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise row.error(field, f"cannot read {what}: not in an image format PIL recognises") from None
    except OSError as err:  # truncated or damaged data
        raise row.error(field, f"cannot read {what}: {err}") from None


def _checked_rgb(row: Row, field: str, img: Image.Image, what: str) -> Image.Image:
    if img.mode not in MODES:
        raise row.error(field, f"{what}: unsupported image mode {img.mode!r} (use RGB or grayscale)")
    return img.convert("RGB")


def load_image_tensor(row: Row, field: str, base: Path, size: int) -> torch.Tensor:
    """An image as a [3, size, size] tensor in [-1, 1]; a different size is an error, not a silent resize."""
    img = load_image(row, field, base)
    if img.size != (size, size):
        raise row.error(field, f"image is {img.size[0]}×{img.size[1]}, the model expects {size}×{size}")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0
