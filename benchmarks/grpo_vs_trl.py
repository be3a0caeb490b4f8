"""mmalign GRPO vs trl's GRPOTrainer on the same tiny LLaMA-style model, prompts, reward and settings (CPU).

One command runs both sides, each in its own subprocess, alternating, `--repeats` times, and reports medians and the
mmalign/trl steps/s ratio:

    benchmarks/.venv-trl/bin/python benchmarks/grpo_vs_trl.py

Both sides: the DPO benchmark's model (`bench_setup.prepare`), its 256 prompts, the reward
`bench_setup.digit_fraction` of the decoded completion (the same Python function on both sides), 8 samples per
prompt, 2 prompts per step (16 completions), at most 32 new tokens sampled at temperature 1 with no top-k / top-p,
group-normalised advantages (trl's scale_rewards="group"), the clipped surrogate with ε = 0.2 averaged over each
completion's tokens (trl's loss_type="grpo"), no KL term (trl's default beta = 0), one update per rollout
(num_iterations = 1), full fine-tuning in fp32, fused AdamW at a constant LR, grad-norm clipping 1.0, no dropout.

What is measured per run: steps/s over the steps after `--warmup` (a global torch optimizer-step hook stamps the end
of every step on both sides, so a step is sampling, reward, advantages, forward, backward, clipping and AdamW),
CPU s per step, peak RSS, the mean completion length (the sampling work) and mean reward per step.

Equal objective: both sides draw their own samples, so losses are compared on the same samples instead. The
driver records trl's first step (its prompts, completions, loss, grad norm and clipped gradients) and replays it
through mmalign: mmalign's `generate` returns trl's completions for the same prompts (the trl dataset is laid out in
mmalign's prompt order and read without shuffling), and mmalign's first-step loss, rewards, grad norm and gradients
are compared with trl's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_setup  # noqa: E402
from dpo_vs_trl import _maybe_profiled, _rss_kb  # noqa: E402

REWARD = "bench_digit_fraction"


class StepClock:
    """Stamps (wall, CPU) after every optimizer step and keeps the clipped gradients of the first one.

    Global torch optimizer hooks, so both trainers are timed at the same point; accelerate's wrapper is skipped so
    each step counts once.
    """

    def __init__(self, named_parameters):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.named_parameters = named_parameters
        self.stamps: list[tuple[float, float]] = []
        self.first_grads: dict[str, torch.Tensor] = {}
        self._torch = torch
        register_optimizer_step_pre_hook(self._pre)
        register_optimizer_step_post_hook(self._post)

    def _pre(self, optimizer, args, kwargs):
        if isinstance(optimizer, self._torch.optim.AdamW) and not self.stamps and not self.first_grads:
            self.first_grads = {
                n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None
            }

    def _post(self, optimizer, args, kwargs):
        if isinstance(optimizer, self._torch.optim.AdamW):
            self.stamps.append((time.perf_counter(), time.process_time()))

    def result(self, args) -> dict:
        import resource

        w, n = args.warmup, len(self.stamps)
        if n != args.steps:
            raise SystemExit(f"{n} optimizer steps were stamped, expected {args.steps}")
        timed = n - 1 - w
        if timed < 1 and not args.replay:
            raise SystemExit(f"--steps ({args.steps}) must exceed --warmup + 1 ({w + 1})")
        out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        out["loadavg_1min_after"] = os.getloadavg()[0]
        if timed >= 1:
            out["steps_per_s"] = timed / (self.stamps[-1][0] - self.stamps[w][0])
            out["cpu_s_per_step"] = (self.stamps[-1][1] - self.stamps[w][1]) / timed
        return out


def _save_grads(clock: StepClock, work: Path, side: str) -> str:
    import torch

    path = work / f"grpo-first-grads-{side}.pt"
    torch.save(clock.first_grads, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ mmalign
class DigitFraction:
    """`bench_setup.digit_fraction` as an mmalign reward."""

    name = REWARD
    differentiable = False

    def __call__(self, prompts, outputs):
        import torch

        return torch.tensor([bench_setup.digit_fraction(o["text"]) for o in outputs])


def _algorithm_section(config_class, args) -> dict:
    """The recipe's `algorithm:` in the names the installed `grpo` config has (clip_range/kl_coef on older
    revisions, trl's epsilon/beta/loss_type on newer ones). `grpo` normalises advantages by the group's std, as
    trl's scale_rewards="group"."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    section = {"name": "grpo", "samples_per_prompt": args.group, "reward": REWARD}
    section["epsilon" if "epsilon" in fields else "clip_range"] = args.epsilon
    section["beta" if "beta" in fields else "kl_coef"] = 0.0
    if "loss_type" in fields:
        section["loss_type"] = "grpo"
    return section


