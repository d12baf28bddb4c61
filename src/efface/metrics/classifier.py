"""Metrics judged by an image classifier: concept rates and image drift.

``ConceptRate`` counts, per named group of prompts, how often the classifier finds the wanted
concept on an axis; ``ImageDrift`` compares evaluated images with reference images (same prompts,
same seeds) in the classifier's feature space. The classifier comes from a factory the caller
hands in (the toy evaluation: the toy classifier; tests: their own): anything with
``predict(x) -> {axis: [names]}`` and ``features(x) -> N x D``, ``x`` float N x 3 x H x W in
[0, 1], and optionally ``provenance() -> dict`` (what the metrics' ``evaluator`` reports).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from efface.metrics.base import Metric, images_to_tensor, register_metric
from efface.metrics.stats import feature_frechet_distance, kid, paired_rms


def _classifier_provenance(classifier) -> dict[str, Any]:
    """The classifier's own ``provenance()``, or its class name."""
    describe = getattr(classifier, "provenance", None)
    return describe() if callable(describe) else {"name": type(classifier).__name__}


@register_metric("concept-rate")
class ConceptRate(Metric):
    """Per group: the fraction of images in which the classifier finds the wanted concept."""

    def __init__(self, classifier_factory: Callable[[], Any]):
        self.classifier = classifier_factory()
        super().__init__()

    def reset(self) -> None:
        self.hits: dict[str, list[bool]] = defaultdict(list)

    def predict(self, images: Sequence[Image.Image]) -> dict[str, list[str]]:
        with torch.no_grad():
            return self.classifier.predict(images_to_tensor(images))

    def update(self, images: Sequence[Image.Image], *, axis: str, wanted: Sequence[str | None], group: str = "all",
               predicted: dict[str, list[str]] | None = None) -> None:
        """``wanted[i]``: the concept image ``i`` should show on ``axis`` (None: not judged)."""
        if len(wanted) != len(images):
            raise ValueError(f"{len(images)} images but {len(wanted)} wanted labels")
        predicted = predicted or self.predict(images)
        self.hits[group] += [p == w for p, w in zip(predicted[axis], wanted) if w is not None]

    def compute(self) -> dict[str, float | None]:
        return {g: (float(np.mean(h)) if h else None) for g, h in self.hits.items()}

    def provenance(self) -> dict[str, Any]:
        return {"metric": self.name, "evaluator": _classifier_provenance(self.classifier)}


@register_metric("image-drift")
class ImageDrift(Metric):
    """Fréchet distance and KID between evaluated and reference images in the classifier's feature
    space, and the paired RMS pixel distance (in [0, 1]) of same-prompt, same-seed pairs."""

    def __init__(self, classifier_factory: Callable[[], Any], *, kid_subsets: int = 20,
                 kid_subset_size: int = 100, seed: int = 0):
        self.classifier = classifier_factory()
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        super().__init__()

    def reset(self) -> None:
        self.features: list[np.ndarray] = []
        self.reference: list[np.ndarray] = []
        self.paired: list[float] = []

    def _features(self, images: Sequence[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            return self.classifier.features(images_to_tensor(images)).double().numpy()

    def update(self, images: Sequence[Image.Image], *, reference: Sequence[Image.Image]) -> None:
        if len(images) != len(reference):
            raise ValueError(f"{len(images)} images but {len(reference)} reference images")
        if not images:
            return
        self.features.append(self._features(images))
        self.reference.append(self._features(reference))
        self.paired.extend(paired_rms(a, b) for a, b in zip(images, reference))

    def compute(self) -> dict[str, float | None]:
        if not self.features:
            return {"frechet_distance": None, "kid": None, "paired_distance": None}
        x, y = np.concatenate(self.features), np.concatenate(self.reference)
        return {
            "frechet_distance": feature_frechet_distance(x, y),
            "kid": float(kid(x, y, subsets=self.kid_subsets, subset_size=min(len(x), self.kid_subset_size),
                             seed=self.seed)) if len(x) > 1 else None,
            "paired_distance": float(np.mean(self.paired)),
        }

    def provenance(self) -> dict[str, Any]:
        return {"metric": self.name, "evaluator": _classifier_provenance(self.classifier),
                "space": "classifier features", "kid_subsets": self.kid_subsets, "kid_subset_size": self.kid_subset_size,
                "kid_kernel": "(x.y / d + 1)^3"}
