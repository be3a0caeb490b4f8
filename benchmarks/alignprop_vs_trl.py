"""Reward backprop: mmalign vs trl 0.23.1's `AlignPropTrainer`, same tiny pipeline, prompts, reward and work (CPU).

trl removed AlignProp after the 0.23.x series, so the trl side runs in its own venv,
`benchmarks/.venv-trl-alignprop` (see benchmarks/README.md); one command runs both sides, each in its own
subprocess, alternating, `--repeats` times:

    benchmarks/.venv-trl-alignprop/bin/python benchmarks/alignprop_vs_trl.py --backprop-steps 10

A step (trl: one `AlignPropTrainer.step`, i.e. one epoch) samples B images through S DDIM steps with classifier-free
guidance, keeping gradients through the last K steps with every UNet call checkpointed, decodes them with the VAE,
scores them with the reward and takes one AdamW step. Settings on the two sides:

  trl AlignPropConfig                          mmalign
  train_batch_size = B / g,                    TrainConfig.batch_size = B, grad_accum = g
    train_gradient_accumulation_steps = g
  truncated_backprop_rand = False,             RewardBackpropConfig(truncation="last", backprop_steps=K)
    truncated_backprop_timestep = S − K          (with a fixed point AlignProp's truncation is DRaFT-K's)
  gradient_checkpoint (always on in trl)       checkpointing = True
  sample_num_steps, sample_eta,                model.num_steps, eta, guidance_scale
    sample_guidance_scale
  loss 10 − mean(r)                            loss "negative": −r (the same gradient)
  train_learning_rate, adam wd/eps,            lr, weight_decay, max_grad_norm (AdamW, constant LR)
    train_max_grad_norm
  DefaultDDPOStableDiffusionPipeline(use_lora=True): LoRA r=4, alpha=4, gaussian init, to_q/to_k/to_v/to_out.0
                                               LoraSpec(r=4, alpha=4) (the same four UNet targets)
  reward: mean pixel value of the [0, 1] image (trl's postprocessed output; mmalign's [-1, 1] image mapped to it)

Measured per step: wall and CPU time between consecutive optimizer steps (a global `torch.optim` step post-hook),
so sampling, decoding, reward and backward are all inside; the first `--warmup` steps are not timed. Peak RSS at the
end of training. Equivalence checks (η = 0: the chain is a function of the initial noise, which both sides draw
first from the same seed): the prompts of every step, the initial LoRA weights, and the LoRA weights after step 1.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE.parent))  # this checkout's mmalign, whatever the venv has installed
sys.path.insert(1, str(HERE))

from ddpo_vs_trl import prompt_schedule  # noqa: E402
from sampling_overhead import PROMPTS, child_env, prepare_pipeline, profiled, versions  # noqa: E402


class StepClock:
    """(wall, CPU) stamps at the start of training and after every optimizer step; UNet calls per step as
    (batch size, grad enabled), counting the recomputations of checkpointed calls during backward."""

    def __init__(self, unet, on_step=None):
        self.stamps: list[tuple[float, float]] = []
        self.calls: list[dict[str, int]] = [{}]
        self.on_step, self.stopped = on_step, False
        unet.register_forward_pre_hook(self._unet)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._opt)

    def start(self) -> None:
        self.stamps = [(time.perf_counter(), time.process_time())]

    def _unet(self, module, args):
        import torch

        if not self.stopped:
            key = f"{'grad' if torch.is_grad_enabled() else 'no-grad'} batch {int(args[0].shape[0])}"
            self.calls[-1][key] = self.calls[-1].get(key, 0) + 1

    def _opt(self, optimizer, args, kwargs):
        # steps before start() are not training's (e.g. a config-time probe of another optimizer)
        if self.stopped or not self.stamps:
            return
        self.stamps.append((time.perf_counter(), time.process_time()))
        self.calls.append({})
        if self.on_step is not None:
            self.on_step(len(self.stamps) - 1)

    def result(self, warmup: int) -> dict:
        wall = [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        cpu = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return {
            "step_wall_s": wall,
            "step_cpu_s": cpu,
            "median_step_s": statistics.median(wall[warmup:]),
            "median_step_cpu_s": statistics.median(cpu[warmup:]),
            "unet_calls_per_step": self.calls[: len(wall)],
            "optimizer_steps": len(wall),
        }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lora_state(unet) -> dict:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _save_states(args, init, after_step1) -> None:
    import torch

    if args.states:
        torch.save({"init": init, "after_step1": after_step1}, args.states)


def brightness01(images):
    """Mean pixel value of images in [0, 1]: a differentiable reward both sides compute on the same pixels."""
    return images.float().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------ mmalign
def run_mmalign(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from mmalign.core.data import rows_from_records
    from mmalign.core.params import LoraSpec
    from mmalign.train.reward_backprop import RewardBackprop, RewardBackpropConfig
    from mmalign.train.trainer import TrainConfig, Trainer
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy

    torch.set_num_threads(args.threads)
    schedule = prompt_schedule(args.batch, 1, args.epochs)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pipeline, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(args.seed)  # the LoRA init draws from the seed, as in trl's pipeline constructor
    policy = DiffusionImagePolicy(
        pipe, lora=LoraSpec(r=4, alpha=4), num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance
    )

    class Brightness:
        name, differentiable = "brightness", True

        def __call__(self, prompts, images):  # decode gives [-1, 1]; trl's postprocess gives (x + 1) / 2
            return brightness01((images + 1) / 2)

    config = RewardBackpropConfig(truncation="last", backprop_steps=args.backprop_steps, checkpointing=True)
    algo = RewardBackprop(
        policy, rows_from_records([{"prompt": p} for p in PROMPTS[: args.batch]]), Brightness(), config
    )
    prompts_seen, rollout = [], algo.rollout

    def recording_rollout(rows):
        batch, metrics = rollout(rows)
        prompts_seen.append(list(batch["prompt"]))
        return batch, metrics

    algo.rollout = recording_rollout
    init_lora = lora_state(policy.module)
    snapshots: dict[int, dict] = {}
    clock = StepClock(policy.module, lambda s: snapshots.setdefault(s, lora_state(policy.module)))
    out_dir = Path(tempfile.mkdtemp(prefix="mmalign-alignprop-", dir=args.work))
    trainer = Trainer(
        policy,
        algo,
        TrainConfig(
            max_steps=args.epochs,
            batch_size=args.batch,
            grad_accum=args.grad_accum,
            lr=args.lr,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            scheduler="constant",
            progress=False,
            seed=args.seed,
        ),
        out_dir,
    )
    setup_s = time.perf_counter() - t0
    rss_before = _rss_mb()
    clock.start()
    profiled(trainer.train, args.profile)
    clock.stopped = True
    peak = _peak_rss_mb()
    log = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out_dir, ignore_errors=True)
    _save_states(args, init_lora, snapshots.get(1))
    return {
        "side": "mmalign",
        "setup_s": setup_s,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak,
        "prompts": prompts_seen,
        "prompts_match_schedule": prompts_seen == schedule,
        "reward_per_step": [m["train/reward"] for m in log if "train/reward" in m],
        **clock.result(args.warmup),
    }


# ---------------------------------------------------------------------------------------------------- trl
def run_trl(args) -> dict:
    import torch
    import trl
    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    torch.set_num_threads(args.threads)
    schedule = prompt_schedule(args.batch, 1, args.epochs)
    queue = [p for step in schedule for p in step]
    t0 = time.perf_counter()
    # Harness shim (as in ddpo_vs_trl.py): the pipeline constructor logs through accelerate's logger, which needs an
    # accelerate state; AlignPropTrainer creates its Accelerator only later.
    PartialState(cpu=True)
    torch.manual_seed(args.seed)
    sd = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    prompts_seen: list[list[str]] = []
    rewards: list[float] = []

    def prompt_fn():
        if not prompts_seen or len(prompts_seen[-1]) == args.batch:
            prompts_seen.append([])
        prompts_seen[-1].append(queue.pop(0))
        return prompts_seen[-1][-1], {}

    def reward_fn(images, prompts, metadata):
        values = brightness01(images)
        rewards.append(float(values.detach().mean()))
        return values, {}

    logdir = tempfile.mkdtemp(prefix="trl-alignprop-", dir=args.work)
    config = AlignPropConfig(
        exp_name="alignprop_vs_trl",
        seed=args.seed,
        logdir=logdir,
        num_epochs=args.epochs,
        save_freq=10**9,  # no checkpoints
        mixed_precision="no",  # trl's default is fp16
        sample_num_steps=args.steps,
        sample_eta=args.eta,
        sample_guidance_scale=args.guidance,
        train_batch_size=args.batch // args.grad_accum,
        train_gradient_accumulation_steps=args.grad_accum,
        train_learning_rate=args.lr,
        train_adam_beta1=0.9,
        train_adam_beta2=0.999,
        train_adam_weight_decay=args.weight_decay,
        train_adam_epsilon=1e-8,
        train_max_grad_norm=args.max_grad_norm,
        truncated_backprop_rand=False,
        truncated_backprop_timestep=args.steps - args.backprop_steps,
        accelerator_kwargs={"cpu": True},
        project_kwargs={"project_dir": logdir},
    )
    trainer = AlignPropTrainer(config, reward_fn, prompt_fn, sd)
    sd.set_progress_bar_config(disable=True)
    init_lora = lora_state(sd.unet)
    snapshots: dict[int, dict] = {}
    clock = StepClock(sd.unet, lambda s: snapshots.setdefault(s, lora_state(sd.unet)))
    setup_s = time.perf_counter() - t0
    rss_before = _rss_mb()
    # AlignPropTrainer seeded the global RNG in __init__; mmalign's Trainer.train() re-seeds right before its first
    # rollout. Re-seed here so both sides draw step 1's initial noise from the same state (harness only).
    torch.manual_seed(args.seed)
    clock.start()
    profiled(lambda: trainer.train(args.epochs), args.profile)
    clock.stopped = True
    peak = _peak_rss_mb()
    shutil.rmtree(logdir, ignore_errors=True)
    _save_states(args, init_lora, snapshots.get(1))
    return {
        "side": "trl",
        "trl": trl.__version__,
        "setup_s": setup_s,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak,
        "prompts": prompts_seen,
        "prompts_match_schedule": prompts_seen == schedule,
        "reward_per_step": rewards,
        **clock.result(args.warmup),
    }


# ------------------------------------------------------------------------------------------------- driver
_SHARED = (
    "batch", "grad_accum", "steps", "backprop_steps", "eta", "guidance", "epochs", "warmup", "lr", "weight_decay",
    "max_grad_norm", "seed", "threads",
)  # fmt: skip


def _child(side: str, args, states: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--pipeline", args.pipeline]
    cmd += ["--work", str(args.work), *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED]]
    if states is not None:
        cmd += ["--states", str(states)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-12000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(a: dict | None, b: dict | None) -> float:
    if a is None or b is None or set(a) != set(b):
        return float("nan")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def drive(args) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "trl is not installed in this interpreter; create benchmarks/.venv-trl-alignprop (see benchmarks/README.md)"
        )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_pipeline(work, args.preset)
    args.pipeline = info["path"]
    runs: dict[str, list[dict]] = {"mmalign": [], "trl": []}
    for r in range(args.repeats):
        for side in ("mmalign", "trl") if r % 2 == 0 else ("trl", "mmalign"):
            load = os.getloadavg()[0]
            res = _child(side, args, work / f"alignprop-states-{side}.pt" if r == 0 else None)
            res["loadavg_1min_before"] = load
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:7s} {res['median_step_s']:.2f} s/step (steps "
                f"{' '.join(f'{x:.2f}' for x in res['step_wall_s'])}), load avg {load:.2f}",
                file=sys.stderr,
            )
    mm, tr = runs["mmalign"], runs["trl"]
    sm, st = (torch.load(work / f"alignprop-states-{s}.pt") for s in ("mmalign", "trl"))

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    keys = ("median_step_s", "median_step_cpu_s", "setup_s", "rss_before_train_mb", "peak_rss_mb")
    summary = {
        "command": " ".join(
            ["benchmarks/.venv-trl-alignprop/bin/python benchmarks/alignprop_vs_trl.py", *sys.argv[1:]]
        ),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "repeats", "preset")},
        "pipeline": info,
        "versions": {**versions(), "trl": tr[0]["trl"]},
        "loadavg_range": [
            min(r["loadavg_1min_before"] for rs in runs.values() for r in rs),
            max(r["loadavg_1min_before"] for rs in runs.values() for r in rs),
        ],
        "median": {side: {k: med(rs, k) for k in keys} for side, rs in runs.items()},
        "ratio_trl_over_mmalign": {
            "step_wall": med(tr, "median_step_s") / med(mm, "median_step_s"),
            "step_cpu": med(tr, "median_step_cpu_s") / med(mm, "median_step_cpu_s"),
            "peak_rss": med(tr, "peak_rss_mb") / med(mm, "peak_rss_mb"),
        },
        "paired_ratio_per_repeat": [
            t["median_step_s"] / m["median_step_s"] for m, t in zip(mm, tr, strict=True)
        ],
        "unet_calls_step1": {
            "mmalign": mm[0]["unet_calls_per_step"][0],
            "trl": tr[0]["unet_calls_per_step"][0],
        },
        "prompts_match_schedule": {
            "mmalign": mm[0]["prompts_match_schedule"],
            "trl": tr[0]["prompts_match_schedule"],
        },
        "init_lora_max_abs_diff": _max_diff(sm["init"], st["init"]),
        "lora_after_step1_max_abs_diff": _max_diff(sm["after_step1"], st["after_step1"]),
        "lora_after_step1_max_abs_value": max(float(v.abs().max()) for v in st["after_step1"].values()),
        "reward_per_step": {"mmalign": mm[0]["reward_per_step"], "trl": tr[0]["reward_per_step"]},
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    name = args.out_name or f"alignprop_vs_trl-k{args.backprop_steps}"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(md)


def _fmt_calls(calls: dict) -> str:
    return ", ".join(f"{n}x {k}" for k, n in sorted(calls.items()))


def render(s: dict) -> str:
    st, p, v, med, ratio = (
        s["settings"],
        s["pipeline"],
        s["versions"],
        s["median"],
        s["ratio_trl_over_mmalign"],
    )
    m, t = med["mmalign"], med["trl"]

    def runs(side, key="median_step_s"):
        return " ".join(f"{r[key]:.2f}" for r in s["runs"][side])

    rewards = s["reward_per_step"]
    return "\n".join(
        [
            f"`{s['command']}`",
            "",
            f"Pipeline `{p['preset']}`: UNet {p['parameters']['unet']:,} parameters, {p['latent_size']}x"
            f"{p['latent_size']} latents, {p['image_size']}x{p['image_size']} images. A step: {st['batch']} images "
            f"({st['grad_accum']} micro-batch(es)), {st['steps']} DDIM steps (η {st['eta']}, guidance {st['guidance']}), "
            f"gradients through the last {st['backprop_steps']} with every UNet call checkpointed, VAE decode, "
            f"brightness reward, one AdamW step (lr {st['lr']:g}, wd {st['weight_decay']:g}, clip "
            f"{st['max_grad_norm']:g}); LoRA r=4, alpha=4; fp32, {st['threads']} thread(s); {st['epochs']} steps per "
            f"run, the first {st['warmup']} not timed; median over steps, then over {st['repeats']} alternating runs "
            f"(1-min load average {s['loadavg_range'][0]:.1f}-{s['loadavg_range'][1]:.1f}). torch {v['torch']}, "
            f"diffusers {v['diffusers']}, peft {v['peft']}, trl {v['trl']}.",
            "",
            "| per step | mmalign | trl 0.23.1 AlignPropTrainer | trl / mmalign |",
            "| --- | ---: | ---: | ---: |",
            f"| wall s | {m['median_step_s']:.2f} | {t['median_step_s']:.2f} | {ratio['step_wall']:.2f}× |",
            f"| wall s of each run | {runs('mmalign')} | {runs('trl')} | "
            f"{' '.join(f'{q:.2f}' for q in s['paired_ratio_per_repeat'])} (paired) |",
            f"| CPU s | {m['median_step_cpu_s']:.2f} | {t['median_step_cpu_s']:.2f} | {ratio['step_cpu']:.2f}× |",
            f"| peak RSS (MB) | {m['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {ratio['peak_rss']:.2f}× |",
            f"| RSS before training (MB) | {m['rss_before_train_mb']:.0f} | {t['rss_before_train_mb']:.0f} | |",
            f"| UNet calls in step 1 | {_fmt_calls(s['unet_calls_step1']['mmalign'])} | "
            f"{_fmt_calls(s['unet_calls_step1']['trl'])} | |",
            f"| mean reward per step | {' '.join(f'{x:.4f}' for x in rewards['mmalign'])} | "
            f"{' '.join(f'{x:.4f}' for x in rewards['trl'])} | |",
            "",
            f"- prompts of every step as scheduled: {s['prompts_match_schedule']}; initial LoRA weights, max abs diff "
            f"{s['init_lora_max_abs_diff']:.1e}; LoRA weights after step 1, max abs diff "
            f"{s['lora_after_step1_max_abs_diff']:.1e} (largest LoRA weight {s['lora_after_step1_max_abs_value']:.2f})",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("mmalign", "trl"), help="internal: run one side and print JSON")
    p.add_argument("--pipeline", help="with --side: the saved pipeline directory")
    p.add_argument("--states", help="with --side: save the initial and after-step-1 LoRA weights here")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "alignprop"))
    p.add_argument("--preset", choices=("small", "fixture"), default="small")
    p.add_argument(
        "--batch", type=int, default=4, help=f"images per step, distinct prompts (at most {len(PROMPTS)})"
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="DDIM sampling steps")
    p.add_argument("--backprop-steps", type=int, default=10, help="K: steps with gradients (the last K)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps not timed")
    p.add_argument("--lr", type=float, default=1e-3, help="trl's default")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="trl's default")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-name", help="results as benchmarks/out/NAME.{md,json}")
    p.add_argument("--profile", help="with --side: CPU-time cProfile of the training call to this file")
    p.add_argument("--render", metavar="JSON", help="only print the table of a results JSON written earlier")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.batch > len(PROMPTS) or args.batch % args.grad_accum:
        p.error(f"--batch must be at most {len(PROMPTS)} and divide by --grad-accum")
    if not 1 <= args.backprop_steps <= args.steps:
        p.error("--backprop-steps must be in 1..--steps")
    if args.side is None:
        drive(args)
        return
    if not args.pipeline:
        p.error("--side needs --pipeline (or run without --side to build one)")
    print(json.dumps(run_mmalign(args) if args.side == "mmalign" else run_trl(args)))


if __name__ == "__main__":
    main()
