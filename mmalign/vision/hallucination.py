"""Hallucination metrics of a vision-language policy on held-out images, in the spirit of CHAIR and POPE.

* CHAIR-style (Rohrbach et al., 2018): greedy descriptions are split into statements and each checkable
  statement is compared with the image's ground truth. `chair_s` is the share of responses with at least one
  hallucinated statement, `chair_i` the share of checkable statements that are hallucinated.
* POPE-style (Li et al., 2023): balanced yes/no probes ("is it a 7?"); accuracy, and the share of "yes" answers
  (a model that says yes to everything hallucinates by agreeing).

Alongside, so a lower hallucination rate cannot hide a collapse: correctness of the digit and of whole
descriptions, coverage (share of the facts stated), malformed statements, mean length and distinct-token ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.vision import vlm_digits as D


def _check_facts(row: Row) -> dict[str, object]:
    facts = {}
    for field in D.FIELDS:
        value = row.data.get(field)
        allowed = list(range(10)) if field == "digit" else list(D.ATTRIBUTES[field])
        if value not in allowed or isinstance(value, bool):
            raise row.error(field, f"expected one of {allowed} (the image's ground truth), got {value!r}")
        facts[field] = value
    return facts


def description_metrics(responses: Sequence[str], facts: Sequence[D.Facts]) -> dict[str, float]:
    """CHAIR-style rates and correctness of descriptions against their images' facts."""
    n = len(responses)
    bad_responses = statements = hallucinated = malformed = total = digit_ok = all_ok = 0
    coverage = 0.0
    for text, truth in zip(responses, facts, strict=True):
        parsed = D.parse(text)
        checkable = [s for s in parsed if s.field is not None]
        wrong = [s for s in checkable if D.is_hallucinated(s, truth)]
        n_malformed = len(parsed) - len(checkable)
        bad_responses += bool(wrong)
        statements += len(checkable)
        hallucinated += len(wrong)
        malformed += n_malformed
        total += len(parsed)
        stated = {s.field for s in checkable}
        coverage += len(stated) / len(D.FIELDS)
        digit_ok += any(s.field == "digit" for s in checkable) and not any(s.field == "digit" for s in wrong)
        all_ok += not wrong and not n_malformed and stated == set(D.FIELDS)
    return {
        "chair_s": bad_responses / n,
        "chair_i": hallucinated / max(statements, 1),
        "digit_accuracy": digit_ok / n,
        "correct": all_ok / n,
        "coverage": coverage / n,
        "malformed_rate": malformed / max(total, 1),
        "statements_per_response": statements / n,
    }


class StatementReward:
    """A verifiable reward for descriptions of the digits VLM world, in [−1, 1]:

        (fields stated truly − false statements − malformed statements − repeated statements) / 3, clipped at −1

    Each prompt is the row the description answers (a VLM's `reward_prompt`: image path plus its ground truth
    `digit`, `ink`, `frame`). A description stating all three facts truly once scores 1; a missing fact earns
    nothing, a false one costs a point, and so does every statement that does not parse (garbled text), and
    every further statement about a field already stated (repeating a true fact or hedging between two values
    cannot pay). The clip at −1 (as bad as three false facts) keeps one runaway garbled sample from dominating
    a group's normalised advantages.

    A row whose prompt is one of the world's yes/no probes ("is it a 3?") is scored as an answer instead: 1 for
    the right yes/no, −1 for the wrong one or anything else, so probes can be mixed into the prompts (POPE).
    """

    differentiable = False

    def __init__(self, name: str = "vlm_statements"):
        self.name = name

    def _truth(self, row: Any) -> Mapping[str, Any]:
        if not isinstance(row, Mapping) or any(f not in row for f in D.FIELDS):
            raise ValueError(
                f"reward {self.name!r} needs prompt rows with the image's ground truth {D.FIELDS}; got {row!r}"
            )
        for field in D.FIELDS:
            allowed = list(range(10)) if field == "digit" else list(D.ATTRIBUTES[field])
            if row[field] not in allowed or isinstance(row[field], bool):
                raise ValueError(
                    f"reward {self.name!r}: ground truth {field!r} must be one of {allowed}, got {row[field]!r}"
                )
        return row

    def score(self, text: str, truth: Mapping[str, Any]) -> float:
        """The reward of one description against its image's facts."""
        right, penalties, stated = set(), 0, set()
        for s in D.parse(text):
            if s.field is None:
                penalties += 1
                continue
            if s.field in stated:
                penalties += 1
            stated.add(s.field)
            if D.is_hallucinated(s, truth):
                penalties += 1
            else:
                right.add(s.field)
        return max(-1.0, (len(right) - penalties) / len(D.FIELDS))

    @staticmethod
    def answer_score(text: str, truth: Mapping[str, Any], claim: tuple[str, object]) -> float:
        """The reward of one answer to a yes/no probe about (field, value): 1 if right, else −1."""
        field, value = claim
        expected = "yes" if truth[field] == value else "no"
        return 1.0 if yes_no(text) == expected else -1.0

    def __call__(self, prompts: Sequence[Mapping[str, Any]], outputs: Sequence[Any]) -> torch.Tensor:
        scores = []
        for row, out in zip(prompts, outputs, strict=True):
            text, truth = out["text"] if isinstance(out, Mapping) else str(out), self._truth(row)
            claim = D.probe_claim(str(row.get("prompt", "")))
            scores.append(self.score(text, truth) if claim is None else self.answer_score(text, truth, claim))
        return torch.tensor(scores)


