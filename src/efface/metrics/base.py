"""Metrics: one registry (``efface.registry.METRICS``), update / compute style.

A metric is fed batches with :meth:`Metric.update` and read with :meth:`Metric.compute`, which
returns plain JSON values (fractions in [0, 1] for rates). :meth:`Metric.provenance` says what
judged the images (evaluator name and version, model file hash, thresholds), so a result can be
reproduced. Models a metric needs (classifier, detector, feature extractor) come from a factory
passed to the constructor, so tests inject tiny models; nothing is downloaded at run time.

>>> rate = ConceptRate(classifier)               # doctest: +SKIP
>>> rate.update(images, wanted=["circle"] * 8)   # doctest: +SKIP
>>> rate.compute()                               # doctest: +SKIP
{'rate': 0.125, 'count': 8}
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from efface.registry import METRICS
from efface.toy.classifier import images_to_tensor as array_to_tensor


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


def images_to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """uint8 N x H x W x 3."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1]."""
    return array_to_tensor(images_to_array(images))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (for provenance of evaluator weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
