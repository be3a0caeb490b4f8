"""Text rewards: verifiable answers, rules, and Bradley–Terry reward models that plug in anywhere."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def _text(output: Any) -> str:
    return output["text"] if isinstance(output, Mapping) else str(output)


class AnswerMatch:
    """1 when the response equals the prompt's known answer (after stripping), else 0: a verifiable reward."""

    differentiable = False

    def __init__(self, answers: Mapping[str, str], name: str = "answer_match"):
        self.answers, self.name = dict(answers), name

    def __call__(self, prompts: Sequence[Any], outputs: Sequence[Any]) -> torch.Tensor:
        scores = []
        for prompt, out in zip(prompts, outputs, strict=True):
            key = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            if key not in self.answers:
                raise KeyError(f"reward '{self.name}': no known answer for prompt {key!r}")
            scores.append(float(_text(out).strip() == self.answers[key].strip()))
        return torch.tensor(scores)


class RegexMatch:
    """1 when the response matches a regular expression (format rewards), else 0."""

    differentiable = False

    def __init__(self, pattern: str, name: str = "regex"):
        self.pattern, self.name = re.compile(pattern), name

    def __call__(self, prompts: Sequence[Any], outputs: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([float(bool(self.pattern.search(_text(o)))) for o in outputs])


class LengthReward:
    """Response length in characters, optionally as a penalty (negative scale) against verbosity."""

    differentiable = False

    def __init__(self, scale: float = 1.0, name: str = "length"):
        self.scale, self.name = scale, name

    def __call__(self, prompts: Sequence[Any], outputs: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([self.scale * len(_text(o)) for o in outputs])
