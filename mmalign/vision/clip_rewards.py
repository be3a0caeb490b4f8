"""CLIP-based image rewards, all differentiable: CLIP score and the LAION aesthetic head (open_clip), PickScore
(a transformers `CLIPModel`) and HPSv2 (an open_clip ViT-H-14 with the HPS v2 / v2.1 weights).

Images arrive as the diffusion policy decodes them: float tensors `[batch, 3, H, W]` in [-1, 1]. Each model's own
preprocessing (resize, centre crop or pad, normalise) is redone here in torch instead of PIL, so gradients reach the
pixels and ReFL/DRaFT-style methods can backpropagate through the reward.

open_clip models load from a built-in architecture name plus a pretrained tag or weights file
(`model="ViT-L-14", pretrained="openai"`), from `hf-hub:org/repo`, or from a local directory holding
`open_clip_config.json` and `open_clip_model.safetensors` (what `save_open_clip` writes). PickScore loads with
transformers from a hub id or a local directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The improved-aesthetic-predictor's public weights are a pickled state dict; convert them once (no other code runs):
PTH_TO_SAFETENSORS = (
    'python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN.pth', map_location='cpu', weights_only=True), 'OUT.safetensors')\""
)
# HPS v2 / v2.1 ship as `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` ({"state_dict": ...}, pickled); convert once:
HPS_TO_SAFETENSORS = (
    'python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('IN.pt', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k.removeprefix('module.'): v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor PickScore's README loads


# ------------------------------------------------------------------------------------------------ loading


def load_open_clip(model: str, pretrained: str | None = None) -> tuple[nn.Module, Any]:
    """An open_clip model (eval mode, frozen weights) and its tokenizer, from a name+tag, hf-hub id or directory."""
    import open_clip

    name = model
    if model.startswith(("hf-hub:", "local-dir:")):
        pass
    elif Path(model).is_dir():
        name = f"local-dir:{model}"
    elif "/" in model or model.startswith("."):
        raise FileNotFoundError(
            f"open_clip model directory not found: {model} (or use a built-in name such as 'ViT-L-14' "
            "with `pretrained`, or 'hf-hub:org/repo')"
        )
    if name.startswith("local-dir:"):
        config = Path(name[len("local-dir:") :]) / "open_clip_config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{config.parent}: no open_clip_config.json (not an open_clip model directory)"
            )
    if pretrained and not name.startswith(("hf-hub:", "local-dir:")):
        looks_like_file = (
            Path(pretrained).suffix in (".safetensors", ".bin", ".pt", ".pth") or "/" in pretrained
        )
        if looks_like_file and not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip pretrained weights file not found: {pretrained}")
    net = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    return net.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def save_open_clip(net: nn.Module, model_cfg: dict[str, Any], path: str | Path) -> None:
    """Write an open_clip model as `open_clip_config.json` + `open_clip_model.safetensors` (loadable above)."""
    from open_clip import get_model_preprocess_cfg
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_preprocess_cfg(net).items()}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))


# ---------------------------------------------------------------------------------------- preprocessing


def check_images(images: Any, n_prompts: int, where: str) -> torch.Tensor:
    """Refuse anything but a float `[batch, 3, H, W]` tensor with one image per prompt."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{where}: images must be a [batch, 3, H, W] tensor in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{where}: images must be floating point in [-1, 1], got dtype {images.dtype}")
    if len(images) != n_prompts:
        raise ValueError(f"{where}: {len(images)} images for {n_prompts} prompts")
    return images


