"""Held-out metrics for any diffusion policy: rewards and independent judges, win rate over the base model, KL to
the base, and the reward-hacking gap between the training reward and a judge."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward, score
from mmalign.core.types import Trajectory
from mmalign.objectives.diffusion import gaussian_kl


class DiffusionEvaluator:
    """Samples every held-out prompt with fixed seeds and reports, over `n_prompts × seeds` outputs (images, mels,
    waveforms; "image" below):

    - `<reward>`: the mean of each reward (a reward with an `agreement` method also reports it, e.g. the digit
      classifier's share of images showing the prompted digit);
    - `<reward>_agreement_gain` and `<reward>_agreement_gain_se`: the paired change in agreement over the base
      model's image from the same noise, and its standard error (std of the per-image differences / √n);
    - `win_rate_vs_base`: share of (prompt, seed) where the policy's image outscores the base model's image from
      the same initial noise under the first reward (ties count ½; exactly 0.5 for the base itself);
    - `kl_to_base`: mean over images of Σ_steps KL(p_θ(x_{t−1}|x_t) ‖ p_base(x_{t−1}|x_t)) along the policy's own
      trajectories, the KL between the two samplers' path distributions (summed over latent dimensions).

    `judges` are rewards no run trains on (e.g. the digits worlds' independent classifiers, another architecture,
    seed and data split). Each reports the same `<judge>`, `<judge>_agreement`, `<judge>_agreement_gain(_se)` as a
    reward, plus the reward-hacking signal

    - `<judge>_hacking_gap` and `<judge>_hacking_gap_se`: mean over images of the paired difference
      (a_r(policy) − a_r(base)) − (a_j(policy) − a_j(base)), where a_r and a_j are the agreement of the gap reward
      and of the judge with the prompt on the image from the same noise; i.e. the training reward's agreement gain
      minus the judge's, and its standard error (std of the per-image differences / √n). Near 0: the judge sees
      the gain the reward sees; clearly positive: the policy learned what fools the reward, not what the judge
      (and the prompt) asks for. The gap reward is the reward named `trained_on` (the run's algorithm reward), or
      when no reward is named (offline methods, `mmalign eval`) the first reward with an agreement; a named
      training reward without an agreement (e.g. JPEG size) gives no gap.
    """

    def __init__(
        self,
        prompts: Sequence[Row],
        rewards: Sequence[Reward],
        *,
        judges: Sequence[Reward] = (),
        trained_on: str | None = None,
        seeds: int = 4,
        batch_size: int = 32,
        grid_prompts: int = 8,
        kl: bool = True,
        grid_seeds: int = 1,
    ):
        if not rewards:
            raise ValueError("DiffusionEvaluator needs at least one reward")
        names = [r.name for r in [*rewards, *judges]]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rewards and judges need distinct names (their metrics share them): {repeated}")
        self.prompts, self.rewards = [r.data["prompt"] for r in prompts], list(rewards)
        self.judges = list(judges)
        self.gap_reward = self._gap_reward(trained_on)
        self.seeds, self.batch_size, self.grid_prompts, self.kl = seeds, batch_size, grid_prompts, kl
        self.grid_seeds = grid_seeds
        self._base_scores: dict[int, dict[str, torch.Tensor]] = {}

    def _gap_reward(self, trained_on: str | None) -> Reward | None:
        """The reward whose agreement gain the judges are compared with (see the class docstring)."""
        with_agreement = [r for r in self.rewards if hasattr(r, "agreement")]
        if trained_on is None:
            return with_agreement[0] if with_agreement else None
        return next((r for r in with_agreement if r.name == trained_on), None)

    def _jobs(self) -> list[tuple[str, int]]:
        return [(p, s) for s in range(self.seeds) for p in self.prompts]

    def _images(
        self, policy: Any, jobs: list[tuple[str, int]], *, kl: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images for (prompt, seed) jobs, each from its own seeded noise; plus the path KL to the base."""
        images, kls = [], []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            generator = torch.Generator().manual_seed(10_000 + start)
            traj = policy.sample([p for p, _ in chunk], generator=generator, record=kl)
            images.append(policy.decode(traj.final).cpu())
            if kl:
                kls.append(self._path_kl(policy, traj))
        return torch.cat(images), (torch.cat(kls) if kl else torch.zeros(len(jobs)))

    @staticmethod
    def _path_kl(policy: DiffusionPolicy, traj: Trajectory) -> torch.Tensor:
        """KL of the path distributions from the recorded step means and the reference's means (same σ)."""
        total = torch.zeros(traj.latents.shape[0])
        for j in range(len(traj.timesteps)):
            if not bool(traj.stochastic[j]):
                continue
            x = traj.latents[:, j]
            with policy.reference():
                ref = policy.sampler.step(policy.predict(x, traj.timesteps[j], traj.conditioning), j, x)
            total += gaussian_kl(traj.means[:, j], ref.mean, ref.std, reduction="sum").cpu()
        return total

    def _scores(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image: each reward's and judge's value, and `<name>_agreement` for those that have one."""
        columns: dict[str, torch.Tensor] = {}
        for reward in [*self.rewards, *self.judges]:
            columns[reward.name] = score(reward, prompts, images).float()
            if hasattr(reward, "agreement"):
                columns[f"{reward.name}_agreement"] = reward.agreement(prompts, images).float()
        return columns

    def evaluate(self, policy: Any) -> dict[str, float]:
        jobs = self._jobs()
        prompts = [p for p, _ in jobs]
        images, kl = self._images(policy, jobs, kl=self.kl)
        if id(policy) not in self._base_scores:  # the reference is frozen: draw and score its images once
            with policy.reference():
                base_images, _ = self._images(policy, jobs, kl=False)
            self._base_scores[id(policy)] = self._scores(prompts, base_images)
        ours, base = self._scores(prompts, images), self._base_scores[id(policy)]
        metrics: dict[str, float] = {}
        gains: dict[str, torch.Tensor] = {}
        for reward in [*self.rewards, *self.judges]:
            metrics[reward.name] = ours[reward.name].mean().item()
            column = f"{reward.name}_agreement"
            if column in ours:
                gains[reward.name] = gain = ours[column] - base[column]
                metrics[column] = ours[column].mean().item()
                metrics[f"{column}_gain"] = gain.mean().item()
                metrics.update(_standard_error(f"{column}_gain_se", gain))
        if self.gap_reward is not None:
            for judge in self.judges:
                if judge.name in gains:
                    gap = gains[self.gap_reward.name] - gains[judge.name]
                    metrics[f"{judge.name}_hacking_gap"] = gap.mean().item()
                    metrics.update(_standard_error(f"{judge.name}_hacking_gap_se", gap))
        first = self.rewards[0].name
        wins = (ours[first] > base[first]).float() + 0.5 * (ours[first] == base[first]).float()
        metrics["win_rate_vs_base"] = wins.mean().item()
        if self.kl:
            metrics["kl_to_base"] = kl.mean().item()
        metrics["n_images"] = len(jobs)
        return metrics

    @torch.no_grad()
    def by_prompt(self, policy: Any) -> list[dict[str, Any]]:
        """One row per held-out prompt over its seeds (the images `evaluate` scores): each reward's and judge's
        mean, its agreement, and for a classifier how often it reads each class, so a whole-set number can be
        traced to the prompts a model still gets wrong."""
        jobs = self._jobs()
        prompts = [p for p, _ in jobs]
        images, _ = self._images(policy, jobs, kl=False)
        columns = self._scores(prompts, images)
        reads = {
            f"{reward.name}_reads": reward.classes(images).cpu()
            for reward in [*self.rewards, *self.judges]
            if hasattr(reward, "classes")
        }
        rows = []
        for prompt in dict.fromkeys(self.prompts):
            mask = torch.tensor([p == prompt for p in prompts])
            row: dict[str, Any] = {"prompt": prompt, "n": int(mask.sum())}
            row.update({name: values[mask].mean().item() for name, values in columns.items()})
            for name, classes in reads.items():
                counts = Counter(classes[mask].tolist()).most_common()
                row[name] = {str(c): n for c, n in counts}
            rows.append(row)
        return rows

    def samples(self, policy: Any) -> list[dict[str, Any]]:
        """The first prompts with `grid_seeds` fixed seeds each, for the report's before/after image grid."""
        jobs = [(p, s) for s in range(self.grid_seeds) for p in self.prompts[: self.grid_prompts]]
        images, _ = self._images(policy, jobs, kl=False)
        return [{"prompt": p, "seed": s, "image": img} for (p, s), img in zip(jobs, images, strict=True)]


def _standard_error(key: str, values: torch.Tensor) -> dict[str, float]:
    """`{key: std / √n}` of per-image values; empty for a single image, whose standard error is undefined."""
    return {key: (values.std() / len(values) ** 0.5).item()} if len(values) > 1 else {}
