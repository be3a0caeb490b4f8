"""How often the base (and trained adapters) answer digit probes wrong on the digits world's TRAINING images.

    python vision/vlm_probe_errors.py WORLD_DIR [RUN_DIR/final ...] [--images 300]

Asks "is it a k?" for every k = 0..9 about the first N training images (`train_describe.jsonl`), greedy, and prints
per model how many "yes" probes (the true digit) and "no" probes (the nine others) it answers right. Diagnostic
only (vision/VLM.md, POVID with probe pairs): no held-out image is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel

from mmalign.core.data import rows_from_records
from mmalign.vision import vlm_digits as D
from mmalign.vision.hallucination import HallucinationEvaluator, yes_no
from mmalign.vision.vlm_policy import VisionLanguagePolicy


def count(truth: list[str], answers: list[str]) -> dict[str, int]:
    """Right answers and totals among the "yes" and the "no" probes."""
    out = {"yes_right": 0, "yes_n": 0, "no_right": 0, "no_n": 0}
    for t, a in zip(truth, answers, strict=True):
        out[f"{t}_n"] += 1
        out[f"{t}_right"] += int(yes_no(a) == t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("adapters", type=Path, nargs="*")
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = (args.world / "train_describe.jsonl").read_text().splitlines()[: args.images]
    probes = []
    for line in lines:
        row = json.loads(line)
        image = str((args.world / row["image"]).resolve())
        for d in range(10):
            answer = "yes" if row["digit"] == d else "no"
            probes.append({"image": image, "prompt": D.probe_question("digit", d), "answer": answer})
    evaluator = HallucinationEvaluator(probes=rows_from_records(probes, "training-image digit probes"))
    truth = [p["answer"] for p in probes]
    policy = VisionLanguagePolicy.from_pretrained(str(args.world / "base"), max_length=128, max_new_tokens=48)
    encoded = evaluator._encode(policy, "probes", evaluator.probes)
    report = {"base": count(truth, [o["text"] for o in evaluator._generate(policy, encoded)])}
    base = policy.module
    for adapter in args.adapters:
        policy.module = PeftModel.from_pretrained(base, str(adapter)).eval()
        report[str(adapter)] = count(truth, [o["text"] for o in evaluator._generate(policy, encoded)])
        policy.module = policy.module.unload()
        base = policy.module
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
