"""mmalign VLM DPO vs trl's DPOTrainer on the same tiny LLaVA, image rows, data order, batch and steps (CPU).

One command runs both sides, each in its own subprocess, alternating, `--repeats` times, and reports medians and
the mmalign/trl steps/s ratio:

    benchmarks/.venv-trl/bin/python benchmarks/vlm_dpo_vs_trl.py

The model is a freshly initialised `LlavaForConditionalGeneration` with the digits VLM world's sizes and processor
(`mmalign.zoo.vlm_world`), the rows are (16×16 digit image, "describe the digit.", ground-truth description,
hallucination-injected description) pairs. Both sides do full fine-tuning in fp32 with a frozen reference copy,
sigmoid DPO, AdamW (fused), constant LR, grad-norm clipping, no dropout.

Token identity: trl's vision collator tokenises the prompt without special tokens and the responses without eos,
so its rows are given the same strings with bos and eos written out ("<bos>" + prompt, response + "<eos>"); the
first steps' non-padding token sequences are compared between the sides. Timing as in dpo_vs_trl.py: from the
start of step `warmup + 1` to the start of the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECK_STEPS = 3


def _stamp(stamps: list[tuple[float, float]]) -> None:
    stamps.append((time.perf_counter(), time.process_time()))


def _finish(result: dict, stamps: list[tuple[float, float]], args) -> dict:
    w = args.warmup
    timed = len(stamps) - 1 - w
    if timed < 1:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup + 1 ({w + 1})")
    result["steps_per_s"] = timed / (stamps[-1][0] - stamps[w][0])
    result["cpu_s_per_step"] = (stamps[-1][1] - stamps[w][1]) / timed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["loadavg_1min_after"] = os.getloadavg()[0]
    return result


def _order(n: int, steps: int, batch: int) -> list[list[int]]:
    """The rows mmalign's Trainer feeds at each step (seeded permutation per epoch, as in bench_setup)."""
    sys.path.insert(0, str(HERE))
    import bench_setup

    return bench_setup.mmalign_order(n, steps, batch)


def _unpadded(input_ids, attention) -> list[list[int]]:
    return [
        [t for t, a in zip(ids, att, strict=True) if a] for ids, att in zip(input_ids, attention, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- setup
def prepare(work: Path, n_pairs: int) -> dict:
    """Write work/model (tiny LLaVA + processor), work/images/*.png and work/rows.json."""
    import numpy as np
    import torch

    from mmalign.vision import vlm_builders as B
    from mmalign.vision import vlm_digits as D
    from mmalign.zoo import vlm_world as W

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    spec = W.VLMWorldSpec()
    processor = W.world_processor()
    model = W.build_model(processor, spec)
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    rendered, labels = W.render_all(0)
    (work / "images").mkdir(exist_ok=True)
    records = []
    for i in range(n_pairs):
        rendered[i].save(work / "images" / f"{i}.png")
        facts = D.facts_of(np.asarray(rendered[i]), labels[i])
        records.append({"image": f"images/{i}.png", "prompt": D.DESCRIBE_PROMPT, "facts": facts})
    rows = B.dpo_rows(records, seed=0)
    random.Random(0).shuffle(rows)
    (work / "rows.json").write_text(json.dumps(rows))
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "parameters": n_params,
        "pairs": n_pairs,
        "vision_hidden": spec.vision_hidden,
        "text_hidden": spec.text_hidden,
    }


# -------------------------------------------------------------------------------------------- mmalign
def run_mmalign(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from mmalign.core.data import Row
    from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig
    from mmalign.train.trainer import TrainConfig, Trainer
    from mmalign.vision.vlm_data import validate_vlm_preference_rows
    from mmalign.vision.vlm_policy import VisionLanguagePolicy

    work = Path(args.work)
    data = json.loads((work / "rows.json").read_text())
    t0 = time.perf_counter()
    policy = VisionLanguagePolicy.from_pretrained(str(work / "model"), max_length=args.max_length)
    rows = validate_vlm_preference_rows(
        [Row(str(work / "rows.json"), i + 1, r, "row") for i, r in enumerate(data)]
    )
    algo = PreferenceAlgorithm(policy, rows, PreferenceConfig(loss="dpo", beta=args.beta))
    stamps: list[tuple[float, float]] = []
    batches: list[list[list[int]]] = []
    inner = algo.loss

    def timed_loss(examples):
        _stamp(stamps)
        if len(batches) < CHECK_STEPS:
            b = policy.collate_pairs(examples)
            batches.append(_unpadded(b["input_ids"].tolist(), b["attention_mask"].tolist()))
        return inner(examples)

    algo.loss = timed_loss
    out_dir = Path(tempfile.mkdtemp(prefix="mmalign-", dir=work))
    config = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=0.0,
        adam_betas=(0.9, 0.999),
        scheduler="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        progress=False,
        seed=0,
    )
    trainer = Trainer(policy, algo, config, out_dir)
    setup_s = time.perf_counter() - t0
    trainer.train()
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in sorted(metrics, key=lambda m: m["step"]) if "train/loss" in m]
    shutil.rmtree(out_dir, ignore_errors=True)
    return _finish(
        {"side": "mmalign", "setup_s": setup_s, "losses": losses, "batches": batches}, stamps, args
    )