def statement_changes(
    before: Sequence[str], after: Sequence[str], facts: Sequence[D.Facts], field: str = "digit"
) -> dict[str, int]:
    """How one field's statement moved between two models' descriptions of the same images.

    Tells apart a model that learned to see (wrong → right) from one that learned to avoid its own earlier answers
    (right → other wrong as often as wrong → right). Keys: `{right,wrong,none}->{same,right,other wrong,none}`.
    """
    if field not in D.FIELDS:
        raise ValueError(f"field must be one of {D.FIELDS}, got {field!r}")

    def value(text: str) -> object:
        return next((s.value for s in D.parse(text) if s.field == field), None)

    out: dict[str, int] = {}
    for b, a, truth in zip(before, after, facts, strict=True):
        vb, va = value(b), value(a)
        start = "none" if vb is None else "right" if vb == truth[field] else "wrong"
        if va is None:
            end = "none"
        elif va == vb:
            end = "same"
        else:
            end = "right" if va == truth[field] else "other wrong"
        key = f"{start}->{end}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def diversity(token_ids: Sequence[Sequence[int]]) -> dict[str, float]:
    """Mean response length and distinct-1/2 (distinct unigrams/bigrams over all, pooled across responses)."""
    unigrams = [t for ids in token_ids for t in ids]
    bigrams = [tuple(ids[i : i + 2]) for ids in token_ids for i in range(len(ids) - 1)]
    return {
        "response_tokens": len(unigrams) / max(len(token_ids), 1),
        "distinct_1": len(set(unigrams)) / max(len(unigrams), 1),
        "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        "distinct_responses": len({tuple(ids) for ids in token_ids}) / max(len(token_ids), 1),
    }


def yes_no(answer: str) -> str:
    """What an answer to a yes/no probe says, normalised ("Yes." → "yes"); anything else is returned as it reads."""
    return answer.strip().lower().rstrip(".!")


