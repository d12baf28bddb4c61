"""efface: concept erasure ("unlearning") for text-to-image diffusion models.

Public API (more arrives with each capability):

* :func:`efface.load_pipeline` — load ``toy``, a local diffusers directory, a single-file checkpoint
  or a hub id, with device and dtype;
* :func:`efface.generate` — seeded, reproducible image generation; :func:`efface.make_grid`;
* :mod:`efface.toy` — the toy world, the bundled toy-sd model and its classifier.

Names are imported on first use, so ``import efface.toy.world`` does not pull in diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_pipeline": "efface.models.loading",
    "generate": "efface.sampling",
    "generate_many": "efface.sampling",
    "make_grid": "efface.sampling",
    "GenerationConfig": "efface.sampling",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'efface' has no attribute {name!r}")