# ------------------------------------------------------------------------------------------------ trl
def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    work = Path(args.work)
    data = json.loads((work / "rows.json").read_text())
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(str(work / "model"))
    model = AutoModelForImageTextToText.from_pretrained(str(work / "model"), dtype=torch.float32)
    order = [i for batch in _order(len(data), args.steps, args.batch) for i in batch]
    tok = processor.tokenizer

    def trl_row(r):
        with Image.open(work / r["image"]) as img:
            image = img.convert("RGB")
        return {
            "image": image,
            "prompt": tok.bos_token + processor.image_token + r["prompt"],
            "chosen": r["chosen"] + tok.eos_token,
            "rejected": r["rejected"] + tok.eos_token,
        }

    dataset = Dataset.from_list([trl_row(data[i]) for i in order])
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    batches: list[list[list[int]]] = []

    class TimedDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            _stamp(stamps)
            if len(batches) < CHECK_STEPS:
                batches.append(_unpadded(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()))
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
        optim="adamw_torch_fused",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=None,  # trl would cut image tokens otherwise; nothing here is longer than 128 tokens
        disable_dropout=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    setup_s = time.perf_counter() - t0
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {
        "side": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "setup_s": setup_s,
        "losses": losses,
        "batches": batches,
    }
    return _finish(result, stamps, args)


# --------------------------------------------------------------------------------------------- driver
_SHARED = ("steps", "warmup", "batch", "lr", "beta", "max_length", "threads")


