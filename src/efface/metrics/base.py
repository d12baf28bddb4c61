"""Metrics: one registry (``efface.registry.METRICS``), update / compute style.

A metric is fed batches with :meth:`Metric.update` and read with :meth:`Metric.compute`, which
returns plain JSON values (fractions in [0, 1] for rates). :meth:`Metric.provenance` says what
judged the images (evaluator name and version, model file hash, thresholds), so a result can be
reproduced. Models a metric needs (classifier, detector, feature extractor) come from a factory
passed to the constructor, so tests inject tiny models; nothing is downloaded at run time.

>>> rate = ConceptRate(lambda: classifier)                      # doctest: +SKIP
>>> rate.update(images, axis="shape", wanted=["circle"] * 8)   # doctest: +SKIP
>>> rate.compute()                                             # doctest: +SKIP
{'all': 0.125}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from PIL import Image

from efface.images import images_to_array, images_to_tensor  # noqa: F401  (the metrics' image helpers)
from efface.io import file_sha256  # noqa: F401  (provenance of evaluator weights)
from efface.registry import METRICS


class Metric(ABC):
    """Base class: ``reset`` / ``update`` / ``compute`` / ``provenance``."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.reset()

    @abstractmethod
    def reset(self) -> None:
        """Forget everything seen so far."""

    @abstractmethod
    def update(self, images: Sequence[Image.Image], **batch: Any) -> None:
        """Add a batch of images (and what the metric needs to judge them)."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """The result so far, as JSON values."""

    def provenance(self) -> dict[str, Any]:
        """What judged the images: evaluator, versions, file hashes, thresholds."""
        return {"metric": self.name}


def register_metric(name: str):
    """Class decorator: register a :class:`Metric` subclass under ``name`` and set its ``name``."""

    def decorator(cls: type[Metric]) -> type[Metric]:
        cls.name = name
        return METRICS.register(name)(cls)

    return decorator
