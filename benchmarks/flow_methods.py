"""Held-out agreement of flow-world runs against reward-scored samples and training time, from their checkpoints.

Training runs are started with evaluation off (`--set eval.prompts=null`), so their wall time is training alone,
and save a checkpoint every few steps (`--set train.save_every=N --set train.keep_checkpoints=1000`). This script
then evaluates the base model once and every checkpoint of every run on the same held-out prompts and seeds,
sampling with the flow policy's `eval_sampler` (the plain pipeline's ODE), and writes a table, a JSON file and one
plot of agreement against the number of reward-scored samples (rollouts × rollout size):

    .venv/bin/python benchmarks/flow_methods.py runs/flow-grpo runs/flow-grpo-fast runs/flow-nft runs/flow-dpo \
        --out vision/flow_methods

`--reward` names the held-out scorer (default: the world's classifier, `digit_classifier` at
zoo://image-flow/classifier; pass the world's independent judge when it has one, e.g.
`--reward '{name: digit_classifier, path: zoo://image-flow/judge}'`). Training time per checkpoint is the
`elapsed` the trainer stored in it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_REWARD = "{name: digit_classifier, path: zoo://image-flow/classifier}"
EVAL_PROMPTS = "zoo://image-flow/eval_prompts.jsonl"


def _evaluator(recipe: dict, reward: str, seeds: int):
    """The run's policy (base weights) and an agreement evaluator on the held-out prompts, as `mmalign eval` builds."""
    from mmalign.core.config import apply_overrides
    from mmalign.run import build_evaluation

    recipe = apply_overrides(
        recipe,
        [
            f"eval.prompts={EVAL_PROMPTS}",
            f"eval.rewards=[{reward}]",
            f"eval.seeds={seeds}",
            "eval.kl=false",
            "eval.n_samples=1",
        ],
    )
    return build_evaluation(recipe)


def evaluate_run(run_dir: Path, reward: str, seeds: int, base_cache: dict) -> dict:
    import torch

    from mmalign.core.config import load_recipe
    from mmalign.train import checkpoint as ckpt

    recipe = load_recipe(run_dir / "recipe.yaml")
    policy, evaluator = _evaluator(recipe, reward, seeds)
    policy.module.eval()
    name = recipe["model"]["name_or_path"]
    points = []
    with torch.no_grad():
        if name not in base_cache:
            base_cache[name] = evaluator.evaluate(policy)
        points.append({"step": 0, "samples": 0, "train_s": 0.0, **base_cache[name]})
        for path in sorted((run_dir / "checkpoints").glob(f"{ckpt.PREFIX}*")):
            trainer = ckpt.load_state(path, "trainer")
            policy.load_trainable_state_dict(ckpt.load_state(path, "policy"))
            metrics = evaluator.evaluate(policy)
            step = int(trainer["step"])
            samples = math.ceil(step / (recipe.get("train") or {}).get("ppo_epochs", 1)) * (
                (recipe.get("train") or {}).get("batch_size", 32)
            )
            points.append({"step": step, "samples": samples, "train_s": float(trainer["elapsed"]), **metrics})
            print(f"{run_dir.name} step {step}: {metrics}", file=sys.stderr)
    return {"run": str(run_dir), "algorithm": recipe["algorithm"]["name"], "points": points}


def agreement_key(point: dict) -> str:
    return next(k for k in point if k.endswith("_agreement") and not k.endswith("_gain"))


def render(results: list[dict], reward: str) -> str:
    lines = [
        f"Held-out agreement ({reward}; 20 held-out prompts × seeds, ODE sampling) per checkpoint.",
        "",
        "| run | step | reward-scored samples | training s | agreement | gain vs base (± se) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        for p in res["points"]:
            key = agreement_key(p)
            gain = p.get(f"{key}_gain", 0.0)
            se = p.get(f"{key}_gain_se", 0.0)
            lines.append(
                f"| {Path(res['run']).name} | {p['step']} | {p['samples']} | {p['train_s']:.0f} | "
                f"{100 * p[key]:.1f}% | {100 * gain:+.1f} ± {100 * se:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, reward: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        xs = [p["samples"] for p in res["points"]]
        ts = [p["train_s"] / 60 for p in res["points"]]
        ys = [100 * p[agreement_key(p)] for p in res["points"]]
        label = Path(res["run"]).name
        axes[0].plot(xs, ys, marker="o", label=label)
        axes[1].plot(ts, ys, marker="o", label=label)
    axes[0].set_xlabel("reward-scored samples")
    axes[1].set_xlabel("training wall time (min)")
    for ax in axes:
        ax.set_ylabel("held-out agreement (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"flow digits world: held-out agreement ({reward})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (trained with checkpoints)")
    p.add_argument("--reward", default=DEFAULT_REWARD, help="held-out scorer as a recipe reward (YAML)")
    p.add_argument("--seeds", type=int, default=13, help="seeds per held-out prompt (13 × 20 prompts = 260)")
    p.add_argument("--out", default=str(HERE / "out" / "flow_methods"), help="output stem (.md, .json, .png)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    base_cache: dict = {}
    results = [evaluate_run(Path(r), args.reward, args.seeds, base_cache) for r in args.runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"reward": args.reward, "results": results}, indent=2))
    md = render(results, args.reward)
    out.with_suffix(".md").write_text(md)
    plot(results, out.with_suffix(".png"), args.reward)
    print(md)


if __name__ == "__main__":
    main()
