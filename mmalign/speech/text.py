"""Character ids for TTS prompts: a fixed alphabet, so text the model cannot pronounce is an error, not <unk>."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mmalign.core.errors import MmalignError

DEFAULT_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
PAD, BOS, EOS = 0, 1, 2
ALPHABET_FILE = "alphabet.json"


class AlphabetError(MmalignError, ValueError):
    """Prompt text with a character outside the text encoder's alphabet (after lower-casing)."""

    label = "data error"


class CharEncoder:
    """Lower-cases text and maps each character to an id (0 pad, 1 bos, 2 eos, then the alphabet)."""

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, max_length: int = 24):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet, self.max_length = alphabet, max_length
        self.ids = {c: i + 3 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def check(self, text: str) -> str:
        """The normalised text, or an `AlphabetError` naming the first bad character and its position."""
        if not isinstance(text, str):
            raise AlphabetError(f"prompt must be text, got {type(text).__name__}")
        norm = text.lower()
        for i, c in enumerate(norm):
            if c not in self.ids:
                raise AlphabetError(
                    f"prompt {text!r}: character {c!r} at position {i} is not in the text encoder's alphabet "
                    f"{self.alphabet!r}"
                )
        if len(norm) + 2 > self.max_length:
            raise AlphabetError(f"prompt {text!r} is longer than {self.max_length - 2} characters")
        return norm

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Ids `[B, max_length]`: bos, characters, eos, padding."""
        out = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for b, text in enumerate(texts):
            ids = [BOS, *(self.ids[c] for c in self.check(text)), EOS]
            out[b, : len(ids)] = torch.tensor(ids)
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        payload = {"alphabet": self.alphabet, "max_length": self.max_length}
        (Path(directory) / ALPHABET_FILE).write_text(json.dumps(payload))

    @classmethod
    def load(cls, directory: str | Path) -> CharEncoder:
        return cls(**json.loads((Path(directory) / ALPHABET_FILE).read_text()))
