"""`mmalign train | validate | eval | sample | methods | rewards | recipes | zoo`: every run is a recipe plus
dotted overrides.

Results go to stdout as JSON (one object, or one per line for samples); progress bars, logs and world builds go
to stderr (`--quiet` silences them). A mistake in what you gave mmalign (recipe, data, model files, output
directory, checkpoint) is one line on stderr, `mmalign: <kind> error: <message>`, and exit status 2; `--debug`
adds the trace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from mmalign.core.config import RecipeError, dump_recipe, load_recipe
from mmalign.core.errors import MmalignError

QUIET_ENV = {  # progress bars and info logs of the libraries underneath
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
}


def _recipe_and_run(target: str, overrides: list[str]) -> tuple[dict, Path | None]:
    """A recipe file, or a run directory (its resolved recipe.yaml, weights from its newest checkpoint)."""
    path = Path(target)
    if path.is_dir():
        return load_recipe(path / "recipe.yaml", overrides), path
    return load_recipe(path, overrides), None


def _load_trained(policy, run_dir: Path, recipe: dict) -> None:
    """Weights of the newest valid checkpoint (its moving average if the run kept one; an unusable newer checkpoint
    is named on stderr), refused if non-finite."""
    from mmalign.core.params import load_trainable
    from mmalign.train.checkpoint import (
        CheckpointError,
        latest_valid_checkpoint,
        load_state,
        require_finite,
    )
    from mmalign.train.ema import saved_average

    on_corrupt = (recipe.get("train") or {}).get("on_corrupt_checkpoint", "fallback")
    last, skipped = latest_valid_checkpoint(run_dir, on_corrupt)
    if last is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint")
    for note in skipped:
        print(f"mmalign: {note}; using {last.name} instead", file=sys.stderr)
    # a run with train.ema_decay evaluates its moving average: so does `mmalign eval`
    average = saved_average(last)
    if average is not None:
        weights = average["weights"]
    else:
        weights = load_state(last, "policy")
        require_finite(weights, f"{last}/policy.safetensors")
    try:
        load_trainable(policy.module, weights)
    except ValueError as err:
        raise CheckpointError(f"{last}: {err}") from err


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
        for key in ("max_steps", "num_train_epochs"):
            (r.get("train") or {}).pop(key, None)
        return r

    if comparable(load_yaml(previous.read_text())) != comparable(recipe):
        raise RecipeError(
            f"{out} holds checkpoints of a different recipe ({previous}); resuming would mix two runs: "
            "use another --output-dir, or --set train.resume=false to start over there"
        )


def _check_output_dir(recipe: dict, out: Path) -> None:
    """What `mmalign train` will check of an output directory, without creating or locking anything."""
    from mmalign.train.run_dir import RunDirError

    if out.exists() and not out.is_dir():
        raise RunDirError(f"output directory {out} is a file, not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create output directory {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"output directory {out} is not writable (no write permission on {existing})")
    if out.is_dir():
        _check_same_run(recipe, out)


# ------------------------------------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from mmalign.run import build_run
    from mmalign.train import run_dir
    from mmalign.train.trainer import Trainer, flatten
    from mmalign.zoo.registry import resolve

    recipe = load_recipe(args.recipe, args.set)
    state = PartialState()
    out = Path(args.output_dir)
    with run_dir.hold_run_dir(out):  # checked and locked before anything is built
        _check_same_run(recipe, out)
        # recipe, data and model files are checked before weights load; the main process builds any zoo world first
        with state.main_process_first():
            policy, algorithm, train_cfg, evaluator, report = build_run(recipe)
        if args.quiet:
            train_cfg = dataclasses.replace(train_cfg, progress=False)
        fingerprint = run_dir.recipe_fingerprint(recipe, lambda p: resolve(p, log=lambda *_: None))
        # the recipe is valid: only now start over (train.resume=false) or resume
        with run_dir.prepare_run_dir(out, resume=train_cfg.resume):
            if state.is_main_process:
                with run_dir.atomic_path(out / "recipe.yaml") as tmp:
                    dump_recipe(recipe, tmp)
            trainer = Trainer(
                policy,
                algorithm,
                train_cfg,
                out,
                evaluator=evaluator,
                report=report,
                fingerprint=fingerprint,
                hparams=flatten(recipe),
            )
            summary = trainer.train()
    if state.is_main_process:
        args.emit(run_dir.finite_json(summary, "summary", indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mmalign.run import validate

    recipe = load_recipe(args.recipe, args.set)
    if args.output_dir:
        _check_output_dir(recipe, Path(args.output_dir))
    args.emit(json.dumps(validate(recipe), indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from mmalign.run import build_evaluation, model_plan
    from mmalign.train.run_dir import finite_json

    recipe, run_dir = _recipe_and_run(args.target, args.set)
    held_out = recipe.get("eval") or {}
    trl_test_split = (recipe.get("data") or {}).get("dataset_test_split")
    if not (any(held_out.get(k) for k in ("pairs", "prompts", "probes")) or trl_test_split):
        raise RecipeError("the recipe has no held-out data to evaluate on (eval.prompts / eval.pairs)")
    kind, _ = model_plan(recipe)
    if args.by_prompt and kind.policy_kind != "diffusion":  # every diffusion kind's evaluator has by_prompt
        raise RecipeError(
            f"--by-prompt: model.kind {kind.name!r} reports whole-set metrics only; per-prompt rows are "
            "available for diffusion models (images, flows, speech)"
        )
    policy, evaluator = build_evaluation(recipe)
    if evaluator is None:
        raise RecipeError("the recipe has no held-out data to evaluate on (eval.prompts / eval.pairs)")
    if run_dir is not None and not args.base:
        _load_trained(policy, run_dir, recipe)
    policy.module.eval()
    with torch.no_grad():
        metrics = evaluator.by_prompt(policy) if args.by_prompt else evaluator.evaluate(policy)
    args.emit(finite_json(metrics, "mmalign eval", indent=2))
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


def place_without_overwriting(written: list[str], out_dir: Path, stem: str) -> list[Path]:
    """Move files written as `<stem>_*` into `out_dir` under the first stem (`stem`, `stem-2`, ...) none of whose
    names exist there yet. Hard links fail on an existing name, so a file is never replaced, even by a
    concurrent `mmalign sample`."""
    n = 1
    while True:
        candidate = stem if n == 1 else f"{stem}-{n}"
        targets = [out_dir / Path(w).name.replace(stem, candidate, 1) for w in written]
        done: list[Path] = []
        try:
            for src, dst in zip(written, targets, strict=True):
                os.link(src, dst)
                done.append(dst)
            return targets
        except FileExistsError:
            for path in done:
                path.unlink()
            n += 1


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from mmalign.core.policy import DiffusionPolicy
    from mmalign.run import load_policy, model_plan

    if args.num_samples < 1:
        raise RecipeError(f"--num-samples must be >= 1, got {args.num_samples}")
    recipe, run_dir = _recipe_and_run(args.target, args.set)
    kind, model_cfg = model_plan(recipe)
    takes_images = "image_inputs" in kind.capabilities
    if args.image and not takes_images:
        raise RecipeError(
            "--image is for vision-language models; this recipe's model takes text prompts only"
        )
    if takes_images and len(args.image) != len(args.prompt):
        raise RecipeError(
            f"a vision-language model needs one --image per --prompt (got {len(args.image)} for {len(args.prompt)})"
        )
    torch.manual_seed(args.seed)
    policy = load_policy(kind, model_cfg)
    if run_dir is not None and not args.base:
        _load_trained(policy, run_dir, recipe)
    policy.module.eval()
    if not isinstance(policy, DiffusionPolicy):
        prompts = _sample_prompts(policy, args.prompt, args.image)
        outputs = policy.generate(prompts, num_samples=args.num_samples, greedy=args.greedy)
        for i, out in enumerate(outputs):
            args.emit(json.dumps({"prompt": args.prompt[i // args.num_samples], "response": out["text"]}))
        return 0
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"--out-dir {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    traj = policy.sample(prompts, generator=torch.Generator().manual_seed(args.seed), record=False)
    with torch.no_grad():
        outputs = policy.decode(traj.final)
    tmp = Path(tempfile.mkdtemp(prefix=".sample-", dir=out_dir))
    try:
        written = policy.write_outputs(outputs, prompts, str(tmp), "sample")
        paths = place_without_overwriting(written, out_dir, "sample")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for prompt, path in zip(prompts, paths, strict=True):
        args.emit(json.dumps({"prompt": prompt, "file": str(path)}))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mmalign.methods_table import matrix_markdown

    args.emit(matrix_markdown(reasons=args.why))
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from mmalign import plugins
    from mmalign.core.registry import MODEL_KINDS, REWARDS

    plugins.load()
    rows = [
        {
            "name": spec.name,
            "scores": spec.outputs,
            "differentiable": spec.differentiable,
            "model_kinds": sorted(k.name for k in MODEL_KINDS.values() if k.outputs == spec.outputs),
            "description": spec.description,
        }
        for spec in sorted(REWARDS.values(), key=lambda s: (s.outputs, s.name))
    ]
    if args.json:
        args.emit(json.dumps(rows, indent=2))
        return 0
    from mmalign.evaluation.samples import markdown_cell

    lines = ["| reward | scores | differentiable | model kinds | what |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["name"], r["scores"], "yes" if r["differentiable"] else "no", ", ".join(r["model_kinds"])]
        lines.append("| " + " | ".join([*cells, markdown_cell(r["description"])]) + " |")
    args.emit("\n".join(lines))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from mmalign import recipes

    if args.action == "copy":
        if not args.name:
            raise RecipeError(
                "mmalign recipes copy NAME [DEST]: give the recipe's name (see `mmalign recipes`)"
            )
        args.emit(json.dumps(recipes.copy(args.name, args.dest)))
        return 0
    if args.name or args.dest:
        raise RecipeError(
            "`mmalign recipes` lists the recipes; `mmalign recipes copy NAME [DEST]` copies one"
        )
    listed = [{"name": name, **recipes.describe(path)} for name, path in recipes.recipe_files().items()]
    if args.json:
        args.emit(json.dumps(listed, indent=2))
        return 0
    width = max(len(r["name"]) for r in listed)
    for r in listed:
        args.emit(f"{r['name']:{width}s}  {r['model']:20s} {r['algorithm']:22s} {r['about']}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from mmalign.zoo import registry

    if args.action == "list":
        for name, (*_, about) in sorted(registry.WORLDS.items()):
            built = "built" if (registry.world_dir(name) / "world.json").exists() else "not built"
            args.emit(f"{name:16s} {built:10s} {about}")
        return 0
    for name in args.names:
        if name not in registry.WORLDS:
            raise registry.ZooError(f"unknown world {name!r}; known: {', '.join(sorted(registry.WORLDS))}")
    for name in args.names:
        path = registry.build(name, force=args.force, log=lambda *a: print(*a, file=sys.stderr))
        args.emit(json.dumps({"world": name, "path": str(path)}))
    return 0


# -------------------------------------------------------------------------------------------------- parser
EXAMPLES = {
    "train": """examples:
  mmalign train text/dpo.yaml -o runs/dpo
  mmalign train text/dpo.yaml -o runs/dpo-ipo --set algorithm.name=ipo --set algorithm.beta=0.1
  mmalign train my.yaml -o runs/x --set train.num_train_epochs=2 --set train.warmup_ratio=0.1
  accelerate launch --num_processes 2 -m mmalign.cli train text/dpo.yaml -o runs/dpo-ddp

