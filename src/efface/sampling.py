"""Seeded, reproducible image generation with any text-to-image diffusers pipeline.

Image ``i`` of a call is drawn from its own generator seeded ``seed + i``, so its initial noise does
not depend on the batch size, and the same seed with the same batch size gives byte-identical PNGs
on CPU. Across batch sizes the images agree only to within rounding: CPU BLAS picks its kernels
(and so its summation order) by matrix shape, so a batch of 1 and a batch of 3 may differ in the
last bit of a float, which can move a pixel by one level.

Classifier-free guidance is the family's (:meth:`~efface.models.families.Family.generation_kwargs`):
``guidance_scale`` on SD / SDXL / SD3, ``true_cfg_scale`` with the empty negative prompt on Flux.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from efface.config import check_bounds, check_seed
from efface.errors import InputError
from efface.io import atomic_dir
from efface.models.families import Conditioning, family_of

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How images are sampled (defaults: 25 steps of the pipeline's scheduler, guidance 7.5, the model's
    native size: its denoiser's latent size times the VAE's factor)."""

    num_images: int = field(default=8, metadata={"help": "images to generate"})
    steps: int = field(default=25, metadata={"help": "denoising steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's)"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt"})
    batch_size: int = field(default=16, metadata={"help": "images per pipeline call"})

    def __post_init__(self) -> None:
        check_bounds(self, at_least_one=("num_images", "steps", "batch_size"))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise InputError(f"{name} must be a positive multiple of 8, not {value}")


def generate(pipe, prompt: str, config: GenerationConfig | None = None, *, seed: int = 0) -> list[Image.Image]:
    """Generate ``config.num_images`` images of ``prompt``; image ``i`` uses seed ``seed + i``."""
    config = config or GenerationConfig()
    return generate_many(pipe, [prompt] * config.num_images, config, seed=seed)


def generate_many(pipe, prompts: list[str | torch.Tensor], config: GenerationConfig | None = None, *,
                  seed: int = 0, seeds: list[int] | None = None, progress: bool = True) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses seed ``seed + i``, or ``seeds[i]`` when ``seeds`` is
    given (``config.num_images`` is ignored); ``progress``: a bar over the batches (two or more). A prompt may also be a text-encoder output of shape
    ``(1, tokens, dim)`` (an attack's adversarial embedding), used as it is; a batch holding one
    is encoded with the pipeline's ``encode_prompt`` and sampled from embeddings."""
    config = config or GenerationConfig()
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    seed = check_seed(seed)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    seeds = [check_seed(s, f"seeds[{i}]", limit=2**64 - 1) for i, s in enumerate(seeds)]
    family = family_of(pipe)
    height, width = config.height, config.width
    if height is None or width is None:
        native = family.image_size(pipe)
        height, width = height or native[0], width or native[1]
    images: list[Image.Image] = []
    starts = range(0, len(prompts), config.batch_size)
    for start in tqdm(starts, desc="batches", disable=not progress or len(starts) < 2):
        chunk = prompts[start : start + config.batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + len(chunk)]]
        guided = family.generation_kwargs(pipe, config.guidance, config.negative_prompt)
        with torch.inference_mode():
            if all(isinstance(p, str) for p in chunk):
                negative = guided.pop("negative_prompt")
                text = {"prompt": chunk, "negative_prompt": [negative] * len(chunk) if negative is not None else None}
            else:
                text = _embeddings(pipe, chunk, guided.pop("negative_prompt") or "")
            out = pipe(**text, **guided, num_inference_steps=config.steps, height=height, width=width,
                       generator=generators, output_type="pil")
        images.extend(out.images)
    return images


def _embeddings(pipe, chunk: list, negative: str) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``negative_prompt_embeds`` (and the pooled ones, where the family has them)
    for a batch mixing text, text-encoder outputs (tensors) and conditionings."""
    family = family_of(pipe)
    den = family.denoiser(pipe)
    rows = [family.encode(pipe, [p]) if isinstance(p, str) else p if isinstance(p, Conditioning) else Conditioning(p)
            for p in chunk]
    cond = Conditioning.cat([r.to(den.device, den.dtype) for r in rows])
    neg = family.encode(pipe, [negative] * len(chunk)).to(den.device, den.dtype)
    out = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": neg.embeds}
    if cond.pooled is not None:
        out |= {"pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": neg.pooled}
    return out


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile ``images`` (all of one size) into one image, ``cols`` per row (default: near square)."""
    if not images:
        raise InputError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def save_images(images: list[Image.Image], out: str | Path, *, metadata: dict, overwrite: bool = False,
                grid_scale: int = 1) -> Path:
    """Write ``000.png``..., ``grid.png`` and ``generation.json`` into ``out`` atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for i, img in enumerate(images):
            img.save(tmp / f"{i:03d}.png")
        grid = make_grid(images)
        if grid_scale > 1:
            grid = grid.resize((grid.width * grid_scale, grid.height * grid_scale), Image.Resampling.NEAREST)
        grid.save(tmp / "grid.png")
        (tmp / "generation.json").write_text(json.dumps(metadata, indent=2))
    log.info("wrote %d images and grid.png to %s", len(images), out)
    return Path(out)


def describe(prompt: str, config: GenerationConfig, seed: int, model: str) -> dict:
    return {"prompt": prompt, "seed": seed, "model": model, **asdict(config)}
