"""A DDPO epoch: mmalign vs trl 0.23.1's `DDPOTrainer`, same tiny pipeline, prompts, reward and work (CPU).

trl removed DDPO after 0.23.x, so the trl side runs in its own venv, `benchmarks/.venv-ddpo` (see
benchmarks/README.md); mmalign is installed there too, and one command runs both sides, each in its own subprocess,
alternating, `--repeats` times:

    benchmarks/.venv-ddpo/bin/python benchmarks/ddpo_vs_trl.py

An epoch is one rollout of S = prompts x samples-per-prompt images sampled in one batch (DDIM, eta, classifier-free
guidance), their JPEG-compressibility rewards, per-prompt advantages, then `inner_epochs` optimizer steps, each
over all S samples x all trained denoising steps in `grad_accum` micro-batches of S / grad_accum samples. Settings
on the two sides:

  trl DDPOConfig                              mmalign
  sample_batch_size = S,                      TrainConfig.batch_size = S (one rollout = one sampled batch),
    sample_num_batches_per_epoch = 1            DiffusionPGConfig.samples_per_prompt
  train_num_inner_epochs = I                  TrainConfig.ppo_epochs = I   (max_steps = epochs x I)
  train_batch_size = S / g,                   TrainConfig.grad_accum = g
    train_gradient_accumulation_steps = g
  train_timestep_fraction                     DiffusionPGConfig.timestep_fraction
  train_clip_range, train_adv_clip_max        clip_range, max_abs_advantage
  per_prompt_stat_tracking (buffer, min)      advantage=per_prompt, stat_buffer, stat_min_count
  train_learning_rate, adam wd/eps, max norm  lr, weight_decay, max_grad_norm (AdamW, constant LR)
  DefaultDDPOStableDiffusionPipeline(use_lora=True): LoRA r=4, alpha=4, gaussian init, to_q/to_k/to_v/to_out.0
                                              LoraSpec(r=4, alpha=4) (mmalign's UNet targets are the same four)

trl accumulates gradients over train_gradient_accumulation_steps x (trained timesteps) backward passes, so it takes
S / (train_batch_size x g) = 1 optimizer step per inner epoch: both sides make I optimizer steps per epoch, and each
runs the UNet (batch 2 x S / g with guidance) forward+backward I x g x (trained timesteps) times, after one sampling
pass of (steps) forwards of batch 2 x S. The benchmark counts the UNet calls of every epoch on both sides to check it.

Measured per epoch (sampling + rewards + training, excluding model loading): wall and CPU time from the start of the
epoch's rollout (mmalign: `DiffusionPolicyGradient.rollout`; trl: `DDPOTrainer.step`) to the end of its last
optimizer step (a global `torch.optim` step post-hook), and the share before the first gradient-enabled UNet call
(sampling + decoding + reward). The first `--warmup` epochs are not timed.

Equivalence checks (same RNG stream at the start of sampling on both sides, see `seed_note` in the JSON): the
initial LoRA weights, the first epoch's prompts and per-sample rewards, and the LoRA weights after epoch 1 (with
timestep fraction 1 the epoch's gradients are order-independent sums) are compared between the sides. Later epochs
draw different noise (trl spends the global RNG on shuffling), so their rewards are a sanity check only.

`--side mmalign|trl --profile FILE` runs one side alone under a CPU-time cProfile of its training call.
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
sys.path.insert(0, str(HERE))

from sampling_overhead import PROMPTS, child_env, prepare_pipeline, profiled, versions  # noqa: E402


def prompt_schedule(n_prompts: int, samples_per_prompt: int, epochs: int) -> list[list[str]]:
    """The prompts of every rollout exactly as mmalign's Trainer draws them (seeded permutation per pass over the
    prompt list, `Trainer._global_indices` with seed 0), each repeated samples_per_prompt times in a row."""
    import torch

    prompts = PROMPTS[:n_prompts]
    out = []
    for epoch in range(
        epochs
    ):  # one rollout takes all n_prompts prompts, so rollout e is pass e over the list
        order = torch.randperm(
            n_prompts, generator=torch.Generator().manual_seed(0 * 1_000_003 + epoch)
        ).tolist()
        out.append([prompts[i] for i in order for _ in range(samples_per_prompt)])
    return out


def jpeg_kb_01(images) -> list[float]:
    """JPEG (quality 95) size in kB of images in [0, 1], as DDPO's jpeg_compressibility computes it."""
    import io

    import torch
    from PIL import Image

    arr = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return sizes


