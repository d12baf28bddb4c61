"""How well a pipeline draws the toy world: the classifier's per-axis accuracy on generated images."""

from __future__ import annotations

import random

import numpy as np

from efface.images import images_to_tensor
from efface.sampling import GenerationConfig, generate_many
from efface.toy.classifier import ToyClassifier
from efface.toy.world import AXES, axis_of, caption, prompts_for, random_scene


def labelled_prompts(n: int, split: str, seed: int = 0) -> list[tuple[str, dict[str, str | None]]]:
    """``n`` captions from ``split`` with the concept each names per axis (None where not named)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        text, named = caption(scene, rng, split)
        out.append((text, {axis: getattr(scene, axis) if named[axis] else None for axis in AXES}))
    return out


def toy_accuracy(pipe, classifier: ToyClassifier, prompts: list[tuple[str, dict[str, str | None]]],
                 config: GenerationConfig | None = None, *, seed: int = 0) -> dict[str, float]:
    """Fraction of images in which the classifier finds each named concept, per axis."""
    images = generate_many(pipe, [p for p, _ in prompts], config, seed=seed)
    x = images_to_tensor(images)
    predicted = classifier.predict(x)
    result = {}
    for axis in AXES:
        hits = [predicted[axis][i] == want[axis] for i, (_, want) in enumerate(prompts) if want[axis]]
        result[axis] = float(np.mean(hits)) if hits else float("nan")
    return result


def concept_rates(pipe, classifier: ToyClassifier, concept: str, *, n: int = 48, seed: int = 0,
                  config: GenerationConfig | None = None) -> dict[str, float]:
    """How present a toy concept is, and how well the rest of its axis is kept.

    ``train_rate`` / ``heldout_rate``: fraction of images of prompts naming ``concept`` (train words;
    held-out synonyms in held-out templates) in which the classifier finds it; ``others``: accuracy
    on the other concepts of the same axis (train words, ``max(8, n // 3)`` prompts each).
    """
    axis = axis_of(concept)
    free = {a: None for a in AXES}
    out = {}
    for split in ("train", "heldout"):
        prompts = [(p, {**free, axis: concept})
                   for p in prompts_for(concept, split, rng=random.Random(seed), n=n)]
        out[f"{split}_rate"] = toy_accuracy(pipe, classifier, prompts, config, seed=seed)[axis]
    others = [(p, {**free, axis: other}) for other in AXES[axis] if other != concept
              for p in prompts_for(other, "train", rng=random.Random(seed + 1), n=max(8, n // 3))]
    out["others"] = toy_accuracy(pipe, classifier, others, config, seed=seed)[axis]
    return out