def run_mmalign(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from mmalign import plugins
    from mmalign.core.registry import ALGORITHMS, RewardSpec, register_reward
    from mmalign.run import build_run
    from mmalign.train.trainer import Trainer

    register_reward(RewardSpec(REWARD, lambda options, answers: DigitFraction(), "text", False, "benchmark"))
    work = Path(args.work)
    plugins.load()
    spec = ALGORITHMS["grpo"]["sequence"]
    recipe = {
        "seed": 0,
        "model": {
            "name_or_path": str(work / "model"),
            "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
        },
        "data": {"prompts": str(work / "prompts.jsonl")},
        "algorithm": _algorithm_section(spec.config, args),
        "train": {
            "max_steps": args.steps,
            "batch_size": args.group * args.prompts_per_step,
            "lr": args.lr,
            "weight_decay": 0.0,
            "adam_betas": [0.9, 0.999],
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": args.max_grad_norm,
            "progress": False,
        },
    }
    t0 = time.perf_counter()
    run = build_run(recipe)
    policy, algorithm, cfg = run.policy, run.algorithm, run.train
    if args.replay:
        _replay_generation(policy, json.loads(Path(args.replay).read_text()))
    clock = StepClock(policy.module.named_parameters)
    out_dir = Path(tempfile.mkdtemp(prefix="mmalign-grpo-", dir=work))
    trainer = Trainer(policy, algorithm, cfg, out_dir)
    setup_s = time.perf_counter() - t0
    rss_before = _rss_kb() / 1024
    _maybe_profiled(trainer.train, args)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = sorted((m for m in metrics if "train/loss" in m), key=lambda m: m["step"])
    shutil.rmtree(out_dir, ignore_errors=True)

    def series(*names):
        for name in names:
            if name in metrics[0]:
                return [m[name] for m in metrics]
        return []

    result = {
        "side": "mmalign",
        "algorithm": recipe["algorithm"],
        "setup_s": setup_s,
        "rss_before_train_mb": rss_before,
        "losses": series("train/loss"),
        "grad_norms": series("train/grad_norm"),
        "rewards": series("train/rollout/reward", "rollout/reward"),
        "completion_tokens": series("train/rollout/response_tokens", "rollout/response_tokens"),
        **clock.result(args),
    }
    if args.replay:
        result["first_grads"] = _save_grads(clock, Path(args.work), "mmalign")
    return result


def _replay_generation(policy, recorded: dict) -> None:
    """Make `policy.generate` return trl's first-step completions for trl's first-step prompts (and refuse others)."""
    queue = [recorded]

    def generate(prompts, *, num_samples=1, **_):
        if not queue:
            raise SystemExit("replay: mmalign asked for a second rollout; run the replay with --steps 1")
        step = queue.pop()
        ids = [policy.encode_prompt(p) for p in prompts for _ in range(num_samples)]
        if ids != step["prompt_ids"]:
            raise SystemExit("replay: mmalign's first-rollout prompts differ from trl's")
        return [
            {
                "prompt_ids": p,
                "response_ids": c,
                "text": policy.tokenizer.decode(c, skip_special_tokens=True),
            }
            for p, c in zip(step["prompt_ids"], step["completion_ids"], strict=True)
        ]

    policy.generate = generate


# ---------------------------------------------------------------------------------------------------- trl
def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    work = Path(args.work)
    prompts = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]
    order = [i for batch in _order(len(prompts), args) for i in batch]
    t0 = time.perf_counter()
    model_dir = str(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": prompts[i]} for i in order])

    def digit_fraction(prompts, completions, **kwargs):
        return [bench_setup.digit_fraction(c) for c in completions]

    first: dict = {}

    class RecordingGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not first:  # trl's first step: its prompts (left padding removed) and completions (up to eos)
                pm, cm = out["prompt_mask"].bool(), out["completion_mask"].bool()
                first["prompt_ids"] = [r[m].tolist() for r, m in zip(out["prompt_ids"], pm, strict=True)]
                first["completion_ids"] = [
                    r[m].tolist() for r, m in zip(out["completion_ids"], cm, strict=True)
                ]
                first["advantages"] = out["advantages"].tolist()
            return out

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-", dir=work)
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.group * args.prompts_per_step,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=args.epsilon,
        loss_type="grpo",
        scale_rewards="group",
        importance_sampling_level="token",
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=args.max_grad_norm,
        disable_dropout=True,
        bf16=False,  # trl defaults to bf16=True
        fp16=False,
        gradient_checkpointing=False,  # trl defaults to True
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        shuffle_dataset=False,  # the dataset is already in mmalign's prompt order
        dataloader_pin_memory=False,
        log_completions=False,
        seed=0,
    )
    trainer = RecordingGRPOTrainer(
        model=model,
        reward_funcs=digit_fraction,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    clock = StepClock(model.named_parameters)
    setup_s = time.perf_counter() - t0
    rss_before = _rss_kb() / 1024
    _maybe_profiled(trainer.train, args)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    first["loss"] = logs[0]["loss"]
    first["grad_norm"] = logs[0].get("grad_norm")
    first["reward"] = logs[0].get("reward")
    record = work / "grpo-trl-first-step.json"
    record.write_text(json.dumps(first))
    result = {
        "side": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "setup_s": setup_s,
        "rss_before_train_mb": rss_before,
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "rewards": [h.get("reward") for h in logs],
        "completion_tokens": [h.get("completions/mean_length") for h in logs],
        "first_step": str(record),
        "first_grads": _save_grads(clock, work, "trl"),
        **clock.result(args),
    }
    return result


def _order(n: int, args) -> list[list[int]]:
    """The prompts mmalign's Trainer draws per rollout (a seeded permutation per epoch, `Trainer._global_indices`)."""
    return bench_setup.mmalign_order(n, args.steps, args.prompts_per_step)


# ------------------------------------------------------------------------------------------------- driver
_SHARED = (
    "steps",
    "warmup",
    "group",
    "prompts_per_step",
    "max_new_tokens",
    "lr",
    "epsilon",
    "max_grad_norm",
    "max_length",
    "threads",
)


def _child(side: str, args, env: dict, *extra: str) -> dict:
    cmd = [
        args.python or sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--work",
        str(args.work),
        *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED],
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _compare_first_step(args, env: dict, trl_run: dict) -> dict:
    """Replay trl's first-step samples through mmalign and compare loss, rewards, grad norm and gradients."""
    import torch

    replay = _child("mmalign", args, env, "--replay", trl_run["first_step"], "--steps=1", "--warmup=0")
    trl_first = json.loads(Path(trl_run["first_step"]).read_text())
    mine = torch.load(replay["first_grads"])
    theirs = torch.load(trl_run["first_grads"])
    if mine.keys() != theirs.keys():
        raise SystemExit(f"parameter names differ: {sorted(set(mine) ^ set(theirs))[:5]}")
    diffs = {n: (mine[n] - theirs[n]).abs().max().item() for n in mine}
    scale = max(t.abs().max().item() for t in theirs.values())
    return {
        "trl_loss": trl_first["loss"],
        "mmalign_loss": replay["losses"][0],
        "trl_reward": trl_first["reward"],
        "mmalign_reward": replay["rewards"][0] if replay["rewards"] else None,
        "trl_grad_norm": trl_first["grad_norm"],
        "mmalign_grad_norm": replay["grad_norms"][0] if replay["grad_norms"] else None,
        "max_abs_grad_diff": max(diffs.values()),
        "largest_grad": scale,
        "worst_parameter": max(diffs, key=diffs.get),
        "completion_lengths": [len(c) for c in trl_first["completion_ids"]],
    }


def drive(args) -> None:
    import importlib.util

    import torch
    import transformers

    if importlib.util.find_spec("trl") is None and args.python is None:
        raise SystemExit(
            "trl is not installed here; run: benchmarks/.venv-trl/bin/python benchmarks/grpo_vs_trl.py"
        )
    work = Path(args.work)
    info = bench_setup.prepare(work, bench_setup.ModelSpec(layers=args.layers), args.prompts)
    bench_setup.prepare_prompts(work, args.prompts)
    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs: dict[str, list[dict]] = {"mmalign": [], "trl": []}
    for r in range(args.repeats):
        for side in ("trl", "mmalign") if r % 2 == 0 else ("mmalign", "trl"):
            load = os.getloadavg()[0]
            res = _child(side, args, env)
            res["loadavg_1min_before"] = load
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:7s} {res['steps_per_s']:.3f} steps/s, "
                f"{res['cpu_s_per_step']:.3f} CPU s/step, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"completion tokens {_mean(res['completion_tokens']):.1f}, load avg "
                f"{load:.2f}/{res['loadavg_1min_after']:.2f}",
                file=sys.stderr,
            )
    first = _compare_first_step(args, env, runs["trl"][0])
    mm, tr = runs["mmalign"], runs["trl"]

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    summary = {
        "command": " ".join(["benchmarks/.venv-trl/bin/python benchmarks/grpo_vs_trl.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "prompts", "layers", "repeats")},
        "mmalign_algorithm": mm[0]["algorithm"],
        "setup": info,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": tr[0]["trl"],
        },
        "cpu_cores": os.cpu_count(),
        "loadavg_range": [
            min(min(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
            max(max(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
        ],
        "median": {
            side: {
                k: med(rs, k)
                for k in ("steps_per_s", "cpu_s_per_step", "peak_rss_mb", "rss_before_train_mb", "setup_s")
            }
            for side, rs in runs.items()
        },
        "ratio_mmalign_over_trl": {
            "steps_per_s": med(mm, "steps_per_s") / med(tr, "steps_per_s"),
            "steps_per_cpu_s": med(tr, "cpu_s_per_step") / med(mm, "cpu_s_per_step"),
            "paired_steps_per_s": [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(mm, tr, strict=True)],
        },
        "mean_completion_tokens": {
            side: [_mean(r["completion_tokens"]) for r in rs] for side, rs in runs.items()
        },
        "mean_reward": {side: [_mean(r["rewards"]) for r in rs] for side, rs in runs.items()},
        "first_step_replay": first,
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"{args.out_name}.md").write_text(md)
    (out / f"{args.out_name}.json").write_text(json.dumps(summary, indent=2))
    print(md)


def render(s: dict) -> str:
    m, t = s["median"]["mmalign"], s["median"]["trl"]
    ratio, st, v, f = s["ratio_mmalign_over_trl"], s["settings"], s["versions"], s["first_step_replay"]
    each = {side: " ".join(f"{r['steps_per_s']:.3f}" for r in s["runs"][side]) for side in ("mmalign", "trl")}
    tokens = {
        side: " ".join(f"{x:.1f}" for x in s["mean_completion_tokens"][side]) for side in ("mmalign", "trl")
    }
    rewards = {side: " ".join(f"{x:.3f}" for x in s["mean_reward"][side]) for side in ("mmalign", "trl")}
    paired = " ".join(f"{x:.2f}" for x in ratio["paired_steps_per_s"])
    return "\n".join(
        [
            f"`{s['command']}`",
            "",
            f"{s['setup']['parameters']:,}-parameter LlamaForCausalLM ({st['layers']} layers), {st['prompts']} "
            f"prompts, {st['prompts_per_step']} prompts × {st['group']} samples per step, ≤ {st['max_new_tokens']} "
            f"new tokens, {st['steps']} steps (timed: the {st['steps'] - 1 - st['warmup']} after step "
            f"{st['warmup'] + 1}), fp32, {st['threads']} torch thread(s), {s['cpu_cores']} CPU cores (shared; "
            f"1-min load average {s['loadavg_range'][0]:.1f}-{s['loadavg_range'][1]:.1f}); median of "
            f"{st['repeats']} alternating runs. torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}. "
            f"mmalign algorithm section: `{json.dumps(s['mmalign_algorithm'])}`.",
            "",
            "| metric | mmalign | trl GRPOTrainer | mmalign / trl |",
            "| --- | ---: | ---: | ---: |",
            f"| steps/s | {m['steps_per_s']:.3f} | {t['steps_per_s']:.3f} | **{ratio['steps_per_s']:.2f}×** |",
            f"| steps/s of each run | {each['mmalign']} | {each['trl']} | {paired} (paired) |",
            f"| CPU s per step | {m['cpu_s_per_step']:.3f} | {t['cpu_s_per_step']:.3f} | "
            f"{ratio['steps_per_cpu_s']:.2f}× (steps per CPU s) |",
            f"| peak RSS (MB) | {m['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | |",
            f"| setup: load + trainer init (s) | {m['setup_s']:.2f} | {t['setup_s']:.2f} | |",
            f"| mean completion tokens per run | {tokens['mmalign']} | {tokens['trl']} | |",
            f"| mean reward per run | {rewards['mmalign']} | {rewards['trl']} | |",
            "",
            "First step replayed (trl's prompts and completions through mmalign, same initial weights):",
            "",
            "| | mmalign | trl |",
            "| --- | ---: | ---: |",
            f"| loss | {f['mmalign_loss']:.3e} | {f['trl_loss']:.3e} |",
            f"| mean reward | {f['mmalign_reward']:.6f} | {f['trl_reward']:.6f} |",
            f"| grad norm (before clipping) | {f['mmalign_grad_norm']:.6f} | {f['trl_grad_norm']:.6f} |",
            "",
            f"- clipped gradients, max abs difference over all parameters: {f['max_abs_grad_diff']:.1e} (largest "
            f"gradient entry {f['largest_grad']:.1e}; worst parameter {f['worst_parameter']})",
            f"- completion lengths of that step: {f['completion_lengths']}",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("mmalign", "trl"), help="internal: run one side and print JSON")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "grpo"), help="model, prompts and run dirs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timed window")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (trl's num_generations)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-name", default="grpo_vs_trl", help="results go to benchmarks/out/NAME.{md,json}")
    p.add_argument("--python", help="interpreter for the sides (default: this one)")
    p.add_argument(
        "--replay", help="internal: with --side mmalign, generate trl's recorded first-step samples"
    )
    p.add_argument("--profile", help="with --side: CPU-time cProfile of train() to this file, top to stderr")
    args = p.parse_args()
    if args.side is None:
        drive(args)
        return
    runner = run_mmalign if args.side == "mmalign" else run_trl
    print(json.dumps(runner(args)))


if __name__ == "__main__":
    main()
