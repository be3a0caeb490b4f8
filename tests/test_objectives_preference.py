import math

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import (
    BCORewardShift,
    BetaDPOController,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    composed_preference_loss,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    dpop_loss,
    exo_pair_loss,
    fdpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    length_offset,
    log_odds,
    mallows_dispersion,
    mallows_dpo_loss,
    nca_pair_loss,
    odpo_offset,
    orpo_loss,
    preference_metrics,
    robust_dpo_loss,
    simpo_loss,
    sppo_hard_loss,
)


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


CHOSEN = [0.5, -1.0, 2.0]
REJECTED = [-0.5, 0.2, 2.5]
MARGINS = [c - r for c, r in zip(CHOSEN, REJECTED, strict=True)]  # h = [1.0, -1.2, -0.5]
BETA = 0.1


def test_dpo_by_hand() -> None:
    expected = [-log_sigmoid(BETA * h) for h in MARGINS]
    assert_close(dpo_loss(f64(CHOSEN), f64(REJECTED), BETA), f64(expected))


def test_cdpo_by_hand_and_zero_smoothing_is_dpo() -> None:
    eps = 0.1
    expected = [-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h) for h in MARGINS]
    assert_close(dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, label_smoothing=eps), f64(expected))
    assert_close(
        dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, label_smoothing=0.0),
        dpo_loss(f64(CHOSEN), f64(REJECTED), BETA),
    )


def test_dpo_offset_float_and_tensor() -> None:
    offsets = [0.3, -0.2, 1.0]
    expected = [-log_sigmoid(BETA * h - d) for h, d in zip(MARGINS, offsets, strict=True)]
    assert_close(dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, offset=f64(offsets)), f64(expected))
    expected_scalar = [-log_sigmoid(BETA * h - 0.3) for h in MARGINS]
    assert_close(dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, offset=0.3), f64(expected_scalar))


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = f64(CHOSEN).requires_grad_()
    rejected = f64(REJECTED).requires_grad_()
    dpo_loss(chosen, rejected, BETA).sum().backward()
    # d/dchosen −log σ(βh) = −β σ(−βh) (seed 004 Eq. (41)); the rejected gradient is its negative.
    expected = f64([-BETA * sigmoid(-BETA * h) for h in MARGINS])
    assert_close(chosen.grad, expected)
    assert_close(rejected.grad, -expected)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.7}, "label_smoothing")]
)
def test_dpo_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dpo_loss(f64(CHOSEN), f64(REJECTED), **{"beta": BETA, **kwargs})


def test_ipo_by_hand_and_seed_eq_44_scaling() -> None:
    beta = 0.25
    losses = ipo_loss(f64(CHOSEN), f64(REJECTED), beta)
    assert_close(losses, f64([(h - 1 / (2 * beta)) ** 2 for h in MARGINS]))
    # Seed 004 Eq. (44): (βh − 1/2)² = β² · ipo_loss.
    assert_close(beta**2 * losses, f64([(beta * h - 0.5) ** 2 for h in MARGINS]))
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(f64(CHOSEN), f64(REJECTED), -1.0)


def test_hinge_by_hand() -> None:
    beta = 0.5
    expected = [max(0.0, 1.0 - beta * h) for h in [1.0, 3.0, -1.0]]
    assert_close(hinge_loss(f64([1.0, 3.0, 0.0]), f64([0.0, 0.0, 1.0]), beta), f64(expected))


def test_length_offset_gives_r_dpo() -> None:
    offset = length_offset(torch.tensor([10, 3]), torch.tensor([4, 7]), alpha=0.1)
    assert_close(offset, torch.tensor([-0.6, 0.4]))  # α(|y_l| − |y_w|), subtracted by dpo_loss
    losses = dpo_loss(f64([1.0, 1.0]), f64([0.0, 0.0]), 0.5, offset=offset.double())
    # −log σ(βh + α(|y_w| − |y_l|)): a longer chosen response already "explains" part of the preference.
    assert_close(losses, f64([-log_sigmoid(0.5 + 0.6), -log_sigmoid(0.5 - 0.4)]))


