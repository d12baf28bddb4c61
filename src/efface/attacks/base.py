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

Text replay. An adversarial prompt without an embedding is *text*: it is generated (and judged)
exactly as the pipeline encodes that text, so anyone can type it and get the same image. The
discrete-token attacks (UnlearnDiffAtk, P4D, Ring-A-Bell, MMA-Diffusion) judge the text by default,
as their official codes do: they search over the token ids that survive decode and re-encode
(:mod:`efface.attacks.text`), so the ids they optimise are
the ids ``tokenizer(text)`` gives. ``replay="embedding"`` keeps the id-level variant (the found ids'
text-encoder output is the prompt); its ASR is reported under its own name (``<attack>/embedding``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from efface.config import Preset, check_bounds, check_seed, resolve
from efface.errors import InputError
from efface.io import atomic_dir
from efface.models.families import Conditioning, family_of
from efface.models.params import named_parameters
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
    (``1 x L x D``, the text encoder's output; or a one-row :class:`Conditioning` where the family
    reads more than one encoder's states) with ``prompt`` its nearest-token reading."""

    prompt: str
    embedding: torch.Tensor | Conditioning | None = None
    loss: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def replay(self) -> str:
        """``"text"``: the image is the pipeline's for :attr:`prompt`; ``"embedding"``: for :attr:`embedding`."""
        return "text" if self.embedding is None else "embedding"


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
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> embedding(s) an attack learned


@dataclass
class AttackResult:
    """The adversarial prompts of one run and the images they give on the erased model.

    ``indices`` / ``judged``: set by :func:`efface.robustness.attack_success`, the position of each
    attacked prompt among the measured ones and the judged image of every measured prompt (its
    pre-attack image, or its adversarial image where the attack ran), which :meth:`save` writes."""

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
    indices: list[int] | None = None
    judged: list | None = None
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # placeholder token -> its learned embedding

    def _image_paths(self) -> list[str]:
        """Relative path of the image of each of this run's prompts, as :meth:`save` writes them."""
        where = self.indices if self.indices is not None and self.judged is not None else range(len(self.prompts))
        return [image_path(k) for k in where]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (embeddings are saved apart, see :meth:`save`)."""
        return {
            "attack": self.attack, "config": self.config, "preset": self.preset, "concept": self.concept,
            "generation": self.generation, "seconds": round(self.seconds, 3),
            "placeholder_tokens": list(self.learned),
            "prompts": [{"prompt": p, "seed": s, "adversarial_prompt": a.prompt, "replay": a.replay,
                         "embedding": a.embedding is not None, "image": path, "loss": a.loss, "meta": a.meta}
                        for p, s, a, path in zip(self.prompts, self.seeds, self.adversarial, self._image_paths())],
        }

    def save(self, out: str | Path, *, overwrite: bool = False, measures: dict[str, Any] | None = None) -> Path:
        """``attack.json`` (``measures`` at the top level, this run under ``"run"``),
        ``embeddings.safetensors`` (prompts replayed from an embedding), ``images/NNNN.png``,
        ``grid.png`` and, for attacks that learn a token (concept inversion, PUND),
        ``learned_embeds.safetensors`` in diffusers' textual-inversion format (placeholder token ->
        embedding; ``pipe.load_textual_inversion(path)``), its token also in ``attack.json``
        (``placeholder_token``), written atomically. With :attr:`judged` (set by ``attack_success``), image
        ``NNNN`` is the judged image of prompt ``NNNN`` of ``measures["prompts"]`` (every prompt);
        otherwise of this run's prompt ``NNNN``."""
        from safetensors.torch import save_file

        from efface.sampling import make_grid

        images = self.judged if self.judged is not None and self.indices is not None else self.images
        with atomic_dir(out, overwrite=overwrite) as tmp:
            data = {**(measures or {}), "run": self.summary()}
            if self.learned:
                data["placeholder_token"] = next(iter(self.learned))
                save_file({k: v.detach().cpu().contiguous() for k, v in self.learned.items()},
                          str(tmp / LEARNED_EMBEDS))
            (tmp / "attack.json").write_text(json.dumps(data, indent=2, default=str))
            if images:
                make_grid(images).save(tmp / "grid.png")
            embeds = {}
            for i, a in enumerate(self.adversarial):
                if isinstance(a.embedding, Conditioning):  # the pooled embedding beside the sequence
                    embeds[f"prompt_{i:04d}"] = a.embedding.embeds.detach().cpu().contiguous()
                    if a.embedding.pooled is not None:
                        embeds[f"prompt_{i:04d}{POOLED_SUFFIX}"] = a.embedding.pooled.detach().cpu().contiguous()
                elif a.embedding is not None:
                    embeds[f"prompt_{i:04d}"] = a.embedding.detach().cpu().contiguous()
            if embeds:
                save_file(embeds, str(tmp / "embeddings.safetensors"))
            (tmp / "images").mkdir()
            for k, im in enumerate(images):
                im.save(tmp / image_path(k))
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> AttackResult:
        """A saved run (its images included), ready to :meth:`replay`. Reads the ``attack.json`` of
        every efface version (runs saved before prompts named their image: ``images/`` in order)."""
        from PIL import Image
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "attack.json").is_file():
            raise InputError(f"{path} is not an attack directory (no attack.json); write one with efface attack")
        data = json.loads((path / "attack.json").read_text())["run"]
        embeds = load_file(str(path / "embeddings.safetensors")) if (path / "embeddings.safetensors").exists() else {}
        adversarial = [Adversarial(p["adversarial_prompt"], _saved_embedding(embeds, f"prompt_{i:04d}"), p["loss"],
                                   p["meta"]) for i, p in enumerate(data["prompts"])]
        if all("image" in p for p in data["prompts"]):
            files = [path / p["image"] for p in data["prompts"]]
        else:
            files = sorted((path / "images").glob("*.png"))
        images = [Image.open(f).copy() for f in files]
        learned = load_file(str(path / LEARNED_EMBEDS)) if (path / LEARNED_EMBEDS).exists() else {}
        return cls(data["attack"], data["config"], data["preset"], data["concept"],
                   [p["prompt"] for p in data["prompts"]], [p["seed"] for p in data["prompts"]], adversarial,
                   images, data["generation"], data.get("seconds", 0.0), learned=learned)

    def replay(self, pipe) -> list:
        """The images of the saved adversarial prompts on ``pipe`` (the erased pipeline), regenerated."""
        return generate_adversarial(pipe, self.adversarial, self.seeds, GenerationConfig(**self.generation))


