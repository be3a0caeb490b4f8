"""Checkpoints are verified before they are loaded: a corrupt, truncated or incomplete newest checkpoint is
named and skipped (or refused), NaN weights and NaN metrics are refused by name, and a failed write leaves the
earlier checkpoints as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mmalign.core.config import apply_overrides
from mmalign.run import build_run
from mmalign.train import checkpoint as ckpt
from mmalign.train.checkpoint import CheckpointError
from mmalign.train.trainer import Trainer


def _trainer(recipe: dict, out: Path, *overrides: str) -> Trainer:
    policy, algorithm, cfg, _, _ = build_run(apply_overrides(recipe, list(overrides)))
    return Trainer(policy, algorithm, cfg, out, evaluator=None, report=None)


def _run(recipe: dict, out: Path, *overrides: str) -> Trainer:
    trainer = _trainer(recipe, out, *overrides)
    trainer.train()
    return trainer


def _snapshot(run: Path) -> dict[str, str]:
    """Digest of every file of a run directory (the lock file aside): what a refused run must not change."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def _corrupt_tensor_bytes(file: Path) -> None:
    """Overwrite tensor bytes of a safetensors file in place, leaving its header (names, shapes, offsets) intact."""
    data = bytearray(file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i in range(header_end, len(data), 5):
        data[i] ^= 0x5A
    file.write_bytes(bytes(data))


@pytest.fixture
def recipe(tiny_recipe) -> dict:
    return apply_overrides(
        tiny_recipe, ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=5"]
    )


def test_corrupted_tensor_bytes_resume_from_the_previous_valid_checkpoint(recipe, tmp_path, capsys):
    clean = _run(recipe, tmp_path / "clean", "train.max_steps=6")
    run = tmp_path / "run"
    _run(recipe, run)
    bad = run / "checkpoints" / "step-00000004" / "policy.safetensors"
    with safe_open(str(bad), "pt") as f:
        names = set(f.keys())
    before = {n: v.clone() for n, v in load_file(str(bad)).items()}  # load_file maps the file
    _corrupt_tensor_bytes(bad)
    with safe_open(str(bad), "pt") as f:  # the header still parses: only the digest can tell
        assert set(f.keys()) == names
    assert any(not torch.equal(before[n], v) for n, v in load_file(str(bad)).items())
    capsys.readouterr()

    resumed = _run(recipe, run, "train.max_steps=6")
    out = capsys.readouterr().out
    assert f"checkpoint {bad.parent} is unusable: policy.safetensors does not match its SHA-256 digest" in out
    assert "resuming from step-00000002 instead" in out
    assert "resumed from" in out and "step-00000002 at step 2" in out
    assert "step-00000004 is unusable" in (run / "run.log").read_text()
    # the corrupt weights were never loaded: the result equals an uninterrupted clean run bit for bit
    a, b = clean.policy.trainable_state_dict(), resumed.policy.trainable_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 were redone, not logged twice
    assert ckpt.checkpoint_problem(bad.parent) is None  # rewritten when the run reached step 4 again


def test_missing_file_is_named_and_skipped(recipe, tmp_path):
    run = tmp_path / "run"
    _run(recipe, run)
    (run / "checkpoints" / "step-00000004" / "optimizer.safetensors").unlink()
    found, notes = ckpt.latest_valid_checkpoint(run)
    assert found.name == "step-00000002"
    assert notes == [
        f"checkpoint {run / 'checkpoints' / 'step-00000004'} is unusable: optimizer.safetensors is missing"
    ]


def test_truncated_safetensors_is_named_and_skipped(recipe, tmp_path):
    run = tmp_path / "run"
    _run(recipe, run)
    file = run / "checkpoints" / "step-00000004" / "policy.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    found, notes = ckpt.latest_valid_checkpoint(run)
    assert found.name == "step-00000002"
    assert f"policy.safetensors has {size // 2} bytes, its manifest says {size} (truncated" in notes[0]


def test_refuse_mode_names_the_checkpoint_and_changes_nothing(recipe, tmp_path):
    run = tmp_path / "run"
    _run(recipe, run)
    _corrupt_tensor_bytes(run / "checkpoints" / "step-00000004" / "optimizer.safetensors")
    snapshot = _snapshot(run)
    trainer = _trainer(recipe, run, "train.max_steps=6", "train.on_corrupt_checkpoint=error")
    with pytest.raises(
        CheckpointError, match=r"step-00000004 is unusable: optimizer\.safetensors does not match"
    ) as err:
        trainer.train()
    assert "train.on_corrupt_checkpoint=error" in str(err.value)
    assert _snapshot(run) == snapshot


def test_no_valid_checkpoint_at_all_is_an_error_not_a_silent_restart(recipe, tmp_path):
    run = tmp_path / "run"
    _run(recipe, run)
    for step in ("step-00000002", "step-00000004"):
        (run / "checkpoints" / step / "trainer.json").write_text("{}")
    snapshot = _snapshot(run)
    with pytest.raises(CheckpointError, match=r"no valid checkpoint in .*train\.resume=false"):
        _trainer(recipe, run, "train.max_steps=6").train()
    assert _snapshot(run) == snapshot


def test_on_corrupt_checkpoint_setting_is_validated(tiny_recipe):
    from mmalign.core.config import RecipeError

    with pytest.raises(RecipeError, match=r"train\.on_corrupt_checkpoint must be 'fallback' or 'error'"):
        build_run(apply_overrides(tiny_recipe, ["train.on_corrupt_checkpoint=ignore"]))


def test_manifest_without_digests_is_not_trusted(tmp_path):
    step = tmp_path / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"world_size": 1}))  # the pre-digest format
    assert "lists no file digests" in ckpt.checkpoint_problem(step)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        ckpt.latest_valid_checkpoint(tmp_path)
    assert ckpt.latest_valid_checkpoint(tmp_path / "nothing-here") == (None, [])