TOY_LENGTHS = f64([2.0, 4.0, 6.0, 8.0, 10.0])
TOY_REWARDS = f64([0.0, 0.6, 1.0, 1.3, 1.5])  # a preference model that likes longer responses


def _population_optimum(beta: float, offset_fn) -> torch.Tensor:
    """The free softmax policy over five responses that minimises the population preference loss.

    Pairs are every ordered (i, j), i ≠ j, drawn uniformly under a uniform π_ref, with i preferred with the
    Bradley–Terry probability σ(r_i − r_j); the expected loss of the pair is p_ij ℓ(i ≻ j) + p_ji ℓ(j ≻ i), and
    summing p_ij ℓ(i ≻ j) over ordered pairs counts both terms.
    """
    ref = torch.full((5,), -math.log(5.0), dtype=torch.float64)
    i, j = (
        torch.tensor(ix) for ix in zip(*[(a, b) for a in range(5) for b in range(5) if a != b], strict=True)
    )
    p_win = torch.sigmoid(TOY_REWARDS[i] - TOY_REWARDS[j])
    logits = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits], max_iter=1000, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logratios = torch.log_softmax(logits, 0) - ref
        offset = offset_fn(TOY_LENGTHS[i], TOY_LENGTHS[j])
        loss = (p_win * dpo_loss(logratios[i], logratios[j], beta, offset=offset)).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(logits, 0).detach()


def test_r_dpo_population_optimum_penalises_length() -> None:
    """R-DPO's loss is minimised by the optimum of its objective max E[r − α|y|] − β KL, which is shorter."""
    beta, alpha = 0.5, 0.1
    dpo = _population_optimum(beta, lambda lw, ll: None)
    rdpo = _population_optimum(beta, lambda lw, ll: length_offset(lw, ll, alpha))
    # The sign seed 004 Eq. (56) and seed 001 Eq. (46) print:
    printed_sign = _population_optimum(beta, lambda lw, ll: -length_offset(lw, ll, alpha))

    # π* ∝ π_ref exp((r − α|y|)/β), solved in closed form (uniform π_ref).
    assert_close(dpo, torch.softmax(TOY_REWARDS / beta, 0), atol=1e-6, rtol=0)
    assert_close(rdpo, torch.softmax((TOY_REWARDS - alpha * TOY_LENGTHS) / beta, 0), atol=1e-6, rtol=0)
    assert_close(
        printed_sign, torch.softmax((TOY_REWARDS + alpha * TOY_LENGTHS) / beta, 0), atol=1e-6, rtol=0
    )

    def expected_length(policy: torch.Tensor) -> float:
        return (policy * TOY_LENGTHS).sum().item()

    assert expected_length(rdpo) < expected_length(dpo) - 0.5  # 7.08 < 8.14
    assert expected_length(printed_sign) > expected_length(dpo) + 0.5  # 8.84: the printed sign rewards length


def test_odpo_offset_transforms() -> None:
    chosen, rejected = f64([3.0, 1.0]), f64([1.0, 2.0])
    assert_close(odpo_offset(chosen, rejected, 2.0, transform="identity"), f64([4.0, -2.0]))
    assert_close(odpo_offset(chosen, rejected, 2.0), f64([2.0 * math.log(1.0 + 2.0), 0.0]))
    with pytest.raises(ValueError, match="transform"):
        odpo_offset(chosen, rejected, 2.0, transform="log")


def test_fdpo_reverse_kl_is_dpo() -> None:
    assert_close(fdpo_loss(f64(CHOSEN), f64(REJECTED), BETA), dpo_loss(f64(CHOSEN), f64(REJECTED), BETA))


