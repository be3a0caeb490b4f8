"""Named offline worlds, where they are cached, and `zoo://world/file` paths that build them on first use."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
from pathlib import Path

from filelock import FileLock

from mmalign.core.errors import MmalignError
from mmalign.core.paths import register_scheme
from mmalign.zoo.reproducible import IN_PROCESS, run_build_process

# name → (module, builder, spec factory, description); imported lazily so text users never import diffusers.
WORLDS: dict[str, tuple[str, str, str, str]] = {
    "text": (
        "mmalign.zoo.text_world",
        "build_text_world",
        "TextWorldSpec",
        "two-digit addition LM that often drops carries (~3 min)",
    ),
    "text-tiny": (
        "mmalign.zoo.text_world",
        "build_text_world",
        "TextWorldSpec.tiny",
        "a seconds-fast text world for tests",
    ),
    "image": (
        "mmalign.zoo.image_world",
        "build_image_world",
        "ImageWorldSpec",
        "handwritten-digit text-to-image diffusion model + digit classifier (~5 min)",
    ),
    "image-pairs": (
        "mmalign.zoo.image_pairs",
        "build_image_pairs",
        "ImagePairsSpec",
        "preference pairs drawn by the image world's base model, ranked by its classifier (~2 min)",
    ),
    "image-tiny": (
        "mmalign.zoo.image_world",
        "build_image_world",
        "ImageWorldSpec.tiny",
        "a seconds-fast image world for tests",
    ),
    "image-flow": (
        "mmalign.zoo.flow_world",
        "build_flow_world",
        "FlowWorldSpec",
        "tiny SD3-layout flow-matching digits model on the image world's VAE and classifier (~1 min + image)",
    ),
    "image-flow-tiny": (
        "mmalign.zoo.flow_world",
        "build_flow_world",
        "FlowWorldSpec.tiny",
        "a seconds-fast flow-matching image world for tests (on image-tiny)",
    ),
    "speech": (
        "mmalign.zoo.speech_world",
        "build_speech_world",
        "SpeechWorldSpec",
        "spoken-digit mel TTS diffusion model (espeak-ng voices) + digit recogniser (needs [speech-world])",
    ),
    "speech-tiny": (
        "mmalign.zoo.speech_world",
        "build_speech_world",
        "SpeechWorldSpec.tiny",
        "a seconds-fast speech world for tests",
    ),
    "pipelines-tiny": (
        "mmalign.zoo.tiny_pipelines",
        "build_tiny_pipelines",
        "TinyPipelinesSpec",
        "untrained seconds-fast SDXL, FLUX and AudioLDM 2 pipelines, for the matrix test of their model kinds",
    ),
    "vlm": (
        "mmalign.zoo.vlm_world",
        "build_vlm_world",
        "VLMWorldSpec",
        "tiny LLaVA describing digits, hallucinating from a language prior + POVID/DPO/RLHF-V data (~5 min)",
    ),
    "vlm-tiny": (
        "mmalign.zoo.vlm_world",
        "build_vlm_world",
        "VLMWorldSpec.tiny",
        "a seconds-fast vision-language world for tests",
    ),
}


class ZooError(MmalignError, ValueError):
    """An unknown world name (in `mmalign zoo build` or a `zoo://` path); the message lists the known ones."""

    label = "zoo error"


def _builder(name: str):
    module_name, builder, spec, _ = WORLDS[name]
    module = importlib.import_module(module_name)
    factory = module
    for part in spec.split("."):
        factory = getattr(factory, part)
    return getattr(module, builder), factory


def zoo_home() -> Path:
    """Cache directory of built worlds: $MMALIGN_HOME/zoo, default ~/.cache/mmalign/zoo."""
    return Path(os.environ.get("MMALIGN_HOME", Path.home() / ".cache" / "mmalign")) / "zoo"


def world_dir(name: str) -> Path:
    return zoo_home() / name


def fingerprint(name: str) -> str:
    """Hash of a world's builder source and spec, and of the fingerprint of the world it builds on (a spec's
    `base_world`): a cached world built by other code, or on a base world built by other code, is rebuilt."""
    module_name = WORLDS[name][0]
    _, factory = _builder(name)
    spec = factory()
    source = Path(inspect.getsourcefile(importlib.import_module(module_name)) or "").read_bytes()
    base = getattr(spec, "base_world", None)
    base_print = fingerprint(base).encode() if base else b""
    return hashlib.sha256(source + repr(spec).encode() + base_print).hexdigest()[:16]


def _is_current(out: Path, name: str) -> bool:
    stamp = out / "fingerprint.txt"
    return (out / "world.json").exists() and stamp.exists() and stamp.read_text().strip() == fingerprint(name)


def build_here(name: str, out: str | Path, log=print) -> Path:
    """Run world `name`'s builder with its spec into `out`, in this process (what the build process runs)."""
    builder, spec = _builder(name)
    return builder(Path(out), spec(), log=log)


def build(name: str, force: bool = False, log=print) -> Path:
    """Build a world into the cache (atomically: a half-built world is never used).

    The builder runs in a fresh process started with `reproducible.BUILD_ENV` (one thread, AVX2 math paths), so
    the world has the same bits whatever this process's threads, state or CPU; with MMALIGN_ZOO_IN_PROCESS=1 it
    runs here (the build process itself does this for the base worlds it builds on)."""
    if name not in WORLDS:
        raise ZooError(f"unknown world {name!r}; known: {', '.join(sorted(WORLDS))}")
    out = world_dir(name)
    if not force and _is_current(out, name):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # a second process asking for the same world waits, then reuses it
        if not force and _is_current(out, name):
            return out
        if (out / "world.json").exists():
            log(f"[zoo] {name}: the cached world was built by other code or settings; rebuilding")
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        if os.environ.get(IN_PROCESS) == "1":
            build_here(name, tmp, log)
        else:
            run_build_process(name, tmp, log)
        (tmp / "fingerprint.txt").write_text(fingerprint(name) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def resolve(path: str, log=print) -> str:
    """Turn `zoo://world/rest` into a path in the cache, building the world if needed; other paths pass."""
    if not isinstance(path, str) or not path.startswith("zoo://"):
        return path
    world, _, rest = path[len("zoo://") :].partition("/")
    return str(build(world, log=log) / rest)


register_scheme("zoo://", resolve)
