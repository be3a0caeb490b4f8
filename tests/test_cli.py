"""The command line explains itself: version, help with examples, rewards and recipes from the registries and the
package, JSON on stdout and logs on stderr (none with --quiet), validate's exit codes, samples never overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from mmalign import recipes
from mmalign.cli import main, place_without_overwriting
from mmalign.core.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "validate", "eval", "sample", "methods", "rewards", "recipes", "zoo")


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmalign {version('mmalign')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"mmalign {command}" in text


def test_rewards_lists_the_registry(capsys):
    from mmalign import plugins
    from mmalign.core.registry import REWARDS

    plugins.load()
    assert main(["rewards", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(REWARDS)
    for name, spec in REWARDS.items():
        assert (listed[name]["scores"], listed[name]["differentiable"]) == (spec.outputs, spec.differentiable)
    assert "causal_lm" in listed["answer_match"]["model_kinds"]
    assert main(["rewards"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| reward |") and len(table) == 2 + len(REWARDS)
    assert all(line.count(" | ") == 4 for line in table[2:])  # a `|` in a description is escaped


def test_packaged_recipes_are_the_repository_files(capsys):
    files = recipes.recipe_files()
    assert "text/dpo" in files and "vision/ddpo_digits" in files and "speech/dlpo_digits" in files
    assert files["text/dpo"].resolve() == (REPO / "text" / "dpo.yaml").resolve()
    assert len(files) == sum(len(list((REPO / g).glob("*.yaml"))) for g in recipes.GROUPS)
    assert main(["recipes", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        listed["text/dpo"]["algorithm"] == "dpo"
        and listed["vision/ddpo_digits"]["model"] == "diffusion_image"
    )


def test_recipes_copy_copies_the_recipe_and_the_data_it_ships_with(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "dpo", "mine.yaml"]) == 0  # a unique stem is enough
    assert json.loads(capsys.readouterr().out)["copied"] == "mine.yaml"
    assert (tmp_path / "mine.yaml").read_bytes() == (REPO / "text" / "dpo.yaml").read_bytes()
    (tmp_path / "configs").mkdir()
    assert main(["recipes", "copy", "speech/audioldm2_dlpo", "configs"]) == 0
    copied = json.loads(capsys.readouterr().out)
    assert copied["copied"] == str(Path("configs") / "audioldm2_dlpo.yaml")
    for rel in ("speech/audioldm2_train_prompts.jsonl", "speech/audioldm2_eval_prompts.jsonl"):
        assert (tmp_path / rel).read_bytes() == (
            REPO / rel
        ).read_bytes()  # where `mmalign train` resolves them


def test_validate_prints_json_and_exits_0_or_2(tiny_recipe, tmp_path, capsys):
    recipe = apply_overrides(
        tiny_recipe, ["train.max_steps=null", "train.num_train_epochs=1", "train.batch_size=8"]
    )
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(file), "-o", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and out["algorithm"]["name"] == "dpo" and out["train"]["max_steps"] == 256 // 8
    assert not (tmp_path / "run").exists()  # validate creates nothing
    assert main(["validate", str(file), "--set", "train.lr=0"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.out == ""
        and "mmalign: recipe error: train: train.lr must be a finite number > 0" in captured.err
    )
    assert "Traceback" not in captured.err


def test_debug_shows_the_trace_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    assert main(["--debug", "validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "mmalign: recipe error: cannot read recipe" in err
    import mmalign.cli

    monkeypatch.setattr(mmalign.cli, "cmd_methods", lambda args: 1 / 0)
    parser_default = mmalign.cli.build_parser
    monkeypatch.setattr(
        mmalign.cli,
        "build_parser",
        lambda: _with_func(parser_default(), "methods", mmalign.cli.cmd_methods),
    )
    with pytest.raises(ZeroDivisionError):  # not a user's mistake: not turned into a one-line message
        main(["methods"])


def _with_func(parser, command, func):
    for action in parser._subparsers._group_actions:
        action.choices[command].set_defaults(func=func)
    return parser


def test_train_writes_only_the_summary_to_stdout_and_nothing_to_stderr_when_quiet(
    tiny_recipe, tmp_path, capsys
):
    recipe = apply_overrides(tiny_recipe, ["train.max_steps=2", "eval.prompts=null", "eval.rewards=[]"])
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(file), "-o", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert json.loads(loud.out)["steps"] == 2  # stdout is exactly one JSON document
    assert main(["--quiet", "train", str(file), "-o", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert json.loads(quiet.out)["steps"] == 2 and quiet.err == ""
    assert (
        main(["train", str(file), "-o", str(tmp_path / "quiet")]) == 0
    )  # resumes: --quiet is no recipe change
    assert "resumed from" in capsys.readouterr().err


def test_place_without_overwriting_picks_a_new_stem(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    (out / "sample_000.png").write_bytes(b"old")
    written = []
    for i in range(2):
        (tmp / f"sample_{i:03d}.png").write_bytes(f"new{i}".encode())
        written.append(str(tmp / f"sample_{i:03d}.png"))
    paths = place_without_overwriting(written, out, "sample")
    assert [p.name for p in paths] == ["sample-2_000.png", "sample-2_001.png"]
    assert (out / "sample_000.png").read_bytes() == b"old"
    assert not (out / "sample_001.png").exists()  # a partial first attempt was undone


def test_sample_never_overwrites_earlier_images(tmp_path, capsys):
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    recipe = {"model": {"kind": "diffusion_image", "name_or_path": str(tmp_path / "sd"), "num_steps": 2}}
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    args = ["sample", str(file), "--prompt", "a one", "-n", "2", "--out-dir", str(tmp_path / "s")]
    assert main(args) == 0
    first = [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()]
    digest = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in first}
    assert main([*args, "--seed", "1"]) == 0
    second = [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()]
    assert len(second) == 2 and not set(first) & set(second)
    assert {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in first} == digest
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(Path(f).name for f in first + second)