@pytest.mark.parametrize(
    ("divergence", "f_prime"),
    [
        ("forward_kl", lambda u: -1.0 / u),
        ("js", lambda u: math.log(2.0 * u / (1.0 + u))),
        ("alpha", lambda u: (1.0 - u**-0.5) / 0.5),
    ],
)
def test_fdpo_by_hand(divergence: str, f_prime) -> None:
    expected = [
        -log_sigmoid(BETA * (f_prime(math.exp(c)) - f_prime(math.exp(r))))
        for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    losses = fdpo_loss(f64(CHOSEN), f64(REJECTED), BETA, divergence=divergence, alpha=0.5)
    assert_close(losses, f64(expected))


def test_fdpo_alpha_limits() -> None:
    chosen, rejected = f64(CHOSEN), f64(REJECTED)
    forward = fdpo_loss(chosen, rejected, BETA, divergence="forward_kl")
    assert_close(fdpo_loss(chosen, rejected, BETA, divergence="alpha", alpha=1.0), forward)
    reverse = fdpo_loss(chosen, rejected, BETA, divergence="reverse_kl")
    assert_close(
        fdpo_loss(chosen, rejected, BETA, divergence="alpha", alpha=1e-6), reverse, rtol=0, atol=1e-6
    )


def test_fdpo_js_is_finite_for_extreme_logratios() -> None:
    chosen = torch.tensor([200.0, -200.0])
    rejected = torch.tensor([-200.0, 200.0])
    losses = fdpo_loss(chosen, rejected, 1.0, divergence="js")
    # log(2u/(1+u)) -> log 2 for u -> ∞ and -> log 2 + log u for u -> 0.
    expected = [-log_sigmoid(math.log(2.0) - (math.log(2.0) - 200.0)), -log_sigmoid(-200.0)]
    assert torch.isfinite(losses).all()
    assert_close(losses, torch.tensor(expected, dtype=torch.float32))


def test_fdpo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"divergence.*reverse_kl.*forward_kl.*js.*alpha"):
        fdpo_loss(f64(CHOSEN), f64(REJECTED), BETA, divergence="hellinger")
    with pytest.raises(ValueError, match="alpha"):
        fdpo_loss(f64(CHOSEN), f64(REJECTED), BETA, divergence="alpha", alpha=0.0)


def test_dpop_by_hand() -> None:
    lam = 50.0
    # Chosen above reference: no penalty, DPO. Chosen 2 nats below reference: βh − βλ·2.
    losses = dpop_loss(f64([0.5, -2.0]), f64([-0.5, -3.0]), BETA, lam)
    assert_close(losses, f64([-log_sigmoid(BETA * 1.0), -log_sigmoid(BETA * (1.0 - lam * 2.0))]))
    with pytest.raises(ValueError, match="lam"):
        dpop_loss(f64([0.0]), f64([0.0]), BETA, -1.0)


def test_kto_by_hand_and_reference_point_has_no_gradient() -> None:
    logratios = f64([0.3, -0.2, 0.5])
    desirable = torch.tensor([True, False, False])
    kl = f64(0.1).requires_grad_()
    losses = kto_loss(logratios, desirable, kl, beta=2.0, desirable_weight=1.5, undesirable_weight=0.7)
    expected = [
        1.5 * (1.0 - sigmoid(2.0 * (0.3 - 0.1))),
        0.7 * (1.0 - sigmoid(2.0 * (0.1 + 0.2))),
        0.7 * (1.0 - sigmoid(2.0 * (0.1 - 0.5))),
    ]
    assert_close(losses, f64(expected))
    assert not losses.requires_grad
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(logratios, desirable, kl, beta=2.0, undesirable_weight=-1.0)


def test_kto_kl_estimate_clamps_and_detaches() -> None:
    assert kto_kl_estimate(f64([-1.0, 0.5])).item() == 0.0
    estimate = kto_kl_estimate(f64([0.2, 0.4]).requires_grad_())
    assert estimate.item() == pytest.approx(0.3)
    assert not estimate.requires_grad


