"""Which denoising steps decide the reward: the basis of the speech recipes' `train_step_range`.

For each sampled trajectory and each step k, the rest of the trajectory is sampled again `--repeats` times from
the recorded x_k (fresh noise for steps k, k+1, …). V_k = E[Var(reward | x_k)] is the reward variance the steps
from k on still decide; step k's share is (V_k − V_{k+1}) / V_0, V_0 the variance left once the initial noise is
drawn. Steps with a small share carry little policy-gradient signal but add the same score-function noise.

    python speech/reward_by_step.py speech/dlpo_digits.yaml [--prompts 40 --repeats 6 --set key=value …]
"""

import argparse
import json

import torch

from mmalign.core.config import load_recipe
from mmalign.core.reward import score
from mmalign.core.sampling import sample_trajectory
from mmalign.run import build_run


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    policy, algorithm, _, _, _ = build_run(load_recipe(args.recipe, args.set))
    policy.module.eval()
    prompts = [row.data["prompt"] for row in algorithm.prompts][: args.prompts]
    generator = torch.Generator().manual_seed(0)
    trajectory = policy.sample(prompts, generator=generator, record=True)
    conditioning, timesteps = trajectory.conditioning, trajectory.timesteps

    def finish(x: torch.Tensor, k: int) -> torch.Tensor:
        predict = lambda x, t: policy.predict(x, t, conditioning)  # noqa: E731
        return sample_trajectory(predict, policy.sampler, x, generator=generator, record=False, start=k).final

    left = []  # V_k for k = 0 … n−1
    for k in range(len(timesteps)):
        rewards = torch.stack(
            [
                score(algorithm.reward, prompts, policy.decode(finish(trajectory.latents[:, k], k))).float()
                for _ in range(args.repeats)
            ]
        )
        left.append(rewards.var(0).mean().item())
    left.append(0.0)
    shares = [(left[k] - left[k + 1]) / left[0] for k in range(len(timesteps))]
    print(
        json.dumps(
            {
                "variance_after_initial_noise": round(left[0], 4),
                "share_decided_by_step": [round(s, 3) for s in shares],
                "prompts": len(prompts),
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
