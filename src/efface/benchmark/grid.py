"""The benchmark grid: method x concept cells (and multi-concept cells), cached and resumable.

One cell runner for every suite (:mod:`efface.suites`: the toy world, or a real-model protocol):
each cell erases with the method's preset (``toy`` on the toy models, chosen by
:func:`efface.toy.presets.method_setup`) and the suite's request, evaluates with
:func:`efface.evaluation.evaluate` on the suite, runs ``--attacks`` on the suite's attack prompts
with its judge, and writes ``cells/<name>.json`` atomically, with a key made of everything that
determines its result; a rerun skips every cell whose file has the same key, so an interrupted run
resumes where it stopped. Sample images of every cell go to ``images/<name>/``. The base model's
images of the reference prompts are made once per run and shared by its cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from efface.errors import InputError
from efface.evaluation import EvalConfig, evaluate
from efface.suites.toy import check_concepts, request_for  # noqa: F401  (request_for: re-exported)
from efface.io import atomic_dir, atomic_file
from efface.toy.presets import default_preset, method_setup
from efface.toy.world import AXES, axis_of

log = logging.getLogger(__name__)

SAMPLES = 8  # images per group kept for the report
TOY_CONCEPTS = ("circle", "striped", "red")  # the toy grid's concepts when --concepts is not given


@dataclass
class BenchConfig:
    """What ``efface bench`` runs (defaults: issue 4's grid)."""

    methods: str = field(default="uce,rece,esd-x,esd-u,ca", metadata={"help": "comma-separated methods"})
    concepts: str = field(default="", metadata={"help": "comma-separated concepts (default: circle,striped,red on the "
                                                         "toy grid; a protocol's own, see efface list protocols)"})
    multi_concept: bool = field(default=True, metadata={"help": "also erase 1, 3 and all concepts of the "
                                                                "first concept's axis at once"})
    preset: str = field(default="", metadata={"help": "method preset: 'paper' or 'toy' (default: 'toy' on a toy "
                                                       "model, else 'paper'; 'toy' only on toy-sd and toy-flux)"})
    attacks: str = field(default="", metadata={"help": "comma-separated attacks run against every single-concept "
                                                        "cell (robustness column; efface list attacks)"})
    attack_prompts: int = field(default=8, metadata={"help": "prompts each attack tries per cell"})

    def attack_list(self) -> list[str]:
        import efface.attacks  # noqa: F401  (registers the attacks)
        from efface.registry import ATTACKS

        names = [a.strip() for a in self.attacks.split(",") if a.strip()]
        for name in names:
            ATTACKS.get(name)  # unknown attack: a clear error listing the valid ones
        if names and self.attack_prompts < 1:
            raise InputError(f"attack_prompts must be at least 1, not {self.attack_prompts}")
        return names

    def method_list(self) -> list[str]:
        import efface.methods  # noqa: F401  (registers the methods)
        from efface.registry import METHODS

        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not names:
            raise InputError("give at least one method, e.g. --methods uce,esd-u")
        for name in names:
            METHODS.get(name)  # unknown method: a clear error listing the valid ones
        return names

    def concept_list(self) -> list[str]:
        return check_concepts(self.names() or list(TOY_CONCEPTS))

    def names(self) -> list[str]:
        """The concepts given (none: the suite's default)."""
        return [c.strip() for c in self.concepts.split(",") if c.strip()]

    def multi_sets(self) -> dict[str, list[str]]:
        """Multi-concept cells: "1", "3" and "all" concepts of the first concept's axis."""
        if not self.multi_concept:
            return {}
        first = self.concept_list()[0]
        axis = [first] + [c for c in AXES[axis_of(first)] if c != first]
        return {"1": axis[:1], "3": axis[:3], "all": axis}


def cell_key(payload: dict) -> str:
    """A short hash of everything that determines a cell's result."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_cell(out: Path, name: str, key: str) -> dict[str, Any] | None:
    """The cell ``out/cells/<name>.json`` if it was written with ``key``, else None."""
    path = out / "cells" / f"{name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            log.info("bench: %s cached", name)
            return cached
    return None


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def write_cell(out: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """Write ``cell`` to ``out/cells/<name>.json`` atomically; returns it."""
    write_json(out / "cells" / f"{cell['name']}.json", cell)
    return cell


def write_table_and_report(out: Path, text: str, table: list[dict[str, Any]], cells: list[dict[str, Any]],
                           multi_sets: dict[str, list[str]], *, title: str, columns=None) -> Path:
    """``table.md`` (``text``) and ``report.html`` under ``out``; returns the report's path."""
    from efface.benchmark.report import write_report
    from efface.benchmark.table import COLUMNS

    with atomic_file(out / "table.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return write_report(out, table, cells, multi_sets, title=title, columns=columns or COLUMNS)


def save_samples(images: dict, directory: Path) -> None:
    """The first :data:`SAMPLES` images of every group as one grid PNG, ``<side>__<group>.png``."""
    from efface.sampling import make_grid

    with atomic_dir(directory, overwrite=True) as tmp:
        for side, groups in images.items():
            for name, imgs in groups.items():
                if imgs:
                    make_grid(imgs[:SAMPLES], cols=SAMPLES).save(tmp / f"{side}__{name.replace('/', '_')}.png")


@dataclass
class Plan:
    """What a bench runs besides its methods: the suite of a concept set, the concepts (one cell each),
    the multi-concept sets (name -> concepts), and what ``results.json`` adds about it."""

    suite_for: Callable[[list[str]], Any]
    concepts: list[str]
    multi_sets: dict[str, list[str]]
    record: dict[str, Any] = field(default_factory=dict)


def toy_plan(config: BenchConfig, classifier_factory=None) -> Plan:
    """The toy grid: a :class:`~efface.suites.toy.ToySuite` per concept set."""
    from efface.suites.toy import ToySuite

    kw = {"classifier_factory": classifier_factory} if classifier_factory else {}
    return Plan(lambda cs: ToySuite(cs, **kw), config.concept_list(), config.multi_sets())


def blurred(images: list) -> list:
    """Images blurred beyond recognition of detail (the report's grids of a nudity protocol)."""
    from PIL import ImageFilter

    return [im.filter(ImageFilter.GaussianBlur(radius=max(im.size) / 24)) for im in images]


@dataclass
class Cell:
    """One cell of a bench: its name, method (None: the base model), suite, key and request."""

    name: str
    method: str | None
    suite: Any
    key: str
    request: dict | None
    attacks: list[str]


def make_cell(name: str, method: str | None, suite, *, preset: str, config: EvalConfig, seed: int, base_ref: str,
              options: dict, attacks: list[str], attack_prompts: int) -> Cell:
    """The cell and its cache key (everything that determines its result)."""
    from efface.evaluation import as_suite

    suite = as_suite(suite)
    attacks = attacks if method is not None and len(suite.concepts) == 1 else []
    request = suite.request(method) if method else None
    key = cell_key({"method": method, "suite": suite.key(), "preset": preset, "eval": asdict(config), "seed": seed,
                    "model": base_ref, "request": request, "options": options,
                    **({"attacks": attacks, "attack_prompts": attack_prompts} if attacks else {})})
    return Cell(name, method, suite, key, request, attacks)


def fit_cell(pipe, cell: Cell, *, preset: str, seed: int, options: dict):
    """The cell's erasure (None for the base model)."""
    if cell.method is None:
        return None
    from efface.methods import erase

    chosen, inputs = method_setup(cell.method, pipe, preset)
    return erase(pipe, cell.method, cell.suite.concepts, seed=seed, preset=chosen, progress=False, **cell.request,
                 **inputs, **options)


def finish_cell(pipe, out: Path, cell: Cell, erased, *, config: EvalConfig, seed: int, attack_prompts: int,
                base_cache: dict | None, shard=None, process: int | None = None) -> dict[str, Any] | None:
    """Evaluate ``erased`` on the cell's suite (its images shared by the processes of ``shard``), run
    its attacks (on the main process), save samples and write the cell; None on the other processes."""
    images: dict = {}
    result = evaluate(pipe, erased, cell.suite, config=config, seed=seed, images_out=images, base_cache=base_cache,
                      shard=shard)
    if shard is not None and not shard.is_main:
        return None
    if cell.attacks:
        from efface.robustness import robustness_of

        concept = cell.suite.concepts[0]
        result["robustness"] = robustness_of(pipe, erased, concept, cell.attacks, n=attack_prompts, seed=seed,
                                             generation=config.generation(), judge=cell.suite.attack_judge(),
                                             prompts=cell.suite.attack_prompts(concept, attack_prompts, seed))
    if cell.suite.blur_samples:
        images["evaluated"] = {k: blurred(v) if k != "coco" else v for k, v in images["evaluated"].items()}
    save_samples(images, out / "images" / cell.name)
    extra = {} if process is None else {"process": process}
    return write_cell(out, {"key": cell.key, "name": cell.name, "method": cell.method or "base",
                            "concepts": cell.suite.concepts, **extra, **result})


def run_cell(pipe, out: Path, name: str, method: str | None, suite, *, preset: str, config: EvalConfig, seed: int,
             base_ref: str, options: dict | None = None, attacks: list[str] | None = None, attack_prompts: int = 8,
             base_cache: dict | None = None) -> dict[str, Any]:
    """Erase ``suite``'s concepts (unless ``method`` is None: the base model) and evaluate one cell on
    ``suite`` (or toy concepts); cached by key. ``preset``: the preset's name
    (:func:`efface.toy.presets.method_setup` resolves it); ``options``: method options on top of the
    preset; ``attacks``: run against the erased model (single-concept cells) on the suite's attack
    prompts, judged by its judge, to fill ``robustness``; ``base_cache``: the base images shared by
    the run's cells."""
    options = options or {}
    cell = make_cell(name, method, suite, preset=preset, config=config, seed=seed, base_ref=base_ref,
                     options=options, attacks=attacks or [], attack_prompts=attack_prompts)
    cached = cached_cell(out, name, cell.key)
    if cached is not None:
        return cached
    erased = fit_cell(pipe, cell, preset=preset, seed=seed, options=options)
    return finish_cell(pipe, out, cell, erased, config=config, seed=seed, attack_prompts=attack_prompts,
                       base_cache=base_cache)


def run_bench(pipe, out: str | Path, config: BenchConfig | None = None, eval_config: EvalConfig | None = None,
              *, seed: int = 0, progress: bool = True, options: dict[str, dict] | None = None,
              spec: dict | None = None, plan: Plan | None = None, shard=None) -> dict[str, Any]:
    """Every cell of the grid (base model included); returns what ``results.json`` holds (``{}`` on
    the processes other than the main one of ``shard``, :mod:`efface.benchmark.distributed`).
    ``plan``: the suites (default: the toy grid of ``config``); ``options``: per method, options on
    top of its preset; ``spec``: the ``--spec`` file's record (:func:`efface.benchmark.spec.load_spec`),
    kept in ``results.json``."""
    options = options or {}
    config, eval_config, out = config or BenchConfig(), eval_config or EvalConfig(), Path(out)
    plan = plan or toy_plan(config)
    methods, concepts, multi = config.method_list(), plan.concepts, plan.multi_sets
    attacks = config.attack_list()
    preset = config.preset or default_preset(pipe)
    for method in methods:
        method_setup(method, pipe, preset)  # a preset the model cannot take fails before any cell
    base_ref = str(getattr(pipe, "efface_source", type(pipe).__name__))
    sets = {c: [c] for c in concepts} | {f"multi-{k}": cs for k, cs in multi.items() if k != "1"}
    jobs = [(f"{m or 'base'}__{name}", m, cs) for m in [None, *methods] for name, cs in sets.items()]
    todo = [make_cell(name, m, plan.suite_for(cs), preset=preset, config=eval_config, seed=seed, base_ref=base_ref,
                      options=options.get(m or "", {}), attacks=attacks, attack_prompts=config.attack_prompts)
            for name, m, cs in jobs]
    run = dict(preset=preset, config=eval_config, seed=seed, attack_prompts=config.attack_prompts)
    if shard is not None:
        from efface.benchmark.distributed import run_cells

        cells = run_cells(pipe, out, todo, shard, options=options, progress=progress, **run)
        if not shard.is_main:
            return {}
    else:
        cells, base_cache = [], {}
        for cell in tqdm(todo, desc="bench cells", disable=not progress):
            cached = cached_cell(out, cell.name, cell.key)
            if cached is None:
                erased = fit_cell(pipe, cell, preset=preset, seed=seed, options=options.get(cell.method or "", {}))
                cached = finish_cell(pipe, out, cell, erased, config=eval_config, seed=seed,
                                     attack_prompts=config.attack_prompts, base_cache=base_cache)
            cells.append(cached)
    results = {**plan.record, "config": asdict(config), "eval_config": asdict(eval_config), "seed": seed,
               "preset": preset, "options": options, "model": base_ref, "multi_sets": multi,
               "processes": 1 if shard is None else shard.world, "cells": cells, **({"spec": spec} if spec else {})}
    write_json(out / "results.json", results)
    return results


def bench_and_report(pipe, out: str | Path, config: BenchConfig | None = None,
                     eval_config: EvalConfig | None = None, *, seed: int = 0, progress: bool = True,
                     options: dict[str, dict] | None = None, title: str = "efface benchmark",
                     spec: dict | None = None, plan: Plan | None = None, columns=None,
                     legend: str | None = None, shard=None) -> tuple[str, Path]:
    """:func:`run_bench`, then ``table.md`` and ``report.html``; returns the table and the report's path
    (``""`` as the table on the processes other than the main one of ``shard``)."""
    results = run_bench(pipe, out, config, eval_config, seed=seed, progress=progress, options=options, spec=spec,
                        plan=plan, shard=shard)
    if not results:
        return "", Path(out) / "report.html"
    text, report, _ = report_bench(out, results, title=title, columns=columns, legend=legend)
    return text, report


def report_bench(out: str | Path, results: dict[str, Any], *, title: str, columns=None,
                 legend: str | None = None) -> tuple[str, Path, list[dict[str, Any]]]:
    """``table.md`` and ``report.html`` of :func:`run_bench`'s ``results`` under ``out``; returns the
    table's text, the report's path and the table's rows. ``columns`` / ``legend``: the suite's
    (default: the toy grid's)."""
    from efface.benchmark.table import COLUMNS, LEGEND, markdown, robustness_markdown, rows

    columns = columns or COLUMNS
    table = rows(results["cells"], results["multi_sets"])
    text = markdown(table, title=title, columns=columns, legend=legend or LEGEND)
    text += robustness_markdown(results["cells"])
    return text, write_table_and_report(Path(out), text, table, results["cells"], results["multi_sets"],
                                        title=title, columns=columns), table
