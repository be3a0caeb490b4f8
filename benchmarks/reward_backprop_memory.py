"""Peak memory of reward backprop through K of N denoising steps, with and without gradient checkpointing (CPU).

Each configuration runs in its own subprocess: a UNet2DConditionModel large enough that its activations dominate
(about 18 M parameters by default), N DDIM steps (η = 0) with classifier-free guidance through mmalign's
`sample_with_gradients`, a reward on the final latents and one backward pass. Peak memory is the process's peak
resident set size during the chain and its backward, over the resident set just before it (Linux VmHWM, reset
through /proc/self/clear_refs after the model, the optimizer-free setup and a warm-up call are in memory), so it
counts what reward backprop adds: the graph kept through the window, and the recomputation during backward.

    /work/main/.venv/bin/python benchmarks/reward_backprop_memory.py                # table + out/*.json
    /work/main/.venv/bin/python benchmarks/reward_backprop_memory.py --plain-k 1 2 5 10

The target (issue): with checkpointing, K = N (the full chain) costs at most 2× the memory of K = 1; without
checkpointing, memory grows with K (reported as MB per step of a least-squares line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's mmalign, whatever the interpreter has installed


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def build_unet(args):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=args.latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(args.channels),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def measure(args) -> dict:
    """One configuration: peak RSS growth (MB) and wall time of the chain + backward."""
    import torch
    from diffusers import DDIMScheduler

    from mmalign.core.sampler import DDPMFamilySampler
    from mmalign.core.sampling import GradientWindow, sample_with_gradients

    torch.set_num_threads(args.threads)
    unet = build_unet(args).train()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    sampler = DDPMFamilySampler(dict(scheduler.config), "ddim", num_steps=args.steps, eta=0.0)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2 * args.batch, 8, 128, generator=g)  # (unconditional, conditional) text states
    x_T = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)

    def predict(x, t):  # classifier-free guidance, as DenoisingPolicy.predict does it
        uncond, text = unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
        return uncond + args.guidance * (text - uncond)

    with torch.no_grad():
        predict(x_T, sampler.timesteps()[0])  # warm-up: allocator pools and kernels, outside the measurement
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    start = time.perf_counter()
    window = GradientWindow(start=args.steps - args.k, checkpoint=args.checkpoint)
    sample = sample_with_gradients(predict, sampler, x_T, window)
    (sample.outputs[0] ** 2).mean().backward()
    elapsed = time.perf_counter() - start
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in unet.parameters() if p.grad is not None)).item()
    return {
        "k": args.k,
        "checkpoint": args.checkpoint,
        "peak_over_before_mb": _status("VmHWM") - before,
        "rss_before_mb": before,
        "seconds": elapsed,
        "grad_norm": grad_norm,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }


def child_env(threads: int) -> dict[str, str]:
    """glibc malloc with a fixed mmap threshold: every tensor buffer of 64 kB or more is its own mapping, returned
    to the system when freed, so the resident set follows live tensor memory (by default the threshold grows with
    freed blocks and freed memory stays resident, which would count allocator reuse, not what backprop keeps)."""
    return {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": str(threads),
    }


def _child(args, k: int, checkpoint: bool) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--k",
        str(k),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--batch", str(args.batch), "--latent", str(args.latent), "--threads", str(args.threads)]
    cmd += ["--guidance", str(args.guidance), "--channels", *map(str, args.channels)]
    if checkpoint:
        cmd.append("--checkpoint")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"K={k} checkpoint={checkpoint} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"K={k:3d} checkpoint={checkpoint!s:5s} peak +{result['peak_over_before_mb']:8.1f} MB "
        f"{result['seconds']:7.1f} s",
        file=sys.stderr,
    )
    return result


def _slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx, my = sum(k for k, _ in points) / n, sum(m for _, m in points) / n
    return sum((k - mx) * (m - my) for k, m in points) / sum((k - mx) ** 2 for k, _ in points)


def drive(args) -> None:
    runs = [_child(args, k, True) for k in args.checkpoint_k]
    runs += [_child(args, k, False) for k in args.plain_k]
    ckpt = {r["k"]: r for r in runs if r["checkpoint"]}
    plain = [(r["k"], r["peak_over_before_mb"]) for r in runs if not r["checkpoint"]]
    full, one = ckpt.get(args.steps), ckpt.get(1)
    summary = {
        "command": " ".join(["python benchmarks/reward_backprop_memory.py", *sys.argv[1:]]),
        "settings": {
            k: getattr(args, k) for k in ("steps", "batch", "latent", "channels", "guidance", "threads")
        },
        "unet_parameters": runs[0]["unet_parameters"],
        "runs": runs,
        "checkpointed_full_over_k1": full["peak_over_before_mb"] / one["peak_over_before_mb"]
        if full and one
        else None,
        "plain_mb_per_step": _slope(plain) if len(plain) > 1 else None,
    }
    lines = [
        f"`{summary['command']}`",
        "",
        f"UNet {summary['unet_parameters']:,} parameters, {args.latent}×{args.latent} latents, batch {args.batch} "
        f"(×2 with guidance), {args.steps} DDIM steps (η = 0), {args.threads} thread(s). Peak = growth of the "
        "peak RSS over the RSS before sampling.",
        "",
        "| K (steps with gradients) | checkpointing | peak memory (MB) | time (s) |",
        "| ---: | --- | ---: | ---: |",
        *[
            f"| {r['k']} | {'yes' if r['checkpoint'] else 'no'} | {r['peak_over_before_mb']:.0f} | {r['seconds']:.1f} |"
            for r in runs
        ],
        "",
    ]
    if summary["checkpointed_full_over_k1"] is not None:
        lines.append(
            f"- checkpointed, K = {args.steps} over K = 1: {summary['checkpointed_full_over_k1']:.2f}×"
        )
    if summary["plain_mb_per_step"] is not None:
        lines.append(
            f"- without checkpointing: {summary['plain_mb_per_step']:.0f} MB per step of K (least squares)"
        )
    md = "\n".join(lines) + "\n"
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "reward_backprop_memory.md").write_text(md)
    (out / "reward_backprop_memory.json").write_text(json.dumps(summary, indent=2))
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help="internal: measure one configuration, print JSON")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--channels", type=int, nargs=3, default=[64, 128, 256])
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-k", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--plain-k", type=int, nargs="+", default=[1, 2, 5, 10])
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