class EpochClock:
    """Stamps (wall, CPU) at epoch starts, at the first grad-enabled UNet call of an epoch and after every
    optimizer step; counts UNet calls per epoch as (batch size, grad enabled)."""

    def __init__(self, unet, steps_per_epoch: int, on_epoch_end=None):
        self.per_epoch = steps_per_epoch
        self.starts, self.train_starts, self.ends = [], [], []
        self.calls: list[dict[str, int]] = []
        self.opt_steps = 0
        self.stopped = False  # set after training: later UNet calls (the evaluation) are not counted
        self.on_epoch_end = on_epoch_end
        unet.register_forward_pre_hook(self._unet)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._opt)

    @staticmethod
    def _now():
        return time.perf_counter(), time.process_time()

    def epoch_start(self):
        self.starts.append(self._now())
        self.calls.append({})

    def _unet(self, module, args):
        import torch

        if not self.calls or self.stopped:
            return
        grad = torch.is_grad_enabled()
        if grad and len(self.train_starts) < len(self.starts):
            self.train_starts.append(self._now())
        key = f"{'fwd+bwd' if grad else 'no-grad fwd'} batch {int(args[0].shape[0])}"
        self.calls[-1][key] = self.calls[-1].get(key, 0) + 1

    def _opt(self, optimizer, args, kwargs):
        self.opt_steps += 1
        if self.opt_steps % self.per_epoch == 0:
            self.ends.append(self._now())
            if self.on_epoch_end is not None:
                self.on_epoch_end(len(self.ends))

    def result(self, warmup: int) -> dict:
        n = len(self.ends)
        wall = [self.ends[i][0] - self.starts[i][0] for i in range(n)]
        cpu = [self.ends[i][1] - self.starts[i][1] for i in range(n)]
        sampling = [self.train_starts[i][0] - self.starts[i][0] for i in range(n)]
        timed = slice(warmup, n)
        return {
            "epoch_wall_s": wall,
            "epoch_cpu_s": cpu,
            "epoch_sampling_wall_s": sampling,
            "median_epoch_s": statistics.median(wall[timed]),
            "median_epoch_cpu_s": statistics.median(cpu[timed]),
            "median_sampling_s": statistics.median(sampling[timed]),
            "median_training_s": statistics.median(
                [w - s for w, s in zip(wall, sampling, strict=True)][timed]
            ),
            "unet_calls_per_epoch": self.calls[:n],
            "optimizer_steps": self.opt_steps,
        }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_state(unet) -> dict:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _common(args):
    import torch

    torch.set_num_threads(args.threads)
    n_images = args.prompts * args.samples_per_prompt
    if n_images % args.grad_accum:
        raise SystemExit(f"images per epoch ({n_images}) must divide by --grad-accum ({args.grad_accum})")
    return n_images, prompt_schedule(args.prompts, args.samples_per_prompt, args.epochs)


