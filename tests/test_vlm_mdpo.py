"""mDPO's conditional image preference and reward anchor: losses by hand, image corruptions, the algorithms."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.core.data import read_rows, write_jsonl
from mmalign.core.params import LoraSpec
from mmalign.objectives import preference as P
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.image_terms import ImageTermsConfig
from mmalign.train.mdpo import MDPOAlgorithm, MDPOConfig
from mmalign.train.povid import DenseDPOAlgorithm, DenseDPOConfig, POVIDAlgorithm, POVIDConfig
from mmalign.vision import image_corruption as C
from mmalign.vision import vlm_digits as D
from mmalign.vision.vlm_data import validate_correction_rows, validate_vlm_preference_rows
from mmalign.vision.vlm_policy import VisionLanguagePolicy
from mmalign.zoo import vlm_world as W

TRUTH = {"digit": 7, "ink": "bold", "frame": "framed"}


def softplus(z: float) -> float:
    return math.log1p(math.exp(-z))  # −log σ(z)


# ------------------------------------------------------------------------------------------- objectives
def test_conditional_and_anchor_losses_match_hand_computation():
    h_w, h_c = torch.tensor([0.4, -0.3]), torch.tensor([-0.2, 0.5])
    got = P.conditional_image_loss(h_w, h_c, 0.5)
    want = [softplus(0.5 * (0.4 + 0.2)), softplus(0.5 * (-0.3 - 0.5))]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    got = P.reward_anchor_loss(h_w, 2.0, delta=0.1)
    assert torch.allclose(got, torch.tensor([softplus(0.8 - 0.1), softplus(-0.6 - 0.1)]), atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        P.reward_anchor_loss(h_w, 0.0)


def test_mdpo_loss_is_the_sum_of_its_three_terms_by_hand():
    h_w, h_l, h_c = torch.tensor([0.4]), torch.tensor([0.9]), torch.tensor([0.1])
    beta = 0.3
    got = P.mdpo_loss(h_w, h_l, h_c, beta, delta=0.0, conditional_weight=2.0, anchor_weight=0.5)
    want = softplus(beta * (0.4 - 0.9)) + 2.0 * softplus(beta * (0.4 - 0.1)) + 0.5 * softplus(beta * 0.4)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # the anchor term is what lifts the chosen response: its gradient on h_w is negative (loss falls as h_w rises)
    h = torch.tensor([0.0], requires_grad=True)
    P.reward_anchor_loss(h, 1.0).sum().backward()
    assert h.grad.item() == pytest.approx(-0.5)


# ------------------------------------------------------------------------------------------ corruptions
def test_random_crop_keeps_shape_and_covers_at_most_max_area():
    height, width = 16, 16
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    pixels = torch.stack([rows, cols, rows * 0]).float()[None].repeat(64, 1, 1, 1)
    out = C.random_crop(pixels, 0.2, torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape
    for img in out:
        # coordinates seen after the resize lie inside the crop: its extent bounds the cropped area
        span_r = img[0].max() - img[0].min() + 1
        span_c = img[1].max() - img[1].min() + 1
        assert span_r * span_c <= 0.2 * height * width + 1e-4
    again = C.random_crop(pixels, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="max_area"):
        C.random_crop(pixels, 0.0)


def test_diffusion_noise_on_pixels_follows_the_ddpm_schedule():
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.prod(1 - betas[:501])  # after step 500 (0-based index)
    x0 = torch.full((2000, 3, 4, 4), 0.6)
    out = C.diffusion_noise(x0, 500, torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.6, abs=0.01)
    assert out.std().item() == pytest.approx(math.sqrt(1 - alpha_bar), rel=0.02)
    with pytest.raises(ValueError, match="corruption"):
        C.corrupt(x0, "blur")


def test_image_terms_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.corruption"):
        ImageTermsConfig(corruption="blur")
    with pytest.raises(ValueError, match=r"algorithm\.anchor_weight"):
        POVIDConfig(anchor_weight=-1.0)
    with pytest.raises(ValueError, match=r"algorithm\.crop_max_area"):
        DenseDPOConfig(crop_max_area=1.5)
    with pytest.raises(ValueError, match=r"algorithm\.beta"):
        MDPOConfig(beta=0.0)


# ------------------------------------------------------------------------------------------- algorithms
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny LLaVA saved locally, four digit images and POVID / RLHF-V rows."""
    root = tmp_path_factory.mktemp("mdpo")
    torch.manual_seed(0)
    processor = W.world_processor()
    W.build_model(processor, W.VLMWorldSpec.tiny()).save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images, _ = W.render_all(0)
    (root / "images").mkdir()
    rng, pairs, corrections = random.Random(0), [], []
    for i in range(4):
        images[i].save(root / "images" / f"{i}.png")
        facts = dict(TRUTH, digit=i)
        chosen = D.describe(facts)
        rejected = D.SwapRewriter().rewrite(chosen, facts, rng)
        base = {"image": f"images/{i}.png", "prompt": D.DESCRIBE_PROMPT}
        pairs.append({**base, "chosen": chosen, "rejected": rejected, "rejected_noisy": None})
        corrections.append({**base, "response": rejected, "corrections": D.corrections_for(rejected, facts)})
    write_jsonl(root / "pairs.jsonl", pairs)
    write_jsonl(root / "rlhfv.jsonl", corrections)
    return root


