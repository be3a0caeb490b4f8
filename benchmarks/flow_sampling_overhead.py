"""Trajectory-recording SDE sampling of a flow model (mmalign) vs the plain `StableDiffusion3Pipeline` (CPU).

One command builds a small randomly initialised SD3-layout pipeline (two CLIP encoders with projection, no T5,
an `SD3Transformer2DModel` wide enough to dominate a step, saved with `save_pretrained`), then runs each side in
its own subprocess, alternating, `--repeats` times, and reports medians and the mmalign/diffusers ratio (the
project's goal for the recording SDE side is <= 1.10):

    .venv/bin/python benchmarks/flow_sampling_overhead.py

Sides:
  * diffusers: `StableDiffusion3Pipeline.from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)` called with
    the prompts, `num_inference_steps`, `guidance_scale`, `max_sequence_length=0`, a seeded generator and
    `output_type="pt"` (its Euler ODE).
  * mmalign-sde: `SD3Policy.from_pretrained(dir, sde_type="flow_grpo", noise_level=0.7)`, `policy.sample(prompts,
    record=True)` (Flow-GRPO's SDE on every step, each transition's Gaussian log-prob recorded) and
    `policy.decode(traj.final)`: what a Flow-GRPO rollout costs.
  * mmalign-ode: the same policy sampling with its ODE `eval_sampler` and `record=False`: the same computation as
    the pipeline, whose images must equal the pipeline's.

Measured per sampled batch (prompt encoding, the whole denoising loop, VAE decoding): wall time, process CPU time
and the wall time inside `SD3Transformer2DModel.forward`. See benchmarks/README.md for the measured table.
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
sys.path.insert(0, str(HERE))

from sampling_overhead import child_env, profiled, versions  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green line", "a yellow star", "three dots", "a white cross"]
SIDES = ("diffusers", "mmalign-sde", "mmalign-ode")


class ForwardClock:
    """Wall time inside a module's forward and its number of calls (the transformer is called with keywords)."""

    def __init__(self, module):
        self.total, self.calls, self._t = 0.0, 0, None
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._t = time.perf_counter()
        self.calls += 1

    def _post(self, module, args, kwargs, output):
        self.total += time.perf_counter() - self._t


