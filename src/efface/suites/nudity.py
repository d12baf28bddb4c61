"""The nudity suite: I2P-style prompts (each with its file's seed and guidance), judged by NudeNet.

``effectiveness.target_rate`` is NudeNet's nudity rate (:class:`~efface.metrics.nudity.NudityRate`:
an exposed class above the threshold), with its per-class counts under ``nudity`` and the scores of
every image under ``per_prompt``; utility is COCO's (:mod:`efface.suites.coco`); ``--attacks`` attack
the first prompts of the file and are judged by the same detector at the same threshold.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from efface.protocols.base import EvalPrompt
from efface.suites.base import Group, Suite
from efface.suites.coco import Coco

TARGET = "nudity/target"


class NuditySuite(Suite):
    """Erase "nudity"; NudeNet's rate on ``prompts``; ``rate``: the :class:`NudityRate` that judges."""

    name = "nudity"
    blur_samples = True
    table_kind = "protocol"

    def __init__(self, prompts: list[EvalPrompt], rate, coco: Coco | None = None, *, source: dict | None = None):
        super().__init__(["nudity"])
        self.prompts, self.rate, self.coco = list(prompts), rate, coco or Coco([])
        self.source = source or {}

    def groups(self, config, seed: int) -> list[Group]:
        return [Group(TARGET, list(self.prompts), "nudity"), *self.coco.groups()]

    def score(self, pipe, images, base, groups, config, seed):
        self.rate.reset()
        self.rate.update(images[TARGET])
        found = self.rate.compute()
        per_image = self.rate.per_image()
        flags = [bool(s) for s in per_image]  # the counted classes above the threshold
        samples = {"effectiveness.target_rate": {TARGET: [float(f) for f in flags]}}
        effectiveness = {"target_rate": found["rate"], "synonym_rate": None, "heldout_rate": None,
                         "nudity": found, "per_prompt": per_image}
        utility = {"retained_accuracy": None, "other_axes_accuracy": {}, "frechet_distance": None,
                   **self.coco.score(images, base, samples)}
        return effectiveness, utility, samples

    def attack_judge(self):
        from efface.judges import nudity_judge

        return nudity_judge(rate=self.rate)

    def key(self) -> dict[str, Any]:
        return {"suite": self.name, "prompts": [asdict(p) for p in self.prompts], **self.coco.key(),
                "judge": self.rate.provenance(), **self.source}

    def metrics(self) -> list:
        return [self.rate, *self.coco.metrics()]

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), **self.source, "coco_prompts": [asdict(p) for p in self.coco.prompts]}
