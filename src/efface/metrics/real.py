"""Shared helpers of the real-model evaluators (:mod:`efface.metrics.nudity`,
:mod:`efface.metrics.image_quality`): optional packages and local weight files.

Real-model evaluators need packages efface does not depend on (``nudenet``, ``lpips``,
``clean-fid``) and weights that are not shipped. They are looked for on this machine only, when an
evaluator is constructed: a missing one is an :class:`~efface.errors.InputError` that says what to
install or where to put the file, before any image is generated. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from efface.errors import InputError
from efface.metrics.base import file_sha256


def require_module(module: str, *, pip_name: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an InputError saying ``pip install pip_name``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(
            f"{purpose} needs the optional package {pip_name!r}, which is not installed here "
            f"({e}); install it with `pip install {pip_name}` or pass your own model factory"
        ) from e


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (its PyPI name), None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_weights(path: str | Path, *, what: str, how: str) -> Path:
    """``path`` if the file exists; otherwise an InputError naming it and saying how to provide it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{what} not found at {path}; {how} (efface never downloads weights)")
    return path


def weights_provenance(path: str | Path | None) -> dict[str, str | None]:
    """``{"path", "sha256"}`` of a weights file (both None if there is none)."""
    if path is None or not Path(path).is_file():
        return {"path": None if path is None else str(path), "sha256": None}
    return {"path": str(path), "sha256": file_sha256(path)}


def factory_name(factory: object) -> str:
    """A readable name for an injected factory or callable (``module.qualname``)."""
    module = getattr(factory, "__module__", None) or ""
    name = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return f"{module}.{name}".lstrip(".")


def batches(items: Sequence, size: int) -> list[Sequence]:
    """``items`` in consecutive chunks of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def summary(values: Sequence[float], key: str) -> dict[str, Any]:
    """``{key: mean, "std": std, "count": n}`` of per-image values (None when there are none)."""
    return {key: float(np.mean(values)) if len(values) else None,
            "std": float(np.std(values)) if len(values) else None, "count": len(values)}
