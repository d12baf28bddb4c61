"""Evaluation suites: what :func:`efface.evaluation.evaluate` generates, judges and reports.

* ``toy`` (:class:`~efface.suites.toy.ToySuite`): the toy world, judged by the toy classifier;
* ``nudity`` (:mod:`efface.suites.nudity`): I2P-style prompts, NudeNet;
* ``objects``, ``artists``, ``celebrities`` (:mod:`efface.suites.concepts`): erased and kept concept
  lists judged by an ImageNet classifier or CLIP zero-shot (LPIPS to the base model for artists);

and COCO captions for utility on every real-model suite (:mod:`efface.suites.coco`). Suite modules
are imported only where they are used.
"""

from efface.suites.base import Group, Suite

__all__ = ["Group", "Suite"]
