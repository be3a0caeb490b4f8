"""Vision-language policy, POVID and RLHF-V dense DPO: losses by hand, image handling, named data errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.core.data import DataError, Row, read_rows, write_jsonl
from mmalign.core.params import LoraSpec
from mmalign.objectives import preference as P
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.povid import DenseDPOAlgorithm, DenseDPOConfig, POVIDAlgorithm, POVIDConfig
from mmalign.vision import vlm_builders as B
from mmalign.vision import vlm_digits as D
from mmalign.vision.hallucination import description_metrics, diversity, pope_metrics
from mmalign.vision.vlm_builders import diffusion_noise
from mmalign.vision.vlm_data import apply_corrections, validate_correction_rows, validate_vlm_preference_rows
from mmalign.vision.vlm_policy import VisionLanguagePolicy
from mmalign.zoo import vlm_world as W

IMAGE_TOKENS = (16 // W.PATCH) ** 2
TRUTH = {"digit": 7, "ink": "bold", "frame": "framed"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny LLaVA + processor saved locally, and a few digit images and rows."""
    root = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(0)
    processor = W.world_processor()
    W.build_model(processor, W.VLMWorldSpec.tiny()).save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images, _ = W.render_all(0)
    (root / "images").mkdir()
    for i in range(4):
        images[i].save(root / "images" / f"{i}.png")
    rng = random.Random(0)
    rows = []
    for i in range(4):
        facts = dict(TRUTH, digit=i)
        chosen = D.describe(facts)
        rows.append(
            {
                "image": f"images/{i}.png",
                "noisy_image": f"images/{(i + 1) % 4}.png",
                "prompt": D.DESCRIBE_PROMPT,
                "chosen": chosen,
                "rejected": D.SwapRewriter().rewrite(chosen, facts, rng),
                "rejected_noisy": D.describe(dict(facts, digit=(i + 3) % 10)),
            }
        )
    write_jsonl(root / "pairs.jsonl", rows)
    return root


def _policy(tiny_dir: Path, **kwargs) -> VisionLanguagePolicy:
    torch.manual_seed(0)
    return VisionLanguagePolicy.from_pretrained(
        str(tiny_dir / "model"), max_length=128, image_size=16, **kwargs
    )


# ------------------------------------------------------------------------------------------- objectives
def test_povid_loss_matches_hand_computation():
    h_w, h_t, h_n = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4]), torch.tensor([-0.5, 0.7])
    alpha, b1, b2 = 0.5, 0.2, 0.3
    got = P.povid_loss(h_w, h_t, h_n, alpha, b1, b2, noisy_mask=torch.tensor([1.0, 0.0]))
    z0 = 0.5 * 0.3 - (0.2 * 0.1 + 0.3 * -0.5)
    z1 = 0.5 * -0.2 - (0.2 * 0.4)  # no noisy response for sample 1
    want = [math.log(1 + math.exp(-z0)), math.log(1 + math.exp(-z1))]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    with pytest.raises(ValueError, match="beta2"):
        P.povid_loss(h_w, h_t, h_n, 0.1, 0.1, -1.0)


def test_token_weighted_logps_match_hand_computation():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    changed = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]])
    gamma = 5.0
    weights = P.dense_token_weights(changed, gamma)
    got = sequence_logps(logps, mask, weights, normalize=True)
    # RLHF-V: (Σ_unchanged log p + γ Σ_changed log p) / (|y_u| + γ|y_c|)
    row0 = (-0.5 + gamma * (-2.0 - 3.0)) / (1 + gamma * 2)
    row1 = (-0.1 - 0.2) / 2
    assert torch.allclose(got, torch.tensor([row0, row1]), atol=1e-6)
    assert torch.allclose(sequence_logps(logps, mask, weights), torch.tensor([-0.5 - 25.0, -0.3]), atol=1e-6)


# ---------------------------------------------------------------------------------------- digits language
def test_describe_parse_and_injection():
    text = D.describe(TRUTH)
    assert text == "digit 7. bold ink. framed."
    assert [(s.field, s.value) for s in D.parse(text)] == [(f, TRUTH[f]) for f in D.FIELDS]
    bad = D.SwapRewriter().rewrite(text, TRUTH, random.Random(1))
    wrong = [s for s in D.parse(bad) if D.is_hallucinated(s, TRUTH)]
    assert len(wrong) == 1 and bad != text
    response = "digit 1. bold inkk. framed."
    corrections = D.corrections_for(response, TRUTH)
    assert corrections == [
        {"start": 0, "original": "digit 1", "corrected": "digit 7"},
        {"start": 9, "original": "bold inkk", "corrected": "bold ink"},
    ]
    row = Row("mem", 1, {"response": response, "corrections": corrections})
    assert apply_corrections(row).chosen == text