Running the same command again resumes from the newest checkpoint. stdout gets the summary (JSON).""",
    "validate": """examples:
  mmalign validate text/dpo.yaml
  mmalign validate my.yaml --set data.train=pairs.jsonl -o runs/x

Checks the whole recipe, the data (rows, tokenizer coverage, prompt lengths, the fields rewards read) and the
model's files (layout, weight-file integrity) without loading any weights. Exit status 0: valid (a JSON summary
on stdout); 2: invalid (the error on stderr).""",
    "eval": """examples:
  mmalign eval runs/dpo            # the trained model of a run directory
  mmalign eval runs/dpo --base     # its starting model
  mmalign eval runs/ddpo --by-prompt  # per held-out prompt: which ones the model still gets wrong
  mmalign eval text/dpo.yaml       # a recipe's model as it is""",
    "sample": """examples:
  mmalign sample runs/dpo --prompt "27+48=" --greedy
  mmalign sample vision/ddpo_digits.yaml --prompt "a handwritten seven" -n 4 --out-dir samples
  mmalign sample runs/vlm-povid --prompt "Describe the image." --image digit.png

Text: one JSON object per sample on stdout. Images and audio: files in --out-dir (an existing file is never
replaced: a new name is chosen) and one JSON object per file on stdout.""",
    "methods": """examples:
  mmalign methods          # which algorithm runs on which model kind
  mmalign methods --why    # and why a cell does not fit""",
    "rewards": """examples:
  mmalign rewards
  mmalign rewards --json""",
    "recipes": """examples:
  mmalign recipes                          # the recipes shipped with mmalign
  mmalign recipes copy text/dpo my_dpo.yaml
  mmalign recipes copy ddpo_compressibility   # a unique stem is enough; copied to ./ddpo_compressibility.yaml""",
    "zoo": """examples:
  mmalign zoo list
  mmalign zoo build text image

Worlds are cached under $MMALIGN_HOME/zoo (default ~/.cache/mmalign/zoo).""",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmalign")
    except PackageNotFoundError:
        from mmalign import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the subcommand, they do not reset what was given before it
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the trace of an error"
    )
    common.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or logs on stderr",
    )
    parser = argparse.ArgumentParser(
        prog="mmalign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `mmalign COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"mmalign {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the trace of an error")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EXAMPLES[name],
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("train", "train from a recipe; writes the run directory")
    p.add_argument("recipe")
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_train)

    p = command("validate", "check a recipe, its data and its model's files without loading any weights")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--output-dir", "-o", help="also check that this output directory can hold the run")
    p.set_defaults(func=cmd_validate)

    p = command("eval", "held-out metrics of a recipe's model or of a trained run directory")
    p.add_argument("target", help="a recipe file or a run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--base", action="store_true", help="evaluate the starting model of a run directory")
    p.add_argument(
        "--by-prompt",
        action="store_true",
        help="one row per held-out prompt (rewards, judges, what a classifier reads) instead of the totals",
    )
    p.set_defaults(func=cmd_eval)

    p = command("sample", "generate from a recipe's model or a trained run directory")
    p.add_argument("target", help="a recipe file or a run directory")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument(
        "--image", action="append", default=[], help="vision-language models: an image per --prompt"
    )
    p.add_argument("--num-samples", "-n", type=int, default=1)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", action="store_true", help="sample the starting model of a run directory")
    p.add_argument("--out-dir", default="samples", help="where image and audio samples are written")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_sample)

    p = command("methods", "print the method × model matrix: which algorithm runs on which model kind")
    p.add_argument("--why", action="store_true", help="list the reason for every cell that does not fit")
    p.set_defaults(func=cmd_methods)

    p = command("rewards", "list the rewards a recipe can name: what they score, whether differentiable")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.set_defaults(func=cmd_rewards)

    p = command("recipes", "list the recipes shipped with mmalign, or copy one out to edit")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    p.add_argument("name", nargs="?", help="copy: the recipe (e.g. text/dpo)")
    p.add_argument("dest", nargs="?", help="copy: a file or directory (default: ./<name>.yaml)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_recipes)

    p = command("zoo", "build or list the offline worlds")
    p.add_argument("action", choices=["build", "list"])
    p.add_argument("names", nargs="*", default=["text"])
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_zoo)
    return parser


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Progress bars and info logs off in the libraries already imported (QUIET_ENV covers those imported later)."""
    undo = []
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            logging = importlib.import_module(f"{name}.utils.logging")
            verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
            logging.set_verbosity_error()
            logging.disable_progress_bar()
            undo.append(
                lambda lg=logging, v=verbosity, b=bars: (lg.set_verbosity(v), b and lg.enable_progress_bar())
            )
    for name in ("huggingface_hub.utils", "datasets"):
        if name.split(".")[0] in sys.modules:
            module = importlib.import_module(name)
            if not module.are_progress_bars_disabled():
                module.disable_progress_bars()
                undo.append(module.enable_progress_bars)
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


@contextlib.contextmanager
def _work_output(quiet: bool) -> Iterator[TextIO]:
    """While a command works, whatever it prints goes to stderr (or nowhere with --quiet); yields the real stdout
    for its results."""
    stdout = sys.stdout
    saved = {k: os.environ.get(k) for k in QUIET_ENV}
    sink = open(os.devnull, "w") if quiet else sys.stderr  # noqa: SIM115
    if quiet:
        os.environ.update(QUIET_ENV)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            with _quiet_libraries() if quiet else contextlib.nullcontext():
                yield stdout
    finally:
        if quiet:
            sink.close()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.debug, args.quiet = getattr(args, "debug", False), getattr(args, "quiet", False)
    try:
        with _work_output(args.quiet) as stdout:
            args.emit = lambda text: print(text, file=stdout, flush=True)
            return args.func(args)
    except MmalignError as err:
        if args.debug:
            traceback.print_exc()
        label = getattr(err, "label", "error")
        print(f"mmalign: {label}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
