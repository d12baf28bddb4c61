"""The benchmark on a real model: ``efface bench --protocol nudity --model <local SD>``.

A bench protocol names what is erased, which prompt set judges it and with which evaluator:

* ``nudity``: erase "nudity"; generate every prompt of an I2P-style file (I2P's ``sexual``
  category by default; UnlearnDiffAtk's ``nudity.csv`` or a Ring-A-Bell file with
  ``--prompt-set``) with the file's own seed and guidance scale; the effectiveness is NudeNet's
  nudity rate (:class:`efface.metrics.nudity.NudityRate`), with its per-class counts.

Utility, when ``--coco`` gives a captions file: images of ``--n-coco`` captions, base and erased
with the same seeds, compared pair by pair (RMS pixel distance, no weights needed) and, with
``--clip-model``, scored by CLIP against their captions. Everything a protocol needs (the model,
the prompt file, NudeNet, CLIP) is checked by :func:`prepare` before any image is generated: a
missing piece is an :class:`~efface.errors.InputError` that says what to provide.

Cells are cached like the toy grid's (``cells/<method>__<concept>.json``, keyed by everything that
determines them), so an interrupted run resumes; ``table.md`` and ``report.html`` follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from efface.benchmark.grid import (BenchConfig, cached_cell, cell_key, save_samples, write_cell, write_json,
                                   write_table_and_report)
from efface.errors import InputError
from efface.evaluation import EvalConfig, erasure_cost, run_provenance
from efface.metrics.stats import mean_defined, paired_rms
from efface.protocols.base import EvalPrompt, load_protocol
from efface.sampling import GenerationConfig, generate_many
from efface.toy.presets import default_preset, method_setup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchProtocol:
    """What a real-model bench protocol erases, with which prompts, judged how."""

    concepts: tuple[str, ...]
    prompt_sets: dict[str, dict[str, Any]]  # protocols.PROTOCOLS name -> loader options; the first is the default
    judge: str  # what judges the images (a registered metric)
    about: str
    blur_samples: bool = False  # blur the judged images in the report's sample grids (nudity)


BENCH_PROTOCOLS: dict[str, BenchProtocol] = {
    "nudity": BenchProtocol(
        concepts=("nudity",),
        prompt_sets={"i2p": {"categories": ["sexual"]}, "unlearndiffatk-nudity": {}, "ring-a-bell": {}},
        judge="nudity",
        about="erase 'nudity'; NudeNet's nudity rate on I2P-style prompts with their own seeds and guidance",
        blur_samples=True,
    ),
}


@dataclass
class ProtocolConfig:
    """``efface bench --protocol``: a real-model protocol instead of the toy grid."""

    protocol: str = field(default="", metadata={"help": "real-model protocol instead of the toy grid: "
                                                         + ", ".join(BENCH_PROTOCOLS)})
    prompts: str = field(default="", metadata={"help": "the protocol's prompt file (e.g. i2p_benchmark.csv)"})
    prompt_set: str = field(default="", metadata={"help": "format of --prompts (nudity: i2p, "
                                                           "unlearndiffatk-nudity, ring-a-bell; default i2p)"})
    limit: int = field(default=0, metadata={"help": "use the first N prompts only (0: all)"})
    threshold: float | None = field(default=None, metadata={
        "help": "the judge's threshold (NudeNet score above which a body part counts; default 0.6, RECE's; "
                "UnlearnDiffAtk's table: 0.45); the toy grid's judge has none"})
    nudenet_model: str = field(default="", metadata={"help": "ONNX detector file (default: NudeNet's bundled one)"})
    coco: str = field(default="", metadata={"help": "COCO captions file for utility (captions_val2014.json "
                                                     "or a CSV with a prompt column); none: no utility"})
    n_coco: int = field(default=100, metadata={"help": "COCO captions used for utility"})
    clip_model: str = field(default="", metadata={"help": "local CLIP directory: adds the CLIP score on COCO"})

    def __post_init__(self) -> None:
        for name in ("limit", "n_coco"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, not {getattr(self, name)}")

    def spec(self) -> BenchProtocol:
        if self.protocol not in BENCH_PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; valid: {', '.join(BENCH_PROTOCOLS)} "
                             "(without --protocol, efface bench runs the toy grid)")
        return BENCH_PROTOCOLS[self.protocol]


@dataclass
class Prepared:
    """A protocol ready to run: its prompts, its judge and utility evaluators."""

    config: ProtocolConfig
    spec: BenchProtocol
    prompt_set: str
    prompts: list[EvalPrompt]
    coco: list[EvalPrompt]
    judge: Any
    clip: Any = None


def check_model(model: str) -> None:
    """A protocol needs a real model on this machine: refuse toy-sd and paths that do not exist."""
    if model == "toy":
        raise InputError("--protocol needs a real Stable Diffusion model: pass --model with a local diffusers "
                         "directory (holding model_index.json) or a single-file .safetensors checkpoint; "
                         "efface never downloads weights (for toy-sd, run efface bench without --protocol)")
    if "/" not in model.strip("./") and not Path(model).exists():
        return  # a hub id: load_pipeline looks in the local cache and says what to do if it is not there
    if not Path(model).exists():
        raise InputError(f"--model {model} does not exist; pass the local directory of a diffusers Stable "
                         "Diffusion pipeline (with model_index.json) or a .safetensors checkpoint")


def prepare(config: ProtocolConfig, *, judge_factory: Callable[[ProtocolConfig], Any] | None = None,
            clip_factory: Callable[[ProtocolConfig], Any] | None = None) -> Prepared:
    """Load the prompts and build the evaluators; every missing file or package fails here, before
    any model is loaded. ``judge_factory`` / ``clip_factory`` replace the default evaluators (tests)."""
    spec = config.spec()
    prompt_set = config.prompt_set or next(iter(spec.prompt_sets))
    if prompt_set not in spec.prompt_sets:
        raise InputError(f"--prompt-set {prompt_set!r} is not one of {config.protocol}'s: {', '.join(spec.prompt_sets)}")
    options = dict(spec.prompt_sets[prompt_set])
    if config.limit:
        options["limit"] = config.limit
    try:
        prompts = load_protocol(prompt_set, config.prompts or None, **options)
    except InputError as e:
        raise InputError(f"--protocol {config.protocol} needs --prompts, your {prompt_set} prompt file: {e}") from e
    if not prompts:
        raise InputError(f"{config.prompts} gave no {prompt_set} prompts; check the file and its filters")
    coco = load_protocol("coco", config.coco, n=config.n_coco) if config.coco else []
    judge = (judge_factory or _nudenet)(config)
    clip = None
    if config.clip_model:
        clip = (clip_factory or _clip)(config)
    return Prepared(config, spec, prompt_set, prompts, coco, judge, clip)


def _nudenet(config: ProtocolConfig, **factory):
    from efface.judges import NUDITY_THRESHOLD
    from efface.metrics.nudity import NudityConfig, NudityRate

    threshold = NUDITY_THRESHOLD if config.threshold is None else config.threshold
    return NudityRate(NudityConfig(threshold=threshold, model_path=config.nudenet_model or None), **factory)


def _clip(config: ProtocolConfig):
    from efface.metrics.image_quality import ClipScore, ClipScoreConfig

    return ClipScore(ClipScoreConfig(model=config.clip_model))


def generate_prompts(pipe, prompts: list[EvalPrompt], gen: GenerationConfig, seed: int) -> list:
    """One image per prompt, with the prompt's own seed and guidance where its source fixes them
    (else ``seed + i`` and ``gen.guidance``); returned in prompt order."""
    images: list = [None] * len(prompts)
    by_guidance: dict[float, list[int]] = {}
    for i, p in enumerate(prompts):
        by_guidance.setdefault(p.guidance if p.guidance is not None else gen.guidance, []).append(i)
    for guidance, idx in by_guidance.items():
        seeds = [prompts[i].seed if prompts[i].seed is not None else seed + i for i in idx]
        out = generate_many(pipe, [prompts[i].prompt for i in idx], GenerationConfig(
            steps=gen.steps, guidance=guidance, batch_size=gen.batch_size, height=gen.height, width=gen.width),
            seeds=seeds)
        for i, im in zip(idx, out):
            images[i] = im
    return images


def evaluate_protocol(pipe, prepared: Prepared, *, erased=None, config: EvalConfig | None = None, seed: int = 0,
                      base_coco: list | None = None, images_out: dict | None = None) -> dict[str, Any]:
    """The eval dictionary of ``pipe`` (with ``erased`` applied) on the prepared protocol; the
    same top-level keys as the toy :func:`efface.evaluation.evaluate`. ``base_coco``: the base
    model's COCO images, for the paired distance (generated here when missing)."""
    config = config or EvalConfig()
    gen = config.generation()
    start = time.perf_counter()
    if base_coco is None and prepared.coco:
        base_coco = generate_prompts(pipe, prepared.coco, gen, seed)
    with erased.applied(pipe) if erased is not None else nullcontext():
        images = generate_prompts(pipe, prepared.prompts, gen, seed)
        coco = generate_prompts(pipe, prepared.coco, gen, seed) if erased is not None else base_coco or []
    concept = prepared.spec.concepts[0]
    if images_out is not None:
        images_out.update(evaluated={f"{concept}_target": images, "coco": coco}, base={"coco": base_coco or []})
    judge = prepared.judge
    judge.reset()
    judge.update(images)
    found = judge.compute()
    utility: dict[str, Any] = {"retained_accuracy": None, "other_axes_accuracy": {}, "frechet_distance": None,
                               "paired_distance": mean_defined([paired_rms(a, b) for a, b in zip(coco, base_coco or [])]),
                               "clip_score": None}
    if prepared.clip is not None and coco:
        prepared.clip.reset()
        prepared.clip.update(coco, prompts=[p.prompt for p in prepared.coco])
        utility["clip_score"] = prepared.clip.compute()
    return {
        "effectiveness": {"target_rate": found["rate"], "synonym_rate": None, "heldout_rate": None,
                          prepared.spec.judge: found, "per_prompt": judge.per_image()},
        "utility": utility,
        "robustness": {},
        "cost": erasure_cost(erased, start),
        "provenance": _provenance(pipe, prepared, erased, config, seed),
    }


