"""Model families: one object per kind of pipeline, chosen from the pipeline's class.

``family_of(pipe)`` is the seam every method, attack and metric goes through (see ``base.py``).
Adding a family: one file with a :class:`~efface.models.families.base.Family` subclass, one entry
in :data:`FAMILIES`, and its tiny components in ``tests/families.py``.
"""

from __future__ import annotations

from efface.errors import InputError
from efface.models.families.base import Conditioning, EditSite, Family
from efface.models.families.flux import Flux
from efface.models.families.sd import SD
from efface.models.families.sd3 import SD3
from efface.models.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}

__all__ = ["FAMILIES", "Conditioning", "EditSite", "Family", "family_of", "family_names", "denoiser_classes"]


def family_of(pipe) -> Family:
    """The family of ``pipe``, by ``isinstance`` on its pipeline class."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_classes()):
            return family
    raise InputError(f"{type(pipe).__name__} is not a model family efface knows; supported: "
                     + "; ".join(f.description for f in FAMILIES.values()))


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def denoiser_classes() -> tuple[type, ...]:
    """Every family's denoiser classes (UNet, SD3 and Flux transformers)."""
    return tuple(c for f in FAMILIES.values() for c in f.denoiser_classes())
