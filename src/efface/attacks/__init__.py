"""Attacks on erased models (one file each); importing this package registers them.

``efface.attacks.ATTACKS`` is the registry; :func:`efface.robustness.attack_success` runs
one against an erased model and computes pre-ASR and ASR.
"""

from efface.attacks import (baselines, concept_inversion, mma_diffusion, p4d, pund, riatig,  # noqa: F401
                            ring_a_bell, unlearndiffatk)
from efface.registry import ATTACKS

__all__ = ["ATTACKS"]
