"""The bad-input corpus: what a newcomer gets wrong, one case each, through the command line.

Every case runs an `mmalign` command on one bad input and asserts: exit status 2, one line
`mmalign: <kind> error: ...` naming the problem (its error type and key phrase), no trace, no file of the output
directory changed, and — wherever the input can be checked without weights — that no model was loaded (the
model loader is replaced by one that fails the test). Groups: data files of every kind (text pairs, unpaired,
prompts, images, speech, vision-language), recipes, models, checkpoints, output directories, and the CLI itself.
`test_corpus_totals` prints the count per group.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from mmalign.core.data import DataError
from mmalign.core.errors import MmalignError, ModelError, RecipeError
from mmalign.train.checkpoint import CheckpointError
from mmalign.train.run_dir import RunDirError

GROUPS = ("data", "recipe", "model", "checkpoint", "output", "cli")


@dataclass
class Case:
    group: str
    name: str
    build: Callable[[Env, Path], list[str]]  # returns argv; may write files under the case's own directory
    error: type[MmalignError]
    phrase: str
    loads_model: bool = False  # the input can only be checked against a loaded model (or a checkpoint)


CASES: list[Case] = []


def case(group: str, error: type[MmalignError], phrase: str, *, loads_model: bool = False):
    def register(build: Callable[[Env, Path], list[str]]) -> Callable[[Env, Path], list[str]]:
        CASES.append(Case(group, build.__name__.removeprefix("_"), build, error, phrase, loads_model))
        return build

    return register


# --------------------------------------------------------------------------------------------- fixtures
class Env:
    """Model directories, data files and recipes every case starts from (built once per module)."""

    def __init__(self, root: Path, world: Path):
        self.root, self.world = root, world
        self.sd = root / "sd"
        self.classifier = root / "classifier"
        self.speech = root / "speech-tts"
        self.vlm = root / "vlm"
        self.trained = root / "trained"

    # ---------------------------------------------------------------------------------------- recipes
    def text(self, **sections: Any) -> dict[str, Any]:
        recipe = {
            "seed": 0,
            "model": {
                "name_or_path": str(self.world / "base"),
                "lora": {"r": 4, "alpha": 8},
                "max_length": 24,
                "max_new_tokens": 4,
            },
            "data": {"train": str(self.world / "train_pairs.jsonl")},
            "algorithm": {"name": "dpo", "beta": 0.5},
            "eval": {"pairs": str(self.world / "eval_pairs.jsonl")},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False},
        }
        return _merge(recipe, sections)

    def image(self, **sections: Any) -> dict[str, Any]:
        reward = {"name": "digit_classifier", "path": str(self.classifier)}
        recipe = {
            "seed": 0,
            "model": {"kind": "diffusion_image", "name_or_path": str(self.sd), "num_steps": 2},
            "data": {"prompts": str(self.root / "image_prompts.jsonl")},
            "algorithm": {"name": "ddpo", "reward": reward},
            "eval": {"prompts": str(self.root / "image_prompts.jsonl"), "rewards": [reward], "seeds": 1},
            "train": {"max_steps": 2, "batch_size": 4, "progress": False},
        }
        return _merge(recipe, sections)

    def image_pairs(self, **sections: Any) -> dict[str, Any]:
        recipe = {
            "seed": 0,
            "model": {"kind": "diffusion_image", "name_or_path": str(self.sd), "num_steps": 2},
            "data": {"train": str(self.root / "image_pairs.jsonl")},
            "algorithm": {"name": "diffusion_dpo"},
            "train": {"max_steps": 2, "batch_size": 2, "progress": False},
        }
        return _merge(recipe, sections)

    def speech_recipe(self, **sections: Any) -> dict[str, Any]:
        reward = {"name": "intelligibility", "path": str(self.classifier)}
        recipe = {
            "seed": 0,
            "model": {"kind": "diffusion_speech", "name_or_path": str(self.speech), "num_steps": 2},
            "data": {"prompts": str(self.root / "speech_prompts.jsonl")},
            "algorithm": {"name": "ddpo", "reward": reward},
            "train": {"max_steps": 2, "batch_size": 4, "progress": False},
        }
        return _merge(recipe, sections)

    def vlm_recipe(self, **sections: Any) -> dict[str, Any]:
        recipe = {
            "seed": 0,
            "model": {"kind": "vlm", "name_or_path": str(self.vlm), "lora": {"r": 2, "alpha": 4}},
            "data": {"train": str(self.root / "vlm_pairs.jsonl")},
            "algorithm": {"name": "dpo"},
            "train": {"max_steps": 2, "batch_size": 2, "progress": False},
        }
        return _merge(recipe, sections)


def _merge(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """`base` with sections replaced; a section given as `{"+": {...}}` is updated instead."""
    out = json.loads(json.dumps(base))
    for key, value in sections.items():
        if isinstance(value, dict) and "+" in value:
            out[key] = {**(out.get(key) or {}), **value["+"]}
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _png(path: Path, size: int = 16, color: tuple[int, int, int] = (0, 0, 0), mode: str = "RGB") -> str:
    Image.new(mode, (size, size), color if mode == "RGB" else 0).save(path)
    return path.name


def _tiny_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(4)}, str(path))


def _train(recipe: dict[str, Any], case_dir: Path, *extra: str) -> list[str]:
    file = case_dir / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return ["train", str(file), "-o", str(case_dir / "run"), *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_world) -> Env:
    from mmalign.cli import main
    from mmalign.evaluation.classifier import ConvClassifier, ConvClassifierConfig
    from mmalign.speech.text import CharEncoder
    from mmalign.zoo.tiny_pipelines import tiny_sd_pipeline
    from mmalign.zoo.tokenizer import char_tokenizer

    e = Env(tmp_path_factory.mktemp("bad-inputs"), tiny_world)
    tiny_sd_pipeline().save_pretrained(e.sd)
    ConvClassifier(ConvClassifierConfig(image_size=16)).save_pretrained(e.classifier)
    _jsonl(
        e.root / "image_prompts.jsonl", [{"prompt": "a handwritten seven"}, {"prompt": "a handwritten two"}]
    )
    for name, color in (("w.png", (255, 255, 255)), ("l.png", (0, 0, 0))):
        _png(e.root / name, 16, color)
    _jsonl(
        e.root / "image_pairs.jsonl",
        [{"prompt": "a handwritten one", "image_w": "w.png", "image_l": "l.png"}],
    )
    # a mel TTS directory as `mmalign zoo build speech` writes it (weights never load in these cases)
    (e.speech / "scheduler").mkdir(parents=True)
    (e.speech / "mmalign_tts.json").write_text(json.dumps({"kind": "mel_tts", "version": 1}))
    (e.speech / "mel.json").write_text("{}")
    (e.speech / "scheduler" / "scheduler_config.json").write_text("{}")
    CharEncoder(max_length=24).save(e.speech)
    for part, weights in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        _tiny_safetensors(e.speech / part / weights)
        (e.speech / part / "config.json").write_text("{}")
    _jsonl(e.root / "speech_prompts.jsonl", [{"prompt": "seven"}, {"prompt": "two"}])
    # a vision-language model directory: config, tokenizer, weights
    char_tokenizer().save_pretrained(e.vlm)
    (e.vlm / "config.json").write_text(json.dumps({"model_type": "llava"}))
    _tiny_safetensors(e.vlm / "model.safetensors")
    _png(e.root / "digit.png", 16)
    _jsonl(
        e.root / "vlm_pairs.jsonl",
        [{"image": "digit.png", "prompt": "Describe.", "chosen": "a one", "rejected": "a two"}],
    )
    # a trained run directory, for the checkpoint cases
    recipe = e.text(train={"+": {"save_every": 2}})
    (e.root / "trained-recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["--quiet", "train", str(e.root / "trained-recipe.yaml"), "-o", str(e.trained)]) == 0
    return e


# ------------------------------------------------------------------------------------ data: text rows
def _pairs_case(rows: list[Any], **recipe: Any) -> Callable[[Env, Path], list[str]]:
    def build(e: Env, d: Path) -> list[str]:
        return _train(e.text(data={"train": _jsonl(d / "pairs.jsonl", rows)}, **recipe), d)

    return build


GOOD = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
CASES += [
    Case(
        "data", "pairs_invalid_json", _pairs_case(['{"prompt": "1+2=",']), DataError, "line 1: invalid JSON"
    ),
    Case(
        "data",
        "pairs_missing_chosen",
        _pairs_case([{"prompt": "1+2=", "rejected": "4"}]),
        DataError,
        "field 'chosen': required field is missing",
    ),
    Case(
        "data",
        "pairs_identical",
        _pairs_case([{**GOOD, "rejected": "3"}]),
        DataError,
        "is identical to 'chosen'",
    ),
    Case("data", "pairs_duplicate", _pairs_case([GOOD, GOOD]), DataError, "line 2: duplicate of line 1"),
    Case("data", "pairs_empty_file", _pairs_case([]), DataError, "the file contains no rows"),
    Case(
        "data",
        "pairs_inverted_scores",
        _pairs_case([{**GOOD, "score_chosen": 0.1, "score_rejected": 0.9}]),
        DataError,
        "the label is inverted",
    ),
    Case(
        "data",
        "pairs_prompt_ends_with_assistant",
        _pairs_case([{**GOOD, "prompt": [{"role": "assistant", "content": "hi"}]}]),
        DataError,
        "must not end with an assistant turn",
    ),
    Case(
        "data",
        "pairs_mixed_formats",
        _pairs_case([GOOD, {**GOOD, "prompt": [{"role": "user", "content": "2+2="}]}]),
        DataError,
        "use one format",
    ),
    Case(
        "data",
        "pairs_character_outside_vocabulary",  # found: both responses became <unk> and the pair was trained on
        _pairs_case([{"prompt": "1+2=", "chosen": "trois", "rejected": "três"}]),
        DataError,
        "field 'rejected': 'ê' is not in the vocabulary",
    ),
    Case(
        "data",
        "pairs_longer_than_max_length",
        _pairs_case([{**GOOD, "chosen": "3" * 40}]),
        DataError,
        "over max_length=24",
    ),
]


@case("data", DataError, "not valid UTF-8")
def _pairs_not_utf8(e: Env, d: Path) -> list[str]:
    (d / "pairs.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    return _train(e.text(data={"train": str(d / "pairs.jsonl")}), d)


@case("data", DataError, "unsupported file extension '.csv'")
def _pairs_csv(e: Env, d: Path) -> list[str]:
    (d / "pairs.csv").write_text("prompt,chosen,rejected\n")
    return _train(e.text(data={"train": str(d / "pairs.csv")}), d)


@case("data", DataError, "cannot read file")
def _pairs_missing_file(e: Env, d: Path) -> list[str]:
    return _train(e.text(data={"train": str(d / "missing.jsonl")}), d)


@case("data", DataError, "cannot read file")
def _pairs_corrupt_parquet(e: Env, d: Path) -> list[str]:
    (d / "pairs.parquet").write_bytes(b"PAR1 not really parquet")
    return _train(e.text(data={"train": str(d / "pairs.parquet")}), d)


@case("data", DataError, "unknown key(s) ['splitt']")
def _data_source_unknown_key(e: Env, d: Path) -> list[str]:
    return _train(e.text(data={"train": {"path": str(e.world / "train_pairs.jsonl"), "splitt": "x"}}), d)


@case("data", DataError, "eval_pairs.jsonl, line 1, field 'chosen': expected a non-empty string")
def _eval_pairs_bad_row(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "1+2=", "chosen": 3, "rejected": "4"}]
    return _train(e.text(eval={"pairs": _jsonl(d / "eval_pairs.jsonl", rows)}), d)


@case("data", DataError, "field 'label': expected true or false, got str")
def _unpaired_string_label(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "1+2=", "completion": "3", "label": "true"}]
    recipe = e.text(data={"train": _jsonl(d / "kto.jsonl", rows)}, algorithm={"name": "kto"})
    return _train(recipe, d)


@case("data", DataError, "contradicts line 1")
def _unpaired_contradiction(e: Env, d: Path) -> list[str]:
    rows = [
        {"prompt": "1+2=", "completion": "3", "label": True},
        {"prompt": "1+2=", "completion": "3", "label": False},
    ]
    recipe = e.text(data={"train": _jsonl(d / "kto.jsonl", rows)}, algorithm={"name": "kto"})
    return _train(recipe, d)


@case("data", DataError, "field 'answer': reward answer_match needs the known answer")
def _prompts_without_answer(e: Env, d: Path) -> list[str]:  # found: failed only after the model had loaded
    recipe = e.text(
        data={
            "prompts": _jsonl(d / "prompts.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2="}])
        },
        algorithm={"name": "rloo", "reward": "answer_match"},
    )
    return _train(recipe, d)


@case("data", DataError, "field 'prompt': expected a non-empty string, got an empty string")
def _prompts_empty_prompt(e: Env, d: Path) -> list[str]:
    recipe = e.text(
        data={"prompts": _jsonl(d / "prompts.jsonl", [{"prompt": "", "answer": "3"}])},
        algorithm={"name": "rloo", "reward": "answer_match"},
    )
    return _train(recipe, d)


@case("data", DataError, "field 'answer'")
def _eval_prompts_without_answer(e: Env, d: Path) -> list[str]:
    recipe = e.text(
        eval={"prompts": _jsonl(d / "eval_prompts.jsonl", [{"prompt": "1+2="}]), "rewards": ["answer_match"]}
    )
    return _train(recipe, d)


@case("data", DataError, "is not a local file or directory, and loading it as a Hugging Face hub dataset")
def _hub_dataset_offline(e: Env, d: Path) -> list[str]:
    return _train(e.text(data={"train": "no-such-org/no-such-dataset"}), d)


# ------------------------------------------------------------------------------- data: images, speech, vlm
@case("data", DataError, "is 43 tokens; the text encoder reads at most 24")
def _image_prompt_longer_than_text_encoder(e: Env, d: Path) -> list[str]:  # found: silently truncated
    prompts = [{"prompt": "a handwritten seven drawn with a thick pen"}]
    return _train(e.image(data={"prompts": _jsonl(d / "p.jsonl", prompts)}), d)


@case("data", DataError, "'ü' is not in the vocabulary of the text encoder's tokenizer")
def _image_prompt_outside_vocabulary(e: Env, d: Path) -> list[str]:
    return _train(e.image(data={"prompts": _jsonl(d / "p.jsonl", [{"prompt": "a seven über"}])}), d)


@case("data", DataError, "field 'prompt': expected exactly one digit in prompt 'a handwritten cat'")
def _ddpo_prompt_without_digit(e: Env, d: Path) -> list[str]:  # found: failed only after the model had loaded
    return _train(e.image(data={"prompts": _jsonl(d / "p.jsonl", [{"prompt": "a handwritten cat"}])}), d)


@case("data", DataError, "found ['2', '7']")
def _eval_prompt_with_two_digits(e: Env, d: Path) -> list[str]:
    prompts = _jsonl(d / "p.jsonl", [{"prompt": "a seven and a two"}])
    return _train(e.image(eval={"+": {"prompts": prompts}}), d)


def _pairs_rows(d: Path, rows: list[dict[str, Any]]) -> str:
    for name, color in (("w.png", (255, 255, 255)), ("l.png", (0, 0, 0))):
        _png(d / name, 16, color)
    return _jsonl(d / "pairs.jsonl", rows)


@case("data", DataError, "is the same file as 'image_w'")
def _image_pair_same_file(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "a one", "image_w": "w.png", "image_l": "w.png"}]
    return _train(e.image_pairs(data={"train": _pairs_rows(d, rows)}), d)


@case("data", DataError, "field 'image_l': expected an image file path")
def _image_pair_missing_image(e: Env, d: Path) -> list[str]:
    return _train(e.image_pairs(data={"train": _pairs_rows(d, [{"prompt": "a one", "image_w": "w.png"}])}), d)


@case("data", DataError, "score_chosen and score_rejected come together")
def _image_pair_one_score(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "a one", "image_w": "w.png", "image_l": "l.png", "score_chosen": 1.0}]
    return _train(e.image_pairs(data={"train": _pairs_rows(d, rows)}), d)


@case("data", DataError, "image file not found")
def _image_pair_file_missing(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "a one", "image_w": "w.png", "image_l": "gone.png"}]
    return _train(e.image_pairs(data={"train": _pairs_rows(d, rows)}), d)


@case("data", DataError, "not in an image format PIL recognises")
def _image_pair_not_an_image(e: Env, d: Path) -> list[str]:
    path = _pairs_rows(d, [{"prompt": "a one", "image_w": "w.png", "image_l": "notes.png"}])
    (d / "notes.png").write_text("not an image")
    return _train(e.image_pairs(data={"train": path}), d)


@case("data", DataError, "image is 32×32, the model expects 16×16")
def _image_pair_wrong_size(e: Env, d: Path) -> list[str]:
    path = _pairs_rows(d, [{"prompt": "a one", "image_w": "w.png", "image_l": "big.png"}])
    _png(d / "big.png", 32)
    return _train(e.image_pairs(data={"train": path}), d)


@case("data", DataError, "a possible decompression bomb")
def _image_pair_decompression_bomb(e: Env, d: Path) -> list[str]:
    path = _pairs_rows(d, [{"prompt": "a one", "image_w": "w.png", "image_l": "bomb.png"}])
    _png(d / "bomb.png", 16)
    data = bytearray((d / "bomb.png").read_bytes())  # claim 100000×100000 pixels in the IHDR chunk
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # with a valid checksum
    (d / "bomb.png").write_bytes(bytes(data))
    return _train(e.image_pairs(data={"train": path}), d)


@case("data", DataError, "character '#' at position 0 is not in the text encoder's alphabet")
def _speech_prompt_outside_alphabet(e: Env, d: Path) -> list[str]:
    return _train(e.speech_recipe(data={"prompts": _jsonl(d / "p.jsonl", [{"prompt": "#seven"}])}), d)


@case("data", DataError, "is longer than 22 characters")
def _speech_prompt_too_long(e: Env, d: Path) -> list[str]:
    prompts = [{"prompt": "seven seven seven seven seven"}]
    return _train(e.speech_recipe(data={"prompts": _jsonl(d / "p.jsonl", prompts)}), d)


@case("data", DataError, "expected exactly one digit in prompt 'hello'")
def _speech_prompt_without_digit(e: Env, d: Path) -> list[str]:
    return _train(e.speech_recipe(data={"prompts": _jsonl(d / "p.jsonl", [{"prompt": "hello"}])}), d)


@case("data", DataError, "field 'audio': expected a non-empty string")
def _speech_target_not_a_path(e: Env, d: Path) -> list[str]:
    targets = _jsonl(d / "t.jsonl", [{"prompt": "seven", "audio": 7}])
    recipe = e.speech_recipe(
        data={"+": {"targets": targets}},
        algorithm={
            "name": "dlpo",
            "reward": {"name": "intelligibility", "path": str(e.classifier)},
            "diffusion_loss_on": "data",
        },
    )
    return _train(recipe, d)


@case("data", DataError, "field 'image': expected an image file path")
def _vlm_pair_without_image(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "Describe.", "chosen": "a one", "rejected": "a two"}]
    return _train(e.vlm_recipe(data={"train": _jsonl(d / "pairs.jsonl", rows)}), d)


@case("data", DataError, "'ß' is not in the vocabulary")
def _vlm_response_outside_vocabulary(e: Env, d: Path) -> list[str]:
    rows = [
        {"image": str(e.root / "digit.png"), "prompt": "Describe.", "chosen": "a one", "rejected": "große"}
    ]
    return _train(e.vlm_recipe(data={"train": _jsonl(d / "pairs.jsonl", rows)}), d)


# ---------------------------------------------------------------------------------------------- recipes
def _recipe_case(make: Callable[[Env], dict[str, Any]], *extra: str) -> Callable[[Env, Path], list[str]]:
    def build(e: Env, d: Path) -> list[str]:
        return _train(make(e), d, *extra)

    return build


CASES += [
    Case("recipe", name, _recipe_case(make), RecipeError, phrase)
    for name, make, phrase in [
        (
            "unknown_section",
            lambda e: {**e.text(), "optimizer": {}},
            "unknown recipe section(s) ['optimizer']",
        ),
        ("unknown_train_key", lambda e: e.text(train={"+": {"lrr": 1}}), "unknown key(s) train.lrr"),
        (
            "negative_learning_rate",
            lambda e: e.text(train={"+": {"lr": -1e-4}}),
            "train.lr must be a finite number > 0",
        ),
        (
            "adam_betas_wrong_length",
            lambda e: e.text(train={"+": {"adam_betas": [0.9, 0.99, 0.999]}}),
            "train.adam_betas must be two numbers in [0, 1)",
        ),
        (
            "adam_beta_of_one",
            lambda e: e.text(train={"+": {"adam_betas": [0.9, 1.0]}}),
            "train.adam_betas must be two numbers",
        ),
        (
            "scheduler_typo",
            lambda e: e.text(train={"+": {"scheduler": "cosin"}}),
            "train.scheduler must be one of linear, cosine",
        ),
        ("log_every_zero", lambda e: e.text(train={"+": {"log_every": 0}}), "train.log_every must be ≥ 1"),
        (
            "eval_batch_size_zero",
            lambda e: e.text(eval={"+": {"batch_size": 0}}),
            "eval.batch_size must be >= 1",
        ),
        ("negative_beta", lambda e: e.text(algorithm={"name": "dpo", "beta": -0.1}), "beta must be > 0"),
        (
            "label_smoothing_above_half",
            lambda e: e.text(algorithm={"name": "dpo", "label_smoothing": 0.6}),
            "label_smoothing",
        ),
        (
            "dtype_typo",
            lambda e: e.text(model={"+": {"dtype": "float23"}}),
            "model.dtype must be one of float32, float16, bfloat16",
        ),
        ("lora_rank_zero", lambda e: e.text(model={"+": {"lora": {"r": 0}}}), "model.lora.r must be >= 1"),
        ("unknown_algorithm", lambda e: e.text(algorithm={"name": "dpoo"}), "unknown algorithm.name 'dpoo'"),
        (
            "algorithm_does_not_fit",
            lambda e: e.text(
                algorithm={"name": "ddpo", "reward": "answer_match"},
                data={"prompts": str(e.world / "train_prompts.jsonl")},
            ),
            "does not fit model.kind 'causal_lm'",
        ),
        (
            "reward_of_another_modality",
            lambda e: e.text(eval={"+": {"rewards": ["jpeg_compressibility"]}}),
            "reward 'jpeg_compressibility' scores image",
        ),
        (
            "unknown_reward",
            lambda e: e.text(eval={"+": {"rewards": ["answer_mach"]}}),
            "unknown reward 'answer_mach'",
        ),
        (
            "data_key_not_read",
            lambda e: e.text(data={"+": {"prompts": str(e.world / "train_prompts.jsonl")}}),
            "data.prompts is not read by algorithm 'dpo'",
        ),
        (
            "online_without_reward",
            lambda e: e.text(
                algorithm={"name": "rloo"}, data={"prompts": str(e.world / "train_prompts.jsonl")}
            ),
            "algorithm.reward is required for rloo",
        ),
        (
            "trl_per_device_batch",
            lambda e: e.text(train={"+": {"per_device_train_batch_size": 8}}),
            "train.batch_size, which is the global batch",
        ),
        (
            "trl_learning_rate_disagrees",
            lambda e: e.text(train={"+": {"learning_rate": 1e-5}}),
            "train.learning_rate (trl's name for train.lr)",
        ),
        (
            "max_steps_and_epochs",
            lambda e: e.text(train={"+": {"num_train_epochs": 2}}),
            "give train.max_steps or train.num_train_epochs, not both",
        ),
        (
            "warmup_steps_and_ratio",
            lambda e: e.text(train={"+": {"warmup_steps": 2, "warmup_ratio": 0.1}}),
            "give train.warmup_steps or train.warmup_ratio, not both",
        ),
        (
            "gradient_checkpointing_unsupported",
            lambda e: e.speech_recipe(train={"+": {"gradient_checkpointing": True}}),
            "model.kind 'diffusion_speech' does not support it",
        ),
        (
            "rpo_alpha_on_diffusion",
            lambda e: e.image_pairs(algorithm={"name": "diffusion_dpo", "rpo_alpha": 1.0}),
            "algorithm.rpo_alpha needs exact log-probabilities",
        ),
        (
            "rpo_alpha_with_orpo",
            lambda e: e.text(algorithm={"name": "orpo", "rpo_alpha": 1.0}),
            "already has an NLL term",
        ),
        (
            "unknown_tracker",
            lambda e: e.text(train={"+": {"log_with": ["mlflow"]}}),
            "unknown tracker 'mlflow'",
        ),
        (
            "mixed_precision_typo",
            lambda e: e.text(train={"+": {"mixed_precision": "bf61"}}),
            "train.mixed_precision must be",
        ),
        (
            "batch_not_divisible",
            lambda e: e.text(train={"+": {"batch_size": 5, "grad_accum": 2}}),
            "must be divisible by train.grad_accum",
        ),
        (
            "unknown_model_kind",
            lambda e: e.text(model={"+": {"kind": "diffusion"}}),
            "model.kind must be one of",
        ),
        (
            "number_as_text",
            lambda e: e.text(train={"+": {"lr": "fast"}}),
            "train.lr must be a number, got 'fast'",
        ),
    ]
]


@case("recipe", RecipeError, "is not valid YAML")
def _invalid_yaml(e: Env, d: Path) -> list[str]:
    (d / "recipe.yaml").write_text("model: {name_or_path: [\n")
    return ["train", str(d / "recipe.yaml"), "-o", str(d / "run")]


@case("recipe", RecipeError, "cannot read recipe")
def _missing_recipe(e: Env, d: Path) -> list[str]:
    return ["train", str(d / "nope.yaml"), "-o", str(d / "run")]


@case("recipe", RecipeError, "is not of the form section.key=value")
def _bad_override(e: Env, d: Path) -> list[str]:
    return _train(e.text(), d, "--set", "train.lr")


# ----------------------------------------------------------------------------------------------- models
def _model_dir(e: Env, d: Path, drop: tuple[str, ...] = ()) -> Path:
    target = d / "model"
    shutil.copytree(e.world / "base", target)
    for name in drop:
        (target / name).unlink()
    return target


def _with_model(path: Path | str, kind: str = "text") -> Callable[[Env], dict[str, Any]]:
    def make(e: Env) -> dict[str, Any]:
        recipe = getattr(e, kind)() if kind != "speech" else e.speech_recipe()
        recipe["model"]["name_or_path"] = str(path)
        return recipe

    return make


@case("model", ModelError, "no such directory")
def _missing_model_path(e: Env, d: Path) -> list[str]:
    return _train(_with_model(d / "no-such-model")(e), d)


@case("model", ModelError, "has no config.json")
def _model_without_config(e: Env, d: Path) -> list[str]:
    return _train(_with_model(_model_dir(e, d, ("config.json",)))(e), d)


@case("model", ModelError, "has no tokenizer files")
def _model_without_tokenizer(e: Env, d: Path) -> list[str]:
    return _train(_with_model(_model_dir(e, d, ("tokenizer.json", "tokenizer_config.json")))(e), d)


@case("model", ModelError, "has no weights")
def _model_without_weights(e: Env, d: Path) -> list[str]:
    return _train(_with_model(_model_dir(e, d, ("model.safetensors",)))(e), d)


@case("model", ModelError, "is truncated")
def _truncated_weights(e: Env, d: Path) -> list[str]:
    model = _model_dir(e, d)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _train(_with_model(model)(e), d)


@case("model", ModelError, "is not a complete safetensors file")
def _weights_not_safetensors(e: Env, d: Path) -> list[str]:
    model = _model_dir(e, d)
    (model / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    return _train(_with_model(model)(e), d)


@case("model", ModelError, "lists weight shards that are missing: model-00002-of-00002.safetensors")
def _missing_weight_shard(e: Env, d: Path) -> list[str]:
    model = _model_dir(e, d, ("model.safetensors",))
    _tiny_safetensors(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return _train(_with_model(model)(e), d)


@case("model", ModelError, "config.json is not readable JSON")
def _config_not_json(e: Env, d: Path) -> list[str]:
    model = _model_dir(e, d)
    (model / "config.json").write_text("{ truncated")
    return _train(_with_model(model)(e), d)


@case("model", ModelError, "is neither an existing local directory nor a valid hub id")
def _invalid_hub_id(e: Env, d: Path) -> list[str]:
    return _train(_with_model("not a model id!")(e), d)


@case("model", ModelError, "model.name_or_path 'no-such-org/no-such-model' cannot be loaded")
def _hub_model_offline(e: Env, d: Path) -> list[str]:
    return _train(_with_model("no-such-org/no-such-model")(e), d)


@case("model", ModelError, "has no model_index.json")
def _pipeline_without_index(e: Env, d: Path) -> list[str]:
    model = d / "sd"
    shutil.copytree(e.sd, model)
    (model / "model_index.json").unlink()
    return _train(_with_model(model, "image")(e), d)


@case(
    "model",
    ModelError,
    "names diffusers.DDIMSchedulr, which diffusers does not have; did you mean DDIMScheduler",
)
def _scheduler_class_typo(e: Env, d: Path) -> list[str]:
    model = d / "sd"
    shutil.copytree(e.sd, model)
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMSchedulr"]
    (model / "model_index.json").write_text(json.dumps(index))
    return _train(_with_model(model, "image")(e), d)


@case("model", ModelError, "component 'vae' listed in model_index.json has no directory")
def _pipeline_missing_component(e: Env, d: Path) -> list[str]:
    model = d / "sd"
    shutil.copytree(e.sd, model)
    shutil.rmtree(model / "vae")
    return _train(_with_model(model, "image")(e), d)


@case("model", ModelError, "is not a mel TTS model directory (no alphabet.json)")
def _speech_model_without_alphabet(e: Env, d: Path) -> list[str]:
    model = d / "tts"
    shutil.copytree(e.speech, model)
    (model / "alphabet.json").unlink()
    return _train(_with_model(model, "speech")(e), d)


@case("model", ModelError, "reward 'digit_classifier'")
def _missing_reward_model_path(e: Env, d: Path) -> list[str]:
    reward = {"name": "digit_classifier", "path": str(d / "no-classifier")}
    return _train(e.image(algorithm={"name": "ddpo", "reward": reward}), d)


@case(
    "model", RecipeError, "'q_projj' matches no layer of the model; its layers are named:", loads_model=True
)
def _lora_target_typo(e: Env, d: Path) -> list[str]:
    return _train(e.text(model={"+": {"lora": {"r": 4, "target_modules": ["q_projj"]}}}), d)


# ------------------------------------------------------------------------------------------ checkpoints
def _trained_copy(e: Env, d: Path) -> Path:
    run = d / "run"
    shutil.copytree(e.trained, run)
    (run / "run.lock").unlink(missing_ok=True)
    return run


@case("checkpoint", CheckpointError, "has no COMPLETE manifest", loads_model=True)
def _eval_without_checkpoint(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    for manifest in run.glob("checkpoints/*/COMPLETE"):
        manifest.unlink()
    return ["eval", str(run)]


@case("checkpoint", CheckpointError, "does not match its SHA-256 digest", loads_model=True)
def _corrupt_checkpoint_with_on_corrupt_error(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    (weights,) = run.glob("checkpoints/*/policy.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return ["eval", str(run), "--set", "train.on_corrupt_checkpoint=error"]


@case("checkpoint", CheckpointError, "checkpoint does not match the model", loads_model=True)
def _checkpoint_of_other_lora_targets(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    return ["eval", str(run), "--set", "model.lora.target_modules=[q_proj]"]


@case("checkpoint", RecipeError, "holds checkpoints of a different recipe")
def _resume_with_another_recipe(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(e.text(algorithm={"name": "dpo", "beta": 0.1})))
    return ["train", str(recipe), "-o", str(run)]


@case("checkpoint", CheckpointError, "tensor", loads_model=True)
def _checkpoint_with_nan_weights(e: Env, d: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    from mmalign.train.checkpoint import write_manifest

    run = _trained_copy(e, d)
    (weights,) = run.glob("checkpoints/*/policy.safetensors")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))
    write_manifest(weights.parent, 1)  # a sealed checkpoint whose weights are NaN: only the values can tell
    return ["eval", str(run)]


@case("checkpoint", RunDirError, "metrics.jsonl, line 1: not a JSON row", loads_model=True)
def _resume_with_a_damaged_metrics_file(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{damaged", *rows[1:]]) + "\n")
    return [
        "train",
        _write(d, e.text(train={"+": {"save_every": 2}})),
        "-o",
        str(run),
    ]  # the run's own recipe


@case("checkpoint", MmalignError, "was written by 2 processes; resume with the same number", loads_model=True)
def _resume_with_another_process_count(e: Env, d: Path) -> list[str]:
    from mmalign.train.checkpoint import write_manifest

    run = _trained_copy(e, d)
    (state,) = run.glob("checkpoints/*/trainer.json")
    trainer = json.loads(state.read_text())
    _set_world_size(trainer, 2)
    state.write_text(json.dumps(trainer))
    write_manifest(state.parent, 1)
    return [
        "train",
        _write(d, e.text(train={"+": {"save_every": 2}})),
        "-o",
        str(run),
    ]  # the run's own recipe


def _set_world_size(node: Any, size: int) -> None:
    """Set `world_size` wherever the checkpoint's JSON skeleton keeps it."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == "world_size":
                node[key] = size
            else:
                _set_world_size(value, size)
    elif isinstance(node, list):
        if len(node) == 2 and node[0] == "world_size":
            node[1] = size
        for value in node:
            _set_world_size(value, size)