def _policy(tiny_dir: Path, lora: LoraSpec | None = None) -> VisionLanguagePolicy:
    torch.manual_seed(0)
    policy = VisionLanguagePolicy.from_pretrained(
        str(tiny_dir / "model"), max_length=128, image_size=16, lora=lora
    )
    return policy


def _pairs(tiny_dir: Path):
    return validate_vlm_preference_rows(read_rows(tiny_dir / "pairs.jsonl"), noisy=True)


class FixedCorruption:
    """Replaces the policy's random corruption by a fixed one (every pixel set to −1), for hand computations."""

    def __init__(self, policy):
        self.calls = 0
        policy.corrupt_pixel_values = self

    def __call__(self, pixels, how, **options):
        self.calls += 1
        return torch.full_like(pixels, -1.0)


def _ratio(policy, seqs, weights=None, normalize=False):
    """log π/π_ref of each (prompt, response, pixels) sequence, each scored in a batch of its own."""
    out = []
    for i, s in enumerate(seqs):
        batch = policy.collate([s])
        w = None if weights is None else weights[i : i + 1, : batch["input_ids"].shape[1] - 1]
        lp = policy.sequence_logprobs(batch)
        with policy.reference():
            ref = policy.sequence_logprobs(batch)
        out.append(
            sequence_logps(lp.token_logps, lp.mask, w, normalize)
            - sequence_logps(ref.token_logps, ref.mask, w, normalize)
        )
    return torch.cat(out)


def _perturb(policy):
    """Move the LoRA weights off zero so policy and reference differ."""
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_mdpo_algorithm_loss_is_the_paper_formula_on_separately_scored_sequences(tiny_dir):
    policy = _policy(tiny_dir, LoraSpec(r=4, alpha=8))
    _perturb(policy)
    corruption = FixedCorruption(policy)
    algo = MDPOAlgorithm(policy, _pairs(tiny_dir), MDPOConfig(beta=0.5, anchor_delta=0.2, sft_weight=0.0))
    ex = algo.train_examples[:3]
    with torch.no_grad():
        losses, metrics = algo.loss(ex)
        corrupted = torch.full_like(ex[0]["pixel_values"], -1.0)
        h_w = _ratio(policy, [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in ex])
        h_l = _ratio(policy, [(e["prompt_ids"], e["rejected_ids"], e["pixel_values"]) for e in ex])
        h_c = _ratio(policy, [(e["prompt_ids"], e["chosen_ids"], corrupted) for e in ex])
    want = [
        softplus(0.5 * (w - lose)) + softplus(0.5 * (w - c)) + softplus(0.5 * w - 0.2)
        for w, lose, c in zip(h_w.tolist(), h_l.tolist(), h_c.tolist(), strict=True)
    ]
    assert torch.allclose(losses, torch.tensor(want), atol=1e-5)
    assert corruption.calls == 1
    assert metrics["rewards/image_margin"].item() == pytest.approx(
        (0.5 * (h_w - h_c)).mean().item(), abs=1e-5
    )


