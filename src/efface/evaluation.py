"""Evaluate a (possibly erased) toy-sd pipeline: effectiveness, utility, cost, provenance.

``evaluate(pipe, "circle", erased=artifact)`` generates seeded images for fixed groups of prompts,
judges them with the toy classifier and returns the ``eval.json`` dictionary:

* ``effectiveness``: fraction of images in which the classifier still finds the erased concept:
  ``target_rate`` (prompts with the erased word itself), ``synonym_rate`` (its other training
  synonyms, "disc"), ``heldout_rate`` (held-out synonyms in held-out templates, words no erasure
  and no UNet training saw). With several concepts: their mean, and ``per_concept``.
* ``utility``: ``retained_accuracy`` (accuracy on the other concepts of the same axis, train words;
  ``per_concept`` and the ``nearest`` ones by text-embedding similarity reported apart),
  ``other_axes_accuracy``, and image drift between base and erased images of those prompts with
  the same seeds: ``frechet_distance`` and ``kid`` in the classifier's feature space,
  ``paired_distance`` (RMS pixel difference of same-prompt, same-seed pairs, in [0, 1]).
* ``robustness``: per attack, filled by the benchmark (``efface bench --attacks``,
  :func:`efface.robustness.robustness_of`); empty here. ``cost``: the erasure's wall time, peak
  memory, UNet evaluations and parameters changed (from the artifact; 0 for the base model).
* ``provenance``: versions, evaluator and its weights' sha256, generation settings, seeds, prompts.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from efface.config import check_bounds
from efface.errors import InputError
from efface.metrics.stats import mean_defined
from efface.metrics.classifier import ConceptRate, ImageDrift
from efface.models.text import encode
from efface.sampling import GenerationConfig, generate_many
from efface.toy.classifier import ToyClassifier
from efface.toy.world import AXES, SYNONYMS, axis_of, prompts_for, synonyms

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """How an evaluation samples and judges (defaults: about 20 s for one concept on toy-sd)."""

    n: int = field(default=32, metadata={"help": "prompts per effectiveness group (target, synonyms, held-out)"})
    n_other: int = field(default=12, metadata={"help": "prompts per other concept of the axis (utility)"})
    steps: int = field(default=25, metadata={"help": "denoising steps"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    batch_size: int = field(default=48, metadata={"help": "images per pipeline call"})
    nearest: int = field(default=2, metadata={"help": "other concepts reported as the nearest (text embedding)"})
    kid_subsets: int = field(default=20, metadata={"help": "KID subsets"})

    def __post_init__(self) -> None:
        check_bounds(self, at_least_one=("n", "n_other", "steps", "batch_size", "kid_subsets"))

    def generation(self) -> GenerationConfig:
        return GenerationConfig(steps=self.steps, guidance=self.guidance, batch_size=self.batch_size)


@dataclass
class Group:
    """Prompts of one kind, with the concept each must show on ``axis`` (None: not judged)."""

    name: str
    axis: str
    concept: str
    prompts: list[str]


def _groups(concepts: list[str], config: EvalConfig, seed: int) -> tuple[list[Group], list[Group]]:
    """Effectiveness groups per erased concept, and utility groups (other concepts of their axes)."""
    effect, utility = [], []
    for c in concepts:
        axis, rng = axis_of(c), random.Random(seed)
        others = tuple(w for w in synonyms(c, "train") if w != c)
        effect.append(Group(f"{c}/target", axis, c, prompts_for(c, "train", rng=rng, n=config.n, words=(c,))))
        if others:
            effect.append(Group(f"{c}/synonyms", axis, c,
                                prompts_for(c, "train", rng=random.Random(seed + 1), n=config.n, words=others)))
        effect.append(Group(f"{c}/heldout", axis, c, prompts_for(c, "heldout", rng=random.Random(seed + 2), n=config.n)))
    kept = [o for axis in dict.fromkeys(axis_of(c) for c in concepts) for o in AXES[axis] if o not in concepts]
    for o in kept:
        utility.append(Group(o, axis_of(o), o, prompts_for(o, "train", rng=random.Random(seed + 3), n=config.n_other)))
    return effect, utility


@functools.cache
def _words_of(axis: str) -> tuple[tuple[str, str], ...]:
    """(word, canonical concept) for every synonym on ``axis``, longest words first."""
    words = {w: c for c, (train, held) in SYNONYMS.items() if axis_of(c) == axis for w in train + held}
    return tuple(sorted(words.items(), key=lambda kv: -len(kv[0])))


def _named(prompt: str, axis: str) -> str | None:
    """The canonical concept a prompt names on ``axis`` (None if it names none)."""
    padded = f" {prompt.replace(',', ' ')} "
    return next((c for w, c in _words_of(axis) if f" {w} " in padded), None)


def _nearest(pipe, concept_list: list[str], candidates: list[str], k: int) -> list[str]:
    if not candidates or k <= 0:
        return []
    emb = encode(pipe, concept_list + candidates).embeds.float().mean(1).cpu()  # mean over the token sequence
    target = torch.nn.functional.normalize(emb[: len(concept_list)], dim=-1).mean(0)
    sims = torch.nn.functional.normalize(emb[len(concept_list):], dim=-1) @ target
    return [candidates[i] for i in sims.argsort(descending=True)[:k].tolist()]


def check_concepts(concepts: str | list[str]) -> list[str]:
    """The concepts as a list; an :class:`InputError` for none or for one the toy world lacks."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts:
        raise InputError("give at least one concept to evaluate, e.g. --concept circle")
    unknown = [c for c in concepts if c not in SYNONYMS]
    if unknown:
        raise InputError(f"the toy evaluation knows no concept {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(SYNONYMS)} (real-model protocols: docs/evaluation.md)")
    if len(set(concepts)) != len(concepts):
        raise InputError(f"a concept is given twice: {concepts}")
    return concepts


