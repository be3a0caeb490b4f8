"""One error type for everything a user can cause and fix: a bad recipe, data, model files, output directory.

`MmalignError` is the base; each subclass names what is wrong (`label`), so the CLI prints
`mmalign: <label>: <message>` without a trace and exits with status 2 (`--debug` shows the trace). Errors that
stay outside this hierarchy are bugs and keep their trace.

Libraries raise their own types for the same user mistakes (a model directory without `config.json` is an
`OSError` from transformers, a truncated weights file a `SafetensorError`); `library_error` turns those into a
`ModelError` that names the recipe key and says what to do. Other subclasses live next to the code that raises
them and keep their historical names: `DataError` (mmalign.core.data), `RewardError` (mmalign.core.reward),
`TrainingError` (mmalign.train.trainer), `RunDirError` and `CheckpointError` (mmalign.train).
"""

from __future__ import annotations


class MmalignError(Exception):
    """A problem with what the user gave mmalign (not a bug): printed as one line naming what to fix."""

    label = "mmalign error"


class RecipeError(MmalignError, ValueError):
    """A recipe (or an override) that cannot describe a run; the message names the key."""

    label = "recipe error"


class ModelError(MmalignError, ValueError):
    """Model files that cannot be loaded: a missing path, a directory without config/tokenizer/weights, a
    truncated weights file, an unknown component class; the message names the recipe key and the file."""

    label = "model error"


def library_error(err: BaseException, where: str, path: object = None) -> MmalignError | None:
    """The named error for a library exception a user causes while loading `where` (e.g. `model.name_or_path`),
    or None when `err` is not one (a bug, which keeps its trace) or is already an `MmalignError`.

    Recognised by type name, so no library is imported here: safetensors' `SafetensorError` (a truncated or
    foreign weights file), huggingface_hub's `HFValidationError` (neither a directory nor a hub id), and the
    `OSError`s transformers, diffusers and huggingface_hub raise for a missing path or file.
    """
    if isinstance(err, MmalignError):
        return None  # already named: the caller re-raises it as it is
    names = {cls.__name__ for cls in type(err).__mro__}
    target = f" {path!r}" if path is not None else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "SafetensorError" in names:
        return ModelError(
            f"{where}{target}: a weights file cannot be read ({first}); it is truncated or not a safetensors "
            "file: save or download it again"
        )
    if "HFValidationError" in names:
        return ModelError(
            f"{where}{target} is neither an existing local directory nor a valid hub id ({first})"
        )
    if isinstance(err, OSError):
        advice = (
            ". A local model is a directory with its config, tokenizer and weights (as save_pretrained writes "
            "them); a hub id needs network access or a cached copy"
            if where.startswith("model.")
            else ""
        )
        return ModelError(f"{where}{target} cannot be loaded: {first}{advice}")
    return None
