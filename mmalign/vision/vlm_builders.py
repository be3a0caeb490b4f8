"""Preference data for hallucination alignment from a world's ground truth: POVID triples and RLHF-V corrections.

Both builders take records `{"image": path, "prompt": str, "facts": {...}}` (paths as they will appear in the
dataset), the images as PIL, and a `VisionLanguagePolicy` whose own responses supply the dispreferred side.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.vision import vlm_digits as D


def diffusion_noise(
    image: Image.Image, step: int, generator: torch.Generator, num_steps: int = 1000
) -> Image.Image:
    """The image after `step` steps of the forward diffusion q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

    POVID's second kind of dispreferred response comes from the model looking at such an image. The schedule
    is DDPM's linear β from 1e-4 to 0.02 over `num_steps` (Ho et al., 2020); pixels are mapped to [−1, 1] and back.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps}), got {step}")
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[step].item()
    x0 = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)) / 127.5 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    xt = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    pixels = ((xt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def _greedy(policy: Any, prompts: Sequence[str], images: Sequence[Image.Image], batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [
            {"prompt": p, "image": img}
            for p, img in zip(
                prompts[start : start + batch_size], images[start : start + batch_size], strict=True
            )
        ]
        out += [o["text"] for o in policy.generate(chunk, greedy=True)]
    return out


def povid_rows(
    policy: Any,
    records: Sequence[dict[str, Any]],
    images: Sequence[Image.Image],
    *,
    rewriter: D.HallucinationRewriter | None = None,
    noise_step: int = 500,
    seed: int = 0,
    batch_size: int = 128,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """POVID rows: chosen = the ground-truth description, rejected = its hallucination-injected rewrite,
    rejected_noisy = the policy's greedy description of the diffusion-noised image (null when it equals the
    ground truth or is empty, both counted in the stats). The noisy response is scored against the CLEAN image in training.
    """
    rewriter = rewriter or D.SwapRewriter()
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    noisy_images = [diffusion_noise(img, noise_step, generator) for img in images]
    noisy = _greedy(policy, [r["prompt"] for r in records], noisy_images, batch_size)
    rows, identical, empty, hallucinating = [], 0, 0, 0
    for rec, response in zip(records, noisy, strict=True):
        chosen = D.describe(rec["facts"])
        rejected = rewriter.rewrite(chosen, rec["facts"], rng)
        if response == chosen:
            identical += 1
            response = None
        elif not response.strip():  # the model ended at once: nothing asserted, nothing to disprefer
            empty += 1
            response = None
        else:
            hallucinating += any(D.is_hallucinated(s, rec["facts"]) for s in D.parse(response))
        rows.append(
            {
                "image": rec["image"],
                "prompt": rec["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "rejected_noisy": response,
            }
        )
    n = len(records)
    stats = {
        "noisy_identical_to_truth": identical / n,
        "noisy_empty": empty / n,
        "noisy_hallucinating": hallucinating / n,
    }
    return rows, {**stats, "n": n}


def dpo_rows(
    records: Sequence[dict[str, Any]], *, rewriter: D.HallucinationRewriter | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Plain DPO pairs: ground truth preferred over its hallucination-injected rewrite."""
    rewriter, rng = rewriter or D.SwapRewriter(), random.Random(seed)
    rows = []
    for rec in records:
        chosen = D.describe(rec["facts"])
        rows.append(
            {
                "image": rec["image"],
                "prompt": rec["prompt"],
                "chosen": chosen,
                "rejected": rewriter.rewrite(chosen, rec["facts"], rng),
            }
        )
    return rows


def correction_rows(
    policy: Any, records: Sequence[dict[str, Any]], images: Sequence[Image.Image], *, batch_size: int = 128
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """RLHF-V rows: the policy's own greedy description and segment-level corrections from ground truth.

    Responses that need no correction yield no row (counted in the stats as `already_correct`).
    """
    responses = _greedy(policy, [r["prompt"] for r in records], images, batch_size)
    rows, segments = [], 0
    for rec, response in zip(records, responses, strict=True):
        corrections = D.corrections_for(response, rec["facts"])
        if corrections:
            segments += len(corrections)
            rows.append(
                {
                    "image": rec["image"],
                    "prompt": rec["prompt"],
                    "response": response,
                    "corrections": corrections,
                }
            )
    n = len(records)
    return rows, {
        "already_correct": 1 - len(rows) / n,
        "segments_per_row": segments / max(len(rows), 1),
        "n": n,
    }


def probe_pair_rows(
    records: Sequence[dict[str, Any]],
    *,
    fields: Sequence[str] = D.FIELDS,
    digit_negatives: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """POPE-style probe pairs: for each record and each of `fields`, one yes/no probe about its image (the world's
    `probes`: half of them asking about a value the image does not have), the true answer preferred over the other.

    With `digit_negatives` = n, the digit is probed n + 1 times instead: once about the true digit ("yes") and about
    n different wrong digits ("no"), drawn at random (n = 9: every digit), followed by the other fields' probes.
    Rows carry no `rejected_noisy`, so POVID scores only its text term on them. Answers come from
    the records' facts; which images may be used (training images only) is the caller's business.
    """
    unknown = sorted(set(fields) - set(D.FIELDS))
    if unknown or not fields:
        raise ValueError(f"fields must be a non-empty subset of {D.FIELDS}, got {list(fields)}")
    if digit_negatives is not None and not 1 <= digit_negatives <= 9:
        raise ValueError(f"digit_negatives must be in 1..9 (or None), got {digit_negatives}")
    rng, rows = random.Random(seed), []
    opposite = {"yes": "no", "no": "yes"}
    for rec in records:
        drawn = list(zip(D.FIELDS, D.probes(rec["facts"], rng), strict=True))
        if digit_negatives is not None:
            truth = rec["facts"]["digit"]
            wrong = rng.sample([d for d in range(10) if d != truth], digit_negatives)
            digit = [(D.probe_question("digit", truth), "yes")]
            digit += [(D.probe_question("digit", d), "no") for d in wrong]
            drawn = [("digit", probe) for probe in digit] + drawn[1:]
        for field, (question, answer) in drawn:
            if field in fields:
                rows.append(
                    {
                        "image": rec["image"],
                        "prompt": question,
                        "chosen": answer,
                        "rejected": opposite[answer],
                    }
                )
    return rows