def test_hallucination_metrics_by_hand():
    responses = [D.describe(TRUTH), "digit 1. faint ink.", "digit 7. purple."]
    m = description_metrics(responses, [TRUTH] * 3)
    assert m["chair_s"] == pytest.approx(1 / 3)  # only the second response asserts something false
    assert m["chair_i"] == pytest.approx(2 / 6)  # 3 + 2 + 1 checkable statements, 2 false
    assert m["malformed_rate"] == pytest.approx(1 / 7)
    assert m["digit_accuracy"] == pytest.approx(2 / 3) and m["correct"] == pytest.approx(1 / 3)
    assert pope_metrics(["yes", "No.", "maybe"], ["yes", "no", "no"]) == {
        "pope_accuracy": pytest.approx(2 / 3),
        "pope_yes_ratio": pytest.approx(1 / 3),
    }
    d = diversity([[1, 2, 3], [1, 2, 4]])
    assert d["distinct_1"] == pytest.approx(4 / 6) and d["distinct_2"] == pytest.approx(3 / 4)


def test_diffusion_noise_is_seeded_and_keeps_shape():
    img = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    a = diffusion_noise(img, 500, torch.Generator().manual_seed(0))
    b = diffusion_noise(img, 500, torch.Generator().manual_seed(0))
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(diffusion_noise(img, 0, torch.Generator().manual_seed(0))).mean() > 190


# ----------------------------------------------------------------------------------------------- policy
def test_image_tokens_are_never_truncated(tiny_dir):
    policy = _policy(tiny_dir)
    rows = validate_vlm_preference_rows(read_rows(tiny_dir / "pairs.jsonl"), noisy=True)
    for row in rows:
        e = policy.encode_pair(row)
        assert e["prompt_ids"].count(policy.image_token_id) == IMAGE_TOKENS
        batch = policy.collate_pairs([e])
        assert (batch["input_ids"] == policy.image_token_id).sum(-1).tolist() == [IMAGE_TOKENS] * 2
    long = Row(str(tiny_dir / "pairs.jsonl"), 9, dict(rows[0].data, chosen="digit 7. " * 20))
    with pytest.raises(DataError, match=r"line 9, field 'chosen': prompt \+ chosen is \d+ tokens"):
        policy.encode_pair(long)
    tight = _policy(tiny_dir)
    tight.codec.max_length = IMAGE_TOKENS  # the image alone no longer fits: an error, not a cut image
    with pytest.raises(DataError, match="field 'prompt'"):
        tight.encode_pair(rows[0])


