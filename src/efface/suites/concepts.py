"""Suites of named concepts: erased and kept lists judged by a classifier (objects, artists, celebrities).

Every erased concept has its prompts (``n`` of them: ``EvalConfig.n``) and so has every kept one
(``EvalConfig.n_other``); a judge (:class:`~efface.judges.Judge`: an ImageNet classifier for objects,
CLIP zero-shot over the erased and kept names for artists and celebrities) says per image whether it
shows the concept its prompt names.

* ``effectiveness.target_rate``: the fraction of the erased concepts' images still judged to show
  them (objects: the classifier's accuracy on the erased class), mean over erased concepts,
  ``per_concept``;
* ``utility.retained_accuracy``: the same on the kept concepts (higher is better), ``per_concept``;
  ``paired_distance`` (RMS pixel, kept prompts, base vs erased, same seeds); with LPIPS (artists,
  RECE's measures): ``lpips_e`` on the erased concepts' prompts (higher: more changed), ``lpips_u``
  on the kept ones (lower: less changed) and ``lpips_d = lpips_e - lpips_u``; with CLIP,
  ``clip_score_kept`` (kept images against their prompts); and COCO's (:mod:`efface.suites.coco`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from efface.errors import InputError
from efface.metrics.stats import mean_defined
from efface.protocols.base import EvalPrompt
from efface.suites.base import Group, Suite
from efface.suites.coco import Coco


def by_concept(prompts: list[EvalPrompt], names: list[str]) -> dict[str, list[EvalPrompt]]:
    """The prompts of every name (compared case-insensitively); an InputError naming those without any."""
    found: dict[str, list[EvalPrompt]] = {n: [] for n in names}
    lookup = {n.casefold(): n for n in names}
    for p in prompts:
        name = lookup.get((p.concept or "").casefold())
        if name is not None:
            found[name].append(p)
    empty = [n for n, ps in found.items() if not ps]
    if empty:
        raise InputError(f"the prompt file has no prompts of {', '.join(map(repr, empty))}; check the names "
                         f"(the file names {len({p.concept for p in prompts})} concepts)")
    return found


class ConceptSuite(Suite):
    """``erased`` and ``kept`` concepts, their prompts, a judge; LPIPS, CLIP and COCO where given."""

    table_kind = "concepts"

    def __init__(self, name: str, erased: list[str], kept: list[str], prompts: list[EvalPrompt], judge, *,
                 coco: Coco | None = None, lpips=None, clip=None, source: dict | None = None):
        super().__init__(erased)
        overlap = set(erased) & set(kept)
        if overlap:
            raise InputError(f"{', '.join(sorted(overlap))} cannot be both erased and kept")
        self.name, self.kept, self.judge = name, list(kept), judge
        self.by_concept = by_concept(prompts, list(erased) + list(kept))
        self.coco, self.lpips, self.clip, self.source = coco or Coco([]), lpips, clip, source or {}

    def groups(self, config, seed: int) -> list[Group]:
        n, n_other = (config.n, config.n_other) if config is not None else (None, None)
        erased = [Group(f"{c}/target", self.by_concept[c][:n], c, reference=self.lpips is not None)
                  for c in self.concepts]
        kept = [Group(k, self.by_concept[k][:n_other], k, reference=True) for k in self.kept]
        return [*erased, *kept, *self.coco.groups()]

    def request(self, method: str) -> dict[str, Any]:
        return {"preserve": self.kept} if self.kept else {}

    def attack_judge(self):
        return self.judge

    def score(self, pipe, images, base, groups, config, seed):
        samples: dict[str, dict[str, list[float]]] = {}
        named = [g for g in groups if g.concept is not None]
        for g in named:
            present = [float(x) for x in self.judge(images[g.name], g.concept)]
            key = "effectiveness.target_rate" if g.name.endswith("/target") else "utility.retained_accuracy"
            samples.setdefault(key, {})[g.name] = present
        targets = samples.get("effectiveness.target_rate", {})
        kept_samples = samples.get("utility.retained_accuracy", {})
        rate = {g.concept: _mean(targets[g.name]) for g in named if g.name in targets}
        kept = {g.concept: _mean(kept_samples[g.name]) for g in named if g.name in kept_samples}
        effectiveness = {"target_rate": mean_defined(list(rate.values())), "synonym_rate": None, "heldout_rate": None,
                         "per_concept": rate, "judge": self.judge.describe()}
        kept_groups = [g for g in named if not g.name.endswith("/target")]
        utility: dict[str, Any] = {
            "retained_accuracy": mean_defined(list(kept.values())), "per_concept": kept, "other_axes_accuracy": {},
            "frechet_distance": None,
            "paired_distance_kept": _paired(kept_groups, images, base),
        }
        if self.lpips is not None:
            utility.update(self._lpips(named, images, base, samples))
        if self.clip is not None and kept_groups:
            self.clip.reset()
            for g in kept_groups:
                self.clip.update(images[g.name], prompts=[p.prompt for p in g.prompts])
            utility["clip_score_kept"] = self.clip.compute()["clip_score"]
        utility.update(self.coco.score(images, base, samples))
        return effectiveness, utility, samples

    def _lpips(self, groups, images, base, samples) -> dict[str, float | None]:
        out = {}
        for key, want in (("lpips_e", True), ("lpips_u", False)):
            self.lpips.reset()
            per = {}
            for g in groups:
                if g.name.endswith("/target") == want:
                    start = len(self.lpips.distances)
                    self.lpips.update(images[g.name], reference=base[g.name])
                    per[g.name] = self.lpips.distances[start:]
            out[key] = mean_defined([_mean(v) for v in per.values()])
            samples[f"utility.{key}"] = per
        out["lpips_d"] = None if None in (out["lpips_e"], out["lpips_u"]) else out["lpips_e"] - out["lpips_u"]
        return out

    def key(self) -> dict[str, Any]:
        return {"suite": self.name, "erased": self.concepts, "kept": self.kept, "judge": self.judge.describe(),
                "prompts": {c: [asdict(p) for p in ps] for c, ps in self.by_concept.items()}, **self.coco.key(),
                "lpips": self.lpips is not None, "clip": self.clip is not None, **self.source}

    def metrics(self) -> list:
        return [m for m in (self.lpips, self.clip) if m is not None] + self.coco.metrics()

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "kept": self.kept, "judge": self.judge.describe(), **self.source}


def _mean(values) -> float | None:
    return sum(values) / len(values) if len(values) else None


def _paired(groups: list[Group], images: dict, base: dict) -> float | None:
    from efface.metrics.stats import paired_rms

    return mean_defined([paired_rms(a, b) for g in groups for a, b in zip(images[g.name], base[g.name])])
