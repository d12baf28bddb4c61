"""The classifier-judged metrics, with the real toy classifier (handed in) and real toy images."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from efface.metrics.classifier import ConceptRate, ImageDrift
from efface.registry import METRICS
from efface.toy.classifier import ToyClassifier
from efface.toy.draw import draw
from efface.toy.world import Scene


def _images(shape: str, n: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    return [Image.fromarray(draw(Scene(shape, "red", "plain"), rng)[0]) for _ in range(n)]


def test_metrics_are_registered():
    import efface.metrics  # noqa: F401

    assert {"concept-rate", "image-drift"} <= set(METRICS.names())


def test_concept_rate_counts_per_group_and_skips_unjudged():
    rate = ConceptRate(ToyClassifier.load)
    rate.update(_images("circle", 4), axis="shape", wanted=["circle"] * 4, group="circles")
    rate.update(_images("square", 4), axis="shape", wanted=["circle", None, None, None], group="squares")
    assert rate.compute() == {"circles": 1.0, "squares": 0.0}
    evaluator = rate.provenance()["evaluator"]
    assert evaluator["name"] == "toy-classifier" and len(evaluator["weights_sha256"]) == 64
    rate.reset()
    assert rate.compute() == {}
    with pytest.raises(ValueError):
        rate.update(_images("circle", 2), axis="shape", wanted=["circle"])


def test_image_drift_is_zero_for_identical_images_and_grows_with_change():
    same = ImageDrift(ToyClassifier.load, kid_subsets=3)
    images = _images("circle", 6)
    same.update(images, reference=images)
    r = same.compute()
    assert r["paired_distance"] == 0.0 and r["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    other = ImageDrift(ToyClassifier.load, kid_subsets=3)
    other.update(_images("star", 6, seed=1), reference=images)
    d = other.compute()
    assert d["paired_distance"] > 0 and d["frechet_distance"] > 1.0 and d["kid"] > r["kid"]
    assert ImageDrift(ToyClassifier.load).compute()["frechet_distance"] is None


def test_a_classifier_without_provenance_is_named_by_its_class():
    class Judge:
        def predict(self, x):
            return {"shape": ["circle"] * len(x)}

    rate = ConceptRate(Judge)
    rate.update(_images("circle", 2), axis="shape", wanted=["circle", "square"])
    assert rate.compute() == {"all": 0.5} and rate.provenance()["evaluator"] == {"name": "Judge"}
