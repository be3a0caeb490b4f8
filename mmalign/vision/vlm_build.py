"""Recipe → objects for vision-language models (`model.kind: vlm`): model config, algorithms, evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmalign.config import RecipeError, to_dataclass
from mmalign.core.data import read_rows
from mmalign.core.hf_data import load_rows
from mmalign.zoo.registry import resolve

VLM_ALGORITHMS = ("dpo", "povid", "rlhfv", "dense_dpo")


@dataclass
class VLMModelConfig:
    """`model:` for kind vlm: a LLaVA-style model (hub id, local dir or zoo path) and how it reads images."""

    kind: str = "vlm"
    name_or_path: str = ""
    lora: dict[str, Any] | None = None  # peft LoRA settings; null = full fine-tuning with a frozen copy
    dtype: str = "float32"
    max_length: int = 512
    max_new_tokens: int = 64
    temperature: float = 1.0
    trust_remote_code: bool = False
    prompt_template: str = "{image}{prompt}"  # e.g. "USER: {image}\n{prompt} ASSISTANT:" for LLaVA-1.5
    image_size: int | None = None  # set to reject images of any other size instead of resizing them


def build_vlm_policy(cfg: VLMModelConfig, lora: Any) -> Any:
    from mmalign.vision.vlm_policy import VisionLanguagePolicy

    path = resolve(cfg.name_or_path)
    if not path:
        raise RecipeError("model.name_or_path is required")
    return VisionLanguagePolicy.from_pretrained(
        path,
        lora=lora,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        prompt_template=cfg.prompt_template,
        image_size=cfg.image_size,
    )


def _train_rows(data: dict[str, Any]):
    if not data.get("train"):
        raise RecipeError("data.train is required for this algorithm")
    return load_rows(data["train"], resolve)


def build_vlm_algorithm(name: str, algo: dict[str, Any], policy: Any, data: dict[str, Any]) -> Any:
    """DPO (any `PreferenceAlgorithm` loss), POVID or RLHF-V dense DPO on image rows, validated here."""
    from mmalign.vision import vlm_data

    if name == "povid":
        from mmalign.train.povid import POVIDAlgorithm, POVIDConfig

        rows = vlm_data.validate_vlm_preference_rows(_train_rows(data), noisy=True)
        return POVIDAlgorithm(policy, rows, to_dataclass(POVIDConfig, algo, "algorithm"))
    if name in ("rlhfv", "dense_dpo"):
        from mmalign.train.povid import DenseDPOAlgorithm, DenseDPOConfig

        rows = vlm_data.validate_correction_rows(_train_rows(data))
        return DenseDPOAlgorithm(policy, rows, to_dataclass(DenseDPOConfig, algo, "algorithm"))
    if name == "dpo":
        from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

        section = dict(algo)
        section.setdefault("loss", "dpo")
        rows = vlm_data.validate_vlm_preference_rows(_train_rows(data))
        return PreferenceAlgorithm(policy, rows, to_dataclass(PreferenceConfig, section, "algorithm"))
    raise RecipeError(
        f"algorithm {name!r} is not available for model.kind vlm; known: {', '.join(VLM_ALGORITHMS)}"
    )


def build_vlm_evaluator(describe: str | None, probes: str | None, batch_size: int, n_samples: int) -> Any:
    """Hallucination metrics on held-out images (eval.prompts = describe rows, eval.probes = yes/no rows)."""
    from mmalign.vision.hallucination import HallucinationEvaluator

    if not describe and not probes:
        return None
    return HallucinationEvaluator(
        read_rows(resolve(describe)) if describe else [],
        read_rows(resolve(probes)) if probes else [],
        batch_size=batch_size,
        n_samples=n_samples,
    )
