"""One Flow-GRPO update on a flow model vs one DDPO update on a DDPM model of (about) equal size: time and memory.

Both sides run the same algorithm class (`DiffusionPolicyGradient`, PPO-clip over recorded steps) through the same
`Trainer` step, on a randomly initialised pipeline saved with `save_pretrained`:

  * grpo: the SD3-layout pipeline of `flow_sampling_overhead.py` (`SD3Transformer2DModel`), Flow-GRPO's SDE with
    noise level 0.7, `advantage: grpo` over `--group` samples per prompt, KL to the base (`kl_coef` 0.04);
  * ddpo: a Stable Diffusion 1.x-layout pipeline whose UNet is widened until its parameter count is within a few
    percent of the transformer's, DDIM with η = 1, DDPO's per-prompt advantages, no KL.

Both: full fine-tuning, `--batch` samples per rollout, `--steps` sampler steps of which all but the last are
trained (`train_step_range` [0, 0.9], timestep_fraction 1), guidance `--guidance` (re-scoring with CFG, as both
papers), one optimizer step per rollout. Measured in a fresh process per side, after one warm-up update: the wall
and CPU time of one rollout and of one update (all trained steps' forward and backward, clipping, AdamW), and the
peak RSS growth during the update: the kernel's peak-RSS mark (VmHWM) is reset before the update and read after it,
minus the RSS before it (Linux `/proc/self/clear_refs`). The table is the median
of `--repeats` alternating runs.

    .venv/bin/python benchmarks/grpo_vs_ddpo_update.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from flow_sampling_overhead import make_pipeline as make_sd3  # noqa: E402
from sampling_overhead import child_env, versions  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green line", "a yellow star", "three dots", "a white cross"]
SIDES = ("grpo", "ddpo")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_sd(width: int, seed: int = 0):
    """An SD 1.x-layout pipeline (32x32 images, 16x16 latents) with UNet channels (width, 2·width)."""
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline(seed, width=width, text_width=32, text_layers=2, image_size=32, norm_groups=8)


def prepare(work: Path) -> dict:
    """Save both pipelines; the UNet width is the multiple of 8 whose parameter count is nearest the transformer's."""
    import shutil

    sd3 = make_sd3()
    target = count(sd3.transformer)
    width = min(range(16, 129, 8), key=lambda w: abs(count(make_sd(w).unet) - target))
    sd = make_sd(width)
    paths = {}
    for name, pipe in (("grpo", sd3), ("ddpo", sd)):
        path = work / f"pipeline-{name}"
        shutil.rmtree(path, ignore_errors=True)
        pipe.save_pretrained(str(path))
        paths[name] = str(path)
    return {"paths": paths, "parameters": {"grpo": target, "ddpo": count(sd.unet)}, "unet_width": width}


