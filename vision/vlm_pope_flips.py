"""Which held-out POPE probes a trained VLM answers differently from the base (vision/VLM.md, why POPE falls).

    python vision/vlm_pope_flips.py WORLD_DIR RUN_DIR/final [RUN_DIR/final ...]

For each adapter: per probed field (digit, ink, frame) and true answer (yes / no), how many probes went right → wrong
and wrong → right against the base's greedy answers, and how many of the new errors are false "yes" answers.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from peft import PeftModel

from mmalign.core.data import read_rows
from mmalign.vision import vlm_digits as D
from mmalign.vision.hallucination import HallucinationEvaluator, yes_no
from mmalign.vision.vlm_policy import VisionLanguagePolicy


def flips(questions: list[str], truth: list[str], before: list[str], after: list[str]) -> dict[str, int]:
    """Counts keyed `field/truth/right->wrong` etc. (plus `field/truth/n`) from the base's and the model's answers."""
    counts: Counter[str] = Counter()
    for q, t, b, a in zip(questions, truth, before, after, strict=True):
        claim = D.probe_claim(q)
        if claim is None:
            raise ValueError(f"not a probe of the digits world: {q!r}")
        key = f"{claim[0]}/{t}"
        counts[f"{key}/n"] += 1
        was, now = yes_no(b) == t, yes_no(a) == t
        if was != now:
            counts[f"{key}/{'right->wrong' if was else 'wrong->right'}"] += 1
        if not now:
            counts[f"{key}/wrong after"] += 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("adapters", type=Path, nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    probes = read_rows(args.world / "eval_probes.jsonl")
    evaluator = HallucinationEvaluator(probes=probes)
    questions, truth = [r.data["prompt"] for r in probes], [r.data["answer"] for r in probes]
    policy = VisionLanguagePolicy.from_pretrained(str(args.world / "base"), max_length=128, max_new_tokens=48)
    base = policy.module
    encoded = evaluator._encode(policy, "probes", evaluator.probes)
    before = [o["text"] for o in evaluator._generate(policy, encoded)]
    report = {}
    for adapter in args.adapters:
        policy.module = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = [o["text"] for o in evaluator._generate(policy, encoded)]
        report[str(adapter)] = flips(questions, truth, before, after)
        policy.module = policy.module.unload()
        base = policy.module
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
