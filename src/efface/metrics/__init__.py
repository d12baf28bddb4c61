"""Metrics (effectiveness, utility, cost) behind one registry; see :mod:`efface.metrics.base`."""

from efface.metrics.base import Metric, register_metric

__all__ = ["Metric", "register_metric"]
