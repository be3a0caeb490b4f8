"""mmalign DPO vs trl's DPOTrainer on the same tiny LLaMA-style model, rows, data order, batch and steps (CPU).

One command runs every variant, each in its own subprocess (so peak RSS does not mix), in rotating order,
`--repeats` times, and reports medians and mmalign/trl ratios:

    benchmarks/.venv-trl/bin/python benchmarks/dpo_vs_trl.py

Variants (`--variants`): `mmalign` and `trl` are the plain paths; `mmalign+options` turns on what a user would:
`precompute_reference` (reference log-probs computed once before training, the frozen copy freed) and
`share_prompt` (each pair one sequence, the prompt computed once); `mmalign+padding_free` adds `padding_free`;
`trl+precompute` is trl's `precompute_ref_log_probs=True`, the one of these options trl 1.16 has (its
`padding_free` warns and falls back to padding; it has no shared-prompt option).

What is measured per run:
  * steps/s: optimizer steps over the timed window. A timestamp is taken when each step starts computing its
    loss (mmalign: `PreferenceAlgorithm.loss`, trl: `DPOTrainer.compute_loss`); the window runs from the start of
    step `warmup + 1` to the start of the last step, so it covers whole steps (data, forward, reference forward,
    backward, clipping, AdamW, logging) and excludes model loading, dataset tokenisation, warm-up and final saving.
  * peak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` of the side's process at the end (includes imports).
  * losses of steps 1..5 on both sides, their max abs difference, and the max abs difference over all steps.
  * the padded input_ids / response masks of steps 1..5, compared between the sides (identical tokens).

See benchmarks/README.md for the venv and the measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

CHECK_STEPS = 5  # steps whose losses and token batches are compared side by side


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stamp(stamps: list[tuple[float, float]]) -> None:
    """Wall clock and this process's CPU time (all threads) at the start of a step."""
    stamps.append((time.perf_counter(), time.process_time()))


def _finish(result: dict, stamps: list[tuple[float, float]], args) -> dict:
    w = args.warmup
    timed = len(stamps) - 1 - w
    if timed < 1:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup + 1 ({w + 1})")
    result["timed_steps"] = timed
    result["steps_per_s"] = timed / (stamps[-1][0] - stamps[w][0])
    result["cpu_s_per_step"] = (stamps[-1][1] - stamps[w][1]) / timed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["loadavg_1min_after"] = os.getloadavg()[0]  # other processes on the machine skew the timing
    return result


def _maybe_profiled(fn, args):
    """Run fn, under cProfile with a CPU-time clock if --profile is given (stats to the file, top 45 to stderr)."""
    if not args.profile:
        return fn()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile(time.process_time)
    out = prof.runcall(fn)
    prof.dump_stats(args.profile)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(45)
    sys.stderr.write(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ mmalign
def run_mmalign(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from mmalign.core.data import rows_from_records, validate_preference_rows
    from mmalign.text.policy import CausalLMPolicy
    from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
    from mmalign.train.trainer import TrainConfig, Trainer

    work = Path(args.work)
    rows = json.loads((work / "rows.json").read_text())
    t0 = time.perf_counter()
    policy = CausalLMPolicy.from_pretrained(str(work / "model"), lora=None, max_length=args.max_length)
    algo = PreferenceAlgorithm(
        policy,
        validate_preference_rows(rows_from_records(rows)),
        PreferenceConfig(
            loss="dpo",
            beta=args.beta,
            precompute_reference=args.precompute_reference,
            share_prompt=args.share_prompt,
            padding_free=args.padding_free,
        ),
    )
    stamps: list[tuple[float, float]] = []
    order: list[list[int]] = []
    batches: list[dict] = []
    inner = algo.loss

    def timed_loss(examples):
        _stamp(stamps)
        order.append([e["index"] for e in examples])
        if len(batches) < CHECK_STEPS:  # the padded form, to compare tokens with trl's batch
            b = policy.collate_pairs(examples)
            batches.append({"input_ids": b["input_ids"].tolist(), "mask": b["response_mask"].tolist()})
        return inner(examples)

    algo.loss = timed_loss
    # a fresh run dir: the trainer would resume from checkpoints it finds
    out_dir = Path(tempfile.mkdtemp(prefix="mmalign-", dir=work))
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=0.0,
        adam_betas=(0.9, 0.999),
        scheduler="constant",
        warmup_steps=0,
        max_grad_norm=args.max_grad_norm,
        progress=False,
        seed=0,
    )
    trainer = Trainer(policy, algo, config, out_dir)
    setup_s = time.perf_counter() - t0
    rss_before = _rss_kb() / 1024
    t1 = time.perf_counter()
    _maybe_profiled(trainer.train, args)
    train_s = time.perf_counter() - t1
    to_first_step_s = stamps[0][0] - t1  # includes precomputing the reference when asked
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in sorted(metrics, key=lambda m: m["step"])]
    shutil.rmtree(out_dir, ignore_errors=True)
    expected = bench_setup.mmalign_order(len(rows), args.steps, args.batch)
    result = {
        "side": "mmalign",
        "setup_s": setup_s,
        "train_call_s": train_s,
        "to_first_step_s": to_first_step_s,
        "rss_before_train_mb": rss_before,
        "losses": losses,
        "batches": batches,
        "order_matches_formula": order == expected,
    }
    return _finish(result, stamps, args)