def pope_metrics(answers: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy of yes/no answers and the share of "yes" (a response that is neither counts as wrong)."""
    said = [yes_no(a) for a in answers]
    return {
        "pope_accuracy": sum(s == t for s, t in zip(said, truth, strict=True)) / len(truth),
        "pope_yes_ratio": sum(s == "yes" for s in said) / len(said),
    }


def pope_breakdown(
    questions: Sequence[str], answers: Sequence[str], truth: Sequence[str]
) -> dict[str, float]:
    """POPE accuracy and yes-ratio per probed field (digit, ink, frame), so a fall can be traced to a kind of probe.

    Keys `pope_accuracy_<field>` and `pope_yes_ratio_<field>`; `pope_unanswered` is the share of answers that are
    neither yes nor no. A question that is not one of the world's probes is a ValueError naming it.
    """
    said = [yes_no(a) for a in answers]
    by_field: dict[str, list[tuple[str, str]]] = {f: [] for f in D.FIELDS}
    for question, s, t in zip(questions, said, truth, strict=True):
        claim = D.probe_claim(question)
        if claim is None:
            raise ValueError(f"not a probe of the digits world: {question!r}")
        by_field[claim[0]].append((s, t))
    out = {}
    for field, pairs in by_field.items():
        if pairs:
            out[f"pope_accuracy_{field}"] = sum(s == t for s, t in pairs) / len(pairs)
            out[f"pope_yes_ratio_{field}"] = sum(s == "yes" for s, _ in pairs) / len(pairs)
    out["pope_unanswered"] = sum(s not in ("yes", "no") for s in said) / max(len(said), 1)
    return out


class HallucinationEvaluator:
    """Greedy descriptions and yes/no probes on held-out images; the same dict before and after training.

    `describe` rows: image, prompt and the ground truth (digit, ink, frame); `probes` rows: image,
    prompt (a yes/no question) and answer ("yes"/"no"). Both are checked when the evaluator is built.
    """

    def __init__(
        self,
        describe: Sequence[Row] = (),
        probes: Sequence[Row] = (),
        *,
        batch_size: int = 128,
        n_samples: int = 8,
    ):
        self.describe, self.probes = list(describe), list(probes)
        if not self.describe and not self.probes:
            raise ValueError("the hallucination evaluator needs describe rows, probe rows, or both")
        self.facts = [_check_facts(r) for r in self.describe]
        for r in self.probes:
            if r.data.get("answer") not in ("yes", "no"):
                raise r.error("answer", f"expected 'yes' or 'no', got {r.data.get('answer')!r}")
        # per-field POPE for the digits world's own probes; other probe sets get the overall numbers only
        self.probes_by_field = bool(self.probes) and all(
            D.probe_claim(str(r.data.get("prompt"))) for r in self.probes
        )
        self.batch_size, self.n_samples = batch_size, n_samples
        self._encoded: dict[str, list[dict[str, Any]]] = {}

    def _encode(self, policy: Any, name: str, rows: list[Row]) -> list[dict[str, Any]]:
        if name not in self._encoded:
            self._encoded[name] = [policy.encode_row_prompt(r) for r in rows]
        return self._encoded[name]

    def _generate(self, policy: Any, encoded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for start in range(0, len(encoded), self.batch_size):
            out += policy.generate(encoded[start : start + self.batch_size], greedy=True)
        return out

    def evaluate(self, policy: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.describe:
            outputs = self._generate(policy, self._encode(policy, "describe", self.describe))
            metrics.update(description_metrics([o["text"] for o in outputs], self.facts))
            metrics.update(diversity([o["response_ids"] for o in outputs]))
            metrics["n_images"] = len(outputs)
        if self.probes:
            outputs = self._generate(policy, self._encode(policy, "probes", self.probes))
            answers, truth = [o["text"] for o in outputs], [r.data["answer"] for r in self.probes]
            metrics.update(pope_metrics(answers, truth))
            if self.probes_by_field:
                metrics.update(pope_breakdown([r.data["prompt"] for r in self.probes], answers, truth))
            metrics["n_probes"] = len(outputs)
        return metrics

    def samples(self, policy: Any) -> list[dict[str, Any]]:
        """Greedy descriptions of the first held-out images with the truth, for the report's table."""
        rows = self.describe[: self.n_samples]
        if not rows:
            return []
        outputs = policy.generate(self._encode(policy, "describe", self.describe)[: len(rows)], greedy=True)
        table = []
        for row, facts, out in zip(rows, self.facts[: len(rows)], outputs, strict=True):
            wrong = [s.text for s in D.parse(out["text"]) if D.is_hallucinated(s, facts)]
            table.append(
                {
                    "prompt": f"{row.data['image']}: {row.data['prompt']}",
                    "response": out["text"],
                    "truth": D.describe(facts),
                    "hallucinated": "; ".join(wrong),
                }
            )
        return table
