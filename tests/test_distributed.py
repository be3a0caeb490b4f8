"""Slow end-to-end contracts: 2 processes equal 1 process, and a run killed with SIGKILL resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _write(recipe: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_processes_equal_one(tiny_recipe, tmp_path):
    recipe = dict(tiny_recipe)
    recipe["train"] = {**recipe["train"], "max_steps": 4, "save_every": 0}
    recipe_file = _write(recipe, tmp_path / "r.yaml")
    one = tmp_path / "one"
    two = tmp_path / "two"
    cli = ["-m", "mmalign.cli", "train", str(recipe_file)]
    subprocess.run([sys.executable, *cli, "-o", str(one)], check=True, env=_env(), capture_output=True)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    proc = subprocess.run([*launch, *cli, "-o", str(two)], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = _losses(one), _losses(two)
    assert list(l1) == list(l2) == [1, 2, 3, 4]
    assert list(l1.values()) == pytest.approx(list(l2.values()), abs=1e-5)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    for key in ("before", "after"):
        assert s1[key] == pytest.approx(s2[key], abs=1e-5)
    assert l1[4] != pytest.approx(l1[1], abs=1e-4)  # training moved the loss, so equality is not vacuous


def test_sigkill_then_resume_matches_uninterrupted(tiny_recipe, tmp_path):
    recipe = dict(tiny_recipe)
    recipe["train"] = {**recipe["train"], "max_steps": 40, "save_every": 5, "keep_checkpoints": 50}
    recipe_file = _write(recipe, tmp_path / "r.yaml")
    cli = [sys.executable, "-m", "mmalign.cli", "train", str(recipe_file)]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*cli, "-o", str(reference)], check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(
        [*cli, "-o", str(killed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = killed / "checkpoints" / "step-00000005" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()

    subprocess.run([*cli, "-o", str(killed)], check=True, env=_env(), capture_output=True)
    expected = json.loads((reference / "summary.json").read_text())
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["steps"] == expected["steps"] == 40
    assert resumed["before"] == expected["before"]
    assert resumed["after"] == expected["after"]
    assert _losses(killed)[40] == _losses(reference)[40]
