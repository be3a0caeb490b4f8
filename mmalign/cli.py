"""`mmalign train | eval | sample | zoo`: every run is a recipe plus dotted overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.core.config import RecipeError, dump_recipe, load_recipe


def _recipe_and_run(target: str, overrides: list[str]) -> tuple[dict, Path | None]:
    """A recipe file, or a run directory (its resolved recipe.yaml, weights from its newest checkpoint)."""
    path = Path(target)
    if path.is_dir():
        return load_recipe(path / "recipe.yaml", overrides), path
    return load_recipe(path, overrides), None


def _load_trained(policy, run_dir: Path, recipe: dict) -> None:
    """Weights of the newest valid checkpoint (an unusable newer one is named on stderr), refused if non-finite."""
    from mmalign.core.params import load_trainable
    from mmalign.train.checkpoint import latest_valid_checkpoint, load_state, require_finite

    on_corrupt = (recipe.get("train") or {}).get("on_corrupt_checkpoint", "fallback")
    last, skipped = latest_valid_checkpoint(run_dir, on_corrupt)
    if last is None:
        raise SystemExit(f"{run_dir} has no complete checkpoint")
    for note in skipped:
        print(f"mmalign: {note}; using {last.name} instead", file=sys.stderr)
    weights = load_state(last, "policy")
    require_finite(weights, f"{last}/policy.safetensors")
    load_trainable(policy.module, weights)


def _check_same_run(recipe: dict, out: Path) -> None:
    """Resuming continues the run in `out`: refuse if its checkpoints come from another recipe (only a longer
    `train.max_steps` may differ), instead of silently mixing two runs."""
    import yaml

    from mmalign.core.config import load_yaml
    from mmalign.train.checkpoint import latest_checkpoint

    previous = out / "recipe.yaml"
    resume = (recipe.get("train") or {}).get("resume", True)
    if not resume or not previous.exists() or latest_checkpoint(out) is None:
        return

    def comparable(r: dict) -> dict:
        r = load_yaml(yaml.safe_dump(r))
        (r.get("train") or {}).pop("max_steps", None)
        return r

    if comparable(load_yaml(previous.read_text())) != comparable(recipe):
        raise RecipeError(
            f"{out} holds checkpoints of a different recipe ({previous}); resuming would mix two runs: "
            "use another --output-dir, or --set train.resume=false to start over there"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from mmalign.run import build_run
    from mmalign.train import run_dir
    from mmalign.train.trainer import Trainer
    from mmalign.zoo.registry import resolve

    recipe = load_recipe(args.recipe, args.set)
    state = PartialState()
    out = Path(args.output_dir)
    with run_dir.hold_run_dir(out):  # checked and locked before anything is built
        _check_same_run(recipe, out)
        # the main process builds any zoo world first; the others then load it
        with state.main_process_first():
            policy, algorithm, train_cfg, evaluator, report = build_run(recipe)
        fingerprint = run_dir.recipe_fingerprint(recipe, lambda p: resolve(p, log=lambda *_: None))
        # the recipe is valid: only now start over (train.resume=false) or resume
        with run_dir.prepare_run_dir(out, resume=train_cfg.resume):
            if state.is_main_process:
                with run_dir.atomic_path(out / "recipe.yaml") as tmp:
                    dump_recipe(recipe, tmp)
            trainer = Trainer(
                policy, algorithm, train_cfg, out, evaluator=evaluator, report=report, fingerprint=fingerprint
            )
            summary = trainer.train()
    if state.is_main_process:
        print(run_dir.finite_json(summary, "summary", indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from mmalign.run import build_evaluation
    from mmalign.train.run_dir import finite_json

    recipe, run_dir = _recipe_and_run(args.target, args.set)
    policy, evaluator = build_evaluation(recipe)
    if evaluator is None:
        raise RecipeError("the recipe has no held-out data to evaluate on (eval.prompts / eval.pairs)")
    if run_dir is not None and not args.base:
        _load_trained(policy, run_dir, recipe)
    policy.module.eval()
    with torch.no_grad():
        print(finite_json(evaluator.evaluate(policy), "mmalign eval", indent=2))
    return 0


def _sample_prompts(policy, prompts: list[str], images: list[str]) -> list:
    """Prompts as the policy takes them: a vision-language model gets one `--image` file per `--prompt`."""
    from mmalign.core.policy import ImageSequencePolicy

    if not isinstance(policy, ImageSequencePolicy):
        if images:
            raise RecipeError(
                "--image is for vision-language models; this recipe's model takes text prompts only"
            )
        return prompts
    from mmalign.core.data import rows_from_records
    from mmalign.vision.images import load_image

    if len(images) != len(prompts):
        raise RecipeError(
            f"a vision-language model needs one --image per --prompt (got {len(images)} for {len(prompts)})"
        )
    rows = rows_from_records(
        [{"prompt": p, "image": i} for p, i in zip(prompts, images, strict=True)], "--image"
    )
    return [{"prompt": r.data["prompt"], "image": load_image(r, "image", Path.cwd())} for r in rows]


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from mmalign.core.policy import DiffusionPolicy
    from mmalign.run import load_policy, model_plan

    recipe, run_dir = _recipe_and_run(args.target, args.set)
    kind, model_cfg = model_plan(recipe)
    torch.manual_seed(args.seed)
    policy = load_policy(kind, model_cfg)
    if run_dir is not None and not args.base:
        _load_trained(policy, run_dir, recipe)
    policy.module.eval()
    if not isinstance(policy, DiffusionPolicy):
        prompts = _sample_prompts(policy, args.prompt, args.image)
        outputs = policy.generate(prompts, num_samples=args.num_samples, greedy=args.greedy)
        for i, out in enumerate(outputs):
            print(json.dumps({"prompt": args.prompt[i // args.num_samples], "response": out["text"]}))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    traj = policy.sample(prompts, generator=torch.Generator().manual_seed(args.seed), record=False)
    with torch.no_grad():
        outputs = policy.decode(traj.final)
    for prompt, path in zip(
        prompts, policy.write_outputs(outputs, prompts, str(out_dir), "sample"), strict=True
    ):
        print(json.dumps({"prompt": prompt, "file": path}))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mmalign.methods_table import matrix_markdown

    print(matrix_markdown(reasons=args.why))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from mmalign.zoo import registry

    if args.action == "list":
        for name, (*_, about) in sorted(registry.WORLDS.items()):
            built = "built" if (registry.world_dir(name) / "world.json").exists() else "not built"
            print(f"{name:12s} {built:10s} {about}")
        return 0
    for name in args.names:
        print(registry.build(name, force=args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a recipe; writes the run directory")
    p.add_argument("recipe")
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out metrics of a recipe's model or of a trained run directory")
    p.add_argument("target", help="a recipe file or a run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--base", action="store_true", help="evaluate the starting model of a run directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate from a recipe's model or a trained run directory")
    p.add_argument("target")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument(
        "--image", action="append", default=[], help="vision-language models: an image per --prompt"
    )
    p.add_argument("--num-samples", "-n", type=int, default=1)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", action="store_true")
    p.add_argument("--out-dir", default="samples", help="where image samples are written")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "methods", help="print the method × model matrix: which algorithm runs on which model kind"
    )
    p.add_argument("--why", action="store_true", help="list the reason for every cell that does not fit")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("zoo", help="build or list the offline worlds")
    p.add_argument("action", choices=["build", "list"])
    p.add_argument("names", nargs="*", default=["text"])
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_zoo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"mmalign: recipe error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        # imported late: they load torch, which `--help` does not need
        from mmalign.core.data import DataError
        from mmalign.train.checkpoint import CheckpointError
        from mmalign.train.run_dir import NonFiniteMetricError, RunDirError

        kinds = [
            (DataError, "data error"),
            (CheckpointError, "checkpoint error"),
            (RunDirError, "run directory error"),
            (NonFiniteMetricError, "non-finite metric"),
        ]
        kind = next((name for cls, name in kinds if isinstance(err, cls)), None)
        if kind is None:
            raise
        print(f"mmalign: {kind}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