def make_pipeline(seed: int = 0):
    """An SD3-layout pipeline whose transformer (4 joint blocks, width 128, 16x16 latents) dominates a step."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from mmalign.zoo.tokenizer import char_tokenizer

    torch.manual_seed(seed)

    def tokenizer():
        tok = char_tokenizer()
        tok.model_max_length = 24
        return tok

    def clip(tok):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=24,
                projection_dim=32,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )

    tok = tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(tok),
        tokenizer=tok,
        text_encoder_2=clip(tok),
        tokenizer_2=tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def prepare_pipeline(work: Path) -> dict:
    import shutil

    pipe = make_pipeline()
    path = work / "pipeline-sd3"
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(str(path))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    return {
        "path": str(path),
        "parameters": {"transformer": count(pipe.transformer), "vae": count(pipe.vae)},
        "latent_size": pipe.transformer.config.sample_size,
        "image_size": pipe.transformer.config.sample_size * 2,
    }


def run_side(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    prompts = (PROMPTS * args.batch)[: args.batch]
    t0 = time.perf_counter()
    if args.side == "diffusers":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(args.pipeline, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        net = pipe.transformer

        def sample_batch(seed: int) -> torch.Tensor:
            return pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                max_sequence_length=0,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
    else:
        from mmalign.vision.sd3_policy import SD3Policy

        policy = SD3Policy.from_pretrained(
            args.pipeline,
            num_steps=args.steps,
            guidance_scale=args.guidance,
            sde_type="flow_grpo",
            noise_level=args.noise_level,
            max_sequence_length=0,
        )
        net = policy.module
        sde = args.side == "mmalign-sde"
        sampler = policy.sampler if sde else policy.eval_sampler

        def sample_batch(seed: int) -> torch.Tensor:
            traj = policy.sample(
                prompts, generator=torch.Generator().manual_seed(seed), record=sde, sampler=sampler
            )
            return (policy.decode(traj.final) + 1) / 2

    load_s = time.perf_counter() - t0
    clock = ForwardClock(net)
    images, walls, cpus, net_s = [], [], [], []

    def loop():
        for i in range(args.warmup + args.batches):
            w0, c0, n0 = time.perf_counter(), time.process_time(), clock.total
            out = sample_batch(args.seed + i)
            if i >= args.warmup:
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
                net_s.append(clock.total - n0)
                images.append(out.detach().float().cpu())

    profiled(loop, args.profile)
    if args.images:
        torch.save(torch.stack(images), args.images)
    return {
        "side": args.side,
        "load_s": load_s,
        "batch_s": walls,
        "median_batch_s": statistics.median(walls),
        "median_cpu_s": statistics.median(cpus),
        "median_net_s": statistics.median(net_s),
        "median_non_net_s": statistics.median(w - u for w, u in zip(walls, net_s, strict=True)),
        "net_calls_per_batch": clock.calls // (args.warmup + args.batches),
        "loadavg_1min_after": os.getloadavg()[0],
    }


_SHARED = ("batch", "steps", "guidance", "noise_level", "warmup", "batches", "seed", "threads")


def _child(side: str, args, images: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--pipeline", args.pipeline]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED]
    if images is not None:
        cmd += ["--images", str(images)]
    env = {
        **child_env(args.threads),
        "PYTHONPATH": str(ROOT),
    }  # this checkout's mmalign, not an installed one
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_pipeline(work)
    args.pipeline = info["path"]
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            load = os.getloadavg()[0]
            res = _child(side, args, work / f"images-{side}.pt" if r == 0 else None)
            res["loadavg_1min_before"] = load
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:12s} {res['median_batch_s']:.3f} s/batch "
                f"(transformer {res['median_net_s']:.3f} s, rest {res['median_non_net_s']:.3f} s), load {load:.2f}",
                file=sys.stderr,
            )
    ref = torch.load(work / "images-diffusers.pt")
    image_diff = {s: float((torch.load(work / f"images-{s}.pt") - ref).abs().max()) for s in SIDES[1:]}
    median = {
        s: {
            k: statistics.median(r[k] for r in runs[s])
            for k in ("median_batch_s", "median_cpu_s", "median_net_s", "median_non_net_s")
        }
        for s in SIDES
    }
    paired = {
        s: [
            m["median_batch_s"] / d["median_batch_s"] for m, d in zip(runs[s], runs["diffusers"], strict=True)
        ]
        for s in SIDES[1:]
    }
    summary = {
        "command": " ".join([".venv/bin/python benchmarks/flow_sampling_overhead.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "repeats")},
        "pipeline": info,
        "versions": versions(),
        "cpu_cores": os.cpu_count(),
        "loadavg_range": [
            min(min(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
            max(max(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
        ],
        "median": median,
        "ratio_over_diffusers": {
            s: median[s]["median_batch_s"] / median["diffusers"]["median_batch_s"] for s in SIDES[1:]
        },
        "paired_ratio_per_repeat": paired,
        "max_abs_image_diff_vs_diffusers": image_diff,
        "net_calls_per_batch": {s: runs[s][0]["net_calls_per_batch"] for s in SIDES},
        "runs": runs,
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "flow_sampling_overhead.md").write_text(md)
    (out / "flow_sampling_overhead.json").write_text(json.dumps(summary, indent=2))
    print(md)


def render(s: dict) -> str:
    st, p, v, med = s["settings"], s["pipeline"], s["versions"], s["median"]
    # under load from other processes the wall time of a whole run swings (time slices lost to them); the CPU time
    # and the fastest batch of each side are what the sampling itself costs
    fastest = {x: min(w for r in s["runs"][x] for w in r["batch_s"]) for x in SIDES}
    label = {
        "diffusers": "StableDiffusion3Pipeline",
        "mmalign-sde": "mmalign SDE, recorded",
        "mmalign-ode": "mmalign ODE",
    }
    lines = [
        f"`{s['command']}`",
        "",
        f"SD3-layout pipeline: transformer {p['parameters']['transformer']:,} parameters ({p['latent_size']}x"
        f"{p['latent_size']} latents, patch 2), VAE {p['parameters']['vae']:,}, two CLIP encoders, no T5; "
        f"{p['image_size']}x{p['image_size']} images. Batch of {st['batch']} prompts, {st['steps']} steps, guidance "
        f"{st['guidance']} (transformer batch {2 * st['batch']}), SDE noise level {st['noise_level']}, fp32, "
        f"{st['threads']} torch thread(s), {s['cpu_cores']} shared cores (1-min load "
        f"{s['loadavg_range'][0]:.1f}-{s['loadavg_range'][1]:.1f}); per run {st['warmup']} warm-up + "
        f"{st['batches']} timed batches (median), table: median of {st['repeats']} alternating runs. torch "
        f"{v['torch']}, diffusers {v['diffusers']}.",
        "",
        "| metric (per sampled batch) | " + " | ".join(label[x] for x in SIDES) + " |",
        "| --- |" + " ---: |" * len(SIDES),
        "| wall s | " + " | ".join(f"{med[x]['median_batch_s']:.3f}" for x in SIDES) + " |",
        "| CPU s | " + " | ".join(f"{med[x]['median_cpu_s']:.3f}" for x in SIDES) + " |",
        "| inside the transformer, wall s | "
        + " | ".join(f"{med[x]['median_net_s']:.3f}" for x in SIDES)
        + " |",
        "| outside the transformer, wall s | "
        + " | ".join(f"{med[x]['median_non_net_s']:.3f}" for x in SIDES)
        + " |",
        "| transformer calls per batch | "
        + " | ".join(str(s["net_calls_per_batch"][x]) for x in SIDES)
        + " |",
        "| ratio to diffusers, wall | 1 | "
        + " | ".join(f"{s['ratio_over_diffusers'][x]:.3f}" for x in SIDES[1:])
        + " |",
        "| ratio to diffusers, paired per repeat (median) | 1 | "
        + " | ".join(
            " ".join(f"{q:.2f}" for q in s["paired_ratio_per_repeat"][x])
            + f" ({statistics.median(s['paired_ratio_per_repeat'][x]):.2f})"
            for x in SIDES[1:]
        )
        + " |",
        "| ratio to diffusers, CPU | 1 | "
        + " | ".join(f"{med[x]['median_cpu_s'] / med['diffusers']['median_cpu_s']:.3f}" for x in SIDES[1:])
        + " |",
        "| fastest timed batch, wall s | " + " | ".join(f"{fastest[x]:.3f}" for x in SIDES) + " |",
        "| ratio to diffusers, fastest batch | 1 | "
        + " | ".join(f"{fastest[x] / fastest['diffusers']:.3f}" for x in SIDES[1:])
        + " |",
        "| max abs image diff vs diffusers ([0, 1]) | 0 | "
        + " | ".join(f"{s['max_abs_image_diff_vs_diffusers'][x]:.1e}" for x in SIDES[1:])
        + " |",
        "",
        "The SDE side draws other images by design (Flow-GRPO's SDE adds noise at every step); the ODE side must "
        "equal the pipeline.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=SIDES, help="internal: run one side and print JSON")
    p.add_argument("--pipeline", help="with --side: the saved pipeline directory")
    p.add_argument("--images", help="with --side: save the timed batches' images ([0, 1]) here")
    p.add_argument("--work", default=str(HERE / "out" / "work" / "flow"))
    p.add_argument("--batch", type=int, default=4, help="prompts per sampled batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--noise-level", dest="noise_level", type=float, default=0.7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
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