def test_kto_kl_estimate_averages_over_processes_before_clamping() -> None:
    # This process's mean is +2; with another process at −5 the batch mean is −1.5, so z = 0, not mean(2, 0) = 1.
    other_process_mean = -5.0
    estimate = kto_kl_estimate(f64([1.0, 3.0]), mean_over_processes=lambda m: (m + other_process_mean) / 2)
    assert estimate.item() == 0.0


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.7, 0.9, 0.999])
def test_log_odds_matches_math(p: float) -> None:
    assert log_odds(f64([math.log(p)])).item() == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


def test_log_odds_near_one_is_finite_and_accurate() -> None:
    logps = f64([-1e-10, 0.0]).requires_grad_()
    values = log_odds(logps)
    assert values[0].item() == pytest.approx(-1e-10 - math.log(-math.expm1(-1e-10)), rel=1e-9)
    assert torch.isfinite(values).all()
    values.sum().backward()
    assert torch.isfinite(logps.grad).all()


def test_orpo_by_hand() -> None:
    lam = 0.5
    p_w, p_l = 0.6, 0.3
    odds_ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    expected = -math.log(p_w) - lam * log_sigmoid(odds_ratio)
    assert orpo_loss(f64([math.log(p_w)]), f64([math.log(p_l)]), lam).item() == pytest.approx(expected)


def test_simpo_and_cpo_by_hand() -> None:
    assert simpo_loss(f64([-0.5]), f64([-1.0]), 2.0, 0.5).item() == pytest.approx(
        -log_sigmoid(2.0 * 0.5 - 0.5)
    )
    assert cpo_loss(f64([-3.0]), f64([-5.0]), 0.1).item() == pytest.approx(-log_sigmoid(0.2) + 3.0)
    custom = cpo_loss(f64([-3.0]), f64([-5.0]), 0.1, lam=2.0, chosen_nll=f64([0.7]))
    assert custom.item() == pytest.approx(-log_sigmoid(0.2) + 2.0 * 0.7)


def test_mallows_dispersion_by_hand() -> None:
    vocab = 100
    entropies = f64([[1.0, 2.0, 3.0, 9.0], [math.log(vocab)] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    dispersion = mallows_dispersion(entropies, mask, vocab)
    # Maximal entropy (uniform reference) is maximal dispersion: φ = 0.
    assert_close(dispersion, f64([-math.log(2.0 / math.log(vocab)), 0.0]))


def test_mallows_dispersion_concatenated_pair_is_seed_pair_average() -> None:
    vocab = 50
    h_w, h_l = [0.4, 1.2, 2.0], [0.8, 0.1, 3.3]
    pair_average = 0.5 * sum(hw + hl for hw, hl in zip(h_w, h_l, strict=True)) / len(h_w)
    dispersion = mallows_dispersion(f64([h_w + h_l]), torch.ones(1, 6), vocab)
    assert dispersion.item() == pytest.approx(-math.log(pair_average / math.log(vocab)))
    with pytest.raises(ValueError, match="vocab_size"):
        mallows_dispersion(f64([h_w]), torch.ones(1, 3), 1)


def test_mallows_dpo_by_hand() -> None:
    losses = mallows_dpo_loss(f64([1.0, 1.0]), f64([0.0, 0.0]), BETA, f64([0.5, 2.0]))
    assert_close(losses, f64([-log_sigmoid(0.5 * BETA), -log_sigmoid(2.0 * BETA)]))


def test_beta_dpo_controller_hand_walk_and_resume() -> None:
    controller = BetaDPOController(beta0=0.1, alpha=0.5, momentum=0.9)
    assert controller.beta(torch.tensor([1.0, 3.0])) == pytest.approx(0.1 * (1 + 0.5 * (2.0 - 0.0)))
    assert controller.m0 == pytest.approx(0.1 * 2.0)
    assert controller.beta(torch.tensor([-1.0])) == pytest.approx(0.1 * (1 + 0.5 * (-1.0 - 0.2)))
    assert controller.m0 == pytest.approx(0.9 * 0.2 + 0.1 * -1.0)

    state = controller.state_dict()
    assert isinstance(state["m0"], float)
    resumed = BetaDPOController(beta0=0.1, alpha=0.5, momentum=0.9)
    resumed.load_state_dict(state)
    margins = torch.tensor([-10.0, -10.0])
    assert resumed.beta(margins) == controller.beta(margins) == pytest.approx(1e-3)  # clamped at min_beta
    assert resumed.state_dict() == controller.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"beta0": 0.0}, "beta0"), ({"momentum": 1.0}, "momentum"), ({"min_beta": 0.0}, "min_beta")],
)
def test_beta_dpo_controller_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BetaDPOController(**{"beta0": 0.1, "alpha": 0.5, **kwargs})


