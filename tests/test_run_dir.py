"""One run per directory: bad output paths are refused by name before anything is built, a second writer is
locked out (but not by a killed one), a fresh start moves the old run aside, before.json follows its evaluation
set, and a torn metrics line does not break a resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmalign.core.config import apply_overrides
from mmalign.run import build_run
from mmalign.train import run_dir
from mmalign.train.logging import read_metrics
from mmalign.train.run_dir import NonFiniteMetricError, RunDirError
from mmalign.train.trainer import Trainer


def _snapshot(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def _cli(recipe: dict, tmp_path: Path, out: Path, *overrides: str) -> int:
    from mmalign.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    sets = [arg for o in overrides for arg in ("--set", o)]
    return main(["train", str(recipe_file), "-o", str(out), *sets])


def _trainer(recipe: dict, out: Path, *overrides: str) -> Trainer:
    policy, algorithm, cfg, _, _ = build_run(apply_overrides(recipe, list(overrides)))
    return Trainer(policy, algorithm, cfg, out, evaluator=None, report=None)


@pytest.fixture
def recipe(tiny_recipe) -> dict:
    # held-out pairs only: generating on the held-out prompts is the slow part of evaluation
    return apply_overrides(
        tiny_recipe, ["train.max_steps=2", "train.save_every=2", "eval.prompts=null", "eval.rewards=[]"]
    )


# ------------------------------------------------------------------------------------- bad output paths
def test_output_dir_that_is_a_file_is_refused_before_building(recipe, tmp_path, capsys, monkeypatch):
    import mmalign.run

    def must_not_build(_recipe):
        raise AssertionError("the recipe was built before the output directory was checked")

    monkeypatch.setattr(mmalign.run, "build_run", must_not_build)
    out = tmp_path / "out"
    out.write_text("not a directory")
    assert _cli(recipe, tmp_path, out) == 2
    assert (
        f"run directory error: output directory {out} is a file, not a directory" in capsys.readouterr().err
    )
    assert out.read_text() == "not a directory"
    assert _cli(recipe, tmp_path, out / "run") == 2
    assert f"cannot create output directory {out / 'run'}: {out} is a file" in capsys.readouterr().err


def test_output_dir_that_is_not_writable_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    with (
        pytest.raises(RunDirError, match=f"output directory {out} is not writable"),
        run_dir.hold_run_dir(out),
    ):
        pass
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable"), run_dir.hold_run_dir(out):
            pass
    finally:
        out.chmod(0o700)


def test_full_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    full = f"cannot write to output directory {out}: No space left on device"
    with pytest.raises(RunDirError, match=full), run_dir.hold_run_dir(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_full_disk_mid_run_is_a_named_error(recipe, tmp_path, monkeypatch):
    from mmalign.train.logging import MetricsLogger

    def disk_full(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(MetricsLogger, "log", disk_full)
    out = tmp_path / "run"
    with pytest.raises(
        RunDirError, match=rf"writing {out / 'metrics.jsonl'} failed: No space left on device"
    ):
        _trainer(recipe, out).train()


# ------------------------------------------------------------------------------------------------ lock
# another run holding the directory: the same OS-level lock on DIR/run.lock (importing mmalign would take seconds)
_HOLDER = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_one_does_not_block(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    snapshot = _snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out / run_dir.LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _cli(recipe, tmp_path, out, "train.max_steps=4") == 2
        err = capsys.readouterr().err
        assert f"run directory error: {out} is in use by another run (it holds {out / 'run.lock'})" in err
        with pytest.raises(RunDirError, match="in use by another run"):
            _trainer(recipe, out, "train.max_steps=4").train()
        assert _snapshot(out) == snapshot
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (out / "run.lock").exists()  # left behind by the killed holder, but no longer locked
    capsys.readouterr()
    assert _trainer(recipe, out, "train.max_steps=4").train()["steps"] == 4
    assert "step-00000002 at step 2" in capsys.readouterr().out


def test_nested_holds_in_one_process_share_the_lock(tmp_path):
    out = tmp_path / "run"
    with run_dir.hold_run_dir(out):
        with run_dir.prepare_run_dir(out, resume=True):
            pass
        with run_dir.prepare_run_dir(out, resume=True):  # still held by the outer call
            pass
    with run_dir.hold_run_dir(out):  # released: can be taken again
        pass


# ------------------------------------------------------------------------------------- metrics.jsonl
def test_partial_metrics_line_and_rows_after_the_checkpoint_are_dropped_on_resume(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(recipe, tmp_path, out, "train.max_steps=4") == 0
    before = (out / "before.json").read_bytes()
    # as if killed mid-write at step 5 after the rows of steps 3-4 were logged but before checkpoint 4
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # the torn line is tolerated
    capsys.readouterr()
    assert _cli(recipe, tmp_path, out, "train.max_steps=4") == 0
    assert "recomputing" not in capsys.readouterr().err  # the CLI logs to stderr; stdout is the summary
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (out / "before.json").read_bytes() == before  # same start, same eval set: kept


def test_read_metrics_names_a_bad_line_that_is_not_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON row"):  # a RunDirError too
        read_metrics(tmp_path)


# --------------------------------------------------------------------------------------- before.json
def test_stale_before_json_of_another_eval_set_is_recomputed(recipe, tmp_path, capsys, mmalign_home):
    from mmalign.zoo.registry import resolve

    source = Path(resolve(recipe["eval"]["pairs"], log=lambda *_: None)).read_text().splitlines()
    eval_pairs = tmp_path / "eval_pairs.jsonl"
    eval_pairs.write_text("\n".join(source) + "\n")
    recipe = apply_overrides(recipe, [f"eval.pairs={eval_pairs}"])
    out = tmp_path / "run"
    assert _cli(recipe, tmp_path, out) == 0
    assert json.loads((out / "summary.json").read_text())["before"]["n_pairs"] == len(source)
    # a run killed before its first checkpoint, then the evaluation file changes under the same path
    shutil.rmtree(out / "checkpoints")
    eval_pairs.write_text("\n".join(source[:3]) + "\n")
    capsys.readouterr()
    assert _cli(recipe, tmp_path, out) == 0
    said = capsys.readouterr().err  # the CLI logs to stderr; stdout is the summary
    assert f"{out / 'before.json'} was computed for another starting point (eval changed)" in said
    assert json.loads((out / "before.json").read_text())["metrics"]["n_pairs"] == 3
    assert json.loads((out / "summary.json").read_text())["before"]["n_pairs"] == 3
    assert "recomputing" in (out / "run.log").read_text()


# ----------------------------------------------------------------------------------- resume=false
def test_resume_false_moves_the_old_run_aside(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(recipe, tmp_path, out) == 0
    old = _snapshot(out)
    capsys.readouterr()
    assert _cli(recipe, tmp_path, out, "train.resume=false", "train.max_steps=1", "train.save_every=1") == 0
    assert (
        "moved the earlier run's files" in capsys.readouterr().err
    )  # the CLI logs to stderr; stdout is the summary
    (previous,) = out.glob("previous-*")
    moved = _snapshot(previous)
    assert {k: v for k, v in moved.items() if k != "run.log"} == {
        k: v for k, v in old.items() if k != "run.log"
    }
    assert [r["step"] for r in read_metrics(out)] == [1]  # the new run's rows only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert "moved the earlier run's files" in (out / "run.log").read_text()


def test_resume_false_with_a_bad_recipe_changes_nothing(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(recipe, tmp_path, out) == 0
    old = _snapshot(out)
    capsys.readouterr()
    assert _cli(recipe, tmp_path, out, "train.resume=false", "train.lrr=1") == 2
    assert "train.lrr" in capsys.readouterr().err
    assert _snapshot(out) == old and not list(out.glob("previous-*"))


# --------------------------------------------------------------------------------------- atomic JSON
def test_json_run_files_refuse_nan_by_name_and_keep_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    run_dir.write_json_atomic(path, {"after": {"reward": 0.5}}, "summary.json")
    with pytest.raises(NonFiniteMetricError, match=r"summary\.json: metric 'after\.reward' is inf"):
        run_dir.write_json_atomic(path, {"after": {"reward": float("inf")}}, "summary.json")
    assert json.loads(path.read_text()) == {"after": {"reward": 0.5}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left


def test_recipe_fingerprint_follows_sections_and_file_contents(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    recipe = {"seed": 0, "model": {"name_or_path": "m"}, "eval": {"pairs": str(data)}, "train": {"lr": 1.0}}
    base = run_dir.recipe_fingerprint(recipe)
    assert (
        run_dir.recipe_fingerprint({**recipe, "train": {"lr": 2.0}}) == base
    )  # training settings do not matter
    assert run_dir.recipe_fingerprint({**recipe, "seed": 1})["model"] != base["model"]
    data.write_text('{"prompt": "a", "chosen": "c", "rejected": "b"}\n')
    changed = run_dir.recipe_fingerprint(recipe)
    assert changed["eval"] != base["eval"] and changed["model"] == base["model"]