def test_povid_and_rlhfv_add_the_image_terms_on_their_own_scores(tiny_dir):
    policy = _policy(tiny_dir, LoraSpec(r=4, alpha=8))
    _perturb(policy)
    FixedCorruption(policy)
    terms = {"conditional_weight": 2.0, "anchor_weight": 0.5}
    plain = POVIDAlgorithm(policy, _pairs(tiny_dir), POVIDConfig(alpha=0.3, beta2=0.0))
    added = POVIDAlgorithm(policy, _pairs(tiny_dir), POVIDConfig(alpha=0.3, beta2=0.0, **terms))
    ex = plain.train_examples[:2]
    corrupted = torch.full_like(ex[0]["pixel_values"], -1.0)
    with torch.no_grad():
        diff = added.loss(ex)[0] - plain.loss(ex)[0]
        h_w = _ratio(policy, [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in ex])
        h_c = _ratio(policy, [(e["prompt_ids"], e["chosen_ids"], corrupted) for e in ex])
    want = [
        2.0 * softplus(0.3 * (w - c)) + 0.5 * softplus(0.3 * w)
        for w, c in zip(h_w.tolist(), h_c.tolist(), strict=True)
    ]
    assert torch.allclose(diff, torch.tensor(want), atol=1e-5)

    rows = validate_correction_rows(read_rows(tiny_dir / "rlhfv.jsonl"))
    cfg = {"beta": 0.5, "gamma": 4.0, "length_normalize": True}
    plain = DenseDPOAlgorithm(policy, rows, DenseDPOConfig(**cfg))
    added = DenseDPOAlgorithm(policy, rows, DenseDPOConfig(**cfg, **terms))
    ex = plain.train_examples[:2]
    with torch.no_grad():
        diff = added.loss(ex)[0] - plain.loss(ex)[0]
        scores = []
        for pixels in ("real", "corrupted"):
            seqs, weights = [], []
            for e in ex:
                px = e["pixel_values"] if pixels == "real" else corrupted
                seqs.append((e["prompt_ids"], e["chosen_ids"], px))
                changed = torch.zeros(128)
                start = len(e["prompt_ids"])
                changed[start : start + len(e["chosen_changed"])] = torch.tensor(
                    e["chosen_changed"], dtype=torch.float
                )
                weights.append(1.0 + 3.0 * changed[1:])
            scores.append(_ratio(policy, seqs, torch.stack(weights), normalize=True))
    h_w, h_c = scores
    want = [
        2.0 * softplus(0.5 * (w - c)) + 0.5 * softplus(0.5 * w)
        for w, c in zip(h_w.tolist(), h_c.tolist(), strict=True)
    ]
    assert torch.allclose(diff, torch.tensor(want), atol=1e-5)


def test_conditional_term_makes_the_response_depend_on_the_image(tiny_dir):
    """Trained on the conditional term alone, with the policy's own random crops, the chosen response gains under
    the real image against fresh crops (margin 0 before training: LoRA starts at the reference)."""
    policy = _policy(tiny_dir, LoraSpec(r=4, alpha=8))
    algo = MDPOAlgorithm(policy, _pairs(tiny_dir), MDPOConfig(beta=1.0, anchor_weight=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        _, before = algo.loss(algo.train_examples)
    opt = torch.optim.AdamW(list(policy.trainable_parameters()), lr=1e-2)
    for _ in range(10):
        losses, _ = algo.loss(algo.train_examples)
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(1)
    with torch.no_grad():
        _, after = algo.loss(algo.train_examples)
    assert before["rewards/image_margin"].abs() < 1e-6
    assert after["rewards/image_margin"] > 0.05 and after["rewards/image_accuracy"] == 1.0
