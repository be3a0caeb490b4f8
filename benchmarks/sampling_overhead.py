"""Trajectory-recording sampling (mmalign) vs the plain diffusers pipeline, same tiny model, prompts and seeds (CPU).

One command builds a small randomly initialised Stable Diffusion pipeline (saved with `save_pretrained`), then runs
each side in its own subprocess, alternating, `--repeats` times, and reports medians and the mmalign/diffusers
ratio (lower is better; the project's goal is <= 1.10):

    .venv/bin/python benchmarks/sampling_overhead.py

Sides:
  * diffusers: `StableDiffusionPipeline.from_pretrained(dir, safety_checker=None, requires_safety_checker=False)`
    called with the prompts, `num_inference_steps`, `eta`, `guidance_scale`, `generator=Generator().manual_seed(s)`
    and `output_type="pt"` (images in [0, 1]).
  * mmalign: `DiffusionImagePolicy.from_pretrained(dir, num_steps=N, eta=eta, guidance_scale=g)`, then
    `policy.sample(prompts, generator=..., record=True)` and `policy.decode(traj.final)` (images in [-1, 1]).
  * mmalign-norecord: the same with `record=False`, to separate the cost of recording from the rest.

Measured per sampled batch (prompt encoding, the whole denoising loop, VAE decoding): wall time, process CPU time
and the wall time spent inside `UNet2DConditionModel.forward` (forward pre/post hooks), whose complement is each
side's own per-step overhead. The images of every timed batch are compared between the sides (max abs difference
on the [0, 1] scale): both draw the initial latents and each step's noise from the same generator in the same order.

`--side mmalign --profile FILE` runs one side alone under a CPU-time cProfile of the timed batches. See
benchmarks/README.md for the measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROMPTS = ["a red circle", "two blue squares", "a green line", "a yellow star", "three dots", "a white cross"]
SIDES = ("diffusers", "mmalign", "mmalign-norecord")


# ------------------------------------------------------------------------------------- the tiny pipeline
def make_pipeline(preset: str = "small", seed: int = 0):
    """A randomly initialised Stable Diffusion 1.x-layout pipeline.

    `fixture` is the tests' `tiny_sd_pipeline()` (UNet of 0.2 M parameters, 8x8 latents), which is dominated by
    Python overhead; `small` (the default) widens the UNet to (32, 64) channels at 16x16 latents (32x32 images) so
    that the UNet dominates a step, as it does for real models.
    """
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

    if preset == "fixture":
        return tiny_sd_pipeline(seed)
    if preset != "small":
        raise ValueError(f"unknown preset {preset!r}")
    return tiny_sd_pipeline(seed, width=32, text_width=32, text_layers=2, image_size=32, norm_groups=8)


def prepare_pipeline(work: Path, preset: str) -> dict:
    """Save the pipeline under work/pipeline-<preset> (rebuilt every time: deterministic) and describe it."""
    import shutil

    pipe = make_pipeline(preset)
    path = work / f"pipeline-{preset}"
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(str(path))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {
        "path": str(path),
        "preset": preset,
        "parameters": {
            "unet": count(pipe.unet),
            "vae": count(pipe.vae),
            "text_encoder": count(pipe.text_encoder),
        },
        "latent_size": pipe.unet.config.sample_size,
        "image_size": pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1),
        "unet_channels": list(pipe.unet.config.block_out_channels),
    }


# ----------------------------------------------------------------------------------------------- helpers
def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "DIFFUSERS_VERBOSITY": "error",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }


class UnetClock:
    """Wall time spent inside a module's forward, and the number and batch sizes of its calls (and grad mode)."""

    def __init__(self, module):
        self.total, self.calls, self._t = 0.0, [], None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        import torch

        self._t = time.perf_counter()
        self.calls.append((int(args[0].shape[0]), torch.is_grad_enabled()))

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._t


def profiled(fn, path: str | None, top: int = 40):
    """Run fn, under a CPU-time cProfile if `path` (stats dumped there, top by tottime and cumtime to stderr)."""
    if not path:
        return fn()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile(time.process_time)
    out = prof.runcall(fn)
    prof.dump_stats(path)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    sys.stderr.write(buf.getvalue())
    return out


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
    }


