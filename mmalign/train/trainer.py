"""The training loop every method shares: offline (dataset → objective) and online (prompts → sample → reward →
objective), on accelerate, with exact resume.

Data order is a pure function of (seed, step): each epoch is a seeded permutation, each optimizer step takes the
next global batch, splits it into `grad_accum` micro-batches and each micro-batch across processes. Losses are
per-sample means over the global batch, so k micro-batches equal one batch k times larger, and P processes equal
one process (up to float reduction order).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmalign.core.errors import MmalignError
from mmalign.core.policy import Policy
from mmalign.train import checkpoint as ckpt
from mmalign.train.algorithm import (
    Algorithm,
    Evaluator,
    LossTerm,
    OfflineAlgorithm,
    OnlineAlgorithm,
    Report,
)
from mmalign.train.ema import PART as EMA_PART
from mmalign.train.ema import WeightAverage, saved_average
from mmalign.train.logging import MetricsLogger
from mmalign.train.run_dir import atomic_dir, prepare_run_dir, read_before, write_json_atomic


class TrainingError(MmalignError, RuntimeError):
    """Training stopped because continuing would train on garbage (NaN/inf loss, bad configuration)."""

    label = "training error"


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.log_with name → the package it needs


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of a run (the `train:` section of a recipe).

    `num_train_epochs` (trl's name), when set, decides `max_steps`: enough optimizer steps for every training
    example (every prompt, for online methods) to be drawn that many times; `warmup_ratio` sets the warm-up to
    that share of the steps (rounded up, as transformers does). `gradient_checkpointing` recomputes activations in
    the backward pass instead of storing them (less memory, the same gradients). `ema_decay` > 0 keeps an
    exponential moving average of the trained weights, updated every `ema_every` optimizer steps (Flow-GRPO's
    `decay` and `update_step_interval`), and evaluates and saves it in their place (`mmalign.train.ema`).
    """

    seed: int = 0
    max_steps: int = 100
    num_train_epochs: float | None = None
    batch_size: int = 32  # global: summed over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "constant_with_warmup"  # any transformers scheduler name
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: evaluate and save the trained weights themselves
    ema_every: int = 1
    eval_every: int = 0  # 0: only before and after
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    log_with: list[str] = field(default_factory=list)  # accelerate trackers: "tensorboard", "wandb"
    resume: bool = True  # false: start over, moving an earlier run's files in the directory aside
    # the newest checkpoint fails verification: "fallback" to the newest valid one (and say so) | "error"
    on_corrupt_checkpoint: str = "fallback"
    ppo_epochs: int = 1  # online: optimizer steps per rollout (PPO-style reuse of samples)
    rollout_prompts: int = 0  # online: prompts per rollout (global); 0 → batch_size / samples_per_prompt
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "ppo_epochs",
            "log_every",
            "keep_checkpoints",
            "ema_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "rollout_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum ({self.grad_accum})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(
                f"train.ema_decay must be in [0, 1) (0: no moving average), got {self.ema_decay}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be ≥ 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"train.max_grad_norm must be > 0 (or null: no clipping), got {self.max_grad_norm}"
            )
        betas = list(self.adam_betas) if isinstance(self.adam_betas, (list, tuple)) else [self.adam_betas]
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.num_train_epochs is not None and not (
            math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0
        ):
            raise ValueError(f"train.num_train_epochs must be > 0, got {self.num_train_epochs}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("give train.warmup_steps or train.warmup_ratio, not both")
        check_scheduler(self.scheduler)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        if self.on_corrupt_checkpoint not in ckpt.ON_CORRUPT:
            raise ValueError(
                f"train.on_corrupt_checkpoint must be 'fallback' or 'error', got {self.on_corrupt_checkpoint!r}"
            )
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        for tracker in self.log_with:
            if tracker not in TRACKERS:
                raise ValueError(f"train.log_with: unknown tracker {tracker!r}; known: {', '.join(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[tracker]) is None:
                extra = "tracking" if tracker == "tensorboard" else "wandb"
                raise ValueError(
                    f"train.log_with: {tracker} is not installed (pip install 'mmalign[{extra}]')"
                )

    def warmup(self) -> int:
        """Warm-up steps: `warmup_steps`, or `warmup_ratio` of `max_steps` rounded up."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)

    def for_data(self, n_items: int, *, online: bool = False, samples_per_prompt: int = 1) -> TrainConfig:
        """This config with `max_steps` derived from `num_train_epochs` (unchanged without it).

        `n_items` is the dataset size: training examples, or prompts for online methods. An offline step draws
        `batch_size` examples; an online rollout draws `rollout_prompts` prompts (default batch_size /
        samples_per_prompt) and is trained on for `ppo_epochs` steps. Draws run on into the next epoch's
        permutation, so E epochs are ⌈E·n / per-draw⌉ draws.
        """
        if self.num_train_epochs is None:
            return self
        if n_items < 1:
            raise ValueError("train.num_train_epochs needs a non-empty training set")
        per_draw = (
            (self.rollout_prompts or self.batch_size // samples_per_prompt) if online else self.batch_size
        )
        steps_per_draw = self.ppo_epochs if online else 1
        draws = max(1, math.ceil(self.num_train_epochs * n_items / max(per_draw, 1) - 1e-9))
        return dataclasses.replace(self, max_steps=draws * steps_per_draw)


_SCHEDULERS: dict[str, str | None] = {}


def check_scheduler(name: str) -> None:
    """Refuse a scheduler transformers cannot build from (warm-up, total steps) alone, listing those it can."""
    if not _SCHEDULERS:
        from transformers import SchedulerType

        probe = torch.nn.Parameter(torch.zeros(1))
        for kind in SchedulerType:
            try:
                optimizer = torch.optim.SGD([probe], lr=1.0)
                scheduler = get_scheduler(kind.value, optimizer, num_warmup_steps=1, num_training_steps=2)
                # no optimizer.step(): it would fire global optimizer hooks (profilers, benchmarks) at config time
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                    scheduler.step()
                _SCHEDULERS[kind.value] = None
            except (
                ValueError,
                TypeError,
            ) as err:  # cosine_with_min_lr needs min_lr, reduce_lr_on_plateau a metric
                _SCHEDULERS[kind.value] = str(err)
    if _SCHEDULERS.get(name, "unknown") is not None:
        usable = ", ".join(n for n, why in _SCHEDULERS.items() if why is None)
        raise ValueError(f"train.scheduler must be one of {usable}; got {name!r}")


class Trainer:
    """Runs an algorithm on a policy and writes the run directory (see README: run directory contract)."""

    def __init__(
        self,
        policy: Policy,
        algorithm: Algorithm,
        config: TrainConfig,
        output_dir: str | Path,
        *,
        evaluator: Evaluator | None = None,
        accelerator: Accelerator | None = None,
        report: Report | None = None,
        fingerprint: Mapping[str, str] | None = None,
        hparams: Mapping[str, Any] | None = None,
    ):
        if config.num_train_epochs is not None:
            online = algorithm.online
            n = len(_online(algorithm).prompts) if online else len(_offline(algorithm).train_examples)
            config = config.for_data(
                n, online=online, samples_per_prompt=getattr(algorithm, "samples_per_prompt", 1)
            )
        self.policy, self.algorithm, self.config = policy, algorithm, config
        # what identifies the starting point besides its weights (e.g. run_dir.recipe_fingerprint); kept in before.json
        self.fingerprint = dict(fingerprint or {})
        # what trackers record as the run's hyperparameters (e.g. the flattened recipe); default: this config
        self.hparams = dict(hparams) if hparams is not None else flatten({"train": asdict(config)})
        self.evaluator = evaluator
        self.report = report
        self.run_dir = Path(output_dir)
        if accelerator is None:
            _release_accelerator_state(config.mixed_precision)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=config.log_with or None,
            project_dir=str(self.run_dir),
        )
        world = self.accelerator.num_processes
        if config.batch_size % (config.grad_accum * world):
            raise ValueError(
                f"train.batch_size ({config.batch_size}) must be divisible by grad_accum × processes "
                f"({config.grad_accum} × {world})"
            )
        self.micro_batch = config.batch_size // config.grad_accum
        self.local_batch = self.micro_batch // world
        # held-out evaluation's share of the wall time, so that training time can be told apart
        self._eval_seconds = 0.0
        self.ema: WeightAverage | None = None

    # ------------------------------------------------------------------------------------------- data
    def _epoch_order(self, n: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _global_indices(self, n: int, draw: int, size: int) -> list[int]:
        """The `draw`-th batch of `size` items from the stream of seeded per-epoch permutations of range(n).

        Batches that run past an epoch continue into the next permutation, so every item is seen once per
        epoch and a batch may hold more items than the dataset (small prompt sets in online methods).
        """
        if n == 0:
            raise ValueError("the dataset is empty")
        start = draw * size
        out: list[int] = []
        epoch, pos = divmod(start, n)
        while len(out) < size:
            order = self._epoch_order(n, epoch)
            out += order[pos : pos + size - len(out)]
            epoch, pos = epoch + 1, 0
        return out

    def _local(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of a global micro-batch."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        share = len(items) // world
        return list(items[rank * share : (rank + 1) * share])

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to `max_steps` (resuming from the newest valid checkpoint if any) and return the summary."""
        with prepare_run_dir(self.run_dir, resume=self.config.resume):
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        start_time = time.time()
        self._eval_seconds = 0.0
        set_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        params = list(self.policy.trainable_parameters())
        if not params:
            raise TrainingError("the policy has no trainable parameters")
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas, fused=fused or None
        )
        scheduler = get_scheduler(
            cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup(), num_training_steps=cfg.max_steps
        )
        if cfg.gradient_checkpointing:
            enable = getattr(self.policy, "enable_gradient_checkpointing", None)
            if enable is None:
                raise TrainingError(
                    f"train.gradient_checkpointing: {type(self.policy).__name__} does not support it"
                )
            enable()
        self.model, optimizer = acc.prepare(self.policy.module, optimizer)
        self.policy.attach(self.model)
        # prepare() placed only the trained module: reference copies, encoders and VAEs follow it
        self.policy.move_frozen_to(acc.device)
        self.ema = WeightAverage(self.policy.module, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
        logger = MetricsLogger(self.run_dir, acc, cfg.log_with)

        step, elapsed_before = 0, 0.0
        last, skipped = (
            ckpt.agreed_checkpoint(
                self.run_dir, cfg.on_corrupt_checkpoint, is_main_process=acc.is_main_process
            )
            if cfg.resume
            else (None, [])
        )
        if last is not None:  # checkpoints are skipped only on the way to a valid one
            for note in skipped:
                logger.event(f"{note}; resuming from {last.name} instead")
        before = self._before_metrics(logger)  # of the starting weights, so before any checkpoint is restored
        logger.held_out(0, before)
        if last is not None:
            step, elapsed_before, eval_before = self._restore(last, optimizer, scheduler)
            self._eval_seconds += eval_before
            acc.print(f"resumed from {last} at step {step}")
        logger.resume_at(step)
        self.algorithm.updates_per_rollout = cfg.ppo_epochs  # the Algorithm protocol: set before setup()
        self.algorithm.setup()
        if last is not None:
            ckpt.set_rng_state(ckpt.load_state(last, f"rng-rank{acc.process_index}"))

        online = self.algorithm.online
        rollout: list[Any] = []
        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            disable=not (cfg.progress and acc.is_main_process),
            desc="train",
            dynamic_ncols=True,
        )
        self.policy.module.train()
        while step < cfg.max_steps:
            metrics: dict[str, float] = {}
            if online:
                if step % cfg.ppo_epochs == 0 or not rollout:
                    rollout, rollout_metrics = self._rollout(step // cfg.ppo_epochs)
                    metrics.update(rollout_metrics)
                micro_batches = self._split_local(rollout)
            else:
                examples = _offline(self.algorithm).train_examples
                idx = self._global_indices(len(examples), step, cfg.batch_size)
                micro_batches = [
                    self._local([examples[i] for i in idx[m * self.micro_batch : (m + 1) * self.micro_batch]])
                    for m in range(cfg.grad_accum)
                ]
            metrics.update(self._optimizer_step(micro_batches, optimizer, scheduler, step))
            step += 1
            if self.ema is not None:
                self.ema.update(step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and self.evaluator:
                held_out = {f"eval/{k}": v for k, v in self._evaluate().items()}
                train_s = elapsed_before + time.time() - start_time - self._eval_seconds
                logger.log(step, {**held_out, "time/train_s": round(train_s, 2)})
            boundary = not online or step % cfg.ppo_epochs == 0
            if boundary and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps):
                self._save(step, optimizer, scheduler, elapsed_before + time.time() - start_time)
        bar.close()

        after = self._evaluate() if self.evaluator else {}
        wall = elapsed_before + time.time() - start_time
        summary = {
            "steps": step,
            "wall_time_s": round(wall, 2),
            "train_time_s": round(wall - self._eval_seconds, 2),  # without held-out evaluation
            "before": before,
            "after": after,
        }
        logger.held_out(step, after)
        logger.hyperparameters(self.hparams, before, after)
        if acc.is_main_process:
            write_json_atomic(self.run_dir / "summary.json", summary, "summary.json")
            with atomic_dir(self.run_dir / "final") as tmp, self._evaluated_weights():
                self.policy.save_pretrained(str(tmp))
            if self.report is not None:
                self.report.write(self.run_dir, summary, self._after_samples())
        logger.close()
        acc.wait_for_everyone()
        return summary

    def _split_local(self, rollout: list[Any]) -> list[list[Any]]:
        """Split this process's rollout examples into grad_accum micro-batches."""
        k = self.config.grad_accum
        if len(rollout) % k:
            raise TrainingError(
                f"{len(rollout)} rollout examples per process do not split into grad_accum={k}"
            )
        size = len(rollout) // k
        return [rollout[m * size : (m + 1) * size] for m in range(k)]

    def _rollout(self, index: int) -> tuple[list[Any], dict[str, float]]:
        """Sample this process's share of the rollout's prompts and let the algorithm score them."""
        alg, cfg = _online(self.algorithm), self.config
        n_prompts = cfg.rollout_prompts or cfg.batch_size // alg.samples_per_prompt
        if n_prompts % self.accelerator.num_processes:
            raise ValueError(f"rollout prompts ({n_prompts}) must divide by the number of processes")
        rows = [alg.prompts[i] for i in self._global_indices(len(alg.prompts), index, n_prompts)]
        self.policy.module.eval()
        examples, metrics = alg.rollout(self._local(rows))
        self.policy.module.train()
        return examples, self._mean_across(metrics)

    def _loss_terms(self, batch: Any) -> list[LossTerm]:
        """The micro-batch's loss as closures to backward one at a time (a single closure unless the algorithm
        splits it, as the diffusion policy gradient does per denoising step to keep one step's graph alive).

        DeepSpeed counts every backward as a micro-step, so there the terms are summed into one backward.
        """
        if self.accelerator.distributed_type.value == "DEEPSPEED":
            return [lambda: self.algorithm.loss(batch)]
        return self.algorithm.loss_terms(batch)

    def _optimizer_step(self, micro_batches, optimizer, scheduler, step: int) -> dict[str, float]:
        acc, cfg = self.accelerator, self.config
        k = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(micro_batches):
            terms = self._loss_terms(batch)
            for j, term in enumerate(terms):
                sync = m == k - 1 and j == len(terms) - 1  # gradients are all-reduced once, after the last
                with nullcontext() if sync else acc.no_sync(self.model):
                    with acc.autocast():
                        losses, metrics = term()
                    bad = (~torch.isfinite(losses.detach())).sum()
                    if acc.reduce(bad.float(), "sum").item() > 0:
                        rows = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
                        raise TrainingError(
                            f"non-finite loss at step {step + 1}, micro-batch {m}, term {j} (local samples "
                            f"{rows[:10]}); nothing was applied and no checkpoint was written for this step"
                        )
                    loss = losses.mean() / k
                    acc.backward(loss)
                totals["train/loss"] = totals.get("train/loss", 0) + loss.detach()
                for name, value in metrics.items():
                    totals[f"train/{name}"] = totals.get(f"train/{name}", 0) + value.detach().float() / k
        if cfg.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(list(self.policy.trainable_parameters()), cfg.max_grad_norm)
            if not torch.isfinite(torch.as_tensor(norm)):
                raise TrainingError(
                    f"non-finite gradient norm at step {step + 1}; the update was not applied"
                )
            totals["train/grad_norm"] = torch.as_tensor(norm).detach().float()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        out = self._mean_across({k_: v for k_, v in totals.items()})
        out["train/lr"] = scheduler.get_last_lr()[0]
        return out

    def _mean_across(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Average scalar metrics over processes (each process saw an equal share of the batch)."""
        if not metrics:
            return {}
        names = sorted(metrics)
        device = self.accelerator.device
        values = torch.stack([torch.as_tensor(metrics[n], dtype=torch.float32, device=device) for n in names])
        values = self.accelerator.reduce(values, "mean")
        return {n: float(v) for n, v in zip(names, values.tolist(), strict=True)}

    # -------------------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics; every process evaluates the full set so all agree without communication."""
        if self.evaluator is None:
            return {}
        was = self.policy.module.training
        self.policy.module.eval()
        start = time.time()
        with torch.no_grad(), self._evaluated_weights():
            result = self.evaluator.evaluate(self.policy)
        self._eval_seconds += time.time() - start
        self.policy.module.train(was)
        return result

    def _evaluated_weights(self) -> AbstractContextManager[None]:
        """The weights a run evaluates and saves: the moving average with `train.ema_decay`, else the trained ones."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def _before_metrics(self, logger: MetricsLogger) -> dict[str, float]:
        """Metrics of the starting model, kept across resumes while its weights and evaluation set are the same."""
        path, acc = self.run_dir / "before.json", self.accelerator
        fingerprint: dict[str, str] = {}
        stored: list[tuple[dict[str, float] | None, str | None] | None] = [None]
        if acc.is_main_process:
            fingerprint = {"weights": ckpt.state_digest(self.policy.module.state_dict()), **self.fingerprint}
            stored = [read_before(path, fingerprint)]
        stored_metrics, note = broadcast_object_list(stored)[0]
        if stored_metrics is not None:
            return stored_metrics
        if note:
            logger.event(note)
        before = self._evaluate()
        samples = self._samples("before")
        if acc.is_main_process:
            record = {"fingerprint": fingerprint, "metrics": before, "samples": samples}
            write_json_atomic(path, record, "before.json")
        acc.wait_for_everyone()
        return before

    def _samples(self, tag: str) -> list[dict[str, Any]]:
        """Evaluator samples made JSON-safe by the report (e.g. images saved as files, paths kept)."""
        if self.evaluator is None:
            return []
        self.policy.module.eval()
        with torch.no_grad(), self._evaluated_weights():
            out = self.evaluator.samples(self.policy)
        self.policy.module.train()
        if self.report is not None and self.accelerator.is_main_process:
            out = self.report.store_samples(self.run_dir, tag, out)
        return out

    def _after_samples(self) -> dict[str, list[dict[str, Any]]]:
        before_file = self.run_dir / "before.json"
        before = json.loads(before_file.read_text()).get("samples", []) if before_file.exists() else []
        return {"before": before, "after": self._samples("after")}

    # ------------------------------------------------------------------------------------- checkpoints
    def _save(self, step: int, optimizer, scheduler, elapsed: float) -> None:
        acc = self.accelerator
        parts = {
            "policy": self.policy.trainable_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "algorithm": self.algorithm.state_dict(),
            **({EMA_PART: self.ema.state_dict()} if self.ema is not None else {}),
            "trainer": {
                "step": step,
                "elapsed": elapsed,
                "eval_elapsed": self._eval_seconds,
                "world_size": acc.num_processes,
                "config": asdict(self.config),
            },
        }
        ckpt.write_checkpoint(
            ckpt.checkpoint_dir(self.run_dir, step),
            parts,
            rank=acc.process_index,
            world_size=acc.num_processes,
            all_ok=ckpt.all_ranks_ok(acc),
        )
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        acc.wait_for_everyone()

    def _restore(self, path: Path, optimizer, scheduler) -> tuple[int, float, float]:
        """Load a checkpoint; returns its step, wall seconds and the evaluation's share of them."""
        trainer = ckpt.load_state(path, "trainer")
        if trainer["world_size"] != self.accelerator.num_processes:
            raise TrainingError(
                f"{path} was written by {trainer['world_size']} processes; resume with the same number "
                f"(got {self.accelerator.num_processes}) so the random streams continue exactly"
            )
        weights = ckpt.load_state(path, "policy")
        ckpt.require_finite(weights, f"{path}/policy.safetensors")
        self.policy.load_trainable_state_dict(weights)
        optimizer.load_state_dict(ckpt.load_state(path, "optimizer"))
        scheduler.load_state_dict({**scheduler.state_dict(), **ckpt.load_state(path, "scheduler")})
        self.algorithm.load_state_dict(ckpt.load_state(path, "algorithm"))
        if self.ema is not None:
            average = saved_average(path)
            if average is None:
                raise TrainingError(
                    f"{path} has no moving average of the weights (it was written without train.ema_decay); "
                    "resume with the settings it was written with, or start over (train.resume: false)"
                )
            self.ema.load_state_dict(average)
        return int(trainer["step"]), float(trainer["elapsed"]), float(trainer.get("eval_elapsed", 0.0))


def _online(algorithm: Algorithm) -> OnlineAlgorithm:
    """An algorithm that says it is online, as one: it must have every member of `OnlineAlgorithm`."""
    if not isinstance(algorithm, OnlineAlgorithm):
        raise TypeError(
            f"{type(algorithm).__name__} is online but lacks {_missing(algorithm, OnlineAlgorithm)}"
        )
    return algorithm


def _offline(algorithm: Algorithm) -> OfflineAlgorithm:
    """An algorithm that says it is offline, as one: it must have every member of `OfflineAlgorithm`."""
    if not isinstance(algorithm, OfflineAlgorithm):
        raise TypeError(
            f"{type(algorithm).__name__} is offline but lacks {_missing(algorithm, OfflineAlgorithm)}"
        )
    return algorithm


def _missing(algorithm: Algorithm, protocol: type) -> str:
    """The protocol members an algorithm does not have, for the error that names them."""
    members = sorted(
        m for c in protocol.__mro__ for m in getattr(c, "__annotations__", {}) if c is not object
    )
    members += sorted(
        m for c in protocol.__mro__ for m, v in vars(c).items() if callable(v) and not m.startswith("_")
    )
    return ", ".join(m for m in dict.fromkeys(members) if not hasattr(algorithm, m)) or "a protocol member"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted keys (`train.lr`), the shape trackers take hyperparameters in."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps in one pass over a dataset (the last partial batch is left for the next epoch)."""
    return max(1, math.floor(n_examples / batch_size))


def _release_accelerator_state(mixed_precision: str) -> None:
    """Let a second Trainer in one process use another precision (accelerate keeps one global state)."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
