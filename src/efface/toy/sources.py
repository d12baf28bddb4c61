"""What the toy world hands to methods and attacks besides option values (:mod:`efface.toy.presets`).

* :class:`ShapeImages`: MACE's ``image_source`` on toy-sd: drawn toy images of a shape with their
  exact shape masks (toy-sd's own training distribution, with the segmentation the toy world knows),
  the toy stand-in for the sampled images and the segmenter MACE is given on real models;
* :func:`toy_synonyms`: the ``synonyms`` attack's ``synonym_source`` on toy-sd.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from efface.errors import InputError
from efface.toy.draw import draw
from efface.toy.world import COLOURS, SHAPES, STYLES, SYNONYMS, Scene


class ShapeImages:
    """``source(concept, n, generator) -> (images, masks)``: ``n`` drawn toy images of the shape
    ``concept`` in random colours and styles (uint8 N x H x W x 3) and their exact shape masks
    (bool N x H x W); one draw from ``generator`` seeds the drawing."""

    def check(self, concepts) -> None:
        """Refuse, before any work, a concept the toy world cannot draw (it draws shapes only)."""
        wrong = [c for c in concepts if c not in SHAPES]
        if wrong:
            raise InputError(f"the toy world's image source draws toy shapes only ({', '.join(SHAPES)}), not "
                             f"{wrong}; use data='generate' (MACE samples the images from the model)")

    def __call__(self, concept: str, n: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        self.check([concept])
        rng = random.Random(int(torch.randint(2**31, (1,), generator=generator)))
        scenes = [Scene(concept, rng.choice(COLOURS), rng.choice(STYLES)) for _ in range(n)]
        drawn = [draw(scene, rng) for scene in scenes]
        return np.stack([im for im, _ in drawn]), np.stack([m for _, m in drawn])

    def __repr__(self) -> str:
        return "ShapeImages()"


def toy_synonyms(concept: str) -> tuple[str, ...]:
    """The toy world's other words for ``concept`` (train synonyms, then held-out paraphrases)."""
    if concept not in SYNONYMS:
        return ()
    train, heldout = SYNONYMS[concept]
    return tuple(w for w in (*train, *heldout) if w != concept)
