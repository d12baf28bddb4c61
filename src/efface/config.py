"""Dataclass configs are the only source of defaults: these helpers turn one into CLI options.

A field's help text is its ``metadata["help"]``; ``bool`` fields become ``--flag/--no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, *, group: str | None = None) -> None:
    """Add one option per field of dataclass ``cls`` (default from the dataclass)."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if tp is bool:
            target.add_argument(option_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif typing.get_origin(tp) in (tuple, list):
            inner = typing.get_args(tp)[0]
            target.add_argument(option_name(f.name), dest=f.name, type=inner, nargs="+", default=default,
                                help=f"{help_text} (default: {default})")
        else:
            target.add_argument(option_name(f.name), dest=f.name, type=tp, default=default,
                                help=f"{help_text} (default: {default})")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed options that ``add_options`` added."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _convert(tp: Any, text: str) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        tp = _base_type(tp)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, not {text!r}")
    if typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0]
        return tuple(inner(x) for x in text.split(",") if x)
    return tp(text)


def parse_assignments(cls: type, assignments: list[str], *, owner: str = "") -> dict[str, Any]:
    """``["key=value", ...]`` -> typed keyword arguments for dataclass ``cls``; unknown keys and
    values of the wrong type raise :class:`~efface.errors.InputError` listing what is valid."""
    from efface.errors import InputError

    hints = typing.get_type_hints(cls)
    valid = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise InputError(f"--set {item!r}: write key=value")
        if key not in valid:
            raise InputError(f"{owner or cls.__name__} has no option {key!r}; valid options: "
                             f"{', '.join(valid) or 'none'}")
        try:
            out[key] = _convert(valid[key], value.strip())
        except (TypeError, ValueError) as err:
            raise InputError(f"--set {key}={value}: {err}") from err
    return out


def coerce_option(tp: Any, value: Any, where: str) -> Any:
    """A TOML value as field type ``tp`` (arrays -> tuples, integers where floats are wanted), or an error."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = _base_type(tp)
    if typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected an array, not {value!r}")
        return tuple(coerce_option(inner, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{where}: expected {tp.__name__}, not {value!r}")
    return value


def load_options(cls: type, path, *, owner: str = "") -> dict[str, Any]:
    """A TOML file's top-level ``key = value`` pairs -> typed keyword arguments for dataclass ``cls``
    (``efface erase --options FILE``); a missing file, bad TOML, unknown keys (the valid ones listed,
    as ``--set`` lists them) and values of the wrong type raise :class:`~efface.errors.InputError`."""
    import tomllib
    from pathlib import Path

    from efface.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--options {path}: no such file; give a TOML file of key = value lines")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--options {path}: not valid TOML: {err}") from err
    return typed_options(cls, data, owner=owner, where=f"--options {path}")


def typed_options(cls: type, data: Mapping[str, Any], *, owner: str = "", where: str = "") -> dict[str, Any]:
    """Values read from a file (TOML types) -> typed keyword arguments for dataclass ``cls``; unknown
    keys (the valid ones listed, as ``--set`` lists them) and wrong types raise :class:`InputError`."""
    from efface.errors import InputError

    hints = typing.get_type_hints(cls)
    valid = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise InputError(f"{where + ': ' if where else ''}{owner or cls.__name__} has no option "
                         f"{', '.join(map(repr, unknown))}; valid options: {', '.join(valid) or 'none'}")
    try:
        return {k: coerce_option(valid[k], v, f"{where}: {k}") for k, v in data.items()}
    except ValueError as err:
        raise InputError(str(err)) from err


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        rows.append((f.name, getattr(tp, "__name__", str(tp)), default, f.metadata.get("help", "")))
    return rows


def check_bounds(obj, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> None:
    """Refuse a field of dataclass ``obj`` below its bound (counts >= 1, weights >= 0, rates > 0)
    with an :class:`~efface.errors.InputError` naming the field and its value."""
    from efface.errors import InputError

    for names, ok, bound in ((at_least_one, lambda v: v >= 1, "at least 1"), (non_negative, lambda v: v >= 0, ">= 0"),
                             (positive, lambda v: v > 0, "> 0")):
        for name in names:
            if not ok(getattr(obj, name)):
                raise InputError(f"{name} must be {bound}, not {getattr(obj, name)}")


SEED_LIMIT = 2**32 - 1  # what numpy's global seed takes (torch's generators take more)


def check_seed(seed, what: str = "seed", *, limit: int = SEED_LIMIT) -> int:
    """``seed`` as an ``int``, refused with an :class:`~efface.errors.InputError` unless it is an
    integer (not a bool or a float) in ``[0, limit]``: every seed that enters efface (an erasure's,
    an attack's, a generation's; ``limit`` 2**64 - 1 for per-image seeds, which only torch reads)."""
    import operator

    from efface.errors import InputError

    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= limit:
        raise InputError(f"{what} must be an integer in [0, {limit}], not {seed!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of option values for a method's or an attack's config, applied on top of its
    defaults (the paper's) and under the caller's own options. ``name`` is what the manifest /
    :class:`~efface.attacks.base.AttackResult` records (``"toy"``: the toy-sd presets of
    :mod:`efface.toy.presets`)."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def resolve(cls: type[T], owner: str, config: T | None, preset: str | Preset | None, overrides: dict[str, Any],
            presets: dict[str, dict], *, kind: str = "method") -> tuple[T, str]:
    """The config of a registered method or attack (``kind``): ``config`` (or ``cls()``), then the
    preset's options, then ``overrides``. ``preset`` is a :class:`Preset`, or the name of one of
    the owner's own ``presets`` or ``"paper"`` (None: ``"paper"``, the defaults). Unknown options
    (of the preset or the overrides) and unknown preset names are refused with the valid ones
    listed. Returns (config, the preset's name)."""
    from efface.errors import InputError

    valid = [f.name for f in dataclasses.fields(cls)]

    def refuse_unknown(options, where: str) -> None:
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise InputError(f"{owner} has no option {', '.join(unknown)}{where}; valid options: "
                             f"{', '.join(valid) or 'none'}")

    refuse_unknown(overrides, "")
    if isinstance(preset, Preset):
        refuse_unknown(preset.options, f" (preset {preset.name!r})")
        name, options = preset.name, dict(preset.options)
    else:
        own = {"paper": {}, **presets}
        if preset == "toy" and "toy" not in own:
            raise InputError(f"{owner}: the toy-sd presets live with the toy world: pass "
                             f"preset=efface.toy.presets.{kind}_preset({owner!r}) from Python (the command line "
                             "picks them with --model toy)")
        if preset is not None and preset not in own:
            raise InputError(f"{owner} has no preset {preset!r}; valid presets: {', '.join(own)} (and, on toy-sd, "
                             f"toy: efface.toy.presets.{kind}_preset)")
        name = preset or "paper"
        options = own[name]
    base = config if config is not None else cls()
    try:
        return dataclasses.replace(base, **{**options, **overrides}), name
    except (TypeError, ValueError) as err:
        raise InputError(f"{owner}: {err}") from err