# ------------------------------------------------------------------------------------------------ mmalign
def run_mmalign(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from mmalign.core.data import rows_from_records
    from mmalign.core.params import LoraSpec
    from mmalign.core.reward import score
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
    from mmalign.train.trainer import TrainConfig, Trainer
    from mmalign.vision.diffusion_policy import DiffusionImagePolicy
    from mmalign.vision.rewards import JpegCompressibility

    n_images, schedule = _common(args)
    t0 = time.perf_counter()
    # What DiffusionImagePolicy.from_pretrained does, split so that the LoRA init draws from seed 0 as in trl
    # (DDPOTrainer seeds right before adding the adapter).
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pipeline, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(args.seed)
    policy = DiffusionImagePolicy(
        pipe,
        lora=LoraSpec(r=4, alpha=4),
        num_steps=args.steps,
        eta=args.eta,
        guidance_scale=args.guidance,
    )
    reward = JpegCompressibility()
    algo = DiffusionPolicyGradient(
        policy,
        rows_from_records([{"prompt": p} for p in PROMPTS[: args.prompts]]),
        reward,
        DiffusionPGConfig(
            clip_range=args.clip_range,
            max_abs_advantage=args.adv_clip,
            timestep_fraction=args.timestep_fraction,
            samples_per_prompt=args.samples_per_prompt,
            advantage="per_prompt",
            stat_buffer=args.stat_buffer,
            stat_min_count=args.stat_min_count,
        ),
    )
    init_lora = lora_state(policy.module)
    snapshots = {}
    clock = EpochClock(
        policy.module, args.inner_epochs, lambda e: snapshots.setdefault(e, lora_state(policy.module))
    )
    rollout_prompts, rollout_rewards = [], []
    inner = algo.rollout

    def rollout(rows):
        clock.epoch_start()
        examples, metrics = inner(rows)
        rollout_prompts.append([e["prompt"] for e in examples])
        rollout_rewards.append(metrics["rollout/reward"])
        return examples, metrics

    algo.rollout = rollout
    # Per-sample rewards of rollouts, from the reward calls made inside rollout().
    per_sample = []
    algo.reward = RecordingReward(reward, per_sample)

    def evaluate(prompts):
        with torch.random.fork_rng():
            torch.manual_seed(args.eval_seed)
            images = policy.decode(policy.sample(prompts, record=False).final)
        return (-torch.as_tensor(score(reward, prompts, images))).tolist()  # kB

    out_dir = Path(tempfile.mkdtemp(prefix="mmalign-ddpo-", dir=args.work))
    config = TrainConfig(
        max_steps=args.epochs * args.inner_epochs,
        batch_size=n_images,
        grad_accum=args.grad_accum,
        ppo_epochs=args.inner_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        adam_betas=(0.9, 0.999),
        scheduler="constant",
        warmup_steps=0,
        max_grad_norm=args.max_grad_norm,
        progress=False,
        seed=args.seed,
    )
    trainer = Trainer(policy, algo, config, out_dir)
    setup_s = time.perf_counter() - t0
    eval_prompts = schedule[0]
    eval_before = evaluate(eval_prompts) if args.eval else None
    rss_before = _rss_mb()
    t1 = time.perf_counter()
    profiled(trainer.train, args.profile)
    train_call_s = time.perf_counter() - t1
    clock.stopped = True
    peak_rss = _peak_rss_mb()  # before the evaluation, which samples without a graph
    shutil.rmtree(out_dir, ignore_errors=True)
    eval_after = evaluate(eval_prompts) if args.eval else None
    _save_states(args, init_lora, snapshots.get(1))
    return {
        "side": "mmalign",
        "setup_s": setup_s,
        "train_call_s": train_call_s,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss,
        "rollout_prompts": rollout_prompts,
        "rollout_reward_mean": rollout_rewards,
        "first_rollout_rewards": per_sample[0] if per_sample else None,
        "eval_kb_before": eval_before,
        "eval_kb_after": eval_after,
        "prompts_match_schedule": rollout_prompts == schedule,
        **clock.result(args.warmup),
    }


class RecordingReward:
    """The same reward, keeping a copy of every batch of values."""

    def __init__(self, reward, store: list):
        self.reward, self.store = reward, store
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, prompts, images):
        values = self.reward(prompts, images)
        self.store.append([float(r) for r in values])
        return values


def _save_states(args, init, after_epoch1) -> None:
    import torch

    if args.states:
        torch.save({"init": init, "after_epoch1": after_epoch1}, args.states)


