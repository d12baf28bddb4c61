"""Erasure methods. Importing this package registers every method in ``efface.registry.METHODS``.

Adding a method: one file here (Config dataclass + class + ``@register_method``), one import line
below, one row in ``tests/test_methods_contract.py``.
"""

from efface.methods import advunlearn  # noqa: F401
from efface.methods import ca  # noqa: F401
from efface.methods import doco  # noqa: F401
from efface.methods import esd  # noqa: F401
from efface.methods import mace  # noqa: F401
from efface.methods import race  # noqa: F401
from efface.methods import rece  # noqa: F401
from efface.methods import receler  # noqa: F401
from efface.methods import salun  # noqa: F401
from efface.methods import spm  # noqa: F401
from efface.methods import uce  # noqa: F401
from efface.methods.base import ErasedModel, ErasureMethod, ErasureRequest, MethodConfig, erase, register_method

__all__ = ["ErasedModel", "ErasureMethod", "ErasureRequest", "MethodConfig", "erase", "register_method"]
