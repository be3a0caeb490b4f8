"""POPE-style probe preference pairs about the digits world's TRAINING images (vision/VLM.md, POPE).

    python vision/vlm_probe_pairs.py WORLD_DIR OUT.jsonl [--fields digit ink frame] [--digit-negatives N] [--seed 0]

For each training image (`train_describe.jsonl`: image and the facts measured from its pixels) and each of the
given fields, one yes/no probe from the world's grammar ("is it a 3?", half of them about a value the image does not
have), with the true answer as `chosen` and the other as `rejected`. No held-out image is used: the script refuses
to write if any of its images is one of `eval_describe.jsonl` / `eval_probes.jsonl`'s. Mix the pairs with the POVID
rows through a list of data sources:

    mmalign train vision/vlm_povid_probes.yaml -o runs/vlm_povid_probes   # data.train: [train_povid, these pairs]

Image paths are written absolute, so OUT.jsonl may live anywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmalign.core.data import write_jsonl
from mmalign.vision import vlm_digits as D
from mmalign.vision.vlm_builders import probe_pair_rows


def _images(path: Path) -> set[str]:
    return {
        str((path.parent / json.loads(line)["image"]).resolve()) for line in path.read_text().splitlines()
    }


def training_probe_pairs(
    world: Path, fields: list[str], seed: int, digit_negatives: int | None = None
) -> list[dict]:
    """The probe pairs of a world's training images, image paths absolute; an error if one is held out."""
    records = []
    for line in (world / "train_describe.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = str((world / row["image"]).resolve())
        records.append({"image": image, "facts": {f: row[f] for f in D.FIELDS}})
    held_out = _images(world / "eval_describe.jsonl") | _images(world / "eval_probes.jsonl")
    leaked = sorted({r["image"] for r in records} & held_out)
    if leaked:
        raise SystemExit(f"{len(leaked)} training images are held-out images too (first: {leaked[0]})")
    return probe_pair_rows(records, fields=fields, digit_negatives=digit_negatives, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fields", nargs="+", default=list(D.FIELDS), choices=D.FIELDS)
    parser.add_argument(
        "--digit-negatives",
        type=int,
        default=None,
        help="probe the true digit and N random wrong ones per image (9: every digit) instead of one probe",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = training_probe_pairs(args.world, args.fields, args.seed, args.digit_negatives)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, rows)
    yes = sum(r["chosen"] == "yes" for r in rows)
    print(f"{len(rows)} probe pairs ({yes} with answer yes) -> {args.out}")


if __name__ == "__main__":
    main()
