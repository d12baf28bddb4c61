"""One benchmark over several models: ``efface bench --model toy,toy-flux``.

Each model's grid runs exactly as a one-model bench, into ``out/<model>/`` (its own cached cells,
``results.json``, ``table.md`` and ``report.html``); the models are loaded one after another, so only
one is in memory at a time. Then ``out/table.md`` and ``out/report.html`` put every model's rows in
one table with a ``model`` column (the robustness table too), followed by each model's section.
A rerun resumes every model's grid from its cached cells.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from efface.errors import InputError
from efface.io import atomic_file


def model_list(spec: str) -> list[str]:
    """The models of a ``--model`` value: one, or several separated by commas (no repeats)."""
    names = [m.strip() for m in str(spec).split(",")]
    if any(not m for m in names):
        raise InputError(f"--model {spec!r} has an empty entry; separate models with commas, e.g. --model toy,toy-flux")
    if len(set(names)) != len(names):
        raise InputError(f"--model {spec!r} names a model twice")
    return names


def model_label(model: str) -> str:
    """The name a model's rows and output folder get: a toy model's name (``toy`` is ``toy-sd``), else the
    last part of its path."""
    from efface.toy.presets import toy_model

    toy = toy_model(model)
    if toy is not None:
        return toy
    return Path(model.rstrip("/\\")).name or model


def _folder(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def bench_models(models: list[str], load: Callable[[str], Any], out: str | Path, config=None, eval_config=None, *,
                 seed: int = 0, progress: bool = True, options: dict[str, dict] | None = None,
                 title: str = "efface benchmark", spec: dict | None = None) -> tuple[str, Path]:
    """:func:`efface.benchmark.grid.run_bench` on every model (``load(model)`` gives its pipeline), each into
    ``out/<model>/``; then the combined ``table.md`` and ``report.html`` under ``out``. Returns the
    combined table's text and the report's path."""
    from efface.benchmark.grid import report_bench, run_bench
    from efface.benchmark.report import write_models_report
    from efface.benchmark.table import (COLUMNS, markdown, model_columns, robustness_rows, robustness_section,
                                        robustness_union, with_model)

    out = Path(out)
    labels = [model_label(m) for m in models]
    if len({_folder(x) for x in labels}) != len(labels):
        raise InputError(f"the models {models} would share an output folder; give directories with different names")
    sections, combined, robust = [], [], []
    for model, label in zip(models, labels):
        pipe = load(model)
        pipe.set_progress_bar_config(disable=True)
        sub = out / _folder(label)
        results = run_bench(pipe, sub, config, eval_config, seed=seed, progress=progress, options=options, spec=spec)
        del pipe  # only one model in memory: the next is loaded after this one is gone
        _, _, table = report_bench(sub, results, title=f"{title}: {label}")
        sections.append((label, sub, table, results["cells"], results["multi_sets"]))
        combined += with_model(label, table)
        attacks, per_attack = robustness_rows(results["cells"])
        robust.append((attacks, with_model(label, per_attack)))
    text = (markdown(combined, title=title, columns=model_columns(COLUMNS))
            + robustness_section(*robustness_union(robust), model=True))
    with atomic_file(out / "table.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text, write_models_report(out, combined, robust, sections, title=title)