class ClipPreprocess:
    """open_clip's evaluation transform (resize → centre crop → normalise) as differentiable tensor operations.

    Matches torchvision's `Resize`/`CenterCrop` on tensors (antialiased bicubic by default); on PIL images the
    resampling differs by a few 1e-3 of the pixel range, and not at all when no resize is needed.
    """

    def __init__(self, config: dict[str, Any]):
        size = config["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(config.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
        self.mode = "bilinear" if config.get("interpolation") == "bilinear" else "bicubic"
        self.resize_mode = config.get("resize_mode") or "shortest"
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown open_clip resize_mode {self.resize_mode!r}")
        self.fill = float(config.get("fill_color", 0)) / 255.0

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return _resize(x, size, self.mode)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # [-1, 1] → [0, 1], what ToTensor gives
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            x = self._resize(x, (th, tw))
        elif self.resize_mode == "shortest" and th == tw:  # torchvision Resize(int): shorter side → size
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(th * long / short)
            x = self._resize(x, (th, new_long) if h <= w else (new_long, th))
        else:  # timm's ResizeKeepRatio, shortest (longest=0) or longest (longest=1) edge
            ratio_h, ratio_w = h / th, w / tw
            ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
            x = self._resize(x, (int(h / ratio), int(w / ratio)))
        x = self._center_crop_or_pad(x, th, tw)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _center_crop_or_pad(self, x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
        return center_crop_or_pad(x, th, tw, self.fill)


def center_crop_or_pad(x: torch.Tensor, th: int, tw: int, fill: float = 0.0) -> torch.Tensor:
    """torchvision's CenterCrop on tensors: pad with `fill` (split as torchvision does) where too small, then crop."""
    h, w = x.shape[-2:]
    if h < th or w < tw:  # open_clip's CenterCropOrPad / torchvision CenterCrop pad with the fill colour
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
        h, w = x.shape[-2:]
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    return x[..., top : top + th, left : left + tw]


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class HFClipPreprocess:
    """transformers' `CLIPImageProcessor` (resize the shorter side, centre crop, rescale, normalise) as
    differentiable tensor operations on images in [-1, 1].

    Sizes, mean and std come from the processor; resampling is torch's antialiased bicubic (bilinear when the
    processor asks for it), which is what the torchvision-backed fast processor does; the PIL-backed one differs
    by a few 1e-3 of the pixel range when it resizes, and not at all when the image already has the crop size.
    """

    def __init__(self, image_processor: Any):
        size, crop = dict(image_processor.size or {}), dict(image_processor.crop_size or {})
        self.do_resize = bool(getattr(image_processor, "do_resize", True))
        self.do_crop = bool(getattr(image_processor, "do_center_crop", True))
        if "shortest_edge" in size:
            self.shortest_edge, self.resize_to = int(size["shortest_edge"]), None
        elif {"height", "width"} <= size.keys():
            self.shortest_edge, self.resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"unsupported image processor size {size!r} (expected shortest_edge or height/width)"
            )
        self.crop = (int(crop["height"]), int(crop["width"])) if crop else None
        self.mean, self.std = list(image_processor.image_mean), list(image_processor.image_std)
        resample = getattr(image_processor, "resample", 3)
        self.mode = "bilinear" if int(getattr(resample, "value", resample)) == 2 else "bicubic"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if self.do_resize:
            if self.resize_to is not None:
                x = _resize(x, self.resize_to, self.mode)
            else:  # shorter side → shortest_edge, the longer scaled by the same factor (truncated, as transformers)
                h, w = x.shape[-2:]
                short, long = (h, w) if h <= w else (w, h)
                new_long = int(self.shortest_edge * long / short)
                target = (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge)
                x = _resize(x, target, self.mode)
        if self.do_crop and self.crop is not None:
            x = center_crop_or_pad(x, *self.crop)
        return _normalise(x, self.mean, self.std)


class LongestEdgePreprocess:
    """HPSv2's evaluation transform as differentiable tensor operations: the longer side resized to `size`
    (bicubic, antialiased; the other side rounded as hpsv2 rounds it), padded with black to a square (split as
    hpsv2 splits it), then normalised. hpsv2 skips the padding when the longer side is already `size`; a non-square
    image then cannot enter the ViT, so here every image is padded to a square."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = int(size), list(mean), list(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        x = _resize(x, (round(h * scale), round(w * scale)), "bicubic")
        ph, pw = self.size - x.shape[-2], self.size - x.shape[-1]
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        return _normalise(x, self.mean, self.std)


def _check_prompts(prompts: Sequence[Any], name: str) -> list[str]:
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"reward {name!r}: prompt {i} must be a string, got {type(p).__name__}")
    return list(prompts)


class _ClipImageReward:
    """Shared part of CLIP rewards: the frozen model, its tensor preprocessing, unit-norm image embeddings."""

    differentiable = True
    name = "clip"

    def __init__(self, model: nn.Module, tokenizer: Any = None, preprocess: Any = None):
        from open_clip import get_model_preprocess_cfg

        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.preprocess = preprocess or ClipPreprocess(get_model_preprocess_cfg(model))

    def image_embeddings(self, prompts: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        check_images(images, len(prompts), f"reward {self.name!r}")
        self.model.to(images.device)
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[Any], device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.tokenizer(_check_prompts(prompts, self.name)).to(device)
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class CLIPScore(_ClipImageReward):
    """scale · cos(CLIP image embedding, CLIP prompt embedding): prompt–image alignment (Hessel et al. 2021).

    With the default scale 100 this is torchmetrics' CLIPScore before its clamp at 0 (the clamp is left out so
    the reward keeps its gradient for poorly aligned images); Hessel et al. use 2.5·max(cos, 0).
    """

    name = "clip_score"

    def __init__(self, model: nn.Module, tokenizer: Any, *, scale: float = 100.0):
        super().__init__(model, tokenizer)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"clip_score: scale must be a positive number, got {scale}")
        self.scale = float(scale)

    @classmethod
    def from_pretrained(
        cls, model: str = "ViT-L-14", pretrained: str | None = "openai", **kwargs
    ) -> CLIPScore:
        return cls(*load_open_clip(model, pretrained), **kwargs)

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        image = self.image_embeddings(prompts, images)
        return self.scale * (image * self.text_embeddings(prompts, image.device)).sum(-1)


class HPSv2Score(_ClipImageReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cos(image, prompt) under an open_clip ViT-H-14 fine-tuned
    on human preferences, as the `hpsv2` package scores it (the diagonal of image_features @ text_features.T, unit
    features, no logit scale; typical values 0.2–0.3). Preprocessing is hpsv2's own (longer side resized, padded
    to a square), not open_clip's resize-and-crop.

    `checkpoint` is the HPS weights as safetensors (convert the released `.pt` once with `HPS_TO_SAFETENSORS`);
    `model` the open_clip architecture they fit ("ViT-H-14").
    """

    name = "hpsv2"

    def __init__(self, model: nn.Module, tokenizer: Any):
        from open_clip import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(model)
        size = cfg["size"] if isinstance(cfg["size"], int) else max(cfg["size"])
        super().__init__(model, tokenizer, LongestEdgePreprocess(size, cfg["mean"], cfg["std"]))

    @classmethod
    def from_pretrained(cls, checkpoint: str, model: str = "ViT-H-14") -> HPSv2Score:
        path = Path(checkpoint)
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            raise ValueError(
                f"{path}: HPS weights are read from safetensors only (never unpickled); convert once with\n"
                f"  {HPS_TO_SAFETENSORS.replace('IN.pt', str(path)).replace('OUT', str(path.with_suffix('')))}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"HPS checkpoint not found: {path}")
        return cls(*load_open_clip(model, str(path)))

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        image = self.image_embeddings(prompts, images)
        return (image * self.text_embeddings(prompts, image.device)).sum(-1)


class PickScore:
    """PickScore (Kirstain et al. 2023): exp(logit_scale) · cos(image, prompt) under a transformers `CLIPModel`
    fine-tuned on Pick-a-Pic preferences, as its reference code scores it (typical values around 20).

    Loads `model` (hub id `yuvalkirstain/PickScore_v1` or a local directory) and its processor (`processor`; by
    default `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` for the PickScore hub id, as its README does, else the model's
    own directory). Images go through `HFClipPreprocess`, so gradients reach the pixels.
    """

    differentiable = True
    name = "pickscore"

    def __init__(self, model: nn.Module, processor: Any, *, max_length: int = 77):
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.preprocess = HFClipPreprocess(processor.image_processor)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, model: str = PICKSCORE_MODEL, processor: str | None = None, **kwargs: Any
    ) -> PickScore:
        from transformers import AutoProcessor, CLIPModel

        if processor is None:
            processor = PICKSCORE_PROCESSOR if model == PICKSCORE_MODEL else model
        for value in (model, processor):
            if (value.startswith((".", "/")) or Path(value).exists()) and not Path(value).is_dir():
                raise FileNotFoundError(f"PickScore model or processor directory not found: {value}")
        return cls(CLIPModel.from_pretrained(model), AutoProcessor.from_pretrained(processor), **kwargs)

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        """transformers 5 returns model outputs whose `pooler_output` is the projected embedding; 4.x a tensor."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_embeddings(self, prompts: Sequence[Any], device: torch.device) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            _check_prompts(prompts, self.name),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            return F.normalize(self._features(self.model.get_text_features(**tokens)).float(), dim=-1)

    def image_embeddings(self, prompts: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        check_images(images, len(prompts), f"reward {self.name!r}")
        self.model.to(images.device)
        pixels = self.preprocess(images).to(self.model.dtype)
        return F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        image = self.image_embeddings(prompts, images)
        cos = (image * self.text_embeddings(prompts, image.device)).sum(-1)
        return self.model.logit_scale.exp().float() * cos


# ------------------------------------------------------------------------------------------- aesthetics


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (C. Schuhmann, LAION): five linear layers, dropout, no activations.

    Same module names as its public `sac+logos+ava1-l14-linearMSE.pth` (layers.0/2/4/6/7), input = unit-norm
    CLIP ViT-L/14 image embeddings (768) for those weights; any input width for heads trained elsewhere.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


MLP_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
LINEAR_KEYS = {"weight", "bias"}


def load_aesthetic_head(path: str | Path) -> nn.Module:
    """The aesthetic head stored in a safetensors file; its layout (MLP or v1 linear) is read from the keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(
            f"{path}: aesthetic weights are read from safetensors only (never unpickled); convert once with\n"
            f"  {PTH_TO_SAFETENSORS.replace('IN.pth', str(path)).replace('OUT', str(path.with_suffix('')))}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head weights not found: {path}")
    try:
        state = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if set(state) == MLP_KEYS:
        head: nn.Module = AestheticMLP(state["layers.0.weight"].shape[1])
    elif set(state) == LINEAR_KEYS and state["weight"].shape[0] == 1:
        head = nn.Linear(state["weight"].shape[1], 1)  # LAION aesthetic predictor v1: one linear layer
    else:
        raise ValueError(
            f"{path}: unknown aesthetic head layout, keys {sorted(state)[:12]}; expected the improved-aesthetic-"
            f"predictor MLP ({sorted(MLP_KEYS)[:2]}…) or a 1-output linear layer (weight, bias)"
        )
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: tensor shapes do not fit the aesthetic head: {err}") from None
    return head.float().eval().requires_grad_(False)


class AestheticScore(_ClipImageReward):
    """LAION aesthetic score: a head on unit-norm CLIP image embeddings (the DDPO paper's aesthetic reward)."""

    name = "aesthetic"

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__(model)
        self.head = head.eval().requires_grad_(False)
        width = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
        embed = self._embed_dim()
        if width != embed:
            raise ValueError(f"aesthetic head takes {width}-dim embeddings but the CLIP model gives {embed}")

    def _embed_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        with torch.no_grad():
            return self.model.encode_image(torch.zeros(1, 3, *self.preprocess.size)).shape[-1]

    @classmethod
    def from_pretrained(
        cls, head: str, model: str = "ViT-L-14", pretrained: str | None = "openai"
    ) -> AestheticScore:
        head_module = load_aesthetic_head(head)  # a missing head fails before the CLIP model loads
        return cls(load_open_clip(model, pretrained)[0], head_module)

    def __call__(self, prompts: Sequence[Any], images: torch.Tensor) -> torch.Tensor:
        embeddings = self.image_embeddings(prompts, images)
        return self.head.to(embeddings.device)(embeddings).squeeze(-1)
