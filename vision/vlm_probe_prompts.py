"""Training prompts with POPE-style probes mixed in (vision/VLM.md, POPE): every training image's describe row plus
one yes/no probe about the same image (a random field, half of them with answer "no"), for online runs whose
`vlm_statements` reward scores a probe prompt as a yes/no answer.

    python vision/vlm_probe_prompts.py WORLD_DIR OUT.jsonl [--seed 0]

Image paths are written absolute, so OUT.jsonl may live anywhere.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mmalign.vision import vlm_digits as D


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for line in (args.world / "train_describe.jsonl").read_text().splitlines():
        row = json.loads(line)
        row["image"] = str((args.world / row["image"]).resolve())
        question, _ = rng.choice(D.probes(row, rng))
        rows += [row, {**row, "prompt": question}]
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} rows ({len(rows) // 2} probes) -> {args.out}")


if __name__ == "__main__":
    main()