def _child(side: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--work", str(args.work)]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "trl is not installed here; run: benchmarks/.venv-trl/bin/python benchmarks/vlm_dpo_vs_trl.py"
        )
    import torch

    info = prepare(Path(args.work), args.pairs)
    runs: dict[str, list[dict]] = {"mmalign": [], "trl": []}
    for r in range(args.repeats):
        for side in ("mmalign", "trl") if r % 2 == 0 else ("trl", "mmalign"):
            load = os.getloadavg()[0]
            res = _child(side, args)
            res["loadavg_1min_before"] = load
            runs[side].append(res)
            print(
                f"[run {r + 1}/{args.repeats}] {side:7s} {res['steps_per_s']:.2f} steps/s, "
                f"{res['cpu_s_per_step']:.3f} CPU s/step, RSS {res['peak_rss_mb']:.0f} MB, "
                f"first loss {res['losses'][0]:.6f}, load {load:.1f}/{res['loadavg_1min_after']:.1f}",
                file=sys.stderr,
            )
    mm, tr = runs["mmalign"], runs["trl"]

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    n = min(len(mm[0]["losses"]), len(tr[0]["losses"]))
    diffs = [abs(a - b) for a, b in zip(mm[0]["losses"][:n], tr[0]["losses"][:n], strict=True)]
    # same sequences per step (as multisets: the sides order chosen/rejected rows the same, padding differs)
    same_tokens = [sorted(a) == sorted(b) for a, b in zip(mm[0]["batches"], tr[0]["batches"], strict=False)]
    summary = {
        "command": " ".join(["benchmarks/.venv-trl/bin/python benchmarks/vlm_dpo_vs_trl.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in (*_SHARED, "pairs", "repeats")},
        "setup": info,
        "versions": {"torch": torch.__version__, "transformers": tr[0]["transformers"], "trl": tr[0]["trl"]},
        "median": {
            side: {k: med(rs, k) for k in ("steps_per_s", "cpu_s_per_step", "peak_rss_mb", "setup_s")}
            for side, rs in runs.items()
        },
        "ratio_mmalign_over_trl": {
            "steps_per_s": med(mm, "steps_per_s") / med(tr, "steps_per_s"),
            "steps_per_cpu_s": med(tr, "cpu_s_per_step") / med(mm, "cpu_s_per_step"),
            "peak_rss": med(mm, "peak_rss_mb") / med(tr, "peak_rss_mb"),
        },
        "losses_first_steps": {"mmalign": mm[0]["losses"][:5], "trl": tr[0]["losses"][:5]},
        "max_abs_loss_diff_first_5": max(diffs[:5]),
        "max_abs_loss_diff_all": max(diffs),
        "identical_token_sequences_first_steps": same_tokens,
        "runs": {
            side: [{k: v for k, v in r.items() if k != "batches"} for r in rs] for side, rs in runs.items()
        },
    }
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "vlm_dpo_vs_trl.json").write_text(json.dumps(summary, indent=2))
    md = render(summary)
    (out / "vlm_dpo_vs_trl.md").write_text(md)
    print(md)


def render(s: dict) -> str:
    m, t, r = s["median"]["mmalign"], s["median"]["trl"], s["ratio_mmalign_over_trl"]
    st = s["settings"]
    return "\n".join(
        [
            f"`{s['command']}`",
            "",
            f"{s['setup']['parameters']:,}-parameter LlavaForConditionalGeneration (CLIP vision tower hidden "
            f"{s['setup']['vision_hidden']}, Llama hidden {s['setup']['text_hidden']}, 16 image tokens), "
            f"{st['pairs']} image pairs, batch {st['batch']}, {st['steps']} steps (timed from step "
            f"{st['warmup'] + 1}), full FT fp32, {st['threads']} thread(s), median of {st['repeats']} alternating "
            f"runs; torch {s['versions']['torch']}, transformers {s['versions']['transformers']}, trl "
            f"{s['versions']['trl']}.",
            "",
            "| | mmalign | trl DPOTrainer | mmalign / trl |",
            "|---|---|---|---|",
            f"| steps/s | {m['steps_per_s']:.2f} | {t['steps_per_s']:.2f} | **{r['steps_per_s']:.2f}×** |",
            f"| CPU s/step | {m['cpu_s_per_step']:.3f} | {t['cpu_s_per_step']:.3f} | {r['steps_per_cpu_s']:.2f}× |",
            f"| peak RSS (MB) | {m['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {r['peak_rss']:.2f} |",
            "",
            f"Identical token sequences in the first {CHECK_STEPS} steps: {s['identical_token_sequences_first_steps']}; "
            f"max |loss difference| over the first 5 steps {s['max_abs_loss_diff_first_5']:.2e}, over all steps "
            f"{s['max_abs_loss_diff_all']:.2e}.",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["mmalign", "trl"])
    p.add_argument("--work", default=str(HERE / "out" / "work" / "vlm"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.side:
        fn = run_mmalign if args.side == "mmalign" else run_trl
        print(json.dumps(fn(args)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
