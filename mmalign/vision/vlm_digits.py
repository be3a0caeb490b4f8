"""The digits vision-language world's language: facts measured from pixels, descriptions, probes and their checks.

A description is a few statements, each checkable against facts measured from the rendered RGB image itself:

    "digit 7. bold ink. framed."

* digit: the scikit-learn label;
* ink: bold / faint, the brightest interior pixel against the midpoint;
* frame: framed / unframed, whether every border pixel is lit.

A statement is *hallucinated* when it asserts a value the image does not have; a statement matching none of the
patterns is *malformed* (counted separately: it asserts nothing checkable).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ATTRIBUTES: dict[str, tuple[str, str]] = {
    "ink": ("bold", "faint"),
    "frame": ("framed", "unframed"),
}
FIELDS = ("digit", *ATTRIBUTES)
DESCRIBE_PROMPT = "describe the digit."
_STATEMENT = {
    "digit": (re.compile(r"^digit (\d)$"), "digit {}"),
    "ink": (re.compile(r"^(bold|faint) ink$"), "{} ink"),
    "frame": (re.compile(r"^(framed|unframed)$"), "{}"),
}
_PROBE = {
    "digit": "is it a {}?",
    "ink": "is the ink {}?",
    "frame": "is it {}?",
}

Facts = Mapping[str, object]


def measurements(rgb: np.ndarray) -> dict[str, float]:
    """Brightest interior pixel and darkest border pixel of an [H, W, 3] image, in [0, 1]."""
    gray = np.asarray(rgb, dtype=np.float64).mean(axis=-1) / 255.0
    inner = gray[1:-1, 1:-1]
    peak = inner.max()
    if peak <= 0:
        raise ValueError("an empty image has no digit")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return {"peak": float(peak), "border": float(border.min())}


def facts_of(rgb: np.ndarray, digit: int) -> dict[str, object]:
    """The ground truth of one rendered image: its digit and each attribute's value, measured from pixels."""
    m = measurements(rgb)
    return {
        "digit": int(digit),
        "ink": "bold" if m["peak"] > 0.75 else "faint",
        "frame": "framed" if m["border"] >= 0.7 else "unframed",
    }


def statement(field: str, value: object) -> str:
    return _STATEMENT[field][1].format(value)


def describe(facts: Facts) -> str:
    """The canonical description of a set of facts (digit first, then ink, frame)."""
    return " ".join(statement(f, facts[f]) + "." for f in FIELDS)


@dataclass(frozen=True)
class Statement:
    """One statement of a response: its character span, and what it asserts (field None: malformed)."""

    start: int
    end: int
    text: str
    field: str | None
    value: object = None


def parse(text: str) -> list[Statement]:
    """Split a response into '.'-terminated statements with their spans and parsed claims."""
    out = []
    for m in re.finditer(r"[^.]+", text):
        raw = m.group(0)
        stripped = raw.strip()
        if not stripped:
            continue
        start = m.start() + (len(raw) - len(raw.lstrip()))
        field, value = None, None
        for name, (pattern, _) in _STATEMENT.items():
            hit = pattern.match(stripped)
            if hit:
                field, value = name, int(hit.group(1)) if name == "digit" else hit.group(1)
                break
        out.append(Statement(start, start + len(stripped), stripped, field, value))
    return out


def is_hallucinated(s: Statement, facts: Facts) -> bool:
    """A parsed statement that contradicts the image's facts."""
    return s.field is not None and facts[s.field] != s.value


def probes(facts: Facts, rng: random.Random) -> list[tuple[str, str]]:
    """POPE-style yes/no questions about one image, one per field, half of them with answer "no"."""
    out = []
    for field in FIELDS:
        truth = facts[field]
        if rng.random() < 0.5:
            value, answer = truth, "yes"
        else:
            value, answer = other_value(field, truth, rng), "no"
        out.append((probe_question(field, value), answer))
    return out


def probe_question(field: str, value: object) -> str:
    """The yes/no probe asking whether `field` has `value` ("is it a 3?", "is the ink faint?")."""
    return _PROBE[field].format(value)


def probe_claim(question: str) -> tuple[str, object] | None:
    """The (field, value) a yes/no probe asks about ("is the ink faint?" → ("ink", "faint")); None if no probe."""
    for field, template in _PROBE.items():
        head, tail = template.split("{}")
        if question.startswith(head) and question.endswith(tail):
            value = question[len(head) : len(question) - len(tail)]
            if field == "digit" and value.isdigit() and len(value) == 1:
                return field, int(value)
            if field != "digit" and value in ATTRIBUTES[field]:
                return field, value
    return None


def other_value(field: str, value: object, rng: random.Random) -> object:
    """A value of `field` different from `value` (a random other digit, or the attribute's opposite)."""
    if field == "digit":
        return rng.choice([d for d in range(10) if d != value])
    a, b = ATTRIBUTES[field]
    return b if value == a else a


class HallucinationRewriter(Protocol):
    """Turns a correct description into a hallucinated one (POVID's first dispreferred kind).

    The rule-based `SwapRewriter` is the default; an LLM-backed rewriter (the paper used GPT-4V) plugs in by
    implementing this one method.
    """

    def rewrite(self, description: str, facts: Facts, rng: random.Random) -> str: ...


class SwapRewriter:
    """Rule-based hallucination injection: swap the digit or one attribute to a value the image does not have."""

    def __init__(self, digit_probability: float = 0.25, n_swaps: int = 1):
        if not 0.0 <= digit_probability <= 1.0:
            raise ValueError(f"digit_probability must be in [0, 1], got {digit_probability}")
        if n_swaps < 1:
            raise ValueError(f"n_swaps must be >= 1, got {n_swaps}")
        self.digit_probability, self.n_swaps = digit_probability, n_swaps

    def rewrite(self, description: str, facts: Facts, rng: random.Random) -> str:
        statements = [s for s in parse(description) if s.field is not None]
        if not statements:
            raise ValueError(f"no checkable statement to rewrite in {description!r}")
        digit = [s for s in statements if s.field == "digit"]
        attrs = [s for s in statements if s.field != "digit"]
        chosen: list[Statement] = []
        if digit and (not attrs or rng.random() < self.digit_probability):
            chosen.append(digit[0])
        pool = [s for s in attrs if s not in chosen]
        rng.shuffle(pool)
        chosen += pool[: max(0, self.n_swaps - len(chosen))]
        out = description
        for s in sorted(chosen, key=lambda s: -s.start):
            new = statement(s.field, other_value(s.field, facts[s.field], rng))
            out = out[: s.start] + new + out[s.end :]
        return out


def corrections_for(response: str, facts: Facts) -> list[dict[str, object]]:
    """Segment-level corrections of a response from ground truth (RLHF-V's feedback format).

    Each hallucinated statement is replaced by the true one; a malformed statement is replaced by the true
    statement of a field the response has not covered yet (or deleted if none is left). Returns
    `[{"start", "original", "corrected"}]`, empty when the response needs no correction.
    """
    statements = parse(response)
    covered = {s.field for s in statements if s.field is not None}
    missing = [f for f in FIELDS if f not in covered]
    out = []
    for s in statements:
        if s.field is not None and is_hallucinated(s, facts):
            out.append(
                {"start": s.start, "original": s.text, "corrected": statement(s.field, facts[s.field])}
            )
        elif s.field is None:
            corrected = statement(missing[0], facts[missing[0]]) if missing else ""
            if missing:
                missing.pop(0)
            out.append({"start": s.start, "original": s.text, "corrected": corrected})
    return out