POLICY_W, POLICY_L = f64([-12.0, -30.0, -8.0]), f64([-15.0, -22.0, -9.5])
REF_W, REF_L = f64([-13.0, -28.0, -8.5]), f64([-14.0, -25.0, -9.0])
LEN_W, LEN_L = torch.tensor([6, 15, 4]), torch.tensor([10, 11, 5])


def composed(**kwargs) -> torch.Tensor:
    return composed_preference_loss(
        POLICY_W, POLICY_L, REF_W, REF_L, LEN_W, LEN_L, **{"beta": BETA, **kwargs}
    )


def test_composed_reduces_to_dpo_ipo_hinge() -> None:
    chosen, rejected = POLICY_W - REF_W, POLICY_L - REF_L
    assert_close(composed(), dpo_loss(chosen, rejected, BETA))
    assert_close(composed(loss_type="ipo"), ipo_loss(chosen, rejected, BETA))
    assert_close(composed(loss_type="hinge"), hinge_loss(chosen, rejected, BETA))
    assert_close(
        composed(offset=0.2, label_smoothing=0.1),
        dpo_loss(chosen, rejected, BETA, label_smoothing=0.1, offset=0.2),
    )


def test_composed_reduces_to_simpo() -> None:
    beta, simpo_gamma = 2.0, 1.0
    losses = composed(beta=beta, ref_mix_alpha=0.0, length_normalize=True, gamma=simpo_gamma / beta)
    assert_close(losses, simpo_loss(POLICY_W / LEN_W, POLICY_L / LEN_L, beta, simpo_gamma))


def test_composed_reduces_to_mallows_dpo() -> None:
    dispersion = f64([0.3, 1.0, 2.5])
    expected = mallows_dpo_loss(POLICY_W - REF_W, POLICY_L - REF_L, BETA, dispersion)
    assert_close(composed(dispersion=dispersion), expected)


def test_composed_reference_mixing_by_hand() -> None:
    alpha, gamma = 0.25, 0.4
    expected = []
    for pw, pl, rw, rl, lw, ll in zip(
        POLICY_W.tolist(),
        POLICY_L.tolist(),
        REF_W.tolist(),
        REF_L.tolist(),
        LEN_W.tolist(),
        LEN_L.tolist(),
        strict=True,
    ):
        # log π_α = α log π_ref + (1 − α) log π_γ; per token, π_γ's chosen-minus-rejected log-ratio is γ.
        margin = (pw / lw - pl / ll) - alpha * (rw / lw - rl / ll) - (1 - alpha) * gamma
        expected.append(-log_sigmoid(BETA * margin))
    losses = composed(ref_mix_alpha=alpha, gamma=gamma, length_normalize=True)
    assert_close(losses, f64(expected))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"loss_type": "exponential"}, "loss_type"),
        ({"ref_mix_alpha": 1.5, "length_normalize": True}, "ref_mix_alpha"),
        ({"ref_mix_alpha": 0.5}, "ref_mix_alpha"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_composed_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        composed(**kwargs)


def test_preference_metrics() -> None:
    chosen = f64([1.0, 0.0, 3.0]).requires_grad_()
    rejected = f64([0.5, 1.0, 3.0])
    metrics = preference_metrics(chosen, rejected)
    assert metrics["rewards/accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["rewards/margin"].item() == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert metrics["rewards/chosen"].item() == pytest.approx(4 / 3)
    assert metrics["rewards/rejected"].item() == pytest.approx(1.5)
    assert not any(value.requires_grad for value in metrics.values())


# ------------------------------------------------------------------------ trl 1.16's other loss types


def dpo_by_hand(z: float) -> float:
    return -log_sigmoid(z)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_by_hand(eps: float) -> None:
    expected = [
        ((1 - eps) * dpo_by_hand(BETA * h) - eps * dpo_by_hand(-BETA * h)) / (1 - 2 * eps) for h in MARGINS
    ]
    assert_close(robust_dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, eps), f64(expected))


def test_robust_is_unbiased_under_label_flips() -> None:
    # A pair whose label flips with probability ε: the mean of the rDPO loss over the flip is the clean DPO loss.
    eps = 0.2
    observed = robust_dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, eps)
    flipped = robust_dpo_loss(f64(REJECTED), f64(CHOSEN), BETA, eps)
    assert_close((1 - eps) * observed + eps * flipped, dpo_loss(f64(CHOSEN), f64(REJECTED), BETA))
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(f64(CHOSEN), f64(REJECTED), BETA, 0.5)


