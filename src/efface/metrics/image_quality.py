"""Utility metrics on real models: CLIP score, LPIPS and FID / KID, each through its usual package.

Each metric gets its model from a factory (``model_factory`` / ``feature_factory``) called once at
construction; the defaults look for the package and its weights on this machine and raise an
:class:`~efface.errors.InputError` that says what is missing; tests pass tiny models built in code.

- ``clip-score`` (:class:`ClipScore`): ``scale * max(cos(image, text), 0)`` with a CLIP model
  (torchmetrics' CLIPScore definition, scale 100; Hessel et al. 2021 use 2.5). Package:
  ``transformers`` (already an efface dependency; torchmetrics' CLIPScore wraps the same
  ``CLIPModel``), weights from a local directory or the Hugging Face cache, never fetched.
- ``lpips`` (:class:`LPIPSDistance`): the ``lpips`` package, the authors' reference code (Zhang et
  al., CVPR 2018) that UCE's ``lpips_eval.py`` uses (``net='alex'``); its linear layers ship with it,
  its AlexNet / VGG trunk must be in torchvision's cache.
- ``fid`` (:class:`FID`): ``clean-fid`` (Parmar et al., CVPR 2022), as in RECE's ``fid_score.py``:
  the TF-Inception torchscript weights and its antialiased "clean" resize, so scores do not depend
  on the resizing library. Fréchet distance and KID are :mod:`efface.metrics.stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from efface.errors import InputError
from efface.metrics.base import Metric, images_to_tensor, register_metric
from efface.metrics.real import (batches, factory_name, package_version, require_module, require_weights, summary,
                                 weights_provenance)
from efface.metrics.stats import feature_frechet_distance, kid

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- CLIP score

@dataclass(frozen=True)
class ClipScoreConfig:
    """Settings of :class:`ClipScore`."""

    model: str = "openai/clip-vit-large-patch14"
    """a local CLIP directory (config, weights, tokenizer, preprocessor) or a hub id already in the HF cache"""
    scale: float = 100.0
    """score = scale * max(cosine, 0) (100: torchmetrics; 2.5: Hessel et al.)"""
    batch_size: int = 16
    device: str = "cpu"


def transformers_clip(config: ClipScoreConfig) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from ``config.model``, local files only."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(config.model, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(config.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(
            f"CLIP model {config.model!r} is not available on this machine ({type(e).__name__}); pass "
            "ClipScoreConfig(model='/path/to/clip-vit-large-patch14'), a directory holding its config, weights, "
            "tokenizer and preprocessor files, or put the model in the Hugging Face cache beforehand "
            "(efface never downloads weights)"
        ) from e
    return model.to(config.device).eval(), processor


def _clip_weights(name: str) -> Path | None:
    folder = Path(name).expanduser()
    return next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)


@register_metric("clip-score")
class ClipScore(Metric):
    """Mean CLIP score of images against their prompts (higher: images follow prompts better)."""

    higher_is_better: ClassVar[bool] = True

    def __init__(self, config: ClipScoreConfig | None = None, *,
                 model_factory: Callable[[ClipScoreConfig], tuple[Any, Any]] = transformers_clip):
        self.config = config or ClipScoreConfig()
        self.model_factory = model_factory
        self.model, self.processor = model_factory(self.config)
        super().__init__()

    def reset(self) -> None:
        self.scores: list[float] = []

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Per pair ``(images[i], prompts[i])``: ``scale * max(cos, 0)``."""
        text_config = getattr(self.model.config, "text_config", None)
        max_length = getattr(text_config, "max_position_embeddings", 77)
        inputs = self.processor(text=list(prompts), images=[im.convert("RGB") for im in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=max_length)
        inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # CLIPModel returns both L2-normalised
        return (self.config.scale * cos.clamp(min=0)).double().cpu().numpy()

    def update(self, images: Sequence[Image.Image], *, prompts: Sequence[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        for ims, ps in zip(batches(images, self.config.batch_size), batches(prompts, self.config.batch_size)):
            self.scores.extend(self.score(ims, ps).tolist())

    def compute(self) -> dict[str, Any]:
        return summary(self.scores, "clip_score")

    def provenance(self) -> dict[str, Any]:
        if self.model_factory is transformers_clip:
            evaluator = {"name": "transformers.CLIPModel", "package_version": package_version("transformers"),
                         "model": self.config.model,
                         "revision": getattr(self.model.config, "_commit_hash", None),
                         "weights": weights_provenance(_clip_weights(self.config.model))}
        else:
            evaluator = {"name": factory_name(self.model_factory), "model": type(self.model).__name__}
        return {"metric": self.name, "evaluator": evaluator, **asdict(self.config),
                "formula": "scale * max(cos(image_embeds, text_embeds), 0)"}


# ---------------------------------------------------------------- LPIPS

# torchvision's ImageNet weights of LPIPS' trunks (https://download.pytorch.org/models/<file>)
# (x, y) in [-1, 1], N x 3 x H x W each -> N distances (any shape with N elements, e.g. N x 1 x 1 x 1)
PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LPIPS_TRUNKS: dict[str, str] = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                                "squeeze": "squeezenet1_1-b8a52dc0.pth"}


@dataclass(frozen=True)
class LPIPSConfig:
    """Settings of :class:`LPIPSDistance`."""

    net: str = "alex"
    """the trunk: 'alex' (the lpips default, and UCE's), 'vgg' or 'squeeze'"""
    version: str = "0.1"
    device: str = "cpu"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.net not in LPIPS_TRUNKS:
            raise InputError(f"unknown LPIPS net {self.net!r}; valid: {', '.join(LPIPS_TRUNKS)}")


def lpips_trunk_file(config: LPIPSConfig) -> Path:
    """Where torchvision keeps the trunk's weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_TRUNKS[config.net]


def lpips_model(config: LPIPSConfig) -> PairDistance:
    """``lpips.LPIPS(net=...)``; InputError if the package or the trunk's weights are missing."""
    lpips = require_module("lpips", pip_name="lpips", purpose="the 'lpips' metric")
    trunk = LPIPS_TRUNKS[config.net]
    require_weights(lpips_trunk_file(config), what=f"the ImageNet weights of LPIPS' {config.net} trunk",
                    how=f"put {trunk} (https://download.pytorch.org/models/{trunk}) there, or set TORCH_HOME to a "
                        "folder whose hub/checkpoints/ holds it")
    return lpips.LPIPS(net=config.net, version=config.version, verbose=False).to(config.device).eval()


@register_metric("lpips")
class LPIPSDistance(Metric):
    """Mean LPIPS distance between images and their references (same prompt and seed): how much
    an erasure changed images it should have kept (lower: closer to the base model)."""

    higher_is_better: ClassVar[bool] = False

    def __init__(self, config: LPIPSConfig | None = None, *,
                 model_factory: Callable[[LPIPSConfig], PairDistance] = lpips_model):
        self.config = config or LPIPSConfig()
        self.model_factory = model_factory
        self.model = model_factory(self.config)
        super().__init__()

    def reset(self) -> None:
        self.distances: list[float] = []

    def update(self, images: Sequence[Image.Image], *, reference: Sequence[Image.Image]) -> None:
        """Pairs ``(images[i], reference[i])`` of equal size; the model sees them in [-1, 1]."""
        if len(images) != len(reference):
            raise ValueError(f"{len(images)} images but {len(reference)} reference images")
        for ims, refs in zip(batches(images, self.config.batch_size), batches(reference, self.config.batch_size)):
            x, y = images_to_tensor(ims) * 2 - 1, images_to_tensor(refs) * 2 - 1
            if x.shape != y.shape:
                raise ValueError(f"image and reference sizes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
            with torch.inference_mode():
                d = self.model(x.to(self.config.device), y.to(self.config.device))
            self.distances.extend(d.reshape(len(ims)).double().cpu().tolist())

    def compute(self) -> dict[str, Any]:
        return summary(self.distances, "lpips")

    def provenance(self) -> dict[str, Any]:
        if self.model_factory is lpips_model:
            import lpips

            linear = Path(lpips.__file__).parent / "weights" / f"v{self.config.version}" / f"{self.config.net}.pth"
            evaluator = {"name": "lpips.LPIPS", "package_version": package_version("lpips"),
                         "linear_weights": weights_provenance(linear),
                         "trunk_weights": weights_provenance(lpips_trunk_file(self.config))}
        else:
            evaluator = {"name": factory_name(self.model_factory), "model": type(self.model).__name__}
        return {"metric": self.name, "evaluator": evaluator, **asdict(self.config), "input_range": "[-1, 1]"}


# ---------------------------------------------------------------- FID / KID

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"

FeatureExtractor = Callable[[Sequence[Image.Image]], np.ndarray]


@dataclass(frozen=True)
class FIDConfig:
    """Settings of :class:`FID`."""

    inception: str | None = None
    """clean-fid's Inception file, or the folder holding it; None: clean-fid's own location (/tmp)"""
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    """seed of KID's random subsets"""
    batch_size: int = 32
    device: str = "cpu"


def inception_file(config: FIDConfig) -> Path:
    """The Inception weights file ``config`` points to."""
    path = Path(config.inception).expanduser() if config.inception else Path("/tmp")
    return path / INCEPTION_FILE if path.is_dir() else path


def clean_fid_features(config: FIDConfig) -> FeatureExtractor:
    """clean-fid's Inception pool features (2048-d) after its "clean" resize to 299 x 299."""
    require_module("cleanfid", pip_name="clean-fid", purpose="the 'fid' metric (clean-fid's Inception)")
    how = f"download {INCEPTION_URL} once and pass FIDConfig(inception=<that file or its folder>)"
    path = require_weights(inception_file(config), what=f"clean-fid's Inception weights ({INCEPTION_FILE})", how=how)
    if path.name != INCEPTION_FILE:
        raise InputError(f"clean-fid loads its Inception weights by the name {INCEPTION_FILE}; rename {path}")
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(config.device).eval()
    resize = build_resizer("clean")

    def extract(images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for batch in batches(images, config.batch_size):
            x = np.stack([resize(np.asarray(im.convert("RGB"))) for im in batch]).transpose(0, 3, 1, 2)
            with torch.inference_mode():
                out.append(model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(config.device)).cpu())
        return torch.cat(out).double().numpy()

    return extract


@register_metric("fid")
class FID(Metric):
    """Fréchet Inception Distance and KID between generated and real (reference) images; lower is
    closer. ``update(images, real=True)`` adds reference images, ``real=False`` generated ones."""

    higher_is_better: ClassVar[bool] = False

    def __init__(self, config: FIDConfig | None = None, *,
                 feature_factory: Callable[[FIDConfig], FeatureExtractor] = clean_fid_features):
        self.config = config or FIDConfig()
        self.feature_factory = feature_factory
        self.features = feature_factory(self.config)
        super().__init__()

    def reset(self) -> None:
        self.real: list[np.ndarray] = []
        self.generated: list[np.ndarray] = []

    def update(self, images: Sequence[Image.Image], *, real: bool) -> None:
        if images:
            (self.real if real else self.generated).append(np.asarray(self.features(images), np.float64))

    def compute(self) -> dict[str, Any]:
        x = np.concatenate(self.generated) if self.generated else np.zeros((0, 0))
        y = np.concatenate(self.real) if self.real else np.zeros((0, 0))
        result: dict[str, Any] = {"fid": None, "kid": None, "n_generated": len(x), "n_real": len(y)}
        if len(x) < 2 or len(y) < 2:
            log.warning("FID needs at least 2 generated and 2 real images (have %d and %d)", len(x), len(y))
            return result
        result["fid"] = feature_frechet_distance(x, y)
        size = min(len(x), len(y), self.config.kid_subset_size)
        result["kid"] = kid(x, y, subsets=self.config.kid_subsets, subset_size=size, seed=self.config.seed)
        return result

    def provenance(self) -> dict[str, Any]:
        if self.feature_factory is clean_fid_features:
            evaluator = {"name": "clean-fid InceptionV3W (mode 'clean')",
                         "package_version": package_version("clean-fid"),
                         "weights": weights_provenance(inception_file(self.config))}
        else:
            evaluator = {"name": factory_name(self.feature_factory)}
        return {"metric": self.name, "evaluator": evaluator, **asdict(self.config),
                "kid_kernel": "(x.y / d + 1)^3, unbiased MMD^2 averaged over subsets"}
