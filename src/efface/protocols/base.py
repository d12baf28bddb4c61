"""Evaluation prompts for real models: the record, the protocol table, and shared file readers.

A protocol is a function that returns a list of :class:`EvalPrompt` (prompt text, the seed and
guidance scale to generate it with, the concept it is about, anything else the source file says).
Data that fits in a few lines (class names, artists, celebrities, templates) is written in the
protocol modules; data sets that are large or licensed by others (I2P, COCO captions) are read from
a file the user has, in its public format. efface never downloads them: a missing file is an
:class:`~efface.errors.InputError` that names the file, its format and where to get it.

>>> prompts = load_protocol("imagenette", classes=["church"], n_per_class=2)
>>> [(p.prompt, p.seed, p.concept) for p in prompts]
[('an image of a church', 0, 'church'), ('an image of a church', 1, 'church')]
"""

from __future__ import annotations

import csv
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efface.errors import InputError

log = logging.getLogger(__name__)

# Index columns that pandas writes (``df.to_csv`` without ``index=False``); never data.
_INDEX_COLUMNS = ("", "Unnamed: 0")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to generate and judge.

    ``seed`` and ``guidance`` are None when the source does not fix them (the runner's defaults
    apply); ``concept`` is the concept the prompt is about (class, artist, celebrity) or None;
    ``meta`` keeps the source's other fields (case number, categories, image id...).
    """

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    concept: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileSpec:
    """What a protocol's file is: its usual name, its format and where to get it publicly."""

    name: str
    format: str
    source: str


def require_file(path: str | Path | None, spec: FileSpec) -> Path:
    """``path`` as a Path if it is an existing file; otherwise an InputError saying what to provide."""
    where = "no path was given" if path is None else f"{path} does not exist"
    if path is not None and Path(path).is_file():
        return Path(path)
    raise InputError(
        f"{spec.name} is needed and {where}. Expected format: {spec.format}. Where to get it: {spec.source}. "
        f"efface never downloads it: pass the path of your copy, e.g. path='.../{spec.name}'."
    )


def read_csv(path: Path, *, required: Sequence[str], spec: FileSpec) -> list[dict[str, str]]:
    """Rows of a CSV file (UTF-8, BOM tolerated) as dicts, pandas index columns dropped; an
    InputError naming the missing columns if ``required`` ones are absent."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(columns) or 'none'}); "
                             f"expected format: {spec.format}")
        rows = [{k: (v or "") for k, v in row.items() if k not in _INDEX_COLUMNS and k is not None} for row in reader]
    log.debug("read %d rows from %s", len(rows), path)
    return rows


def parse_int(value: str | None) -> int | None:
    """``"41337"`` or ``"41337.0"`` -> 41337; empty -> None."""
    value = (value or "").strip()
    return int(float(value)) if value else None


def parse_float(value: str | None) -> float | None:
    """``"7.5"`` -> 7.5; empty -> None."""
    value = (value or "").strip()
    return float(value) if value else None


def case_number(value: str) -> int | str:
    """A ``case_number`` cell as an int when it is one (ESD's files number their rows), else as is."""
    try:
        return int(value)
    except ValueError:
        return value


def first_present(row: dict[str, str], columns: Iterable[str]) -> str | None:
    """The value of the first of ``columns`` that the row has and is not empty."""
    for column in columns:
        if (row.get(column) or "").strip():
            return row[column]
    return None


def rows_to_prompts(rows: Iterable[dict[str, str]], *, concept_column: str | None = None,
                    seed_columns: Sequence[str] = ("evaluation_seed", "seed"),
                    guidance_columns: Sequence[str] = ("evaluation_guidance", "guidance")) -> list[EvalPrompt]:
    """Generic CSV rows (a ``prompt`` column, optional seed / guidance / concept columns) to prompts;
    every other column goes to ``meta`` as text (``case_number`` as an int where it is one)."""
    used = {"prompt", *seed_columns, *guidance_columns, *([concept_column] if concept_column else [])}
    return [
        EvalPrompt(
            prompt=row["prompt"],
            seed=parse_int(first_present(row, seed_columns)),
            guidance=parse_float(first_present(row, guidance_columns)),
            concept=(row.get(concept_column) or None) if concept_column else None,
            meta={k: (case_number(v) if k == "case_number" else v) for k, v in row.items() if k not in used},
        )
        for row in rows
    ]


def _lazy(target: str) -> Callable[..., list[EvalPrompt]]:
    """A loader that imports ``module:function`` only when called (no import-time work here)."""
    module, function = target.split(":")

    def loader(path: str | Path | None = None, **kw: Any) -> list[EvalPrompt]:
        return getattr(importlib.import_module(module), function)(path, **kw)

    loader.__name__ = function
    loader.__doc__ = f"See :func:`{module}.{function}`."
    return loader


# name -> loader(path=None, **kw) -> list[EvalPrompt]. Plain dict, no registry: add an entry here.
PROTOCOLS: dict[str, Callable[..., list[EvalPrompt]]] = {
    "i2p": _lazy("efface.protocols.nudity:load_i2p"),
    "ring-a-bell": _lazy("efface.protocols.nudity:load_ring_a_bell"),
    "unlearndiffatk-nudity": _lazy("efface.protocols.nudity:load_unlearndiffatk_nudity"),
    "imagenette": _lazy("efface.protocols.objects:load_imagenette"),
    "artists": _lazy("efface.protocols.artists:load_artists"),
    "celebrities": _lazy("efface.protocols.celebrities:load_celebrities"),
    "coco": _lazy("efface.protocols.coco:load_coco"),
}


def load_protocol(name: str, path: str | Path | None = None, **kw: Any) -> list[EvalPrompt]:
    """The prompts of protocol ``name`` (see :data:`PROTOCOLS`), read from ``path`` where it needs a
    file; keyword arguments go to the protocol's loader."""
    if name not in PROTOCOLS:
        raise InputError(f"unknown protocol {name!r}; valid protocols: {', '.join(sorted(PROTOCOLS))}")
    prompts = PROTOCOLS[name](path, **kw)
    log.info("protocol %s: %d prompts", name, len(prompts))
    return prompts
