"""Attacks on erased models (one file each); importing this package registers them.

``efface.attacks.ATTACKS`` is the registry; :func:`efface.attacks.robustness.attack_success` runs
one against an erased model and computes pre-ASR and ASR.
"""

from efface.attacks import baselines, concept_inversion, mma_diffusion, p4d, ring_a_bell, unlearndiffatk  # noqa: F401
from efface.registry import ATTACKS

__all__ = ["ATTACKS"]