LEARNED_EMBEDS = "learned_embeds.safetensors"  # the name diffusers' textual-inversion script writes
POOLED_SUFFIX = ".pooled"  # embeddings.safetensors: a prompt's pooled embedding, beside its sequence


def _saved_embedding(embeds: dict[str, torch.Tensor], key: str) -> torch.Tensor | Conditioning | None:
    if key not in embeds:
        return None
    pooled = embeds.get(key + POOLED_SUFFIX)
    return embeds[key] if pooled is None else Conditioning(embeds[key], pooled)


def image_path(k: int) -> str:
    """Relative path, in an attack directory, of image ``k``."""
    return f"images/{k:04d}.png"


def generate_adversarial(pipe, adversarial: list[Adversarial], seeds: list[int], gen: GenerationConfig, *,
                         progress: bool = True) -> list:
    """One image per adversarial prompt, with its seed, ``gen.batch_size`` at a time: text is
    encoded as the pipeline encodes it, embeddings are used as they are."""
    return generate_many(pipe, [a.embedding if a.embedding is not None else a.prompt for a in adversarial], gen,
                         seeds=seeds, progress=progress)


C = TypeVar("C", bound=AttackConfig)
TRAIN_SEED_OFFSET = 2**31 - 1  # seeds of training images: torch's CPU generator reads a seed's low 32 bits, so
# an offset of 2^31 - 1 keeps them disjoint from any run of fewer than 2^31 judged seeds


class Attack(ABC, Generic[C]):
    """Base class: ``attack = RingABell(preset=attack_preset("ring-a-bell")); result = attack.run(erased_pipe,
    "circle", prompts)`` (``attack_preset``: :mod:`efface.toy.presets`)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AttackConfig]] = AttackConfig
    paper: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    families: ClassVar[frozenset[str]] = frozenset({"sd"})  # model families (efface.models.families) it supports
    family_notes: ClassVar[dict[str, str]] = {}  # family -> why it is not supported (or what differs there)
    # target images made by run() (none given) use the seeds seeds[i] + this: 0, the judged image's own
    # seed (the original model's image of the prompt); TRAIN_SEED_OFFSET for attacks that *train* on the
    # images (concept inversion), so that they are never judged on an image they were fitted to
    target_seed_offset: ClassVar[int] = 0

    def __init__(self, config: C | None = None, *, preset: str | Preset | None = None, **overrides):
        self.config, self.preset = resolve(self.Config, self.name, config, preset, overrides,
                                           self.Config.PRESETS, kind="attack")  # type: ignore[assignment]

    @property
    def variant(self) -> str | None:
        """``"embedding"`` when the attack runs its id-level variant (``replay="embedding"``: images
        from the found ids' embedding, not from the text); None for the attack as published."""
        return "embedding" if getattr(self.config, "replay", "text") == "embedding" else None

    @property
    def report_name(self) -> str:
        """The name its measures are reported under: its own, or ``<name>/<variant>``."""
        return f"{self.name}/{self.variant}" if self.variant else self.name

    def uses_features(self) -> bool:
        """Whether this run needs ``features=`` (an image feature extractor)."""
        return "image_features" in self.needs

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
        if erased_pipe is None:
            raise InputError(f"{self.name} needs the erased pipeline")
        self.check_family(erased_pipe)
        if "original_model" in self.needs:
            self.check_family(original, "the original model")
        if self.uses_features() and features is None:
            raise InputError(f"{self.name} needs {NEEDS['image_features']}")

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

            target_images = generate_many(original, prompts, gen,  # the original model's images
                                          seeds=[s + self.target_seed_offset for s in seeds], progress=progress)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        ctx = AttackContext(erased_pipe, concept.strip(), prompts, seeds, original, target_images,
                            torch.Generator("cpu").manual_seed(seed), gen, progress, judge, features)
        start = time.perf_counter()
        with frozen(erased_pipe, original):
            self._prepare(ctx)
            adversarial = [self._attack(ctx, i)
                           for i in tqdm(range(len(prompts)), desc=self.name, disable=not progress)]
        seconds = time.perf_counter() - start
        images = generate_adversarial(erased_pipe, adversarial, seeds, gen, progress=progress)
        return AttackResult(self.name, asdict(self.config), self.preset, ctx.concept, prompts, seeds, adversarial,
                            images, asdict(gen), seconds, learned=dict(ctx.learned))


@contextmanager
def frozen(*pipes) -> Iterator[None]:
    """Within the block no parameter of ``pipes`` (None skipped) requires a gradient, so attacks
    backpropagate to their own variables only; the flags are restored on exit."""
    params = {id(p): p for pipe in pipes if pipe is not None for _, _, p in named_parameters(pipe)}
    flags = {k: p.requires_grad for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])


def register_attack(name: str):
    """Class decorator: register an :class:`Attack` under ``name`` (sets ``cls.name``)."""

    def decorator(cls):
        cls.name = name
        return ATTACKS.register(name)(cls)

    return decorator
