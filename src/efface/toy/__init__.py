"""The toy world (shapes x colours x styles), toy-sd and the toy classifier.

``efface.toy.world`` holds the vocabulary and captions, ``efface.toy.draw`` the image generator,
``efface.toy.train`` the training recipe of the bundled weights (``efface toy train``);
``efface.toy.presets`` / ``efface.toy.sources`` what toy runs hand to methods and attacks.
"""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
TOY_SD = WEIGHTS / "toy-sd"
CLASSIFIER = WEIGHTS / "classifier"


def is_toy(pipe) -> bool:
    """Whether ``pipe`` was loaded from the bundled toy-sd (``load_pipeline("toy")`` records the
    resolved weights directory as ``pipe.efface_source``)."""
    return str(getattr(pipe, "efface_source", "")) == str(TOY_SD.resolve())