# ---------------------------------------------------------------------------------------------------- trl
def run_trl(args) -> dict:
    import torch
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    n_images, schedule = _common(args)
    t0 = time.perf_counter()
    # Shim 1 (harness only): DefaultDDPOStableDiffusionPipeline tries `load_lora_weights(dir)`, and when the directory
    # has no pytorch_lora_weights.safetensors it logs a warning through accelerate's logger, which raises
    # "RuntimeError: You must initialize the accelerate state ..." unless an accelerate state exists. DDPOTrainer
    # creates its Accelerator only later, so initialise the (CPU, single-process) state first, as the error asks.
    from accelerate import PartialState

    PartialState(cpu=True)
    sd = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    queue = [p for epoch in schedule for p in epoch]
    rollout_prompts: list[list[str]] = []

    def prompt_fn():
        rollout_prompts[-1].append(queue.pop(0))
        return rollout_prompts[-1][-1], {}

    per_sample = []

    def reward_fn(images, prompts, metadata):
        kb = jpeg_kb_01(images)
        per_sample.append([-k for k in kb])
        return torch.tensor([-k for k in kb]), {}

    logdir = tempfile.mkdtemp(prefix="trl-ddpo-", dir=args.work)
    config = DDPOConfig(
        exp_name="ddpo_vs_trl",
        seed=args.seed,
        logdir=logdir,
        num_epochs=args.epochs,
        save_freq=10**9,  # no checkpoints (trl saves accelerator state every save_freq epochs)
        mixed_precision="no",  # trl's default is fp16
        sample_num_steps=args.steps,
        sample_eta=args.eta,
        sample_guidance_scale=args.guidance,
        sample_batch_size=n_images,
        sample_num_batches_per_epoch=1,
        train_batch_size=n_images // args.grad_accum,
        train_gradient_accumulation_steps=args.grad_accum,
        train_num_inner_epochs=args.inner_epochs,
        train_learning_rate=args.lr,
        train_adam_beta1=0.9,
        train_adam_beta2=0.999,
        train_adam_weight_decay=args.weight_decay,
        train_adam_epsilon=1e-8,
        train_max_grad_norm=args.max_grad_norm,
        train_cfg=True,
        train_adv_clip_max=args.adv_clip,
        train_clip_range=args.clip_range,
        train_timestep_fraction=args.timestep_fraction,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=args.stat_buffer,
        per_prompt_stat_tracking_min_count=args.stat_min_count,
        accelerator_kwargs={"cpu": True},
        project_kwargs={"project_dir": logdir},
    )
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, sd)
    sd.set_progress_bar_config(disable=True)
    unet = sd.unet
    init_lora = lora_state(unet)
    snapshots = {}
    clock = EpochClock(unet, args.inner_epochs, lambda e: snapshots.setdefault(e, lora_state(unet)))
    inner_step = trainer.step

    def step(epoch, global_step):
        clock.epoch_start()
        rollout_prompts.append([])
        return inner_step(epoch, global_step)

    trainer.step = step

    @torch.no_grad()
    def evaluate(prompts):
        # As DDPOTrainer._generate_samples samples (prompt embeds + the "" negative embeds, pipeline_step), with the
        # global RNG seeded: trl's pipeline_step draws each step's noise from the global RNG even with a generator.
        with torch.random.fork_rng():
            torch.manual_seed(args.eval_seed)
            sd.unet.eval()
            ids = sd.tokenizer(
                prompts,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=sd.tokenizer.model_max_length,
            ).input_ids
            out = sd(
                prompt_embeds=sd.text_encoder(ids)[0],
                negative_prompt_embeds=trainer.neg_prompt_embed.repeat(len(prompts), 1, 1),
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                eta=args.eta,
                output_type="pt",
            )
        return jpeg_kb_01(out.images)

    setup_s = time.perf_counter() - t0
    eval_prompts = schedule[0]
    eval_before = evaluate(eval_prompts) if args.eval else None
    # DDPOTrainer seeded the global RNG (seed 0) in __init__ and then spent it on the LoRA init; mmalign's
    # Trainer.train() re-seeds right before its first rollout. Re-seed here so both sides sample epoch 1 from the same
    # RNG state (harness only: it changes no trl code or setting).
    torch.manual_seed(args.seed)
    rss_before = _rss_mb()
    t1 = time.perf_counter()
    profiled(lambda: trainer.train(args.epochs), args.profile)
    train_call_s = time.perf_counter() - t1
    clock.stopped = True
    peak_rss = _peak_rss_mb()
    eval_after = evaluate(eval_prompts) if args.eval else None
    shutil.rmtree(logdir, ignore_errors=True)
    _save_states(args, init_lora, snapshots.get(1))
    return {
        "side": "trl",
        "trl": trl.__version__,
        "setup_s": setup_s,
        "train_call_s": train_call_s,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss,
        "rollout_prompts": rollout_prompts,
        "rollout_reward_mean": [statistics.fmean(r) for r in per_sample],
        "first_rollout_rewards": per_sample[0] if per_sample else None,
        "eval_kb_before": eval_before,
        "eval_kb_after": eval_after,
        "prompts_match_schedule": rollout_prompts == schedule,
        **clock.result(args.warmup),
    }


