"""Erasure on the real toy-sd: the concept goes, the rest of its axis stays (slow: minutes).

The fast contract tests run on a tiny random model whose prompts all embed alike; this is where
specificity is measured for every method, with its CPU-sized "toy" preset.
"""

from __future__ import annotations

import pytest

import efface.methods  # noqa: F401
from efface.sampling import GenerationConfig
from efface.methods import erase
from efface.registry import METHODS
from efface.toy import CLASSIFIER
from efface.toy.classifier import ToyClassifier
from efface.toy.quality import concept_rates

pytestmark = pytest.mark.slow
CONFIG = GenerationConfig(steps=20, guidance=7.5, batch_size=48)


@pytest.fixture(scope="module")
def toy():
    from efface import load_pipeline

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    classifier = ToyClassifier.load(CLASSIFIER)
    return pipe, classifier, concept_rates(pipe, classifier, "circle", n=24, config=CONFIG)


@pytest.mark.parametrize("name", METHODS.names())
def test_erasing_circle_on_toy_sd_removes_it_and_keeps_other_shapes(name, toy):
    pipe, classifier, base = toy
    erased = erase(pipe, name, ["circle"], seed=0, preset="toy", progress=False)
    with erased.applied(pipe):
        after = concept_rates(pipe, classifier, "circle", n=24, config=CONFIG)
    assert base["train_rate"] > 0.9
    assert after["train_rate"] < 0.3, after
    assert after["others"] >= base["others"] - 0.15, (base, after)
