"""Metrics (effectiveness, utility, cost) behind one registry; see :mod:`efface.metrics.base`."""

from efface.metrics.base import Metric, register_metric
from efface.metrics import classifier  # noqa: F401  (registers concept-rate, image-drift)
from efface.metrics import image_quality, nudity  # noqa: F401  (optional packages load lazily)

__all__ = ["Metric", "register_metric"]
from efface.metrics import diffusion_classifier  # noqa: F401