def _write(path: Path, data: bytes | Image.Image) -> None:
    if isinstance(data, Image.Image):
        data.save(path)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "image file not found"),
        ("corrupt.png", b"not a png", "cannot read image"),
        ("cmyk.jpg", Image.new("CMYK", (16, 16)), "unsupported image mode 'CMYK'"),
        ("big.png", Image.new("RGB", (32, 16)), "image is 32×16, the model expects 16×16"),
    ],
)
def test_bad_images_are_named_errors(tiny_dir, tmp_path, name, content, message):
    if content is not None:
        _write(tmp_path / name, content)
    policy = _policy(tiny_dir)
    row = Row(str(tmp_path / "data.jsonl"), 3, {"image": name, "prompt": "p", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match=rf"data.jsonl, line 3, field 'image': .*{message}"):
        policy.encode_pair(row)
    with pytest.raises(DataError, match="field 'image': expected an image file path"):
        validate_vlm_preference_rows([Row("d.jsonl", 1, {"prompt": "p", "chosen": "a", "rejected": "b"})])


def test_mismatched_corrections_are_named_errors():
    def row(corrections):
        return Row(
            "c.jsonl",
            4,
            {"image": "x.png", "prompt": "p", "response": "digit 1. thin stroke.", **corrections},
        )

    with pytest.raises(DataError, match=r"line 4, field 'corrections\[0\].original': does not match"):
        validate_correction_rows(
            [row({"corrections": [{"start": 0, "original": "digit 2", "corrected": "x"}]})]
        )
    with pytest.raises(DataError, match=r"corrections\[0\].original': 'thick' occurs 0 times"):
        apply_corrections(row({"corrections": [{"original": "thick", "corrected": "thin"}]}))
    with pytest.raises(DataError, match=r"corrections\[1\]': overlaps corrections\[0\]"):
        apply_corrections(
            row(
                {
                    "corrections": [
                        {"start": 0, "original": "digit 1", "corrected": "digit 2"},
                        {"start": 6, "original": "1. thin", "corrected": "2"},
                    ]
                }
            )
        )
    with pytest.raises(DataError, match="field 'corrections': expected a non-empty list"):
        apply_corrections(row({}))


def test_reference_is_the_untrained_model_for_lora_and_full(tiny_dir):
    rows = read_rows(tiny_dir / "pairs.jsonl")
    for lora in (LoraSpec(r=4, alpha=8), None):
        policy = _policy(tiny_dir, lora=lora)
        batch = policy.collate_pairs([policy.encode_pair(r) for r in rows])
        before = policy.sequence_logprobs(batch).token_logps.detach()
        opt = torch.optim.SGD(list(policy.trainable_parameters()), lr=1.0)
        (-policy.sequence_logprobs(batch).token_logps.sum()).backward()
        opt.step()
        after = policy.sequence_logprobs(batch).token_logps.detach()
        with torch.no_grad(), policy.reference():
            ref = policy.sequence_logprobs(batch).token_logps
        assert not torch.allclose(before, after, atol=1e-4)
        assert torch.allclose(ref, before, atol=1e-6)


def test_generate_is_greedy_and_deterministic(tiny_dir):
    policy = _policy(tiny_dir, max_new_tokens=6)
    image = Image.open(tiny_dir / "images" / "0.png").convert("RGB")
    a = policy.generate([{"prompt": "describe the digit.", "image": image}] * 2, greedy=True)
    assert a[0]["response_ids"] == a[1]["response_ids"] and 1 <= len(a[0]["response_ids"]) <= 6
    assert a[0]["prompt_ids"].count(policy.image_token_id) == IMAGE_TOKENS


def test_generate_never_samples_the_image_placeholder(tiny_dir):
    """A response holding <image> has no features to fill it: scoring it fails inside LLaVA's forward."""
    policy = _policy(tiny_dir, max_new_tokens=6)
    head = policy.module.get_output_embeddings()
    favour = head.register_forward_hook(
        lambda m, i, out: out.index_add(
            -1, torch.tensor([policy.image_token_id]), torch.full((*out.shape[:-1], 1), 100.0)
        )
    )
    image = Image.open(tiny_dir / "images" / "0.png").convert("RGB")
    prompt = {"prompt": "describe the digit.", "image": image}
    try:
        out = policy.generate([prompt] * 2, greedy=True) + policy.generate([prompt], num_samples=3)
    finally:
        favour.remove()
    assert all(policy.image_token_id not in o["response_ids"] and o["response_ids"] for o in out)
    pixels = policy.pixel_values([image])[0]
    batch = policy.collate_completions([{**o, "pixel_values": pixels} for o in out])
    assert torch.isfinite(policy.sequence_logprobs(batch).token_logps).all()  # the responses can be scored


# ------------------------------------------------------------------------------------------- algorithms
def test_noisy_response_is_scored_under_the_clean_image(tiny_dir):
    policy = _policy(tiny_dir)
    rows = validate_vlm_preference_rows(read_rows(tiny_dir / "pairs.jsonl"), noisy=True)
    seen = []
    collate = policy.collate
    policy.collate = lambda seqs: seen.append(seqs) or collate(seqs)
    algo = POVIDAlgorithm(policy, rows, POVIDConfig())
    ex = algo.train_examples[:2]
    losses, _ = algo.loss(ex)
    seqs = seen[-1]
    assert len(seqs) == 6  # chosen ×2, injected ×2, noisy ×2
    clean = [e["pixel_values"] for e in ex]
    for k in range(2):
        assert torch.equal(seqs[4 + k][2], clean[k]) and seqs[4 + k][1] == ex[k]["noisy_ids"]
    # and the loss is the POVID formula on (noisy response | clean image) log-ratios, scored independently
    lp = policy.sequence_logprobs(collate(seqs))
    with torch.no_grad(), policy.reference():
        ref = policy.sequence_logprobs(collate(seqs))
    h = sequence_logps(lp.token_logps, lp.mask) - sequence_logps(ref.token_logps, ref.mask)
    want = P.povid_loss(h[:2], h[2:4], h[4:], 0.1, 0.1, 0.1)
    assert torch.allclose(losses, want, atol=1e-6)

    noisy_ctx = POVIDAlgorithm(policy, rows, POVIDConfig(noisy_context="noisy"))
    seen.clear()
    noisy_ctx.loss(noisy_ctx.train_examples[:1])
    other = policy.encode_row_prompt(rows[0], "noisy_image")["pixel_values"]
    assert torch.equal(seen[-1][2][2], other) and not torch.equal(other, clean[0])


def test_povid_on_probe_pairs_without_a_noisy_response_drops_only_the_noisy_term(tiny_dir):
    """A batch mixing a POVID row with probe pairs (vision/vlm_probe_pairs.py: no `rejected_noisy`): the probe rows'
    loss is −log σ(α h_w − β₁ h_t) + λ·NLL(chosen), the POVID row's keeps its β₂ term; every log-ratio is scored
    here one sequence at a time, independently of the algorithm's batching."""
    policy = _policy(tiny_dir, lora=LoraSpec(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapter off zero so that every log-ratio is non-zero
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    records = [
        {"image": f"images/{i}.png", "facts": dict(TRUTH, digit=i)} for i in range(4)
    ]  # the images of tiny_dir
    probe_rows = B.probe_pair_rows(records, fields=("digit",), seed=3)[:2]
    write_jsonl(tiny_dir / "probe_pairs.jsonl", probe_rows)
    rows = read_rows(tiny_dir / "pairs.jsonl")[:1] + read_rows(tiny_dir / "probe_pairs.jsonl")
    rows = validate_vlm_preference_rows(rows, noisy=True)
    alpha, b1, b2, lam = 0.3, 0.2, 0.5, 0.7
    algo = POVIDAlgorithm(policy, rows, POVIDConfig(alpha=alpha, beta1=b1, beta2=b2, sft_weight=lam))
    assert [e["noisy_ids"] is None for e in algo.train_examples] == [False, True, True]
    with torch.no_grad():
        losses, metrics = algo.loss(algo.train_examples)

    def logp(e, ids, reference=False):
        seq = policy.collate([(e["prompt_ids"], ids, e["pixel_values"])])
        with torch.no_grad():
            if reference:
                with policy.reference():
                    lp = policy.sequence_logprobs(seq)
            else:
                lp = policy.sequence_logprobs(seq)
        n = int(lp.mask.sum())
        return float((lp.token_logps * lp.mask).sum()), n

    want = []
    for e in algo.train_examples:
        h = {}
        for side in ("chosen", "rejected", "noisy"):
            if e[f"{side}_ids"] is None:
                continue
            (pol, n), (ref, _) = logp(e, e[f"{side}_ids"]), logp(e, e[f"{side}_ids"], reference=True)
            h[side] = pol - ref
            if side == "chosen":
                nll = -pol / n
        z = alpha * h["chosen"] - b1 * h["rejected"] - b2 * h.get("noisy", 0.0)
        want.append(math.log1p(math.exp(-z)) + lam * nll)
        assert abs(h["chosen"]) > 1e-3 and abs(h["rejected"]) > 1e-3
    assert torch.allclose(losses, torch.tensor(want, dtype=losses.dtype), atol=1e-5)
    assert metrics["noisy_share"].item() == pytest.approx(1 / 3)


def test_probe_pairs_prefer_the_true_answer_about_their_own_image():
    rng = random.Random(0)
    records = [
        {
            "image": f"images/{i}.png",
            "facts": {
                "digit": rng.randrange(10),
                "ink": rng.choice(D.ATTRIBUTES["ink"]),
                "frame": rng.choice(D.ATTRIBUTES["frame"]),
            },
        }
        for i in range(200)
    ]
    rows = B.probe_pair_rows(records, seed=5)
    assert len(rows) == 3 * len(records)
    for k, row in enumerate(rows):
        facts = records[k // 3]["facts"]
        field, value = D.probe_claim(row["prompt"])
        assert field == D.FIELDS[k % 3] and row["image"] == records[k // 3]["image"]
        truth = "yes" if facts[field] == value else "no"
        assert (row["chosen"], row["rejected"]) == (truth, {"yes": "no", "no": "yes"}[truth])
    share = sum(r["chosen"] == "yes" for r in rows) / len(rows)
    assert 0.4 < share < 0.6  # half of the probes ask about a value the image does not have
    # a subset of fields keeps the same probes (the same draws), only fewer of them
    digit_only = B.probe_pair_rows(records, fields=("digit",), seed=5)
    assert digit_only == rows[0::3]
    with pytest.raises(ValueError, match="fields"):
        B.probe_pair_rows(records, fields=("colour",))
    # digit_negatives n: the true digit ("yes") and n different wrong digits ("no") per image, then ink and frame
    for n in (1, 9):
        more = B.probe_pair_rows(records, digit_negatives=n, seed=5)
        assert len(more) == (n + 3) * len(records)
        for k, rec in enumerate(records):
            block = more[k * (n + 3) : (k + 1) * (n + 3)]
            asked = [D.probe_claim(r["prompt"]) for r in block]
            truth = rec["facts"]["digit"]
            assert asked[0] == ("digit", truth) and (block[0]["chosen"], block[0]["rejected"]) == (
                "yes",
                "no",
            )
            wrong = [value for field, value in asked[1 : n + 1] if field == "digit"]
            assert len(set(wrong)) == n and truth not in wrong
            assert all((r["chosen"], r["rejected"]) == ("no", "yes") for r in block[1 : n + 1])
            assert [field for field, _ in asked[n + 1 :]] == ["ink", "frame"]
            for r, (field, value) in zip(block[n + 1 :], asked[n + 1 :], strict=True):
                assert r["chosen"] == ("yes" if rec["facts"][field] == value else "no")
    with pytest.raises(ValueError, match="digit_negatives"):
        B.probe_pair_rows(records, digit_negatives=10)


def test_dense_dpo_weights_changed_tokens_by_hand(tiny_dir):
    policy = _policy(tiny_dir)
    response = "digit 1. bold ink. framed."
    data = {
        "image": "images/0.png",
        "prompt": D.DESCRIBE_PROMPT,
        "response": response,
        "corrections": [{"start": 0, "original": "digit 1", "corrected": "digit 0"}],
    }
    write_jsonl(tiny_dir / "corr.jsonl", [data])
    rows = validate_correction_rows(read_rows(tiny_dir / "corr.jsonl"))
    gamma = 3.0
    algo = DenseDPOAlgorithm(policy, rows, DenseDPOConfig(beta=0.5, gamma=gamma))
    e = algo.train_examples[0]
    # character tokenizer: one token per character, so the changed token is the single differing digit
    assert e["chosen_changed"][:8] == [1] * 7 + [0] and sum(e["chosen_changed"]) == 7
    batch = policy.collate_pairs([e])
    lp = policy.sequence_logprobs(batch)
    with torch.no_grad(), policy.reference():
        ref = policy.sequence_logprobs(batch)
    n_prompt = len(e["prompt_ids"])

    def score(tok, row):  # hand: Σ w log p / Σ w over the response tokens, w = γ on the first 7 characters
        values = tok.token_logps[row, n_prompt - 1 : n_prompt - 1 + len(e["chosen_ids"])]
        w = torch.tensor([gamma] * 7 + [1.0] * (len(values) - 7))
        return (w * values).sum() / w.sum()

    h_w, h_l = score(lp, 0) - score(ref, 0), score(lp, 1) - score(ref, 1)
    losses, _ = algo.loss([e])
    assert torch.allclose(losses, P.dpo_loss(h_w[None], h_l[None], 0.5), atol=1e-6)


@pytest.mark.parametrize("which", ["povid", "rlhfv"])
def test_algorithms_raise_their_margin_on_a_tiny_model(tiny_dir, which):
    policy = _policy(tiny_dir, lora=LoraSpec(r=4, alpha=8))
    if which == "povid":
        rows = validate_vlm_preference_rows(read_rows(tiny_dir / "pairs.jsonl"), noisy=True)
        algo = POVIDAlgorithm(policy, rows, POVIDConfig(alpha=1.0, beta1=1.0, beta2=1.0))
    else:
        records = []
        for r in read_rows(tiny_dir / "pairs.jsonl"):
            fixes = D.corrections_for(r.data["rejected"], dict(TRUTH, digit=int(r.data["chosen"][6])))
            records.append(
                {
                    **{k: r.data[k] for k in ("image", "prompt")},
                    "response": r.data["rejected"],
                    "corrections": fixes,
                }
            )
        write_jsonl(tiny_dir / "rlhfv.jsonl", records)
        algo = DenseDPOAlgorithm(
            policy, validate_correction_rows(read_rows(tiny_dir / "rlhfv.jsonl")), DenseDPOConfig(beta=10.0)
        )
    opt = torch.optim.AdamW(list(policy.trainable_parameters()), lr=1e-2)
    first = None
    for _ in range(8):
        losses, metrics = algo.loss(algo.train_examples)
        first = first if first is not None else losses.mean().item()
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final, metrics = algo.loss(algo.train_examples)
    assert final.mean().item() < first - 0.05 and metrics["rewards/margin"] > 0


def test_world_facts_are_measured_from_pixels():
    bar = np.zeros((8, 8))
    bar[1:7, 3:5] = 16
    for ink in ("bold", "faint"):
        for frame in ("framed", "unframed"):
            rgb = np.asarray(W.render(bar, ink, frame))
            assert rgb.shape == (16, 16, 3)
            assert D.facts_of(rgb, 1) == {"digit": 1, "ink": ink, "frame": frame}
    assert json.dumps(D.facts_of(np.asarray(W.render(bar, "faint", "unframed")), 7))


def test_sft_weight_adds_the_mean_token_nll_of_the_preferred_response(tiny_dir):
    policy = _policy(tiny_dir)
    rows = validate_vlm_preference_rows(read_rows(tiny_dir / "pairs.jsonl"), noisy=True)
    plain = POVIDAlgorithm(policy, rows, POVIDConfig())
    anchored = POVIDAlgorithm(policy, rows, POVIDConfig(sft_weight=0.5))
    ex = plain.train_examples[:2]
    with torch.no_grad():
        diff = anchored.loss(ex)[0] - plain.loss(ex)[0]
        chosen = policy.sequence_logprobs(policy.collate_pairs(ex)).split(2)[0]
    nll = -(chosen.token_logps.sum(-1) / chosen.mask.sum(-1))
    assert torch.allclose(diff, 0.5 * nll, atol=1e-6)


def test_world_vision_pretraining_learns_digits_and_sft_keeps_the_tower_frozen(tiny_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    spec = W.VLMWorldSpec.tiny()
    spec.vision_pretrain_steps = 150
    torch.manual_seed(0)
    model = W.build_model(W.world_processor(), spec)
    held_out = (
        [W.render(digits.images[i], "bold", "framed") for i in range(300, 400)],
        digits.target[300:400],
    )
    got = W.pretrain_vision(
        model, list(digits.images[:300]), list(digits.target[:300]), held_out, spec, log=lambda *_: None
    )
    assert got["held_out_digit_accuracy"] > 0.25  # chance is 0.1

    policy = _policy(tiny_dir)
    tower = {k: v.clone() for k, v in policy.module.model.vision_tower.state_dict().items()}
    images = [Image.open(tiny_dir / "images" / f"{i}.png") for i in range(4)]
    facts = [dict(TRUTH, digit=i) for i in range(4)]
    spec.sft_steps, spec.batch_size = 2, 4
    W.train_base(policy, policy.pixel_values(images), facts, facts, spec, log=lambda *_: None)
    after = policy.module.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], after[k]) for k in tower)
    assert all(p.requires_grad for p in policy.module.parameters())


def test_statement_changes_by_hand():
    from mmalign.vision.hallucination import statement_changes

    facts = [dict(TRUTH, digit=d) for d in (1, 2, 3, 4, 5)]
    before = ["digit 1. bold ink.", "digit 2.", "digit 9.", "digit 8.", "bold ink."]
    after = ["digit 1.", "digit 7.", "digit 3.", "zzz.", "digit 5."]
    got = statement_changes(before, after, facts)
    assert got == {
        "none->right": 1,
        "right->other wrong": 1,
        "right->same": 1,
        "wrong->none": 1,
        "wrong->right": 1,
    }
    assert statement_changes(before, after, facts, "ink") == {"none->none": 3, "right->none": 2}
    with pytest.raises(ValueError, match="field"):
        statement_changes(before, after, facts, "slant")
