"""The attack API: try to bring an erased concept back. One file per attack.

An attack subclasses :class:`Attack`: a ``Config`` dataclass (official defaults; the CPU-sized
toy-sd budgets live with the toy world, :mod:`efface.toy.presets`), its ``paper``, the set
``needs`` of what it requires (:data:`NEEDS`), and ``_attack(ctx, i)``, which returns the
:class:`Adversarial` prompt (text, or a prompt embedding) for prompt ``i``; ``_prepare(ctx)`` does
the per-concept work first (a concept vector, a learned token).

``attack.run(erased_pipe, concept, prompts, original=..., target_images=..., seed=...)`` checks
that everything declared in ``needs`` was given (before any work), seeds, attacks every prompt,
generates each adversarial prompt's image with the prompt's own seed and returns an
:class:`AttackResult`, which saves every adversarial prompt and embedding so that it can be
replayed (:meth:`AttackResult.replay` regenerates the same images).
"""

from __future__ import annotations

import json
import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from efface.config import Preset, check_bounds, check_seed, resolve
from efface.errors import InputError
from efface.io import atomic_dir
from efface.models.families import family_of
from efface.registry import ATTACKS
from efface.sampling import GenerationConfig, generate_many

log = logging.getLogger(__name__)

# What an attack may need; the base class refuses to run one without it.
NEEDS: dict[str, str] = {
    "erased_model": "white-box access to the erased pipeline (gradients through its denoiser)",
    "original_model": "the model before erasure (original=...): its predictions or images",
    "text_encoder": "the erased pipeline's tokenizer and text encoder only",
    "target_images": "images that show the concept, one per prompt (target_images=..., or original=... to make them)",
    "image_features": "an image feature extractor (features=: PIL images -> N x D tensor; toy-sd: the toy classifier's)",
}


@dataclass
class AttackConfig:
    """Fields every attack has; subclasses add the paper's hyper-parameters. ``PRESETS``: the
    attack's own named settings (none today); the toy-sd budgets are handed in as a
    :class:`~efface.config.Preset` (:func:`efface.toy.presets.attack_preset`)."""

    PRESETS: ClassVar[dict[str, dict]] = {}

    def check_counts(self, *names: str) -> None:
        """Refuse integer fields ``names`` below 1 and a learning rate ``lr`` (if any) not above 0."""
        check_bounds(self, at_least_one=names, positive=("lr",) if hasattr(self, "lr") else ())


# Every model family (efface.models.families); attacks that only change the prompt's text and
# generate through efface.sampling can declare them all.
ALL_FAMILIES = frozenset({"sd", "sdxl", "sd3", "flux"})
# Why the token-level attacks (which optimise or read the first CLIP text encoder's token
# embeddings and use its output as the whole conditioning) stay on SD 1.x / 2.x.
CLIP_ONLY = ("it works on the token embeddings of the one CLIP text encoder, whose output is the whole "
             "conditioning only on SD 1.x / 2.x; this family also conditions on {what}, which the attack "
             "neither optimises nor produces")
CLIP_ONLY_NOTES = {
    "sdxl": CLIP_ONLY.format(what="a second CLIP encoder (OpenCLIP bigG: its states and its pooled embedding)"),
    "sd3": CLIP_ONLY.format(what="CLIP-G and T5 states and a pooled embedding"),
    "flux": CLIP_ONLY.format(what="T5 states (the token sequence) and the CLIP pooled embedding"),
}


def clip_text(pipe):
    """The first (CLIP) tokenizer and text encoder of ``pipe``, through its family."""
    family = family_of(pipe)
    return family.tokenizer(pipe), getattr(pipe, family.text_encoders[0])


def clip_states(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The first text encoder's last hidden states (B x T x D) for token ids ``ids`` (B x T): on SD
    1.x / 2.x the conditioning the pipeline's ``encode_prompt`` gives for those tokens. Gradients
    flow as the caller's grad mode allows (inside ``replaced_token_embeddings``: to soft tokens)."""
    _, te = clip_text(pipe)
    return te(ids.to(te.device))[0]


def target_latents(pipe, images: list) -> torch.distributions.Distribution:
    """The VAE's latent distribution of PIL ``images``, scaled (and shifted) as the denoiser reads
    latents (the distribution of :meth:`~efface.models.families.Family.encode_images`), on the
    denoiser's device."""
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32))
                          for im in images]).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return family_of(pipe).latent_distribution(pipe, pixels)