class Reward:
    name = "mean_pixel"
    differentiable = False

    def __call__(self, prompts, images):
        return images.float().flatten(1).mean(1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS in MB (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def run_side(args) -> dict:
    import torch

    from mmalign.core.data import rows_from_records
    from mmalign.train.diffusion_pg import DiffusionPGConfig, DiffusionPolicyGradient
    from mmalign.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.side == "grpo":
        from mmalign.vision.sd3_policy import SD3Policy

        policy = SD3Policy.from_pretrained(
            args.pipeline,
            num_steps=args.steps,
            guidance_scale=args.guidance,
            sde_type="flow_grpo",
            noise_level=0.7,
            max_sequence_length=0,
        )
        cfg = DiffusionPGConfig(
            advantage="grpo", samples_per_prompt=args.group, kl_coef=0.04, train_step_range=(0.0, 0.9)
        )
    else:
        from mmalign.vision.diffusion_policy import DiffusionImagePolicy

        policy = DiffusionImagePolicy.from_pretrained(
            args.pipeline, num_steps=args.steps, eta=1.0, guidance_scale=args.guidance
        )
        cfg = DiffusionPGConfig(advantage="per_prompt", train_step_range=(0.0, 0.9))
    n_prompts = args.batch // cfg.samples_per_prompt
    rows = rows_from_records([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n_prompts)])
    algorithm = DiffusionPolicyGradient(policy, rows, Reward(), cfg)
    trainer = Trainer(
        policy,
        algorithm,
        TrainConfig(max_steps=1, batch_size=args.batch, lr=1e-5, progress=False, scheduler="constant"),
        Path(args.work) / f"run-{args.side}",
    )
    params = list(policy.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trainer.model = policy.module
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    out = {"side": args.side, "trained_steps": None, "rollout_s": [], "update_s": [], "update_cpu_s": []}
    for i in range(1 + args.updates):  # the first update warms up allocator and kernels
        t0 = time.perf_counter()
        batch, _ = algorithm.rollout(rows)
        rollout_s = time.perf_counter() - t0
        before = reset_peak_rss()
        w0, c0 = time.perf_counter(), time.process_time()
        trainer._optimizer_step([batch], optimizer, scheduler, i)
        update_s, update_cpu = time.perf_counter() - w0, time.process_time() - c0
        growth = _status_mb("VmHWM") - before
        if i == 0:
            out["trained_steps"] = int(batch["steps"].shape[1])
            continue
        out["rollout_s"].append(rollout_s)
        out["update_s"].append(update_s)
        out["update_cpu_s"].append(update_cpu)
        out["peak_rss_growth_mb"] = growth
    out["peak_rss_mb"] = peak_rss_mb()
    out["parameters"] = count(policy.module)
    return out


_SHARED = ("batch", "group", "steps", "guidance", "updates", "threads", "work")


def _child(side: str, args, pipeline: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--pipeline", pipeline]
    cmd += [f"--{k}={getattr(args, k)}" for k in _SHARED]
    env = {**child_env(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            res = _child(side, args, info["paths"][side])
            res["loadavg_1min"] = os.getloadavg()[0]
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side}: update {statistics.median(res['update_s']):.2f} s, "
                f"rollout {statistics.median(res['rollout_s']):.2f} s, +{res['peak_rss_growth_mb']:.0f} MB",
                file=sys.stderr,
            )

    def med(side: str, key: str) -> float:
        return statistics.median(
            statistics.median(r[key]) if isinstance(r[key], list) else r[key] for r in runs[side]
        )

    summary = {
        "command": " ".join([".venv/bin/python benchmarks/grpo_vs_ddpo_update.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED[:-1], "repeats")},
        "parameters": info["parameters"],
        "unet_width": info["unet_width"],
        "trained_steps": {s: runs[s][0]["trained_steps"] for s in SIDES},
        "versions": versions(),
        "loadavg_range": [
            min(r["loadavg_1min"] for rs in runs.values() for r in rs),
            max(r["loadavg_1min"] for rs in runs.values() for r in rs),
        ],
        "median": {
            s: {
                k: med(s, k)
                for k in ("update_s", "update_cpu_s", "rollout_s", "peak_rss_growth_mb", "peak_rss_mb")
            }
            for s in SIDES
        },
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "grpo_vs_ddpo_update.md").write_text(md)
    (out / "grpo_vs_ddpo_update.json").write_text(json.dumps(summary, indent=2))
    print(md)


def render(s: dict) -> str:
    st, med, p = s["settings"], s["median"], s["parameters"]
    g, d = med["grpo"], med["ddpo"]
    lines = [
        f"`{s['command']}`",
        "",
        f"Flow-GRPO on an SD3-layout transformer of {p['grpo']:,} parameters vs DDPO on an SD-layout UNet of "
        f"{p['ddpo']:,} (channels {s['unet_width']}/{2 * s['unet_width']}); {st['batch']} samples per rollout "
        f"(GRPO: groups of {st['group']}), {st['steps']} sampler steps of which {s['trained_steps']['grpo']} are "
        f"trained, guidance {st['guidance']}, full fine-tuning, fp32, {st['threads']} torch thread(s), 2 shared cores "
        f"(1-min load {s['loadavg_range'][0]:.1f}-{s['loadavg_range'][1]:.1f}); median of {st['repeats']} alternating "
        f"runs of {st['updates']} timed update(s) each, after a warm-up update.",
        "",
        "| metric | Flow-GRPO (SD3 transformer) | DDPO (SD UNet) | GRPO / DDPO |",
        "| --- | ---: | ---: | ---: |",
        f"| one update, wall s | {g['update_s']:.2f} | {d['update_s']:.2f} | {g['update_s'] / d['update_s']:.2f} |",
        f"| one update, CPU s | {g['update_cpu_s']:.2f} | {d['update_cpu_s']:.2f} | "
        f"{g['update_cpu_s'] / d['update_cpu_s']:.2f} |",
        f"| one rollout, wall s | {g['rollout_s']:.2f} | {d['rollout_s']:.2f} | {g['rollout_s'] / d['rollout_s']:.2f} |",
        f"| peak RSS growth during the update, MB | {g['peak_rss_growth_mb']:.0f} | {d['peak_rss_growth_mb']:.0f} | |",
        f"| peak RSS of the process, MB | {g['peak_rss_mb']:.0f} | {d['peak_rss_mb']:.0f} | |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=SIDES, help="internal: run one side and print JSON")
    p.add_argument("--pipeline", help="with --side: the saved pipeline directory")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "grpo_vs_ddpo"))
    p.add_argument("--batch", type=int, default=16, help="samples per rollout")
    p.add_argument("--group", type=int, default=4, help="GRPO samples per prompt")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--updates", type=int, default=2, help="timed updates per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--render", metavar="JSON", help="only print the table of a results JSON written earlier")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.side is None:
        drive(args)
        return
    print(json.dumps(run_side(args)))


if __name__ == "__main__":
    main()
