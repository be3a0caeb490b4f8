"""Rows checked against a tokenizer before any weights load: every character must be in its vocabulary, and a
prompt must fit the text encoder that reads it.

A character the vocabulary lacks becomes the unknown token, so two different responses can encode to the same
ids and a pair would be trained on as if it carried a preference; a prompt longer than a text encoder's window
would be cut without a word. Both are `DataError`s naming the row and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mmalign.core.data import Row

# the text fields a row of each data kind holds (a field that is absent is skipped)
TEXT_FIELDS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "completions": ("prompt", "completion"),
    "prompts": ("prompt",),
    "corrections": ("prompt", "response"),
    "targets": ("prompt",),
}


def text_items(rows: Mapping[str, list[Row]]) -> list[tuple[Row, str]]:
    """(row, field) for every text field of rows given by data kind."""
    return [
        (row, field)
        for kind, kind_rows in rows.items()
        for row in kind_rows
        for field in TEXT_FIELDS.get(kind, ())
        if row.data.get(field) is not None
    ]


def _texts(value: Any) -> list[str]:
    """The strings of a text field: itself, or each turn's content of a conversation."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t["content"] for t in value if isinstance(t, Mapping) and isinstance(t.get("content"), str)]
    return []


def check_vocabulary(tokenizer: Any, items: Iterable[tuple[Row, str]], what: str = "the tokenizer") -> None:
    """Fail on the first text field with a character `tokenizer` maps to its unknown token, naming it.

    Tokenizers without an unknown token (byte-level BPE, byte fallback) cover every character and pass.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    literal = tokenizer.unk_token
    flat = [(row, field, text) for row, field in items for text in _texts(row.data.get(field))]
    flat = [
        (r, f, t) for r, f, t in flat if not (literal and literal in t)
    ]  # the token written out is allowed
    if not flat:
        return
    encoded = tokenizer([t for *_, t in flat], add_special_tokens=False)["input_ids"]
    for (row, field, text), ids in zip(flat, encoded, strict=True):
        if unk in ids:
            bad = sorted({c for c in text if unk in tokenizer(c, add_special_tokens=False)["input_ids"]})
            chars = ", ".join(repr(c) for c in bad) or "a character sequence"
            raise row.error(
                field,
                f"{chars} {'is' if len(bad) < 2 else 'are'} not in the vocabulary of {what} and would be "
                f"encoded as {literal!r} (two different texts could then look the same to the model); "
                "replace or remove it, or use a model whose tokenizer covers it",
            )


def check_prompt_length(tokenizer: Any, items: Iterable[tuple[Row, str]], max_tokens: int, what: str) -> None:
    """Fail on the first prompt longer than `max_tokens` tokens (special tokens included, as an encoder sees it)."""
    items = list(items)
    prompts = [row.data[field] for row, field in items]
    if not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    for (row, field), n in zip(items, lengths, strict=True):
        if n > max_tokens:
            raise row.error(
                field,
                f"is {n} tokens; {what} reads at most {max_tokens} and would cut the rest, so the model would "
                "not see the whole prompt: shorten it",
            )


def load_tokenizer(path: str, where: str, **kwargs: Any) -> Any:
    """A tokenizer from a model path (no weights), a loader's error for a user's mistake named as a ModelError."""
    from transformers import AutoTokenizer

    from mmalign.core.errors import MmalignError, library_error

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except MmalignError:
        raise
    except (OSError, ValueError) as err:
        named = library_error(err, where, path)
        if named is None:
            raise
        raise named from err