@dataclass
class Adversarial:
    """What an attack found for one prompt: the text to generate with, or a prompt embedding
    (``1 x L x D``, the text encoder's output) with ``prompt`` its nearest-token reading."""

    prompt: str
    embedding: torch.Tensor | None = None
    loss: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackContext:
    """Everything an attack works with (``original`` and ``target_images`` may be None unless needed)."""

    erased: Any
    concept: str
    prompts: list[str]
    seeds: list[int]
    original: Any
    target_images: list | None
    generator: torch.Generator
    generation: GenerationConfig
    progress: bool
    judge: Any = None  # judge(images, concept) -> [concept present]; attacks that stop early use it
    features: Any = None  # features(images) -> N x D; attacks that score images use it
    state: dict[str, Any] = field(default_factory=dict)  # what _prepare computes for _attack


@dataclass
class AttackResult:
    """The adversarial prompts of one run and the images they give on the erased model."""

    attack: str
    config: dict[str, Any]
    preset: str
    concept: str
    prompts: list[str]
    seeds: list[int]
    adversarial: list[Adversarial]
    images: list
    generation: dict[str, Any]
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (embeddings are saved apart, see :meth:`save`)."""
        return {
            "attack": self.attack, "config": self.config, "preset": self.preset, "concept": self.concept,
            "generation": self.generation, "seconds": round(self.seconds, 3),
            "prompts": [{"prompt": p, "seed": s, "adversarial_prompt": a.prompt, "embedding": a.embedding is not None,
                         "loss": a.loss, "meta": a.meta}
                        for p, s, a in zip(self.prompts, self.seeds, self.adversarial)],
        }

    def save(self, out: str | Path, *, overwrite: bool = False, measures: dict[str, Any] | None = None) -> Path:
        """``attack.json`` (``measures`` at the top level, this run under ``"run"``),
        ``embeddings.safetensors`` (continuous attacks), ``images/NNNN.png`` and ``grid.png``,
        written atomically."""
        from safetensors.torch import save_file

        from efface.sampling import make_grid

        with atomic_dir(out, overwrite=overwrite) as tmp:
            data = {**(measures or {}), "run": self.summary()}
            (tmp / "attack.json").write_text(json.dumps(data, indent=2, default=str))
            if self.images:
                make_grid(self.images).save(tmp / "grid.png")
            embeds = {f"prompt_{i:04d}": a.embedding.detach().cpu().contiguous()
                      for i, a in enumerate(self.adversarial) if a.embedding is not None}
            if embeds:
                save_file(embeds, str(tmp / "embeddings.safetensors"))
            (tmp / "images").mkdir()
            for i, im in enumerate(self.images):
                im.save(tmp / "images" / f"{i:04d}.png")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> AttackResult:
        """A saved run (images included), ready to :meth:`replay`."""
        from PIL import Image
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "attack.json").is_file():
            raise InputError(f"{path} is not an attack directory (no attack.json); write one with efface attack")
        data = json.loads((path / "attack.json").read_text())["run"]
        embeds = load_file(str(path / "embeddings.safetensors")) if (path / "embeddings.safetensors").exists() else {}
        adversarial = [Adversarial(p["adversarial_prompt"], embeds.get(f"prompt_{i:04d}"), p["loss"], p["meta"])
                       for i, p in enumerate(data["prompts"])]
        images = [Image.open(f).copy() for f in sorted((path / "images").glob("*.png"))]
        return cls(data["attack"], data["config"], data["preset"], data["concept"],
                   [p["prompt"] for p in data["prompts"]], [p["seed"] for p in data["prompts"]], adversarial,
                   images, data["generation"], data.get("seconds", 0.0))

    def replay(self, pipe) -> list:
        """The images of the saved adversarial prompts on ``pipe`` (the erased pipeline), regenerated."""
        return generate_adversarial(pipe, self.adversarial, self.seeds, GenerationConfig(**self.generation))


def generate_adversarial(pipe, adversarial: list[Adversarial], seeds: list[int], gen: GenerationConfig) -> list:
    """One image per adversarial prompt, with its seed, ``gen.batch_size`` at a time: text is
    encoded as the pipeline encodes it, embeddings are used as they are."""
    return generate_many(pipe, [a.embedding if a.embedding is not None else a.prompt for a in adversarial], gen,
                         seeds=seeds)


C = TypeVar("C", bound=AttackConfig)


class Attack(ABC, Generic[C]):
    """Base class: ``attack = RingABell(preset=attack_preset("ring-a-bell")); result = attack.run(erased_pipe,
    "circle", prompts)`` (``attack_preset``: :mod:`efface.toy.presets`)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AttackConfig]] = AttackConfig
    paper: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    families: ClassVar[frozenset[str]] = frozenset({"sd"})  # model families (efface.models.families) it supports
    family_notes: ClassVar[dict[str, str]] = {}  # family -> why it is not supported (or what differs there)

    def __init__(self, config: C | None = None, *, preset: str | Preset | None = None, **overrides):
        self.config, self.preset = resolve(self.Config, self.name, config, preset, overrides,
                                           self.Config.PRESETS, kind="attack")  # type: ignore[assignment]

    def check(self, erased_pipe, concept: str, prompts: list[str], original, target_images, features=None) -> None:
        """Everything that can be checked before work starts: the inputs ``needs`` declares."""
        if not concept or not concept.strip():
            raise InputError("empty concept: name the erased concept to bring back, e.g. 'circle'")
        if not prompts:
            raise InputError("no prompts to attack: give at least one prompt that names the concept")
        if "original_model" in self.needs and original is None:
            raise InputError(f"{self.name} needs {NEEDS['original_model']}; pass original=<the base pipeline> "
                             "(efface attack: --model is the original, --erased the artifact)")
        if "target_images" in self.needs:
            if target_images is None and original is None:
                raise InputError(f"{self.name} needs {NEEDS['target_images']}")
            if target_images is not None and len(target_images) != len(prompts):
                raise InputError(f"{len(target_images)} target images for {len(prompts)} prompts: give one per prompt")
        if "image_features" in self.needs and features is None:
            raise InputError(f"{self.name} needs {NEEDS['image_features']}")
        if erased_pipe is None:
            raise InputError(f"{self.name} needs the erased pipeline")
        self.check_family(erased_pipe)
        if "original_model" in self.needs:
            self.check_family(original, "the original model")

    @classmethod
    def check_family(cls, pipe, what: str = "") -> None:
        """Refuse a pipeline of a model family the attack does not support, saying why (before any work)."""
        family = family_of(pipe).name
        if family not in cls.families:
            why = cls.family_notes.get(family, "not implemented for this family")
            whose = f" ({what})" if what else ""
            raise InputError(f"{cls.name} supports {', '.join(sorted(cls.families))} models, "
                             f"not {family}{whose}: {why}")

    def _prepare(self, ctx: AttackContext) -> None:
        """Per-concept work before the prompts are attacked (default: none)."""

    @abstractmethod
    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        """The adversarial prompt for ``ctx.prompts[i]``."""

    def run(self, erased_pipe, concept: str, prompts: list[str], *, seeds: list[int] | None = None,
            original=None, target_images: list | None = None, seed: int = 0,
            generation: GenerationConfig | None = None, progress: bool = True, judge=None,
            features=None) -> AttackResult:
        """Attack every prompt; image ``i`` is generated with ``seeds[i]`` (default ``seed + i``).
        ``judge(images, concept) -> [bool]``, if given, lets attacks stop early once the concept is back."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seed = check_seed(seed)
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise InputError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
        seeds = [check_seed(s, f"seeds[{i}]", limit=2**64 - 1) for i, s in enumerate(seeds)]
        self.check(erased_pipe, concept, prompts, original, target_images, features)
        gen = generation or GenerationConfig()
        if "target_images" in self.needs and target_images is None:
            from efface.sampling import generate_many

            target_images = generate_many(original, prompts, gen, seeds=seeds)  # the original model's images
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        ctx = AttackContext(erased_pipe, concept.strip(), prompts, seeds, original, target_images,
                            torch.Generator("cpu").manual_seed(seed), gen, progress, judge, features)
        start = time.perf_counter()
        self._prepare(ctx)
        adversarial = [self._attack(ctx, i) for i in tqdm(range(len(prompts)), desc=self.name, disable=not progress)]
        seconds = time.perf_counter() - start
        images = generate_adversarial(erased_pipe, adversarial, seeds, gen)
        return AttackResult(self.name, asdict(self.config), self.preset, ctx.concept, prompts, seeds, adversarial,
                            images, asdict(gen), seconds)


def register_attack(name: str):
    """Class decorator: register an :class:`Attack` under ``name`` (sets ``cls.name``)."""

    def decorator(cls):
        cls.name = name
        return ATTACKS.register(name)(cls)

    return decorator