# ---------------------------------------------------------------------------------- output directories
@case("output", RunDirError, "is a file, not a directory")
def _output_is_a_file(e: Env, d: Path) -> list[str]:
    (d / "run").write_text("notes")
    return _train(e.text(), d)


@case("output", RunDirError, "is a file")
def _output_under_a_file(e: Env, d: Path) -> list[str]:
    (d / "parent").write_text("notes")
    return ["train", _write(d, e.text()), "-o", str(d / "parent" / "run")]


@case("output", RunDirError, "is in use by another run")
def _output_locked_by_another_run(e: Env, d: Path) -> list[str]:
    run = d / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK.format(lock=run / "run.lock", ready=d / "ready")],
        stdin=subprocess.PIPE,
    )
    d.joinpath("holder.pid").write_text(str(holder.pid))
    _HOLDERS.append(holder)
    while not (d / "ready").exists():
        if holder.poll() is not None:
            raise RuntimeError("the lock holder died")
    return _train(e.text(), d)


@case("output", RunDirError, "is a file, not a directory")
def _validate_output_is_a_file(e: Env, d: Path) -> list[str]:
    (d / "run").write_text("notes")
    return ["validate", _write(d, e.text()), "-o", str(d / "run")]


@case("output", RecipeError, "holds checkpoints of a different recipe")
def _validate_output_of_another_run(e: Env, d: Path) -> list[str]:
    run = _trained_copy(e, d)
    return ["validate", _write(d, e.text(algorithm={"name": "dpo", "beta": 0.2})), "-o", str(run)]


_HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from filelock import FileLock
    with FileLock("{lock}"):
        Path("{ready}").touch()
        sys.stdin.read()
    """
)
_HOLDERS: list[subprocess.Popen] = []


def _write(d: Path, recipe: dict[str, Any]) -> str:
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(d / "recipe.yaml")


# -------------------------------------------------------------------------------------------------- CLI
@case("cli", MmalignError, "unknown world 'txt'; known: image")
def _zoo_unknown_world(e: Env, d: Path) -> list[str]:
    return ["zoo", "build", "txt"]


@case("cli", MmalignError, "exists; mmalign recipes copy never overwrites")
def _recipes_copy_over_a_file(e: Env, d: Path) -> list[str]:
    (d / "mine.yaml").write_text("seed: 1\n")
    return ["recipes", "copy", "text/dpo", str(d / "mine.yaml")]


@case("cli", RecipeError, "no packaged recipe 'text/dpoo'")
def _recipes_copy_unknown(e: Env, d: Path) -> list[str]:
    return ["recipes", "copy", "text/dpoo", str(d / "x.yaml")]


@case("cli", RecipeError, "recipe 'ddpo_digits' is ambiguous: vision/ddpo_digits, speech/ddpo_digits")
def _recipes_copy_ambiguous(e: Env, d: Path) -> list[str]:
    return ["recipes", "copy", "ddpo_digits", str(d / "x.yaml")]


@case("cli", RecipeError, "--image is for vision-language models")
def _sample_image_for_a_text_model(e: Env, d: Path) -> list[str]:
    return ["sample", _write(d, e.text()), "--prompt", "1+2=", "--image", "digit.png"]


@case("cli", RecipeError, "--num-samples must be >= 1")
def _sample_zero_samples(e: Env, d: Path) -> list[str]:
    return ["sample", _write(d, e.text()), "--prompt", "1+2=", "-n", "0"]


@case("cli", RecipeError, "no held-out data to evaluate on")
def _eval_without_held_out_data(e: Env, d: Path) -> list[str]:
    return ["eval", _write(d, e.text(eval=None))]


@case("cli", RecipeError, "--by-prompt: model.kind 'causal_lm' reports whole-set metrics only")
def _eval_by_prompt_of_a_text_model(e: Env, d: Path) -> list[str]:
    return ["eval", _write(d, e.text()), "--by-prompt"]


@case("cli", DataError, "'é' is not in the vocabulary")
def _validate_reports_vocabulary(e: Env, d: Path) -> list[str]:
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "é"}]
    return ["validate", _write(d, e.text(data={"train": _jsonl(d / "p.jsonl", rows)}))]


# ------------------------------------------------------------------------------------------------ tests
def _snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def _prefill(run: Path) -> None:
    """An earlier run's files (no sealed checkpoint, so a resume check passes them by) that must stay as they are."""
    if run.exists():
        return
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "policy.safetensors").write_bytes(b"partial")
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.69}\n')
    (run / "before.json").write_text('{"metrics": {}}')


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}-{c.name}" for c in CASES])
def test_bad_input_is_a_named_error(case: Case, env: Env, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    import mmalign.cli
    from mmalign.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no retries
    monkeypatch.chdir(env.root)
    if not case.loads_model:
        import mmalign.run

        def must_not_load(*_args, **_kwargs):
            raise AssertionError("a model was loaded although the input can be checked without one")

        monkeypatch.setattr(mmalign.run, "load_policy", must_not_load)
    raised: list[BaseException] = []
    monkeypatch.setattr(mmalign.cli.traceback, "print_exc", lambda: raised.append(sys.exc_info()[1]))
    try:
        argv = case.build(env, tmp_path)
        out = Path(argv[argv.index("-o") + 1]) if "-o" in argv else tmp_path / "run"
        if argv[0] == "train" and not out.exists() and out.parent.is_dir() and out.parent == tmp_path:
            _prefill(out)
        watched = _snapshot(tmp_path)
        capsys.readouterr()
        code = main(["--debug", *argv])
        err = capsys.readouterr().err
    finally:
        for holder in _HOLDERS:
            holder.kill()
            holder.wait()
        _HOLDERS.clear()
    assert code == 2, err
    assert len(raised) == 1 and isinstance(raised[0], case.error), (type(raised[0]), err)
    assert f"mmalign: {raised[0].label}: " in err
    assert case.phrase in err, err
    assert _snapshot(tmp_path) == watched, "a file of the output directory (or the case's inputs) changed"


def test_corpus_totals():
    """At least 60 cases, every group represented; prints the totals by group (see the report)."""
    totals = Counter(c.group for c in CASES)
    print("bad-input corpus:", dict(totals), "total", sum(totals.values()))
    assert set(totals) == set(GROUPS)
    assert sum(totals.values()) >= 60
    names = [f"{c.group}-{c.name}" for c in CASES]
    assert len(names) == len(set(names))
