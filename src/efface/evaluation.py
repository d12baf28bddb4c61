"""Evaluate a (possibly erased) pipeline on a suite: effectiveness, utility, intervals, cost, provenance.

``evaluate(pipe, artifact, suite)`` generates the suite's prompt groups (each prompt with its own
seed; once per evaluation seed with ``EvalConfig.seeds``), has the suite judge them and returns the
``eval.json`` dictionary. A suite (:mod:`efface.suites`) is the toy world judged by the toy
classifier (``evaluate(pipe, artifact, "circle")``: :class:`~efface.suites.toy.ToySuite`) or a
real-model protocol (nudity, objects, artists, celebrities) with its own judge; the keys are the same:

* ``effectiveness``: the suite's concept rates (``target_rate`` first: the fraction of images of the
  erased concept's prompts in which the judge still finds it);
* ``utility``: what is kept (``retained_accuracy`` on the other concepts, drift against the base
  model's images of the same prompts and seeds, COCO scores where the suite has them);
* ``intervals``: per headline number, its mean and 95 % bootstrap interval over prompts and seeds;
* ``robustness``: per attack, filled by the benchmark (``efface bench --attacks``,
  :func:`efface.robustness.robustness_of`); empty here. ``cost``: the erasure's wall time, peak
  memory, UNet evaluations and parameters changed (from the artifact; 0 for the base model);
* ``provenance``: versions, evaluators and their weights' sha256, generation settings, seeds, prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from efface.config import check_bounds
from efface.metrics.stats import mean_defined
from efface.sampling import GenerationConfig

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
    seeds: str = field(default="", metadata={
        "help": "evaluation seeds, e.g. 0,1,2: every prompt generated once per seed (a prompt file's own seeds "
                "offset by each), results with 95 percent bootstrap intervals over prompts and seeds (default: once)"})

    def __post_init__(self) -> None:
        check_bounds(self, at_least_one=("n", "n_other", "steps", "batch_size", "kid_subsets"))
        from efface.suites.base import seed_offsets

        seed_offsets(self.seeds)  # a bad list fails here, before any model loads

    def generation(self) -> GenerationConfig:
        return GenerationConfig(steps=self.steps, guidance=self.guidance, batch_size=self.batch_size)


def check_concepts(concepts: str | list[str]) -> list[str]:
    """The toy concepts as a list (:func:`efface.suites.toy.check_concepts`)."""
    from efface.suites.toy import check_concepts as check

    return check(concepts)


def as_suite(suite):
    """A :class:`~efface.suites.base.Suite` as is; a toy concept or list of them as their toy suite."""
    from efface.suites.base import Suite
    from efface.suites.toy import ToySuite

    return suite if isinstance(suite, Suite) else ToySuite(suite)


def evaluate(pipe, erased=None, suite="circle", *, config: EvalConfig | None = None, seed: int = 0,
             images_out: dict | None = None, base_cache: dict | None = None, shard=None) -> dict[str, Any]:
    """The ``eval.json`` dictionary of ``pipe`` with ``erased`` applied (None: the base model) on
    ``suite`` (a :class:`~efface.suites.base.Suite`, or toy concepts: their toy suite).

    ``pipe`` is left as it was. Every prompt is generated once per evaluation seed (``config.seeds``,
    else once); ``intervals`` holds the 95 % bootstrap interval of each headline number over prompts
    and seeds. ``base_cache``: the base model's images of the reference groups, shared by the cells of
    a run (filled here when missing). ``images_out``, if given, receives ``{"base": {...},
    "evaluated": {...}}`` image lists per group name (for reports). ``shard``: this process's share
    of the images (:mod:`efface.benchmark.distributed`)."""
    from efface.suites.base import expand, generate_groups, seed_offsets

    suite = as_suite(suite)
    config = config or EvalConfig()
    offsets = seed_offsets(config.seeds)
    gen = config.generation()
    groups = expand(suite.groups(config, seed), offsets, seed)
    effect = [g for g in groups if not g.reference]
    reference = [g for g in groups if g.reference]
    start = time.perf_counter()
    base = _base_images(pipe, reference, gen, base_cache, shard)
    if erased is not None:
        with erased.applied(pipe):
            evaluated = {**generate_groups(pipe, effect, gen, shard=shard),
                         **generate_groups(pipe, reference, gen, shard=shard)}
    else:
        evaluated = {**generate_groups(pipe, effect, gen, shard=shard), **base}
    if images_out is not None:
        images_out.update(base=base, evaluated=evaluated)
    if shard is not None and not shard.is_main:
        return {}  # scored once, by the main process
    effectiveness, utility, samples = suite.score(pipe, evaluated, base, groups, config, seed)
    n_seeds = len(offsets or [seed])
    return {
        "effectiveness": effectiveness,
        "utility": utility,
        "robustness": {},
        "cost": erasure_cost(erased, start),
        "intervals": intervals(samples, n_seeds, seed=seed),
        "provenance": _provenance(pipe, erased, suite, config, seed, offsets, groups),
    }


def _base_images(pipe, groups, gen, cache: dict | None, shard) -> dict[str, list]:
    """The base model's images of ``groups``, from ``cache`` where it has them (keyed by the prompts)."""
    import json

    from efface.suites.base import generate_groups

    cache = {} if cache is None else cache
    keys = {g.name: json.dumps([[p.prompt, p.seed, p.guidance] for p in g.prompts]) for g in groups}
    missing = [g for g in groups if keys[g.name] not in cache]
    for name, images in generate_groups(pipe, missing, gen, shard=shard).items():
        cache[keys[name]] = images
    return {g.name: cache[keys[g.name]] for g in groups}


def intervals(samples: dict, n_seeds: int, *, seed: int = 0) -> dict[str, Any]:
    """Per headline metric of ``samples``: ``{"mean", "low", "high", "n_images", "seeds"}``, the
    95 % bootstrap interval over prompts and seeds (:func:`efface.metrics.stats.bootstrap_interval`)."""
    from efface.metrics.stats import bootstrap_interval

    out = {}
    for metric, groups in samples.items():
        groups = {g: v for g, v in groups.items() if len(v)}
        if not groups:
            continue
        bounds = bootstrap_interval(groups, n_seeds, seed=seed)
        out[metric] = {"mean": mean_defined([sum(v) / len(v) for v in groups.values()]),
                       "low": bounds[0], "high": bounds[1],
                       "n_images": sum(len(v) for v in groups.values()), "seeds": n_seeds}
    return out


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


def _provenance(pipe, erased, suite, config, seed, offsets, groups) -> dict[str, Any]:
    metrics = suite.metrics()
    return {
        **run_provenance(pipe, erased),
        **suite.provenance(),
        "metrics": [m.provenance() for m in metrics],
        "config": asdict(config),
        "seed": seed,
        "seeds": ("each prompt's own seed where its source fixes one, else seed + i (i: its place in the group)"
                  if offsets is None else f"once per offset in {offsets}: the prompt's own seed + offset, "
                  "else offset + i"),
        "prompts": {g.name: [p.prompt for p in g.prompts] for g in groups} if offsets is None else
                   {g.name: [p.prompt for p in g.prompts[: len(g.prompts) // len(offsets)]] for g in groups},
        "prompt_seeds": {g.name: [p.seed for p in g.prompts] for g in groups},
    }
