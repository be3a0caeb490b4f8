"""Model directories judged from their files alone: which paths are local, what a directory must hold, and a
safetensors file whose header does not describe exactly its bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mmalign.core.errors import ModelError
from mmalign.core.model_files import check_safetensors, check_transformers_dir, local_model_dir


def test_local_paths_hub_ids_and_paths_that_do_not_exist(tmp_path):
    assert local_model_dir(str(tmp_path), "model.name_or_path") == tmp_path
    assert local_model_dir("Qwen/Qwen2.5-0.5B-Instruct", "model.name_or_path") is None  # left to the loader
    assert local_model_dir("gpt2", "model.name_or_path") is None
    for missing in (str(tmp_path / "nope"), "./nope", "runs/dpo/final", "~/nope"):
        with pytest.raises(ModelError, match="no such directory"):
            local_model_dir(missing, "model.name_or_path")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file; a model is a directory"):
        local_model_dir(str(tmp_path / "weights.bin"), "model.name_or_path")
    with pytest.raises(ModelError, match="neither an existing local directory nor a valid hub id"):
        local_model_dir("two  spaces", "model.name_or_path")


def test_safetensors_header_must_describe_exactly_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.zeros(3, 2)}, str(path))
    check_safetensors(path, "model.name_or_path")
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(
        ModelError, match=rf"is truncated \({len(data) - 1} bytes, its header describes {len(data)}\)"
    ):
        check_safetensors(path, "model.name_or_path")
    path.write_bytes(data + b"\0")
    with pytest.raises(ModelError, match="is longer than its header says"):
        check_safetensors(path, "model.name_or_path")
    path.write_bytes(data[:5])
    with pytest.raises(ModelError, match="not a complete safetensors file"):
        check_safetensors(path, "model.name_or_path")


def test_a_lora_adapter_directory_is_a_model_directory(tmp_path):
    """mmalign's `final/` of a LoRA run holds the adapter (its config names the base model), not config.json."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    check_transformers_dir(tmp_path, "model.name_or_path")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights"):
        check_transformers_dir(tmp_path, "model.name_or_path")
