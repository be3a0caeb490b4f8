"""Tiny SD3, FLUX and SDXL pipelines for tests (built in `mmalign.zoo.tiny_pipelines`), and a save/load round trip.

`saved_and_loaded` round-trips a pipeline through `save_pretrained` / `from_pretrained` of the plain diffusers
class, as a user's checkpoint would load.
"""

from __future__ import annotations

from pathlib import Path

from mmalign.zoo.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline  # noqa: F401


def saved_and_loaded(pipe, path: str | Path):
    """The pipeline after `save_pretrained(path)` and its own class's `from_pretrained(path)` (local only).

    Absent components (SD3 without T5) are passed as None, as diffusers documents for dropping T5.
    """
    pipe.save_pretrained(path)
    absent = {name: None for name, module in pipe.components.items() if module is None}
    loaded = type(pipe).from_pretrained(path, local_files_only=True, **absent)
    loaded.set_progress_bar_config(disable=True)
    return loaded
