"""Which held-out descriptions changed their digit statement after training (vision/VLM.md, RLHF-V's digit drop).

    python vision/vlm_digit_transitions.py WORLD_DIR RUN_DIR/final

WORLD_DIR is a built VLM world (its `base` and `eval_describe.jsonl`), the second argument a trained LoRA adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel

from mmalign.core.data import read_rows
from mmalign.vision.hallucination import HallucinationEvaluator, statement_changes
from mmalign.vision.vlm_policy import VisionLanguagePolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--field", default="digit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    evaluator = HallucinationEvaluator(read_rows(args.world / "eval_describe.jsonl"))
    policy = VisionLanguagePolicy.from_pretrained(str(args.world / "base"), max_length=128, max_new_tokens=48)
    encoded = evaluator._encode(policy, "describe", evaluator.describe)
    before = [o["text"] for o in evaluator._generate(policy, encoded)]
    policy.module = PeftModel.from_pretrained(policy.module, str(args.adapter)).merge_and_unload().eval()
    after = [o["text"] for o in evaluator._generate(policy, encoded)]
    print(json.dumps(statement_changes(before, after, evaluator.facts, args.field), indent=2))


if __name__ == "__main__":
    main()