def _provenance(pipe, prepared: Prepared, erased, config: EvalConfig, seed: int) -> dict[str, Any]:
    metrics = [prepared.judge] + ([prepared.clip] if prepared.clip is not None else [])
    return {
        **run_provenance(pipe, erased),
        "protocol": prepared.config.protocol, "prompt_set": prepared.prompt_set, "prompt_file": prepared.config.prompts,
        "metrics": [m.provenance() for m in metrics], "config": asdict(config), "seed": seed,
        "seeds": "each prompt's own seed and guidance where its file gives them, else seed + i and the config's",
        "prompts": [asdict(p) for p in prepared.prompts],
        "coco_prompts": [asdict(p) for p in prepared.coco],
    }


def blurred(images: list) -> list:
    """Images blurred beyond recognition of detail (the report's grids of a nudity protocol)."""
    from PIL import ImageFilter

    return [im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 24)) for im in images]


def run_protocol_bench(pipe, out: str | Path, prepared: Prepared, config: BenchConfig | None = None,
                       eval_config: EvalConfig | None = None, *, seed: int = 0, progress: bool = True,
                       options: dict[str, dict] | None = None, spec: dict | None = None) -> tuple[str, Path]:
    """Base model and every method of ``config`` on the protocol; writes ``cells/``, ``results.json``,
    ``table.md`` and ``report.html`` under ``out``; returns the table and the report's path."""
    from efface.benchmark.table import (PROTOCOL_COLUMNS, PROTOCOL_LEGEND, markdown, protocol_rows, robustness_rows,
                                        robustness_section)

    options = options or {}
    config, eval_config, out = config or BenchConfig(), eval_config or EvalConfig(), Path(out)
    methods, concepts = config.method_list(), list(prepared.spec.concepts)
    preset = config.preset or default_preset(pipe)
    for method in methods:
        method_setup(method, pipe, preset)  # a preset the model cannot take ('toy') fails before any cell
    base_ref = str(getattr(pipe, "efface_source", type(pipe).__name__))
    what = {"protocol": asdict(prepared.config), "prompts": [asdict(p) for p in prepared.prompts],
            "coco": [asdict(p) for p in prepared.coco], "eval": asdict(eval_config), "seed": seed, "model": base_ref}
    base_coco: list | None = None  # the base model's COCO images, made once, when a cell first needs them
    cells = []
    for method in tqdm([None, *methods], desc="bench cells", disable=not progress):
        name = f"{method or 'base'}__{concepts[0]}"
        attacks = config.attack_list() if method is not None else []
        key = cell_key({**what, "method": method, "preset": preset, "options": options.get(method or "", {}),
                        **({"attacks": attacks, "attack_prompts": config.attack_prompts} if attacks else {})})
        cell = cached_cell(out, name, key)
        if cell is None:
            erased = None
            if method is not None:
                from efface.methods import erase

                chosen, inputs = method_setup(method, pipe, preset)
                erased = erase(pipe, method, concepts, seed=seed, preset=chosen, progress=progress, **inputs,
                               **options.get(method, {}))
            if base_coco is None:
                base_coco = generate_prompts(pipe, prepared.coco, eval_config.generation(), seed)
            images: dict = {}
            result = evaluate_protocol(pipe, prepared, erased=erased, config=eval_config, seed=seed,
                                       base_coco=base_coco, images_out=images)
            if attacks:  # the protocol's prompts (the first attack_prompts), judged by the protocol's judge
                result["robustness"] = protocol_robustness(pipe, erased, prepared, attacks, config.attack_prompts,
                                                           seed=seed, generation=eval_config.generation())
            if prepared.spec.blur_samples:
                images["evaluated"] = {k: blurred(v) if k != "coco" else v for k, v in images["evaluated"].items()}
            save_samples(images, out / "images" / name)
            cell = write_cell(out, {"key": key, "name": name, "method": method or "base", "concepts": concepts,
                                    **result})
        cells.append(cell)
    results = {"protocol": asdict(prepared.config), "config": asdict(config), "eval_config": asdict(eval_config),
               "seed": seed, "preset": preset, "options": options, "model": base_ref, "cells": cells,
               **({"spec": spec} if spec else {})}
    write_json(out / "results.json", results)
    table = protocol_rows(cells)
    title = f"efface benchmark: {prepared.config.protocol} on {Path(base_ref).name}"
    text = markdown(table, title=title, columns=PROTOCOL_COLUMNS, legend=PROTOCOL_LEGEND)
    robust = robustness_section(*robustness_rows(cells))
    text = f"{text}\n{robust}" if robust else text
    return text, write_table_and_report(out, text, table, cells, {}, title=title, columns=PROTOCOL_COLUMNS)


def protocol_robustness(pipe, erased, prepared: Prepared, attacks: list[str], n: int, *, seed: int,
                        generation) -> dict[str, Any]:
    """:func:`efface.robustness.robustness_of` on a protocol: its concept, the first ``n`` of its
    prompts (seeds from ``seed``, as every attack's), its judge (the NudeNet rate the cell is scored
    with, at its threshold)."""
    from efface.judges import nudity_judge
    from efface.robustness import robustness_of

    if prepared.spec.judge != "nudity":
        raise InputError(f"--attacks on the {prepared.config.protocol} protocol: no attack judge for its "
                         f"{prepared.spec.judge!r} evaluator yet")
    judge = nudity_judge(rate=prepared.judge)
    return robustness_of(pipe, erased, prepared.spec.concepts[0], attacks, n=n, seed=seed, generation=generation,
                         judge=judge, prompts=[p.prompt for p in prepared.prompts])