def test_bco_pair_by_hand() -> None:
    delta = 0.05
    expected = [
        -log_sigmoid(BETA * c - delta) - log_sigmoid(-(BETA * r - delta))
        for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    assert_close(bco_pair_loss(f64(CHOSEN), f64(REJECTED), BETA, delta), f64(expected))


def test_bco_reward_shift_is_the_mean_of_batch_means_and_resumes() -> None:
    shift = BCORewardShift()
    assert shift.update(torch.tensor([1.0])) == pytest.approx(1.0)  # the current batch counts
    assert shift.update(torch.tensor([3.0, -1.0])) == pytest.approx((1.0 + 3.0 - 1.0) / 3)  # two processes
    resumed = BCORewardShift()
    resumed.load_state_dict(shift.state_dict())
    assert resumed.update(torch.tensor([5.0])) == shift.update(torch.tensor([5.0])) == pytest.approx(8.0 / 4)
    assert resumed.state_dict() == shift.state_dict() == {"delta": 2.0, "count": 4}


def test_sppo_hard_by_hand_and_its_minimum() -> None:
    beta = 0.25
    expected = [(c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2 for c, r in zip(CHOSEN, REJECTED, strict=True)]
    assert_close(sppo_hard_loss(f64(CHOSEN), f64(REJECTED), beta), f64(expected))
    # Minimised at log-ratios ±η/2 = ±1/(2β): the win probabilities 1 and 0 minus 1/2, scaled by η = 1/β.
    assert sppo_hard_loss(f64([2.0]), f64([-2.0]), beta).item() == 0.0


def test_nca_pair_by_hand() -> None:
    expected = [
        -log_sigmoid(BETA * c) - 0.5 * log_sigmoid(-BETA * c) - 0.5 * log_sigmoid(-BETA * r)
        for c, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    assert_close(nca_pair_loss(f64(CHOSEN), f64(REJECTED), BETA), f64(expected))


def test_apo_zero_and_down_by_hand() -> None:
    pairs = list(zip(CHOSEN, REJECTED, strict=True))
    zero = [(1 - sigmoid(BETA * c)) + sigmoid(BETA * r) for c, r in pairs]
    down = [sigmoid(BETA * c) + (1 - sigmoid(BETA * (c - r))) for c, r in pairs]
    assert_close(apo_zero_loss(f64(CHOSEN), f64(REJECTED), BETA), f64(zero))
    assert_close(apo_down_loss(f64(CHOSEN), f64(REJECTED), BETA), f64(down))


def test_apo_zero_raises_chosen_and_apo_down_lowers_it() -> None:
    chosen, rejected = f64([0.5]).requires_grad_(), f64([-0.5]).requires_grad_()
    apo_zero_loss(chosen, rejected, 1.0).sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises y_w, lowers y_l
    chosen.grad = rejected.grad = None
    apo_down_loss(chosen, rejected, 1.0).sum().backward()
    assert chosen.grad.item() > 0 and rejected.grad.item() > 0  # descent lowers both
    assert rejected.grad.item() > chosen.grad.item()  # the rejected one more


def test_exo_pair_is_the_reverse_kl_of_two_point_distributions() -> None:
    eps = 1e-3
    expected = []
    for c, r in zip(CHOSEN, REJECTED, strict=True):
        weights = [math.exp(BETA * c), math.exp(BETA * r)]
        q = [w / sum(weights) for w in weights]  # the policy's softmax over the pair
        p = [1 - eps, eps]  # the labels'
        expected.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True)))
    assert_close(exo_pair_loss(f64(CHOSEN), f64(REJECTED), BETA, eps), f64(expected))
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(f64(CHOSEN), f64(REJECTED), BETA, 0.0)