# ---------------------------------------------------------------------------------------------------- trl
def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from mmalign.core.codec import TextCodec
    from mmalign.core.data import rows_from_records

    work = Path(args.work)
    rows = json.loads((work / "rows.json").read_text())
    t0 = time.perf_counter()
    model_dir = str(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The dataset is laid out in mmalign's order (one epoch's permutation after the other, step by step) and read
    # sequentially, so both sides see the same rows at every step.
    order = [i for batch in bench_setup.mmalign_order(len(rows), args.steps, args.batch) for i in batch]
    dataset = Dataset.from_list([rows[i] for i in order])
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    batches: list[dict] = []

    class TimedDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            _stamp(stamps)
            if len(batches) < CHECK_STEPS:
                batches.append(
                    {"input_ids": inputs["input_ids"].tolist(), "mask": inputs["completion_mask"].tolist()}
                )
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    out_dir = tempfile.mkdtemp(prefix="trl-", dir=work)
    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",  # the trl/transformers default; mmalign also uses fused torch AdamW
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=args.max_grad_norm,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=args.precompute_reference,
        max_length=args.max_length,
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
        train_sampling_strategy="sequential",
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    setup_s = time.perf_counter() - t0

    # Token-level check: trl's tokenisation of every row against mmalign's codec (prompt with specials, response
    # without, then eos).
    codec = TextCodec(AutoTokenizer.from_pretrained(model_dir), args.max_length)
    mine = {}
    for i, row in enumerate(rows_from_records(rows)):
        mine[i] = codec.encode_pair(row)
    mismatched = 0
    for pos, ex in enumerate(trainer.train_dataset):
        m = mine[order[pos]]
        if (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) != (
            m["prompt_ids"],
            m["chosen_ids"],
            m["rejected_ids"],
        ):
            mismatched += 1

    rss_before = _rss_kb() / 1024
    t1 = time.perf_counter()
    _maybe_profiled(trainer.train, args)
    train_s = time.perf_counter() - t1
    to_first_step_s = stamps[0][0] - t1  # trl precomputes the reference in __init__ (setup_s)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {
        "side": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "setup_s": setup_s,
        "train_call_s": train_s,
        "to_first_step_s": to_first_step_s,
        "rss_before_train_mb": rss_before,
        "losses": losses,
        "logged_losses_first": logged[:CHECK_STEPS],
        "batches": batches,
        "token_mismatched_examples": mismatched,
    }
    return _finish(result, stamps, args)


