"""The preference-loss registry, the `algorithm:` keys that select a loss (mmalign's and trl's), and their checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mmalign.core.config import RecipeError, to_dataclass
from mmalign.objectives import preference as P
from mmalign.train.online import OnlineDPO, OnlineDPOConfig
from mmalign.train.preference import TRL_LOSS_TYPES, PreferenceConfig

# Parameters some losses need to be given (no default): the rest use the loss's defaults.
REQUIRED = {"rdpo": {"alpha": 0.05}, "odpo": {"alpha": 1.0}, "beta_dpo": {"alpha": 0.5}}

# trl 1.16 DPOTrainer's loss types, as listed by its "Unknown loss type" error.
TRL_1_16_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


def config(name: str, **kwargs) -> PreferenceConfig:
    return PreferenceConfig(loss=name, **{**REQUIRED.get(name, {}), **kwargs})


# ----------------------------------------------------------------------------------------- the one list


def test_every_registered_loss_is_a_valid_config_loss() -> None:
    for name in P.PREFERENCE_LOSSES:
        assert config(name).loss == name
    with pytest.raises(ValueError, match=r"algorithm\.loss must be one of dpo, ipo, hinge, robust.*rainbow"):
        PreferenceConfig(loss="banana")


def test_every_trl_loss_type_maps_to_a_registered_loss() -> None:
    assert set(TRL_1_16_LOSS_TYPES) - set(TRL_LOSS_TYPES) == {"sft"}  # sft is its own algorithm in mmalign
    for trl_name, (loss, _) in TRL_LOSS_TYPES.items():
        assert loss in P.PREFERENCE_LOSSES, trl_name
        assert PreferenceConfig(loss_type=trl_name).loss == loss


# ------------------------------------------------------------------------------------------ wiring
B = 4
SC, SR = torch.tensor([-6.0, -11.0, -4.0, -9.0]), torch.tensor([-7.5, -10.0, -6.0, -8.0])
RC, RR = torch.tensor([-6.5, -10.0, -5.0, -8.5]), torch.tensor([-7.0, -10.5, -5.5, -8.0])
CL, RL = torch.tensor([3.0, 5.0, 2.0, 4.0]), torch.tensor([4.0, 4.0, 3.0, 5.0])
SCORE_DIFF = torch.tensor([0.5, 2.0, 0.0, 1.0])
ENTROPIES = torch.tensor([[1.0, 2.0, 0.0, 1.5, 0.5, 0.0]] * B)
ENTROPY_MASK = torch.tensor([[1, 1, 0, 1, 1, 0]] * B)
VOCAB = 50


def pair_scores(chosen=SC, rejected=SR, reference=True) -> P.PairScores:
    return P.PairScores(
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_lengths=CL,
        rejected_lengths=RL,
        ref_chosen_logps=RC if reference else None,
        ref_rejected_logps=RR if reference else None,
        score_diff=SCORE_DIFF,
        ref_entropies=ENTROPIES,
        entropy_mask=ENTROPY_MASK,
        vocab_size=VOCAB,
    )


def direct(name: str, p: PreferenceConfig) -> torch.Tensor:
    """Each loss called on the inputs its paper defines, spelled out here rather than read from PairScores."""
    n_c, n_r = (CL, RL) if p.length_normalize else (1.0, 1.0)
    lc, lr = (SC - RC) / n_c, (SR - RR) / n_r  # log-ratios
    mean_c, mean_r = SC / CL, SR / RL  # per-token log-probs (ORPO, SimPO)
    phi = -torch.log(torch.tensor([(1.0 + 2.0 + 1.5 + 0.5) / 4 / math.log(VOCAB)] * B))
    calls = {
        "dpo": lambda: P.dpo_loss(lc, lr, p.beta, p.label_smoothing),
        "ipo": lambda: P.ipo_loss(lc, lr, p.beta),
        "hinge": lambda: P.hinge_loss(lc, lr, p.beta),
        "robust": lambda: P.robust_dpo_loss(lc, lr, p.beta, p.label_smoothing),
        "bco_pair": lambda: P.bco_pair_loss(lc, lr, p.beta, p.beta * torch.cat([lc, lr]).mean()),
        "sppo_hard": lambda: P.sppo_hard_loss(lc, lr, p.beta),
        "nca_pair": lambda: P.nca_pair_loss(lc, lr, p.beta),
        "apo_zero": lambda: P.apo_zero_loss(lc, lr, p.beta),
        "apo_down": lambda: P.apo_down_loss(lc, lr, p.beta),
        "exo_pair": lambda: P.exo_pair_loss(lc, lr, p.beta, p.label_smoothing),
        "aot": lambda: P.aot_loss(SC / n_c, SR / n_r, RC / n_c, RR / n_r, p.beta, p.label_smoothing),
        "aot_unpaired": lambda: P.aot_unpaired_loss(lc, lr, p.beta, p.label_smoothing),
        "discopop": lambda: P.discopop_loss(lc, lr, p.beta, p.tau),
        "rdpo": lambda: P.dpo_loss(lc, lr, p.beta, offset=p.alpha * (RL - CL)),
        "odpo": lambda: P.dpo_loss(lc, lr, p.beta, offset=p.alpha * torch.log1p(SCORE_DIFF)),
        "fdpo": lambda: P.fdpo_loss(lc, lr, p.beta, p.divergence, p.alpha),
        "dpop": lambda: P.dpop_loss(lc, lr, p.beta, p.lam),
        "beta_dpo": lambda: P.dpo_loss(lc, lr, p.beta * (1 + p.alpha * p.beta * (lc - lr).mean().item())),
        "mallows": lambda: P.mallows_dpo_loss(lc, lr, p.beta, phi),
        "orpo": lambda: P.orpo_loss(mean_c, mean_r, p.lam),
        "simpo": lambda: P.simpo_loss(mean_c, mean_r, p.beta, p.gamma),
        "cpo": lambda: P.cpo_loss(SC / n_c, SR / n_r, p.beta, p.lam),
        "rainbow": lambda: P.composed_preference_loss(
            SC, SR, RC, RR, CL, RL, beta=p.beta, length_normalize=p.length_normalize, gamma=p.gamma
        ),
    }
    assert set(calls) == set(P.PREFERENCE_LOSSES)
    return calls[name]()


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("name", list(P.PREFERENCE_LOSSES))
def test_registry_entry_feeds_its_loss_the_right_scores(name: str, length_normalize: bool) -> None:
    p = config(name, beta=0.7, length_normalize=length_normalize)
    entry = P.PREFERENCE_LOSSES[name]
    state = entry.state(p) if entry.state else None
    losses, _ = entry.fn(pair_scores(reference=entry.needs_reference), p, state)
    assert losses.shape == (B,)
    assert_close(losses, direct(name, p))


def margin_after_one_step(
    name: str, chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.5
) -> float:
    """Mean log π(y_w) − log π(y_l) after one gradient step of the loss on free policy scores."""
    p = config(name, beta=beta)
    entry = P.PREFERENCE_LOSSES[name]
    chosen, rejected = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    state = entry.state(p) if entry.state else None
    losses, _ = entry.fn(pair_scores(chosen, rejected, entry.needs_reference), p, state)
    losses.mean().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    step = 0.1
    return ((chosen - step * chosen.grad) - (rejected - step * rejected.grad)).mean().item()


@pytest.mark.parametrize("name", [n for n in P.PREFERENCE_LOSSES if n != "discopop"])
def test_every_loss_widens_the_margin_from_the_reference(name: str) -> None:
    """One gradient step from π_θ = π_ref raises log π(y_w) − log π(y_l) on average (the margin of ORPO, SimPO and
    CPO, which have no reference, starts from the same scores)."""
    before = (RC - RR).mean().item()
    assert margin_after_one_step(name, RC, RR) > before + 1e-4


def test_discopop_is_non_convex_around_a_zero_margin() -> None:
    """At ρ = 0 DiscoPOP's gradient lowers the margin (towards its local minimum near ρ ≈ −0.1 for τ = 0.05);
    past its bump (ρ ≈ 0.07) it raises it like DPO."""
    at_reference = (RC - RR).mean().item()
    assert margin_after_one_step("discopop", RC, RR, beta=1.0) < at_reference - 1e-4
    ahead = RC + 1.0  # every margin ρ = βh = 1, past the bump
    before = (ahead - RR).mean().item()
    assert margin_after_one_step("discopop", ahead, RR, beta=1.0) > before + 1e-4


def test_stateful_losses_report_and_checkpoint_their_state() -> None:
    for name, key in (("beta_dpo", "beta"), ("bco_pair", "delta")):
        p = config(name)
        entry = P.PREFERENCE_LOSSES[name]
        state = entry.state(p)
        _, metrics = entry.fn(pair_scores(), p, state)
        assert set(metrics) == {key}
        resumed = entry.state(p)
        resumed.load_state_dict(state.state_dict())
        assert resumed.state_dict() == state.state_dict()
        assert entry.fn(pair_scores(), p, resumed)[1][key] == entry.fn(pair_scores(), p, state)[1][key]


def test_entropies_are_needed_by_mallows_and_by_rainbow_with_mallows() -> None:
    needing = {n for n, e in P.PREFERENCE_LOSSES.items() if e.entropies_needed(config(n))}
    assert needing == {"mallows"}
    assert P.PREFERENCE_LOSSES["rainbow"].entropies_needed(config("rainbow", mallows=True))
    assert {n for n, e in P.PREFERENCE_LOSSES.items() if not e.per_pair} == {"aot", "aot_unpaired"}


# ------------------------------------------------------------------------------------ recipe keys


@pytest.mark.parametrize(
    ("trl_name", "loss", "length_normalize"),
    [
        ("sigmoid", "dpo", False),
        ("sigmoid_norm", "dpo", True),
        ("ipo", "ipo", True),
        ("robust", "robust", False),
    ],
)
def test_trl_loss_type_is_an_alias(trl_name: str, loss: str, length_normalize: bool) -> None:
    cfg = PreferenceConfig(loss_type=trl_name)
    assert (cfg.loss, cfg.length_normalize) == (loss, length_normalize)
    assert PreferenceConfig(loss=loss, loss_type=trl_name).loss == loss  # both given and agreeing


def test_trl_loss_type_that_disagrees_or_is_unknown_is_named() -> None:
    with pytest.raises(ValueError, match=r"algorithm\.loss_type 'ipo'.*disagrees with algorithm\.loss 'dpo'"):
        PreferenceConfig(
            loss="dpo", loss_type="ipo"
        )  # what `name: dpo` + `--set algorithm.loss_type=ipo` gives
    with pytest.raises(
        ValueError, match=r"algorithm\.loss_type must be one of trl's loss types sigmoid.*'banana'"
    ):
        PreferenceConfig(loss_type="banana")
    with pytest.raises(ValueError, match="algorithm sft"):
        PreferenceConfig(loss_type="sft")
    with pytest.raises(RecipeError, match=r"algorithm\.loss_type"):
        to_dataclass(PreferenceConfig, {"loss_type": "banana"}, "algorithm")


def test_trl_keys_with_another_mmalign_name_are_named() -> None:
    assert PreferenceConfig(loss="discopop", discopop_tau=0.1).tau == 0.1
    with pytest.raises(ValueError, match="disagree"):
        PreferenceConfig(loss="discopop", discopop_tau=0.1, tau=0.2)
    for key, value, ours in (
        ("f_divergence_type", "js_divergence", r"algorithm\.divergence"),
        ("f_alpha_divergence_coef", 0.3, r"alpha = 1 - c"),
        ("precompute_ref_log_probs", True, r"algorithm\.precompute_reference"),
    ):
        with pytest.raises(ValueError, match=ours):
            PreferenceConfig(loss="fdpo", **{key: value})


def test_per_loss_defaults_and_explicit_values() -> None:
    assert PreferenceConfig(loss="fdpo").alpha == 0.5
    assert PreferenceConfig(loss="fdpo", alpha=0.0).alpha == 0.0  # kept (reverse_kl does not read it)
    with pytest.raises(ValueError, match=r"algorithm\.alpha must be > 0 for divergence 'alpha', got 0\.0"):
        PreferenceConfig(loss="fdpo", divergence="alpha", alpha=0.0)  # not silently 0.5
    assert PreferenceConfig(loss="exo_pair").label_smoothing == 1e-3
    assert PreferenceConfig(loss="dpo").label_smoothing == 0.0
    assert PreferenceConfig(loss="discopop").tau == 0.05
    assert PreferenceConfig(loss="ipo").alpha is None
    with pytest.raises(ValueError, match=r"algorithm\.alpha is required for loss 'rdpo'"):
        PreferenceConfig(loss="rdpo")
    with pytest.raises(ValueError, match=r"algorithm\.alpha is not read by loss 'dpo'"):
        PreferenceConfig(loss="dpo", alpha=0.1)
    with pytest.raises(ValueError, match=r"algorithm\.label_smoothing is not read by loss 'ipo'"):
        PreferenceConfig(loss="ipo", label_smoothing=0.1)
    assert PreferenceConfig(loss="ipo", label_smoothing=0.0).loss == "ipo"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 0.0}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
        ({"loss": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss": "exo_pair", "label_smoothing": 0.0}, "label_smoothing"),
        ({"loss": "beta_dpo", "alpha": 0.0}, "alpha"),
        ({"loss": "rdpo", "alpha": -0.1}, "alpha"),
        ({"loss": "odpo", "alpha": 1.0, "offset_transform": "log"}, "offset_transform"),
        ({"loss": "fdpo", "divergence": "hellinger"}, "divergence"),
        ({"loss": "dpop", "lam": -1.0}, "lam"),
        ({"loss": "simpo", "gamma": math.inf}, "gamma"),
        ({"loss": "discopop", "tau": 0.0}, "tau"),
        ({"loss": "rainbow", "rainbow_shape": "exponential"}, "rainbow_shape"),
        ({"loss": "rainbow", "ref_mix_alpha": 0.5}, "ref_mix_alpha"),
        ({"loss": "rainbow", "ref_mix_alpha": 1.5, "length_normalize": True}, "ref_mix_alpha"),
        ({"loss": "rainbow", "rainbow_shape": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_out_of_range_values_are_named_before_training(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"algorithm\.{field}"):
        PreferenceConfig(**kwargs)


def test_online_dpo_names_an_unknown_preference_key() -> None:
    with pytest.raises(RecipeError, match=r"algorithm\.preference\.bogus"):
        OnlineDPO(None, [], None, OnlineDPOConfig(preference={"loss": "dpo", "bogus": 1}))
    with pytest.raises(RecipeError, match=r"algorithm\.preference.*beta must be > 0"):
        OnlineDPO(None, [], None, OnlineDPOConfig(preference={"beta": -1}))
    with pytest.raises(RecipeError, match=r"algorithm\.preference\.loss 'aot' sorts the batch"):
        OnlineDPO(None, [], None, OnlineDPOConfig(preference={"loss": "aot"}))
    assert (
        OnlineDPO(None, [], None, OnlineDPOConfig(preference={"loss_type": "ipo"})).preference.config.loss
        == "ipo"
    )
