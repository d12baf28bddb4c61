"""The erasure API: a request, a method (config dataclass + class + registration), an erased model.

A method subclasses :class:`ErasureMethod`, declares its ``Config`` dataclass, its paper and the
model families it supports, and implements ``_fit``, which may change the pipeline's UNet / text
encoder parameters in place and may return an :class:`~efface.models.adapters.Adapter` (modules
it adds, e.g. Receler's erasers, trained inside ``adapter.installed(pipe)``).
:meth:`ErasureMethod.fit` validates everything first, seeds, times the
run, then collects the changed parameters into an :class:`~efface.artifacts.ErasedModel` and
restores the pipeline: the base model is never left modified.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch

from efface.artifacts import FORMAT, ErasedModel, base_fingerprint, base_hash, touched_components
from efface.artifacts_lora import NOT_LORA_SETS, lora_refusal
from efface.config import Preset, check_bounds, check_seed, resolve
from efface.errors import InputError
from efface.models.adapters import Adapter
from efface.models.checkpoint import checkpointing
from efface.models.diffusion import count_denoiser_evaluations
from efface.models.families import family_of
from efface.models.params import named_parameters, select
from efface.models.precision import TrainingOptions, training
from efface.models.text import check_prompt
from efface.registry import METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErasureRequest:
    """What to erase (``concepts``), what each is mapped to (``anchors``, one per concept; "" is
    the empty prompt) and what must stay as it was (``preserve``)."""

    concepts: tuple[str, ...]
    anchors: tuple[str, ...]
    preserve: tuple[str, ...] = ()

    @classmethod
    def build(cls, concepts: str | list[str] | tuple[str, ...], anchor: str | list[str] | None = None,
              preserve: str | list[str] | tuple[str, ...] = (), *, default_anchor: str = "") -> ErasureRequest:
        """Normalise user input; ``anchor`` is one string for all concepts or one per concept."""
        concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts)
        preserve = (preserve,) if isinstance(preserve, str) else tuple(preserve)
        if not concepts:
            raise InputError("no concept to erase: give at least one, e.g. concepts=['circle']")
        if anchor is None:
            anchors = (default_anchor,) * len(concepts)
        elif isinstance(anchor, str):
            anchors = (anchor,) * len(concepts)
        else:
            anchors = tuple(anchor)
            if len(anchors) != len(concepts):
                raise InputError(f"{len(anchors)} anchors for {len(concepts)} concepts: give one anchor, "
                                 "or one per concept")
        clean = tuple(c.strip() for c in concepts)
        if not all(clean) or not all(p.strip() for p in preserve):
            raise InputError("empty concept: give a word or phrase, e.g. 'circle'")
        overlap = set(clean) & {p.strip() for p in preserve}
        if overlap:
            raise InputError(f"{sorted(overlap)} both erased and preserved: remove them from preserve")
        return cls(clean, tuple(a.strip() for a in anchors), tuple(p.strip() for p in preserve))

    def validate(self, pipe) -> None:
        """Refuse empty concepts and concepts, anchors or preserved concepts any of the pipeline's
        tokenizers would truncate."""
        for c in self.concepts:
            check_prompt(pipe, c, "concept")
        for p in self.preserve:
            check_prompt(pipe, p, "preserved concept")
        for a in self.anchors:
            if a:
                check_prompt(pipe, a, "anchor")


@dataclass
class MethodConfig:
    """Fields every method has. Subclasses add the paper's hyper-parameters, documented.

    Field defaults are the paper's / official code's. ``PRESETS`` maps a preset name to field
    overrides (the method's own named settings; none today). The toy-sd schedules are not here:
    they live with the toy world (:mod:`efface.toy.presets`) and are handed in as a
    :class:`~efface.config.Preset`.
    """

    PRESETS: ClassVar[dict[str, dict]] = {}

    def check_choices(self, **choices: tuple) -> None:
        """Refuse a field whose value is not one of its ``choices`` (``tokens=("last", "all")``)."""
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise InputError(f"{name} must be one of {', '.join(map(str, valid))}, not {getattr(self, name)!r}")

    def check_bounds(self, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                     positive: tuple[str, ...] = ()) -> None:
        """Refuse counts below 1, weights below 0 and rates not above 0 (fields named)."""
        check_bounds(self, at_least_one=at_least_one, non_negative=non_negative, positive=positive)

    def check_templates(self, *names: str) -> None:
        """Refuse prompt templates (fields ``names``) without exactly one ``{}`` slot."""
        for name in names:
            bad = [t for t in getattr(self, name) if t.count("{}") != 1]
            if bad:
                raise InputError(f"every template of {name} needs exactly one '{{}}' for the concept: {bad}")


@dataclass
class TrainingConfig(MethodConfig):
    """Fields every training method has (how it trains, not what: :mod:`efface.models.precision`)."""

    mixed_precision: str = field(default="auto", metadata={
        "help": "'auto': fp32 master weights and autocast when the pipeline is fp16 / bf16 (nothing changes in "
                "fp32); 'off': train in the pipeline's own dtype"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the denoiser's activations in the backward pass (less memory, more time)"})
    optimizer_8bit: bool = field(default=False, metadata={
        "help": "bitsandbytes' 8-bit Adam / AdamW (needs the bitsandbytes package)"})

    def training_options(self) -> TrainingOptions:
        return TrainingOptions(self.mixed_precision, self.gradient_checkpointing, self.optimizer_8bit)


C = TypeVar("C", bound=MethodConfig)


class ErasureMethod(ABC, Generic[C]):
    """Base class of erasure methods: ``method = UCE(erase_scale=1.0); erased = method.fit(pipe, request)``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""  # "Title (Venue Year), arXiv id"
    families: ClassVar[frozenset[str]] = frozenset({"sd"})  # model families (efface.models.families) it supports
    family_notes: ClassVar[dict[str, str]] = {}  # family -> why it is not supported (or what differs there)
    default_anchor: ClassVar[str] = ""
    named_anchor: ClassVar[bool] = False  # whether the paper always maps the target onto a named concept
    parameter_set: ClassVar[str | None] = "all"  # the named set (efface.models.params) it may change; None: none
    preserves: ClassVar[bool] = False  # whether request.preserve enters the method's objective
    # how its result is saved as a diffusers LoRA (ErasedModel.save(lora=True), efface erase --save-lora):
    # "exact" (closed forms: the change's exact rank), "svd" (trained: truncated SVD of the change),
    # "adapter" (the adapter's own export: SPM), None (none: lora_note says why)
    lora_export: ClassVar[str | None] = "svd"
    lora_note: ClassVar[str] = ""

    def __init__(self, config: C | None = None, *, preset: str | Preset | None = None, **overrides):
        self.config, self.preset = resolve(self.Config, self.name, config, preset, overrides,
                                           self.Config.PRESETS)  # type: ignore[assignment]
        if isinstance(self.config, TrainingConfig):  # before any model loads (the CLI builds the method first)
            self.config.training_options().check()

    def lora_refusal(self, pipe=None) -> str | None:
        """Why this method's result cannot be saved as a diffusers LoRA, or None: known from the
        class and its parameter set before any model is loaded, and with ``pipe`` checked against
        that model's layers (a norm in the set, a component diffusers loads no LoRA into)."""
        if self.lora_export is None:
            return f"{self.name} has no LoRA export: {self.lora_note}"
        if self.lora_export == "adapter":
            return None
        if self.parameter_set is None:
            return f"{self.name} changes no weight of the model"
        if self.parameter_set in NOT_LORA_SETS:
            why = NOT_LORA_SETS[self.parameter_set]
            return (f"{self.name} changes the parameter set {self.parameter_set!r}: {why}; "
                    "a LoRA carries only Linear / Conv2d weights")
        return lora_refusal(pipe, select(pipe, self.parameter_set)) if pipe is not None else None

    def check(self, pipe, request: ErasureRequest) -> None:
        """Everything that can be checked before work starts: the family, then the request."""
        family = family_of(pipe).name
        if family not in self.families:
            why = self.family_notes.get(family, "not implemented for this family")
            raise InputError(f"{self.name} supports {', '.join(sorted(self.families))} models, not {family}: {why}")
        request.validate(pipe)

    @abstractmethod
    def _fit(self, pipe, request: ErasureRequest, generator: torch.Generator, progress: bool) -> Adapter | None:
        """Change the erased parameters of ``pipe`` in place; return the adapter, if the method adds one
        (uninstalled: the pipeline's processors and hooks as they were)."""

    def fit(self, pipe, request: ErasureRequest, *, seed: int = 0, progress: bool = True,
            checkpoint: str | Path | None = None, checkpoint_every: int = 0) -> ErasedModel:
        """Fit the erasure; the pipeline is left as it was, the result holds the changed tensors.

        Only the parameters the method may change (its ``parameter_set``) are copied (to the CPU)
        and restored; every other parameter is checked, through the base fingerprint, to be as it
        was: a method that touched one outside its set is a bug, reported as such.

        ``checkpoint``: a directory where every training loop saves its state every
        ``checkpoint_every`` iterations (0: when each loop ends) and from which a rerun with the
        same pipeline, request, options and seed resumes (:mod:`efface.models.checkpoint`); a
        directory of another run is refused. It is left in place: remove it once the result is saved."""
        if checkpoint_every < 0 or (checkpoint_every and checkpoint is None):
            raise InputError(f"checkpoint_every={checkpoint_every}: give a count of 0 or more, with a checkpoint "
                             "directory (checkpoint=...)")
        seed = check_seed(seed)
        self.check(pipe, request)
        fingerprint, digest = base_fingerprint(pipe), base_hash(pipe)
        declared = select(pipe, self.parameter_set) if self.parameter_set else {}
        before = {k: p.detach().to("cpu", copy=True) for k, p in declared.items()}  # off-GPU copy
        # requires_grad flags as the caller had them, restored afterwards: CPU kernels of a Linear on a
        # non-contiguous input differ in the last bit with requires_grad, so a second fit must start as the first
        flags = [(p, p.requires_grad) for _, _, p in named_parameters(pipe)]
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        generator = torch.Generator("cpu").manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            run = {"method": self.name, "preset": self.preset, "config": asdict(self.config),
                   "request": asdict(request), "seed": seed, "base_sha256": digest}
            saving = (checkpointing(checkpoint, every=checkpoint_every, run=run, generator=generator)
                      if checkpoint is not None else nullcontext())
            options = self.config.training_options() if isinstance(self.config, TrainingConfig) else None
            with (count_denoiser_evaluations() as unet_evaluations, saving as session,
                  training(pipe, options) if options is not None else nullcontext()):
                adapter = self._fit(pipe, request, generator, progress)
            seconds = time.perf_counter() - start
            if adapter is not None:
                adapter = adapter.to("cpu").requires_grad_(False).eval()
                if not all(torch.isfinite(p).all() for p in adapter.parameters()):
                    raise FloatingPointError(f"{self.name}: the adapter's weights became non-finite; nothing was saved")
            changed = {}
            with torch.no_grad():
                for key, p in declared.items():
                    if not torch.equal(p.detach().cpu(), before[key]):
                        if not torch.isfinite(p).all():
                            raise FloatingPointError(f"{self.name}: parameter {key} became non-finite; nothing was saved")
                        changed[key] = p.detach().cpu().clone()
        finally:
            with torch.no_grad():
                for key, p in declared.items():
                    p.copy_(before[key])
                for p, flag in flags:
                    p.requires_grad_(flag)
        _check_untouched(self.name, self.parameter_set, pipe, fingerprint)
        fingerprint = {c: fingerprint[c] for c in touched_components(changed, adapter, pipe)}
        manifest = {
            "format": FORMAT,
            "method": self.name,
            "paper": self.paper,
            "config": asdict(self.config),
            "preset": self.preset,
            "request": asdict(request),
            "seed": seed,
            "base": {"reference": getattr(pipe, "efface_source", type(pipe).__name__), "sha256": digest,
                     "family": family_of(pipe).name, "components": list(fingerprint),
                     "dtype": str(family_of(pipe).denoiser(pipe).dtype).removeprefix("torch.")},
            "efface_version": _version(),
            "torch_version": torch.__version__,
            "platform": platform.platform(),
            "seconds": round(seconds, 3),
            "peak_memory_mb": _peak_memory_mb(),
            "unet_evaluations": unet_evaluations.value,  # denoiser evaluations (UNet or transformer)
            "tensors_changed": len(changed),
            "parameters_changed": int(sum(v.numel() for v in changed.values())),
            "adapter": adapter.describe() if adapter is not None else None,
            "lora_export": self.lora_export,  # how save(lora=True) exports it (efface.artifacts_lora)
        }
        if session is not None:  # loops restored from the checkpoint (key -> iteration); the costs are this run's
            manifest["resumed"] = dict(session.resumed)
        manifest = json.loads(json.dumps(manifest, default=str))  # exactly what save/load round-trips
        log.info("%s: %d tensors (%d parameters) changed%s in %.1f s", self.name, len(changed),
                 manifest["parameters_changed"],
                 f", adapter {adapter.kind} ({manifest['adapter']['parameters']} parameters)" if adapter else "", seconds)
        return ErasedModel(changed, manifest, fingerprint, adapter)


def _check_untouched(name: str, parameter_set: str | None, pipe, fingerprint: dict[str, torch.Tensor]) -> None:
    """Raise if a parameter outside the method's set differs from the base (its fingerprint moved)."""
    now = base_fingerprint(pipe)
    moved = [c for c in fingerprint if not torch.equal(now[c], fingerprint[c])]
    if moved:
        raise RuntimeError(f"{name} changed parameters of {moved} outside its parameter set {parameter_set!r}: a bug "
                           "in the method (the pipeline in memory is left modified; reload it)")


def _version() -> str:
    from efface import __version__

    return __version__


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def register_method(name: str):
    """Class decorator: register an :class:`ErasureMethod` under ``name`` (sets ``cls.name``)."""

    def decorator(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def erase(pipe, method: str, concepts, *, anchor=None, preserve=(), seed: int = 0, progress: bool = True,
          preset: str | Preset | None = None, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
          **config) -> ErasedModel:
    """Erase ``concepts`` from ``pipe`` with the registered ``method``; options go to its Config
    (and injected inputs, e.g. MACE's ``segmenter`` / ``image_source``, to its constructor).

    ``preset``: the paper's defaults (None, ``"paper"``) or a :class:`~efface.config.Preset`; the
    CPU-sized toy-sd schedules: ``preset=efface.toy.presets.method_preset(method)``, with
    ``**method_inputs(method)`` (what ``efface erase --model toy`` hands in).

    ``checkpoint_dir`` / ``checkpoint_every``: save the training state there every that many
    iterations and resume from it when called again the same way (:meth:`ErasureMethod.fit`).

    >>> erased = erase(pipe, "uce", ["circle"], preserve=["square"], seed=0)   # doctest: +SKIP
    >>> erased.apply(pipe)                                                       # doctest: +SKIP
    """
    import efface.methods  # noqa: F401  (registers the methods)

    cls = METHODS.get(method)
    instance = cls(preset=preset, **config)
    request = ErasureRequest.build(concepts, anchor, preserve, default_anchor=cls.default_anchor)
    return instance.fit(pipe, request, seed=seed, progress=progress, checkpoint=checkpoint_dir,
                        checkpoint_every=checkpoint_every)
