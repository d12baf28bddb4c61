"""A benchmark run described by a file: ``efface bench --spec bench.toml``.

The file is TOML (read with the standard library's ``tomllib``). Its top-level keys are the options
of ``efface bench`` (the fields of :class:`~efface.benchmark.grid.BenchConfig`,
:class:`~efface.evaluation.EvalConfig` and :class:`~efface.benchmark.protocol.ProtocolConfig`, and
``model``, ``seed``, ``out``, ``device``, ``dtype``), with the CLI's names in snake case; a
comma-separated option (``methods``, ``concepts``, ``attacks``, ``model``) may be an array. Each
method's options are the table ``[options.<method>]``, checked against that method's ``Config``::

    model = ["toy", "toy-flux"]
    methods = ["uce", "mace"]
    concepts = ["circle"]
    multi_concept = false
    n = 16

    [options.uce]
    lamb = 1.0

Unknown keys (top level, a method name, a method's option) are refused with the valid ones
listed, as ``--set`` does, before any model is loaded. A flag given on the command line wins over
the file; the file wins over the defaults. ``results.json`` records the spec (its path, its keys
and the sha256 of its bytes); the cells are cached by what determines them, so ``efface bench
--spec`` of a finished run reuses every cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path
from typing import Any

from efface.config import coerce_option, typed_options
from efface.errors import InputError

RUN_KEYS: dict[str, tuple[type, Any]] = {  # key -> (type, the CLI's default; device / dtype: load_pipeline's)
    "model": (str, "toy"), "seed": (int, 0), "out": (str, "runs/bench"), "device": (str, None),
    "dtype": (str, None),
}
LISTS = ("methods", "concepts", "attacks", "model")  # comma-separated on the command line


def spec_fields(*configs: type) -> dict[str, tuple[Any, Any]]:
    """Every key a spec may set: name -> (type, default), from the run keys and ``configs``' fields."""
    import inspect

    from efface.models.loading import load_pipeline

    loader = inspect.signature(load_pipeline).parameters
    out = {**RUN_KEYS, **{k: (str, loader[k].default) for k in ("device", "dtype")}}
    for cls in configs:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out[f.name] = (hints[f.name], f.default)
    return out


def load_spec(path: str | Path, fields: dict[str, tuple[Any, Any]]) -> tuple[dict[str, Any], dict[str, dict], dict]:
    """``(values, options, record)``: the spec's top-level values (typed; arrays of the comma options
    joined), its per-method ``[options.<method>]`` (checked against each method's ``Config``), and what
    ``results.json`` records of it. Every refusal is an :class:`InputError` naming the valid keys."""
    import tomllib

    import efface.methods  # noqa: F401  (registers the methods)
    from efface.registry import METHODS

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--spec {path}: no such file; give a TOML file (docs/evaluation.md, 'A run described by a "
                         "file')")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--spec {path}: not valid TOML: {err}") from err
    options = data.pop("options", {})
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"--spec {path}: unknown key {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(fields)}, and [options.<method>] tables")
    values = {}
    for key, value in data.items():
        if key in LISTS and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        try:
            values[key] = coerce_option(fields[key][0], value, f"--spec {path}: {key}")
        except ValueError as err:
            raise InputError(str(err)) from err
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InputError(f"--spec {path}: options must be tables [options.<method>] of key = value lines")
    checked = {}
    for method, opts in options.items():
        cls = METHODS.get(method)  # unknown method: the valid ones listed
        checked[method] = typed_options(cls.Config, opts, owner=method, where=f"--spec {path}: options.{method}")
    record = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "values": values, "options": checked}
    return values, checked, record


def apply_spec(args, values: dict[str, Any], fields: dict[str, tuple[Any, Any]]) -> None:
    """Put the spec's ``values`` into the parsed ``args`` wherever the command line left the default
    (a flag given on the command line wins; one given with its default value counts as not given)."""
    for key, value in values.items():
        if getattr(args, key, fields[key][1]) == fields[key][1]:
            setattr(args, key, value)