def _write(run: Path, step: int, value: float) -> Path:
    path = ckpt.checkpoint_dir(run, step)
    ckpt.write_checkpoint(path, {"policy": {"w": torch.full((3,), value)}}, rank=0, world_size=1, all_ok=bool)
    return path


def test_pruning_never_drops_the_last_valid_checkpoint_for_a_corrupt_one(tmp_path):
    first = _write(tmp_path, 1, 1.0)
    second = _write(tmp_path, 2, 2.0)
    _corrupt_tensor_bytes(second / "policy.safetensors")
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert first.exists() and second.exists()  # step 2 is not counted: step 1 is still the last valid one
    third = _write(tmp_path, 3, 3.0)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert not first.exists() and not second.exists() and third.exists()


def test_manifest_records_size_and_digest_of_every_file(tmp_path):
    path = _write(tmp_path, 7, 0.5)
    manifest = json.loads((path / "COMPLETE").read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    assert sorted(manifest["files"]) == files and "policy.safetensors" in files
    for name, meta in manifest["files"].items():
        assert meta["bytes"] == (path / name).stat().st_size
        assert meta["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert torch.equal(ckpt.load_state(path, "policy")["w"], torch.full((3,), 0.5))


def test_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(recipe, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _run(recipe, run, "train.max_steps=2")
    snapshot = _snapshot(run / "checkpoints")
    real_save_state = ckpt.save_state

    def disk_full_on_step_4(path: Path, name: str, state) -> None:
        if path.name.startswith("step-00000004") and name == "optimizer":
            raise OSError(errno.ENOSPC, "No space left on device", str(path / f"{name}.safetensors"))
        real_save_state(path, name, state)

    monkeypatch.setattr(ckpt, "save_state", disk_full_on_step_4)
    with pytest.raises(
        CheckpointError, match=r"could not write checkpoint .*step-00000004: .*No space left on device"
    ):
        _trainer(recipe, run).train()
    assert _snapshot(run / "checkpoints") == snapshot
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000002"
    ]  # no partial directory
    monkeypatch.setattr(ckpt, "save_state", real_save_state)
    _run(recipe, run)
    assert ckpt.latest_valid_checkpoint(run)[0].name == "step-00000004"


def _cli_run(recipe: dict, tmp_path: Path) -> Path:
    from mmalign.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "-o", str(out), "--set", "train.max_steps=2"]) == 0
    return out


def test_eval_refuses_non_finite_weights_naming_the_tensor(recipe, tmp_path, capsys):
    from mmalign.cli import main

    out = _cli_run(recipe, tmp_path)
    last = out / "checkpoints" / "step-00000002"
    weights = ckpt.load_state(last, "policy")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    (last / "COMPLETE").unlink()
    ckpt.save_state(last, "policy", weights)
    ckpt.write_manifest(last, world_size=1)  # a checkpoint whose digests are right but whose weights are NaN
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    captured = capsys.readouterr()
    assert (
        f"checkpoint error: {last}/policy.safetensors: tensor {name!r} holds 1 non-finite value"
        in captured.err
    )
    assert captured.out == ""
    with pytest.raises(CheckpointError, match=f"tensor {name!r} holds 1 non-finite"):  # nor is it trained on
        _trainer(recipe, out, "train.max_steps=3").train()


def test_eval_falls_back_past_a_corrupt_checkpoint_and_says_so(recipe, tmp_path, capsys):
    from mmalign.cli import main

    out = _cli_run(apply_overrides(recipe, ["train.save_every=1"]), tmp_path)
    _corrupt_tensor_bytes(out / "checkpoints" / "step-00000002" / "policy.safetensors")
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    captured = capsys.readouterr()
    assert "step-00000002 is unusable: policy.safetensors does not match" in captured.err
    assert "using step-00000001 instead" in captured.err
    assert set(json.loads(captured.out)) >= {"preference_accuracy", "n_pairs"}


def test_eval_never_prints_nan_it_names_the_metric(recipe, tmp_path, capsys, monkeypatch):
    from mmalign.cli import main
    from mmalign.evaluation.sequence import SequenceEvaluator

    out = _cli_run(recipe, tmp_path)
    real = SequenceEvaluator.evaluate
    monkeypatch.setattr(
        SequenceEvaluator, "evaluate", lambda self, policy: {**real(self, policy), "logp_margin": math.nan}
    )
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    captured = capsys.readouterr()
    assert "non-finite metric: mmalign eval: metric 'logp_margin' is nan" in captured.err
    assert "NaN" not in captured.out and captured.out == ""


def test_checkpoint_without_manifest_is_skipped_like_an_interrupted_write(recipe, tmp_path):
    run = tmp_path / "run"
    _run(recipe, run)
    (run / "checkpoints" / "step-00000004" / "COMPLETE").unlink()
    shutil.copytree(run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000006.tmp")
    found, notes = ckpt.latest_valid_checkpoint(run)
    assert found.name == "step-00000002"
    assert len(notes) == 1 and "step-00000004 is unusable: it has no COMPLETE manifest" in notes[0]
