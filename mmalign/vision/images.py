"""Image files in datasets: loaded and checked with errors that name the file, row and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmalign.core.data import Row


def resolve_image_path(row: Row, field: str, base: Path) -> Path:
    """A row's image path, relative paths taken from the dataset file's directory."""
    value = row.data.get(field)
    if not isinstance(value, str) or not value.strip():
        raise row.error(field, f"expected an image file path, got {type(value).__name__}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def load_image(row: Row, field: str, base: Path) -> Image.Image:
    """Open a row's image and convert it to RGB; missing or unreadable files are a `DataError`."""
    path = resolve_image_path(row, field, base)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("RGB", "RGBA", "L", "P"):
                raise row.error(field, f"{path}: unsupported image mode {img.mode!r} (use RGB or grayscale)")
            return img.convert("RGB")
    except FileNotFoundError:
        raise row.error(field, f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise row.error(field, f"cannot read image {path}: {err}") from None


def load_image_tensor(row: Row, field: str, base: Path, size: int) -> torch.Tensor:
    """An image as a [3, size, size] tensor in [-1, 1]; a different size is an error, not a silent resize."""
    img = load_image(row, field, base)
    if img.size != (size, size):
        raise row.error(field, f"image is {img.size[0]}×{img.size[1]}, the model expects {size}×{size}")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0
