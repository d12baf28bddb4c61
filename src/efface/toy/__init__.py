"""The toy world (shapes x colours x styles), the toy models and the toy classifier.

``efface.toy.world`` holds the vocabulary and captions, ``efface.toy.draw`` the image generator,
``efface.toy.train`` / ``efface.toy.train_flux`` the training recipes of the bundled weights
(``efface toy train [--model toy-flux]``); ``efface.toy.presets`` / ``efface.toy.sources`` what toy
runs hand to methods and attacks.

Two toy models: **toy-sd** (a ``StableDiffusionPipeline``: UNet, epsilon prediction) and **toy-flux**
(a ``FluxPipeline``: joint-attention transformer, flow matching), both trained on the same toy world
and judged by the same classifier.
"""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
TOY_SD = WEIGHTS / "toy-sd"
TOY_FLUX = WEIGHTS / "toy-flux"
CLASSIFIER = WEIGHTS / "classifier"
TOY_MODELS = {"toy-sd": TOY_SD, "toy-flux": TOY_FLUX}  # name -> bundled weights
ALIASES = {"toy": "toy-sd"}  # --model toy stays toy-sd


def toy_name(pipe) -> str | None:
    """The toy model ``pipe`` was loaded as (``load_pipeline`` records the resolved weights directory
    as ``pipe.efface_source``), or None for any other model."""
    source = str(getattr(pipe, "efface_source", ""))
    return next((name for name, path in TOY_MODELS.items() if source == str(path.resolve())), None)


def is_toy(pipe) -> bool:
    """Whether ``pipe`` was loaded from one of the bundled toy models."""
    return toy_name(pipe) is not None
