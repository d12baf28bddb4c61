"""The benchmark grid: method x concept cells (and multi-concept cells), cached and resumable.

Each cell erases with the method's preset (``toy`` on toy-sd, chosen by
:func:`efface.toy.presets.method_setup`), evaluates with :func:`efface.evaluation.evaluate` and
writes ``cells/<name>.json`` atomically, with a key made of everything that determines its result;
a rerun skips every cell whose file has the same key, so an interrupted run resumes where it
stopped. Sample images of every cell go to ``images/<name>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from efface.errors import InputError
from efface.evaluation import EvalConfig, check_concepts, evaluate
from efface.io import atomic_dir, atomic_file
from efface.toy.presets import default_preset, method_setup
from efface.toy.world import AXES, axis_of

log = logging.getLogger(__name__)

SAMPLES = 8  # images per group kept for the report


@dataclass
class BenchConfig:
    """What ``efface bench`` runs (defaults: issue 4's grid)."""

    methods: str = field(default="uce,rece,esd-x,esd-u,ca", metadata={"help": "comma-separated methods"})
    concepts: str = field(default="circle,striped,red", metadata={"help": "comma-separated toy concepts"})
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
        return check_concepts([c.strip() for c in self.concepts.split(",") if c.strip()])

    def multi_sets(self) -> dict[str, list[str]]:
        """Multi-concept cells: "1", "3" and "all" concepts of the first concept's axis."""
        if not self.multi_concept:
            return {}
        first = self.concept_list()[0]
        axis = [first] + [c for c in AXES[axis_of(first)] if c != first]
        return {"1": axis[:1], "3": axis[:3], "all": axis}


def request_for(method: str, concepts: list[str]) -> dict[str, Any]:
    """The erasure request the benchmark gives ``method``: preserve the rest of the axes involved;
    anchor: the method's default, or, for methods whose paper always maps the target onto a named
    concept (``named_anchor``: CA, DoCo), the axis' first other concept (the toy world has no
    category word)."""
    import efface.methods  # noqa: F401  (registers the methods)
    from efface.registry import METHODS

    axes = dict.fromkeys(axis_of(c) for c in concepts)
    preserve = [o for a in axes for o in AXES[a] if o not in concepts]
    anchor = None
    if METHODS.get(method).named_anchor:  # per concept: the axis' first concept not erased ("" if none is left)
        anchor = [next((o for o in AXES[axis_of(c)] if o not in concepts), "") for c in concepts]
    return {"preserve": preserve, "anchor": anchor}


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


def run_cell(pipe, out: Path, name: str, method: str | None, concepts: list[str], *, preset: str,
             config: EvalConfig, seed: int, base_ref: str, options: dict | None = None,
             attacks: list[str] | None = None, attack_prompts: int = 8) -> dict[str, Any]:
    """Erase (unless ``method`` is None: the base model) and evaluate one cell; cached by key.
    ``preset``: the preset's name (:func:`efface.toy.presets.method_setup` resolves it);
    ``options``: method options on top of the preset; ``attacks``: run against the erased model
    (single-concept cells) to fill ``robustness``."""
    options = options or {}
    attacks = attacks if method is not None and len(concepts) == 1 else []
    key = cell_key({"method": method, "concepts": concepts, "preset": preset, "eval": asdict(config), "seed": seed,
                    "model": base_ref, "request": request_for(method, concepts) if method else None,
                    "options": options, **({"attacks": attacks, "attack_prompts": attack_prompts} if attacks else {})})
    cached = cached_cell(out, name, key)
    if cached is not None:
        return cached
    erased = None
    if method is not None:
        from efface.methods import erase

        chosen, inputs = method_setup(method, pipe, preset)
        erased = erase(pipe, method, concepts, seed=seed, preset=chosen, progress=False,
                       **request_for(method, concepts), **inputs, **options)
    images: dict = {}
    result = evaluate(pipe, concepts, erased=erased, config=config, seed=seed, images_out=images)
    if attacks:
        from efface.robustness import robustness_of

        result["robustness"] = robustness_of(pipe, erased, concepts[0], attacks, n=attack_prompts, seed=seed,
                                             generation=config.generation())
    save_samples(images, out / "images" / name)
    return write_cell(out, {"key": key, "name": name, "method": method or "base", "concepts": concepts, **result})


def run_bench(pipe, out: str | Path, config: BenchConfig | None = None, eval_config: EvalConfig | None = None,
              *, seed: int = 0, progress: bool = True, options: dict[str, dict] | None = None,
              spec: dict | None = None) -> dict[str, Any]:
    """Every cell of the grid (base model included); returns what ``results.json`` holds.
    ``options``: per method, options on top of its preset; ``spec``: the ``--spec`` file's record
    (:func:`efface.benchmark.spec.load_spec`), kept in ``results.json``."""
    options = options or {}
    config, eval_config, out = config or BenchConfig(), eval_config or EvalConfig(), Path(out)
    methods, concepts, multi = config.method_list(), config.concept_list(), config.multi_sets()
    attacks = config.attack_list()
    preset = config.preset or default_preset(pipe)
    for method in methods:
        method_setup(method, pipe, preset)  # a preset the model cannot take fails before any cell
    base_ref = str(getattr(pipe, "efface_source", type(pipe).__name__))
    jobs = [(f"base__{c}", None, [c]) for c in concepts]
    jobs += [(f"base__multi-{k}", None, cs) for k, cs in multi.items() if k != "1"]
    jobs += [(f"{m}__{c}", m, [c]) for m in methods for c in concepts]
    jobs += [(f"{m}__multi-{k}", m, cs) for m in methods for k, cs in multi.items() if k != "1"]
    cells = []
    for name, method, cs in tqdm(jobs, desc="bench cells", disable=not progress):
        cells.append(run_cell(pipe, out, name, method, cs, preset=preset, config=eval_config, seed=seed,
                              base_ref=base_ref, options=options.get(method or "", {}), attacks=attacks,
                              attack_prompts=config.attack_prompts))
    results = {"config": asdict(config), "eval_config": asdict(eval_config), "seed": seed, "preset": preset,
               "options": options, "model": base_ref, "multi_sets": multi, "cells": cells,
               **({"spec": spec} if spec else {})}
    write_json(out / "results.json", results)
    return results


def bench_and_report(pipe, out: str | Path, config: BenchConfig | None = None,
                     eval_config: EvalConfig | None = None, *, seed: int = 0, progress: bool = True,
                     options: dict[str, dict] | None = None, title: str = "efface benchmark",
                     spec: dict | None = None) -> tuple[str, Path]:
    """:func:`run_bench`, then ``table.md`` and ``report.html``; returns the table and the report's path."""
    results = run_bench(pipe, out, config, eval_config, seed=seed, progress=progress, options=options, spec=spec)
    text, report, _ = report_bench(out, results, title=title)
    return text, report


def report_bench(out: str | Path, results: dict[str, Any], *, title: str) -> tuple[str, Path, list[dict[str, Any]]]:
    """``table.md`` and ``report.html`` of :func:`run_bench`'s ``results`` under ``out``; returns the
    table's text, the report's path and the table's rows."""
    from efface.benchmark.table import markdown, robustness_markdown, rows

    table = rows(results["cells"], results["multi_sets"])
    text = markdown(table, title=title) + robustness_markdown(results["cells"])
    return text, write_table_and_report(Path(out), text, table, results["cells"], results["multi_sets"],
                                        title=title), table