def evaluate(pipe, concepts: str | list[str], *, erased=None, config: EvalConfig | None = None, seed: int = 0,
             classifier_factory=ToyClassifier.load, images_out: dict | None = None) -> dict[str, Any]:
    """The ``eval.json`` dictionary for ``pipe`` with ``erased`` applied (None: the base model).

    ``pipe`` is left as it was. ``classifier_factory`` makes the judge (default: the bundled toy
    classifier, handed to the metrics). ``images_out``, if given, receives ``{"base": {...}, "evaluated": {...}}`` image
    lists per group name (for reports)."""
    concepts = check_concepts(concepts)
    config = config or EvalConfig()
    classifier = classifier_factory()
    gen = config.generation()
    effect, utility = _groups(concepts, config, seed)
    start = time.perf_counter()

    def run(groups: list[Group]) -> dict[str, list]:
        prompts = [p for g in groups for p in g.prompts]
        images = generate_many(pipe, prompts, gen, seed=seed) if prompts else []
        out, i = {}, 0
        for g in groups:
            out[g.name] = images[i : i + len(g.prompts)]
            i += len(g.prompts)
        return out

    base_utility = run(utility)
    if erased is not None:
        with erased.applied(pipe):
            evaluated = {**run(effect), **run(utility)}
    else:
        evaluated = {**run(effect), **base_utility}
    if images_out is not None:
        images_out.update(base=base_utility, evaluated=evaluated)

    rates = ConceptRate(lambda: classifier)
    drift = ImageDrift(lambda: classifier, kid_subsets=config.kid_subsets, seed=seed)
    effectiveness = _effectiveness(rates, effect, evaluated, concepts)
    utility_result = _utility(pipe, rates, drift, utility, evaluated, base_utility, concepts, config)
    return {
        "effectiveness": effectiveness,
        "utility": utility_result,
        "robustness": {},
        "cost": erasure_cost(erased, start),
        "provenance": _provenance(pipe, erased, concepts, config, seed, effect + utility, [rates, drift]),
    }


def erasure_cost(erased, start: float) -> dict[str, Any]:
    """The ``cost`` entry: the erasure's wall time, peak memory, UNet evaluations and parameters
    changed (from its manifest, an adapter's parameters included; 0 for the base model), and the
    evaluation's seconds since ``start``."""
    manifest = erased.manifest if erased is not None else {}
    adapter = manifest.get("adapter") or {}
    return {
        "seconds": manifest.get("seconds", 0.0),
        "peak_memory_mb": manifest.get("peak_memory_mb", 0.0),
        "unet_evaluations": manifest.get("unet_evaluations", 0),
        "parameters_changed": manifest.get("parameters_changed", 0) + adapter.get("parameters", 0),
        "eval_seconds": round(time.perf_counter() - start, 2),
    }


def run_provenance(pipe, erased) -> dict[str, Any]:
    """Versions, the model evaluated and the erasure applied (method, preset, config, request, seed)."""
    from efface import __version__

    return {
        "efface_version": __version__,
        "torch_version": torch.__version__,
        "model": getattr(pipe, "efface_source", type(pipe).__name__),
        "erased": None if erased is None else {k: erased.manifest.get(k) for k in ("method", "preset", "config", "request", "seed")},
    }


def _effectiveness(rates: ConceptRate, groups: list[Group], images: dict, concepts: list[str]) -> dict[str, Any]:
    rates.reset()
    for g in groups:
        rates.update(images[g.name], axis=g.axis, wanted=[g.concept] * len(g.prompts), group=g.name)
    found = rates.compute()
    keys = {"target_rate": "target", "synonym_rate": "synonyms", "heldout_rate": "heldout"}
    per = {c: {k: found.get(f"{c}/{kind}") for k, kind in keys.items()} for c in concepts}
    return {**{k: mean_defined([r[k] for r in per.values()]) for k in keys}, "per_concept": per}


def _utility(pipe, rates: ConceptRate, drift: ImageDrift, groups: list[Group], images: dict, base: dict,
             concepts: list[str], config: EvalConfig) -> dict[str, Any]:
    rates.reset(), drift.reset()
    for g in groups:
        predicted = rates.predict(images[g.name])
        rates.update(images[g.name], axis=g.axis, wanted=[g.concept] * len(g.prompts), group=g.name,
                     predicted=predicted)
        for axis in AXES:
            if axis != g.axis:
                rates.update(images[g.name], axis=axis, wanted=[_named(p, axis) for p in g.prompts],
                             group=f"axis:{axis}", predicted=predicted)
        drift.update(images[g.name], reference=base[g.name])
    found = rates.compute()
    per = {g.concept: found[g.name] for g in groups}
    nearest = _nearest(pipe, concepts, list(per), config.nearest)
    return {
        "retained_accuracy": mean_defined(list(per.values())),
        "per_concept": per,
        "nearest": {c: per[c] for c in nearest},
        "nearest_accuracy": mean_defined([per[c] for c in nearest]),
        "other_axes_accuracy": {k.removeprefix("axis:"): v for k, v in found.items()
                                if k.startswith("axis:") and v is not None},
        **drift.compute(),
    }


def _provenance(pipe, erased, concepts, config, seed, groups: list[Group], metrics) -> dict[str, Any]:
    return {
        **run_provenance(pipe, erased),
        "concepts": concepts,
        "evaluator": metrics[0].provenance()["evaluator"],
        "metrics": [m.provenance() for m in metrics],
        "config": asdict(config),
        "seed": seed,
        "seeds": "image i of each group uses seed + i",
        "prompts": {g.name: g.prompts for g in groups},
    }