# ------------------------------------------------------------------------------------------------- driver
_SHARED = (
    "prompts", "samples_per_prompt", "steps", "eta", "guidance", "epochs", "warmup", "inner_epochs", "grad_accum",
    "timestep_fraction", "clip_range", "adv_clip", "stat_buffer", "stat_min_count", "lr", "weight_decay",
    "max_grad_norm", "seed", "eval_seed", "threads",
)  # fmt: skip


def _child(side: str, args, states: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--pipeline", args.pipeline]
    cmd += ["--work", str(args.work), *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED]]
    if not args.eval:
        cmd.append("--no-eval")
    if states is not None:
        cmd += ["--states", str(states)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-12000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(a: dict, b: dict) -> float:
    if a is None or b is None or set(a) != set(b):
        return float("nan")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def drive(args) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "trl is not installed in this interpreter; create benchmarks/.venv-ddpo (see benchmarks/README.md) and "
            "run: benchmarks/.venv-ddpo/bin/python benchmarks/ddpo_vs_trl.py"
        )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_pipeline(work, args.preset)
    args.pipeline = info["path"]
    runs: dict[str, list[dict]] = {"mmalign": [], "trl": []}
    for r in range(args.repeats):
        for side in ("mmalign", "trl") if r % 2 == 0 else ("trl", "mmalign"):
            load = os.getloadavg()[0]
            res = _child(side, args, work / f"ddpo-states-{side}.pt" if r == 0 else None)
            res["loadavg_1min_before"] = load
            res["loadavg_1min_after"] = os.getloadavg()[0]
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:7s} {res['median_epoch_s']:.2f} s/epoch (sampling "
                f"{res['median_sampling_s']:.2f} s, training {res['median_training_s']:.2f} s; epochs "
                f"{' '.join(f'{x:.2f}' for x in res['epoch_wall_s'])}), rewards "
                f"{' '.join(f'{x:.3f}' for x in res['rollout_reward_mean'])}, load avg {load:.2f}",
                file=sys.stderr,
            )
    mm, tr = runs["mmalign"], runs["trl"]
    sm, st = (torch.load(work / f"ddpo-states-{s}.pt") for s in ("mmalign", "trl"))
    first_m, first_t = mm[0]["first_rollout_rewards"], tr[0]["first_rollout_rewards"]

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    keys = (
        "median_epoch_s", "median_epoch_cpu_s", "median_sampling_s", "median_training_s", "setup_s",
        "rss_before_train_mb", "peak_rss_mb",
    )  # fmt: skip
    lora_scale = max(float(v.abs().max()) for v in st["after_epoch1"].values()) if st["after_epoch1"] else 0.0
    summary = {
        "command": " ".join(["benchmarks/.venv-ddpo/bin/python benchmarks/ddpo_vs_trl.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "repeats", "preset")},
        "images_per_epoch": args.prompts * args.samples_per_prompt,
        "pipeline": info,
        "versions": {**versions(), "trl": tr[0]["trl"]},
        "cpu_cores": os.cpu_count(),
        "loadavg_range": [
            min(min(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
            max(max(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
        ],
        "median": {side: {k: med(rs, k) for k in keys} for side, rs in runs.items()},
        "ratio_trl_over_mmalign": {
            "epoch_wall": med(tr, "median_epoch_s") / med(mm, "median_epoch_s"),
            "epoch_cpu": med(tr, "median_epoch_cpu_s") / med(mm, "median_epoch_cpu_s"),
            "sampling": med(tr, "median_sampling_s") / med(mm, "median_sampling_s"),
            "training": med(tr, "median_training_s") / med(mm, "median_training_s"),
        },
        "paired_ratio_per_repeat": [
            t["median_epoch_s"] / m["median_epoch_s"] for m, t in zip(mm, tr, strict=True)
        ],
        "unet_calls_per_epoch": {
            "mmalign": mm[0]["unet_calls_per_epoch"][0],
            "trl": tr[0]["unet_calls_per_epoch"][0],
        },
        "same_unet_calls_every_epoch": mm[0]["unet_calls_per_epoch"] == tr[0]["unet_calls_per_epoch"],
        "optimizer_steps": {"mmalign": mm[0]["optimizer_steps"], "trl": tr[0]["optimizer_steps"]},
        "prompts_match_schedule": {
            "mmalign": mm[0]["prompts_match_schedule"],
            "trl": tr[0]["prompts_match_schedule"],
        },
        "init_lora_max_abs_diff": _max_diff(sm["init"], st["init"]),
        "first_rollout_rewards": {"mmalign": first_m, "trl": first_t},
        "first_rollout_max_abs_reward_diff": max(abs(a - b) for a, b in zip(first_m, first_t, strict=True)),
        "lora_after_epoch1_max_abs_diff": _max_diff(sm["after_epoch1"], st["after_epoch1"]),
        "lora_after_epoch1_max_abs_value": lora_scale,
        "rollout_reward_mean": {"mmalign": mm[0]["rollout_reward_mean"], "trl": tr[0]["rollout_reward_mean"]},
        "eval_kb": {
            side: {"before": rs[0]["eval_kb_before"], "after": rs[0]["eval_kb_after"]}
            for side, rs in runs.items()
        },
        "seed_note": "trl side re-seeds torch (seed) right before trainer.train(); mmalign's policy is built with "
        "torch.manual_seed(seed) right before the LoRA adapter is added",
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    name = args.out_name or "ddpo_vs_trl"
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
    pc = p["parameters"]

    def runs(side, key="median_epoch_s"):
        return " ".join(f"{r[key]:.2f}" for r in s["runs"][side])

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    ev = s["eval_kb"]
    lines = [
        f"`{s['command']}`",
        "",
        f"Pipeline `{p['preset']}`: UNet {pc['unet']:,} parameters (channels {tuple(p['unet_channels'])}, "
        f"{p['latent_size']}x{p['latent_size']} latents), VAE {pc['vae']:,}, text encoder {pc['text_encoder']:,}; "
        f"{p['image_size']}x{p['image_size']} images. Epoch: {s['images_per_epoch']} images ({st['prompts']} prompts x "
        f"{st['samples_per_prompt']}) sampled in one batch, {st['steps']} DDIM steps, eta {st['eta']}, guidance "
        f"{st['guidance']}; JPEG-compressibility reward; per-prompt stats (buffer {st['stat_buffer']}, min count "
        f"{st['stat_min_count']}); {st['inner_epochs']} inner epochs, each one optimizer step over all samples x "
        f"{st['timestep_fraction']:g} of the steps in {st['grad_accum']} micro-batches; PPO clip {st['clip_range']:g}, "
        f"advantage clip {st['adv_clip']:g}; LoRA r=4, alpha=4 on to_q/k/v/out.0; AdamW lr {st['lr']:g}, weight decay "
        f"{st['weight_decay']:g}, grad norm {st['max_grad_norm']:g}; fp32, {st['threads']} torch thread(s), "
        f"{s['cpu_cores']} CPU cores (shared; 1-min load average {s['loadavg_range'][0]:.1f}-"
        f"{s['loadavg_range'][1]:.1f}). {st['epochs']} epochs per run, the first {st['warmup']} not timed; median "
        f"over epochs, then over {st['repeats']} alternating runs. torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}, peft {v['peft']}, trl {v['trl']}.",
        "",
        "| per epoch | mmalign | trl 0.23.1 DDPOTrainer | trl / mmalign |",
        "| --- | ---: | ---: | ---: |",
        f"| wall s (sampling + training) | {m['median_epoch_s']:.2f} | {t['median_epoch_s']:.2f} | "
        f"{ratio['epoch_wall']:.2f}× |",
        f"| wall s of each run | {runs('mmalign')} | {runs('trl')} | "
        f"{' '.join(f'{q:.2f}' for q in s['paired_ratio_per_repeat'])} (paired) |",
        f"| CPU s | {m['median_epoch_cpu_s']:.2f} | {t['median_epoch_cpu_s']:.2f} | {ratio['epoch_cpu']:.2f}× |",
        f"| CPU s of each run | {runs('mmalign', 'median_epoch_cpu_s')} | {runs('trl', 'median_epoch_cpu_s')} | |",
        f"| sampling + decode + reward, wall s | {m['median_sampling_s']:.2f} | {t['median_sampling_s']:.2f} | "
        f"{ratio['sampling']:.2f}× |",
        f"| training (inner epochs), wall s | {m['median_training_s']:.2f} | {t['median_training_s']:.2f} | "
        f"{ratio['training']:.2f}× |",
        f"| setup: load + trainer init (s) | {m['setup_s']:.2f} | {t['setup_s']:.2f} | |",
        f"| RSS before training → peak during training (MB) | {m['rss_before_train_mb']:.0f} → "
        f"{m['peak_rss_mb']:.0f} | {t['rss_before_train_mb']:.0f} → {t['peak_rss_mb']:.0f} | |",
        f"| UNet calls per epoch | {_fmt_calls(s['unet_calls_per_epoch']['mmalign'])} | "
        f"{_fmt_calls(s['unet_calls_per_epoch']['trl'])} | |",
        f"| optimizer steps per run | {s['optimizer_steps']['mmalign']} | {s['optimizer_steps']['trl']} | |",
        f"| mean rollout reward per epoch (−kB) | {' '.join(f'{x:.3f}' for x in s['rollout_reward_mean']['mmalign'])} "
        f"| {' '.join(f'{x:.3f}' for x in s['rollout_reward_mean']['trl'])} | |",
    ]
    if ev["mmalign"]["before"] is not None:
        lines.append(
            f"| fixed-noise eval, mean JPEG kB before → after | {mean(ev['mmalign']['before']):.3f} → "
            f"{mean(ev['mmalign']['after']):.3f} | {mean(ev['trl']['before']):.3f} → {mean(ev['trl']['after']):.3f} | |"
        )
    lines += [
        "",
        f"- same UNet calls (count, batch, grad mode) in every epoch on both sides: {s['same_unet_calls_every_epoch']}; "
        f"prompts of every rollout as scheduled: {s['prompts_match_schedule']}",
        f"- initial LoRA weights, max abs diff: {s['init_lora_max_abs_diff']:.1e}; epoch-1 per-sample rewards, max abs "
        f"diff: {s['first_rollout_max_abs_reward_diff']:.1e}; LoRA weights after epoch 1, max abs diff: "
        f"{s['lora_after_epoch1_max_abs_diff']:.1e} (largest LoRA weight {s['lora_after_epoch1_max_abs_value']:.2f})",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("mmalign", "trl"), help="internal: run one side and print JSON")
    p.add_argument("--pipeline", help="with --side: the saved pipeline directory")
    p.add_argument("--states", help="with --side: save the initial and after-epoch-1 LoRA weights here")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "diffusion"))
    p.add_argument("--preset", choices=("small", "fixture"), default="small")
    p.add_argument("--prompts", type=int, default=4, help=f"distinct prompts (at most {len(PROMPTS)})")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="DDIM sampling steps")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="epochs not timed")
    p.add_argument("--inner-epochs", type=int, default=2, help="optimizer steps per epoch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--timestep-fraction", type=float, default=1.0)
    p.add_argument("--clip-range", type=float, default=1e-4)
    p.add_argument("--adv-clip", type=float, default=5.0)
    p.add_argument("--stat-buffer", type=int, default=16)
    p.add_argument("--stat-min-count", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="trl's default AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-seed", type=int, default=4242, help="noise of the before/after fixed-noise evaluation"
    )
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the before/after evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-name", help="results as benchmarks/out/NAME.{md,json} (default ddpo_vs_trl)")
    p.add_argument("--profile", help="with --side: CPU-time cProfile of the training call to this file")
    p.add_argument("--render", metavar="JSON", help="only print the table of a results JSON written earlier")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.prompts > len(PROMPTS):
        p.error(f"--prompts must be at most {len(PROMPTS)}")
    if args.side is None:
        drive(args)
        return
    if not args.pipeline:
        p.error("--side needs --pipeline (or run without --side to build one)")
    print(json.dumps(run_mmalign(args) if args.side == "mmalign" else run_trl(args)))


if __name__ == "__main__":
    main()
