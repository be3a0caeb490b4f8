"""Shared fixtures: a seconds-fast text world built once per test session in a private MMALIGN_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests run in parallel workers on a 2-core machine


@pytest.fixture(scope="session")
def mmalign_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.getbasetemp().parent / "mmalign-home"
    os.environ["MMALIGN_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_world(mmalign_home) -> Path:
    """The `text-tiny` zoo world (tiny LLaMA + pairs/prompts files); built once, shared by all tests."""
    from filelock import FileLock

    from mmalign.zoo import registry

    with FileLock(str(mmalign_home) + ".lock"):
        return registry.build("text-tiny", log=lambda *_: None)


@pytest.fixture
def tiny_recipe(tiny_world) -> dict:
    """A small DPO recipe on the tiny world that trains in a few seconds."""
    return {
        "seed": 0,
        "model": {
            "name_or_path": "zoo://text-tiny/base",
            "lora": {"r": 4, "alpha": 8},
            "max_length": 24,
            "max_new_tokens": 4,
        },
        "data": {"train": "zoo://text-tiny/train_pairs.jsonl"},
        "algorithm": {"name": "dpo", "beta": 0.5},
        "eval": {
            "pairs": "zoo://text-tiny/eval_pairs.jsonl",
            "prompts": "zoo://text-tiny/eval_prompts.jsonl",
            "rewards": ["answer_match"],
            "n_samples": 2,
        },
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "progress": False, "save_every": 2},
    }