# ------------------------------------------------------------------------------------------------ a side
def run_side(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    prompts = (PROMPTS * args.batch)[: args.batch]
    t0 = time.perf_counter()
    if args.side == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.pipeline, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.unet

        def sample_batch(seed: int) -> torch.Tensor:
            return pipe(
                prompts,
                num_inference_steps=args.steps,
                eta=args.eta,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
    else:
        from mmalign.vision.diffusion_policy import DiffusionImagePolicy

        policy = DiffusionImagePolicy.from_pretrained(
            args.pipeline, num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance
        )
        unet = policy.module
        record = args.side == "mmalign"

        def sample_batch(seed: int) -> torch.Tensor:
            traj = policy.sample(prompts, generator=torch.Generator().manual_seed(seed), record=record)
            return (policy.decode(traj.final) + 1) / 2  # [-1, 1] -> [0, 1], diffusers' output_type="pt" scale

    load_s = time.perf_counter() - t0
    clock = UnetClock(unet)
    images, walls, cpus, unet_s = [], [], [], []

    def loop():
        for i in range(args.warmup + args.batches):
            w0, c0, u0 = time.perf_counter(), time.process_time(), clock.total
            out = sample_batch(args.seed + i)
            if i >= args.warmup:
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
                unet_s.append(clock.total - u0)
                images.append(out.detach().float().cpu())

    profiled(loop, args.profile)
    if args.images:
        torch.save(torch.stack(images), args.images)
    n_calls = len(clock.calls) // (args.warmup + args.batches)
    return {
        "side": args.side,
        "load_s": load_s,
        "batch_s": walls,
        "cpu_s": cpus,
        "unet_s": unet_s,
        "median_batch_s": statistics.median(walls),
        "median_cpu_s": statistics.median(cpus),
        "median_unet_s": statistics.median(unet_s),
        "median_non_unet_s": statistics.median(w - u for w, u in zip(walls, unet_s, strict=True)),
        "unet_calls_per_batch": n_calls,
        "unet_batch_sizes": sorted({b for b, _ in clock.calls}),
        "loadavg_1min_after": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------------------ driver
_SHARED = ("batch", "steps", "eta", "guidance", "warmup", "batches", "seed", "threads")


def _child(side: str, args, images: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--pipeline", args.pipeline]
    cmd += [f"--{k}={getattr(args, k)}" for k in _SHARED]
    if images is not None:
        cmd += ["--images", str(images)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_pipeline(work, args.preset)
    args.pipeline = info["path"]
    sides = SIDES if args.norecord else SIDES[:2]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else tuple(reversed(sides))
        for side in order:
            load = os.getloadavg()[0]
            res = _child(side, args, work / f"images-{side}.pt" if r == 0 else None)
            res["loadavg_1min_before"] = load
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:16s} {res['median_batch_s']:.3f} s/batch "
                f"(UNet {res['median_unet_s']:.3f} s, rest {res['median_non_unet_s']:.3f} s), "
                f"load avg {load:.2f}/{res['loadavg_1min_after']:.2f}",
                file=sys.stderr,
            )
    ref = torch.load(work / "images-diffusers.pt")
    image_diff = {s: float((torch.load(work / f"images-{s}.pt") - ref).abs().max()) for s in sides[1:]}

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    median = {
        s: {
            k: med(s, k)
            for k in ("median_batch_s", "median_cpu_s", "median_unet_s", "median_non_unet_s", "load_s")
        }
        for s in sides
    }
    d = median["diffusers"]
    ratios = {
        s: {
            "wall": median[s]["median_batch_s"] / d["median_batch_s"],
            "cpu": median[s]["median_cpu_s"] / d["median_cpu_s"],
            "non_unet": median[s]["median_non_unet_s"] / d["median_non_unet_s"],
        }
        for s in sides[1:]
    }
    # Paired per repeat (the two sides of one repeat ran back to back, so share the machine's load best).
    paired = {
        s: [
            m["median_batch_s"] / dd["median_batch_s"]
            for m, dd in zip(runs[s], runs["diffusers"], strict=True)
        ]
        for s in sides[1:]
    }
    summary = {
        "command": " ".join([".venv/bin/python benchmarks/sampling_overhead.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "repeats", "preset")},
        "pipeline": info,
        "versions": versions(),
        "cpu_cores": os.cpu_count(),
        "loadavg_range": [
            min(min(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
            max(max(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
        ],
        "unet_calls_per_batch": {s: runs[s][0]["unet_calls_per_batch"] for s in sides},
        "unet_batch_sizes": {s: runs[s][0]["unet_batch_sizes"] for s in sides},
        "median": median,
        "ratio_over_diffusers": ratios,
        "paired_ratio_per_repeat": paired,
        "max_abs_image_diff_vs_diffusers": image_diff,
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    name = "sampling_overhead" if args.preset == "small" else f"sampling_overhead-{args.preset}"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(md)


def render(s: dict) -> str:
    st, p, v, med = s["settings"], s["pipeline"], s["versions"], s["median"]
    sides = list(med)
    d = med["diffusers"]
    pc = p["parameters"]
    label = {
        "diffusers": "diffusers pipeline",
        "mmalign": "mmalign record=True",
        "mmalign-norecord": "mmalign record=False",
    }
    lines = [
        f"`{s['command']}`",
        "",
        f"Pipeline `{p['preset']}`: UNet {pc['unet']:,} parameters (channels {tuple(p['unet_channels'])}, "
        f"{p['latent_size']}x{p['latent_size']} latents), VAE {pc['vae']:,}, text encoder {pc['text_encoder']:,}; "
        f"{p['image_size']}x{p['image_size']} images. Batch of {st['batch']} prompts, {st['steps']} DDIM steps, "
        f"eta {st['eta']}, guidance {st['guidance']} (UNet batch {2 * st['batch']}), fp32, {st['threads']} torch "
        f"thread(s), {s['cpu_cores']} CPU cores (shared; 1-min load average {s['loadavg_range'][0]:.1f}-"
        f"{s['loadavg_range'][1]:.1f}). Per run: {st['warmup']} warm-up + {st['batches']} timed batches (median); "
        f"table: median of {st['repeats']} alternating runs. torch {v['torch']}, diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}.",
        "",
        "| metric (per sampled batch) | " + " | ".join(label[x] for x in sides) + " |",
        "| --- |" + " ---: |" * len(sides),
        "| wall s | " + " | ".join(f"{med[x]['median_batch_s']:.3f}" for x in sides) + " |",
        "| wall s of each run | "
        + " | ".join(" ".join(f"{r['median_batch_s']:.3f}" for r in s["runs"][x]) for x in sides)
        + " |",
        "| CPU s | " + " | ".join(f"{med[x]['median_cpu_s']:.3f}" for x in sides) + " |",
        "| inside UNet forward, wall s | "
        + " | ".join(f"{med[x]['median_unet_s']:.3f}" for x in sides)
        + " |",
        "| outside the UNet, wall s | "
        + " | ".join(f"{med[x]['median_non_unet_s']:.3f}" for x in sides)
        + " |",
        "| UNet calls per batch | " + " | ".join(str(s["unet_calls_per_batch"][x]) for x in sides) + " |",
        "| ratio to diffusers, wall | 1 | "
        + " | ".join(f"{s['ratio_over_diffusers'][x]['wall']:.3f}" for x in sides[1:])
        + " |",
        "| ratio to diffusers, paired per repeat (median) | 1 | "
        + " | ".join(
            " ".join(f"{q:.2f}" for q in s["paired_ratio_per_repeat"][x])
            + f" ({statistics.median(s['paired_ratio_per_repeat'][x]):.2f})"
            for x in sides[1:]
        )
        + " |",
        "| ratio to diffusers, CPU | 1 | "
        + " | ".join(f"{s['ratio_over_diffusers'][x]['cpu']:.3f}" for x in sides[1:])
        + " |",
        "| extra time outside the UNet, % of diffusers' batch | 0 | "
        + " | ".join(
            f"{100 * (med[x]['median_non_unet_s'] - d['median_non_unet_s']) / d['median_batch_s']:+.1f}%"
            for x in sides[1:]
        )
        + " |",
        "| max abs image diff vs diffusers ([0, 1] scale) | 0 | "
        + " | ".join(f"{s['max_abs_image_diff_vs_diffusers'][x]:.1e}" for x in sides[1:])
        + " |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=SIDES, help="internal: run one side and print JSON")
    p.add_argument("--pipeline", help="with --side: the saved pipeline directory")
    p.add_argument("--images", help="with --side: save the timed batches' images ([0, 1]) here")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "diffusion"))
    p.add_argument("--preset", choices=("small", "fixture"), default="small")
    p.add_argument("--batch", type=int, default=4, help="prompts per sampled batch")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per run")
    p.add_argument("--batches", type=int, default=4, help="timed batches per run")
    p.add_argument("--seed", type=int, default=1000, help="batch i uses Generator().manual_seed(seed + i)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--no-norecord", dest="norecord", action="store_false", help="skip the mmalign record=False side"
    )
    p.add_argument("--profile", help="with --side: CPU-time cProfile of the timed batches to this file")
    p.add_argument("--render", metavar="JSON", help="only print the table of a results JSON written earlier")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.side is None:
        drive(args)
        return
    if not args.pipeline:
        p.error("--side needs --pipeline (or run without --side to build one)")
    print(json.dumps(run_side(args)))


if __name__ == "__main__":
    main()