AOT_POLICY_W, AOT_POLICY_L = [-3.0, -1.0, -7.0, -2.0], [-4.0, -5.0, -6.0, -2.5]
AOT_REF_W, AOT_REF_L = [-3.5, -2.0, -6.0, -1.0], [-3.0, -4.0, -6.5, -2.0]


def test_aot_matches_quantiles_of_policy_and_reference_margins() -> None:
    eps = 0.1
    policy_margins = sorted(w - lo for w, lo in zip(AOT_POLICY_W, AOT_POLICY_L, strict=True))
    ref_margins = sorted(w - lo for w, lo in zip(AOT_REF_W, AOT_REF_L, strict=True))
    expected = [
        -(1 - eps) * log_sigmoid(BETA * (m - q)) - eps * log_sigmoid(-BETA * (m - q))
        for m, q in zip(policy_margins, ref_margins, strict=True)
    ]
    losses = aot_loss(f64(AOT_POLICY_W), f64(AOT_POLICY_L), f64(AOT_REF_W), f64(AOT_REF_L), BETA, eps)
    assert_close(losses, f64(expected))
    order = [2, 0, 3, 1]  # the batch's order does not matter, only its two distributions
    shuffled = aot_loss(
        *(f64([v[k] for k in order]) for v in (AOT_POLICY_W, AOT_POLICY_L, AOT_REF_W, AOT_REF_L)), BETA, eps
    )
    assert_close(shuffled, losses)


def test_aot_unpaired_matches_sorted_chosen_and_rejected() -> None:
    chosen = [w - r for w, r in zip(AOT_POLICY_W, AOT_REF_W, strict=True)]
    rejected = [w - r for w, r in zip(AOT_POLICY_L, AOT_REF_L, strict=True)]
    expected = [-log_sigmoid(BETA * (c - r)) for c, r in zip(sorted(chosen), sorted(rejected), strict=True)]
    assert_close(aot_unpaired_loss(f64(chosen), f64(rejected), BETA), f64(expected))


def test_discopop_by_hand() -> None:
    tau = 0.05
    expected = []
    for h in MARGINS:
        rho = BETA * h
        mix = sigmoid(rho / tau)
        expected.append((1 - mix) * -log_sigmoid(rho) + mix * math.exp(-rho))
    assert_close(discopop_loss(f64(CHOSEN), f64(REJECTED), BETA, tau), f64(expected))


def test_discopop_is_finite_where_exp_overflows() -> None:
    # ρ = −200: exp(200) overflows float32, but σ(ρ/τ) exp(−ρ) = exp(−4000 + 200) ≈ 0; the loss is −log σ(−200).
    losses = discopop_loss(torch.tensor([-200.0]), torch.tensor([0.0]), 1.0, 0.05)
    assert torch.isfinite(losses).all()
    assert losses.item() == pytest.approx(200.0)
    with pytest.raises(ValueError, match="tau"):
        discopop_loss(f64(CHOSEN), f64(REJECTED), BETA, 0.0)