# ------------------------------------------------------------------------------------------------- driver
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mmalign": ("mmalign", ()),
    "mmalign+options": ("mmalign", ("--precompute-reference", "--share-prompt")),
    "mmalign+padding_free": ("mmalign", ("--precompute-reference", "--share-prompt", "--padding-free")),
    "trl": ("trl", ()),
    "trl+precompute": ("trl", ("--precompute-reference",)),
}
"""label → (side, the side's option flags)."""
DEFAULT_VARIANTS = ("mmalign", "mmalign+options", "trl", "trl+precompute")
_SHARED = ("steps", "warmup", "batch", "lr", "beta", "max_grad_norm", "max_length", "threads")
_MEDIANS = (
    "steps_per_s",
    "cpu_s_per_step",
    "peak_rss_mb",
    "rss_before_train_mb",
    "setup_s",
    "to_first_step_s",
)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _child(variant: str, args, extra_env: dict) -> dict:
    side, flags = VARIANTS[variant]
    cmd = [
        args.python or sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        *flags,
        "--work",
        str(args.work),
        *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED],
    ]
    env = {**os.environ, **extra_env}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    import importlib.util

    import torch
    import transformers

    if importlib.util.find_spec("trl") is None and args.python is None:
        raise SystemExit(
            "trl is not installed in this interpreter; create the benchmark venv (see benchmarks/README.md) and "
            "run: benchmarks/.venv-trl/bin/python benchmarks/dpo_vs_trl.py"
        )
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not any(VARIANTS[v][0] == "trl" for v in variants):
        raise SystemExit(
            f"--variants: choose from {', '.join(VARIANTS)}, at least one trl; got {args.variants}"
        )
    work = Path(args.work)
    info = bench_setup.prepare(work, bench_setup.ModelSpec(layers=args.layers), args.pairs)
    env = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        shift = r % len(variants)  # rotate the order so every variant runs in every position
        for variant in variants[shift:] + variants[:shift]:
            load = os.getloadavg()[0]
            res = _child(variant, args, env)
            res["loadavg_1min_before"] = load
            runs[variant].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {variant:21s} {res['steps_per_s']:.2f} steps/s, "
                f"{res['cpu_s_per_step']:.3f} CPU s/step, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB, first loss {res['losses'][0]:.6f}, "
                f"load avg before/after {load:.2f}/{res['loadavg_1min_after']:.2f}",
                file=sys.stderr,
            )

    first = {v: rs[0] for v, rs in runs.items()}
    trl_base = next(v for v in variants if VARIANTS[v][0] == "trl")
    t_loss = first[trl_base]["losses"]
    loss_check = {}
    for v, res in first.items():
        diffs = [abs(a - b) for a, b in zip(res["losses"], t_loss, strict=False)]
        loss_check[v] = {
            "losses_first_steps": res["losses"][:CHECK_STEPS],
            "first_step_diff": diffs[0],
            "max_abs_diff_first_steps": max(diffs[:CHECK_STEPS]),
            "max_abs_diff_all_steps": max(diffs),
            "deterministic_across_repeats": all(r["losses"] == res["losses"] for r in runs[v]),
        }
    same_tokens = {
        v: [
            mb["input_ids"] == tb["input_ids"] and mb["mask"] == tb["mask"]
            for mb, tb in zip(first[v]["batches"], first[trl_base]["batches"], strict=False)
        ]
        for v in variants
        if VARIANTS[v][0] == "mmalign"
    }
    med = {v: {k: _median(rs, k) for k in _MEDIANS} for v, rs in runs.items()}
    ratios = {
        f"{m} / {t}": {
            "steps_per_s": med[m]["steps_per_s"] / med[t]["steps_per_s"],
            "steps_per_cpu_s": med[t]["cpu_s_per_step"] / med[m]["cpu_s_per_step"],
            "peak_rss": med[m]["peak_rss_mb"] / med[t]["peak_rss_mb"],
            "paired_steps_per_s": [
                a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs[m], runs[t], strict=True)
            ],
        }
        for m in variants
        if VARIANTS[m][0] == "mmalign"
        for t in variants
        if VARIANTS[t][0] == "trl"
    }
    trl_runs = [r for v in variants if VARIANTS[v][0] == "trl" for r in runs[v]]
    summary = {
        "command": " ".join(["benchmarks/.venv-trl/bin/python benchmarks/dpo_vs_trl.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "pairs", "layers", "repeats", "variants")},
        "variants": {v: " ".join(VARIANTS[v][1]) or "(plain)" for v in variants},
        "setup": info,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl_runs[0]["trl"],
        },
        "cpu_cores": os.cpu_count(),
        "loadavg_range": [
            min(min(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
            max(max(r["loadavg_1min_before"], r["loadavg_1min_after"]) for rs in runs.values() for r in rs),
        ],
        "median": med,
        "ratios": ratios,
        "losses_vs": trl_base,
        "loss_check": loss_check,
        "identical_tokens_first_steps": same_tokens,
        "trl_token_mismatched_examples": max(r["token_mismatched_examples"] for r in trl_runs),
        "mmalign_order_matches_formula": all(
            r["order_matches_formula"] for v in variants if VARIANTS[v][0] == "mmalign" for r in runs[v]
        ),
        "runs": {v: [{k: x for k, x in r.items() if k != "batches"} for r in rs] for v, rs in runs.items()},
    }
    md = render(summary)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"{args.out_name}.md").write_text(md)
    (out / f"{args.out_name}.json").write_text(json.dumps(summary, indent=2))
    print(md)


def render(s: dict) -> str:
    med, st, v = s["median"], s["settings"], s["versions"]
    names = list(med)
    lines = [
        f"`{s['command']}`",
        "",
        f"{s['setup']['parameters']:,}-parameter LlamaForCausalLM ({st['layers']} layers, hidden "
        f"{s['setup']['model']['hidden_size']}, MLP {s['setup']['model']['intermediate_size']}, char vocab "
        f"{s['setup']['vocab']}), {st['pairs']} pairs, batch {st['batch']} pairs, {st['steps']} steps "
        f"(timed: steps {st['warmup'] + 1}..{st['steps'] - 1}), full fine-tuning, fp32, {st['threads']} torch "
        f"thread(s), {s['cpu_cores']} CPU cores (shared; 1-min load average {s['loadavg_range'][0]:.1f}-"
        f"{s['loadavg_range'][1]:.1f} during the runs); median of {st['repeats']} runs, variants in rotating order. "
        f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}.",
        "",
        "| variant | options | steps/s | steps/s of each run | CPU s/step | peak RSS MB | setup s | train() start → "
        "step 1 (s) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        m = med[name]
        each = " ".join(f"{r['steps_per_s']:.2f}" for r in s["runs"][name])
        lines.append(
            f"| {name} | {s['variants'][name]} | {m['steps_per_s']:.2f} | {each} | {m['cpu_s_per_step']:.3f} | "
            f"{m['peak_rss_mb']:.0f} | {m['setup_s']:.2f} | {m['to_first_step_s']:.2f} |"
        )
    lines += [
        "",
        "| mmalign / trl | steps/s (medians) | paired runs | steps per CPU s | peak RSS |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for pair, r in s["ratios"].items():
        paired = " ".join(f"{x:.2f}" for x in r["paired_steps_per_s"])
        lines.append(
            f"| {pair} | **{r['steps_per_s']:.2f}×** | {paired} | {r['steps_per_cpu_s']:.2f}× | {r['peak_rss']:.2f}× |"
        )
    lines += [
        "",
        f"| step | {' | '.join(names)} |",
        "| ---: |" + " ---: |" * len(names),
    ]
    for i in range(len(s["loss_check"][names[0]]["losses_first_steps"])):
        cells = " | ".join(f"{s['loss_check'][n]['losses_first_steps'][i]:.6f}" for n in names)
        lines.append(f"| {i + 1} | {cells} |")
    lines.append("")
    for name in (n for n in names if n != s["losses_vs"]):
        c = s["loss_check"][name]
        lines.append(
            f"- {name} vs {s['losses_vs']}: first-step loss diff {c['first_step_diff']:.1e}, max abs diff steps "
            f"1..{CHECK_STEPS} {c['max_abs_diff_first_steps']:.1e}, all {st['steps']} steps "
            f"{c['max_abs_diff_all_steps']:.1e}; losses bit-identical across repeats: "
            f"{c['deterministic_across_repeats']}"
        )
    lines += [
        f"- identical padded input_ids and response masks in steps 1..{CHECK_STEPS} (mmalign vs trl): "
        f"{s['identical_tokens_first_steps']}; rows tokenised differently by trl vs mmalign: "
        f"{s['trl_token_mismatched_examples']}; mmalign's step order matches the reordered trl dataset: "
        f"{s['mmalign_order_matches_formula']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("mmalign", "trl"), help="internal: run one side and print JSON")
    p.add_argument("--work", default=str(HERE / "out" / "work"), help="model, rows and run dirs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timed window")
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (see README: 2 oversubscribes)"
    )
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    p.add_argument("--out-name", default="dpo_vs_trl", help="results go to benchmarks/out/NAME.{md,json}")
    p.add_argument("--python", help="interpreter for the sides (default: this one)")
    p.add_argument(
        "--profile", help="with --side: write a CPU-time cProfile of train() here, print the top to stderr"
    )
    p.add_argument(
        "--precompute-reference",
        action="store_true",
        help="with --side: mmalign precompute_reference / trl precompute_ref_log_probs",
    )
    p.add_argument("--share-prompt", action="store_true", help="with --side mmalign: algorithm.share_prompt")
    p.add_argument("--padding-free", action="store_true", help="with --side mmalign: algorithm.padding_free")
    args = p.parse_args()
    if args.side is None:
        drive(args)
        return
    if args.side == "trl" and (args.share_prompt or args.padding_free):
        raise SystemExit("--share-prompt and --padding-free are mmalign options")
    runner = run_mmalign if args.side == "mmalign" else run_trl
    print(json.dumps(runner(args)))


if __name__ == "__main__":
    main()
