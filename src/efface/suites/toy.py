"""The toy suite: toy-world prompts judged by the toy classifier (toy-sd, toy-flux).

* ``effectiveness``: fraction of images in which the classifier still finds the erased concept:
  ``target_rate`` (prompts with the erased word itself), ``synonym_rate`` (its other training
  synonyms, "disc"), ``heldout_rate`` (held-out synonyms in held-out templates, words no erasure
  and no UNet training saw). With several concepts: their mean, and ``per_concept``.
* ``utility``: ``retained_accuracy`` (accuracy on the other concepts of the same axis, train words;
  ``per_concept`` and the ``nearest`` ones by text-embedding similarity reported apart),
  ``other_axes_accuracy``, and image drift between base and erased images of those prompts with
  the same seeds: ``frechet_distance`` and ``kid`` in the classifier's feature space,
  ``paired_distance`` (RMS pixel difference of same-prompt, same-seed pairs, in [0, 1]).

Seeds: image ``i`` of the effectiveness groups (all of them, in order) uses ``seed + i``, and so do
the utility groups' images; ``--seeds`` adds its offsets to these.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import torch

from efface.errors import InputError
from efface.metrics.classifier import ConceptRate, ImageDrift
from efface.metrics.stats import mean_defined
from efface.models.text import encode
from efface.protocols.base import EvalPrompt
from efface.suites.base import Group, Suite
from efface.toy.classifier import ToyClassifier
from efface.toy.world import AXES, SYNONYMS, axis_of, prompts_for, synonyms


def check_concepts(concepts: str | list[str]) -> list[str]:
    """The concepts as a list; an :class:`InputError` for none or for one the toy world lacks."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts:
        raise InputError("give at least one concept to evaluate, e.g. --concept circle")
    unknown = [c for c in concepts if c not in SYNONYMS]
    if unknown:
        raise InputError(f"the toy evaluation knows no concept {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(SYNONYMS)} (real-model protocols: docs/evaluation.md)")
    if len(set(concepts)) != len(concepts):
        raise InputError(f"a concept is given twice: {concepts}")
    return concepts


def request_for(method: str, concepts: list[str]) -> dict[str, Any]:
    """The erasure request the benchmark gives ``method``: preserve the rest of the axes involved;
    anchor: the method's default, or, for methods whose paper always maps the target onto a named
    concept (``named_anchor``: CA, DoCo), the axis' first other concept (the toy world has no
    category word)."""
    import efface.methods  # noqa: F401  (registers the methods)
    from efface.registry import METHODS

    axes = dict.fromkeys(axis_of(c) for c in concepts)
    preserve = [o for a in axes for o in AXES[a] if o not in concepts]
    anchor = None
    if METHODS.get(method).named_anchor:  # per concept: the axis' first concept not erased ("" if none is left)
        anchor = [next((o for o in AXES[axis_of(c)] if o not in concepts), "") for c in concepts]
    return {"preserve": preserve, "anchor": anchor}


def toy_prompts(concept: str, n: int, seed: int) -> list[str]:
    """The toy evaluation's target prompts for ``concept`` (its own word in training templates)."""
    return prompts_for(concept, "train", rng=random.Random(seed), n=n, words=(concept,))


@functools.cache
def _words_of(axis: str) -> tuple[tuple[str, str], ...]:
    """(word, canonical concept) for every synonym on ``axis``, longest words first."""
    words = {w: c for c, (train, held) in SYNONYMS.items() if axis_of(c) == axis for w in train + held}
    return tuple(sorted(words.items(), key=lambda kv: -len(kv[0])))


def named(prompt: str, axis: str) -> str | None:
    """The canonical concept a prompt names on ``axis`` (None if it names none)."""
    padded = f" {prompt.replace(',', ' ')} "
    return next((c for w, c in _words_of(axis) if f" {w} " in padded), None)


def _seeded(groups: list[Group], seed: int) -> list[Group]:
    """The groups' prompts with seeds ``seed + i`` counted over all of them, in order."""
    i = 0
    for g in groups:
        g.prompts = [EvalPrompt(p.prompt, seed + i + k, concept=g.concept) for k, p in enumerate(g.prompts)]
        i += len(g.prompts)
    return groups


class ToySuite(Suite):
    """The toy world's evaluation of ``concepts`` (see the module docstring)."""

    name = "toy"

    def __init__(self, concepts: str | list[str], *, classifier_factory=ToyClassifier.load):
        super().__init__(check_concepts(concepts))
        self.classifier_factory = classifier_factory
        self._classifier = None

    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = self.classifier_factory()
        return self._classifier

    def groups(self, config, seed: int) -> list[Group]:
        n, n_other = (config.n, config.n_other) if config is not None else (32, 12)
        effect, utility = [], []
        for c in self.concepts:
            axis, rng = axis_of(c), random.Random(seed)
            others = tuple(w for w in synonyms(c, "train") if w != c)
            lists = {"target": prompts_for(c, "train", rng=rng, n=n, words=(c,))}
            if others:
                lists["synonyms"] = prompts_for(c, "train", rng=random.Random(seed + 1), n=n, words=others)
            lists["heldout"] = prompts_for(c, "heldout", rng=random.Random(seed + 2), n=n)
            effect += [Group(f"{c}/{kind}", [EvalPrompt(p) for p in ps], c, meta={"axis": axis, "kind": kind})
                       for kind, ps in lists.items()]
        kept = [o for axis in dict.fromkeys(axis_of(c) for c in self.concepts) for o in AXES[axis]
                if o not in self.concepts]
        for o in kept:
            ps = prompts_for(o, "train", rng=random.Random(seed + 3), n=n_other)
            utility.append(Group(o, [EvalPrompt(p) for p in ps], o, reference=True, meta={"axis": axis_of(o)}))
        return _seeded(effect, seed) + _seeded(utility, seed)

    def attack_prompts(self, concept: str, n: int, seed: int) -> list[str]:
        return toy_prompts(concept, n, seed)

    def attack_judge(self):
        from efface.judges import toy_judge

        return toy_judge(lambda: self.classifier)

    def request(self, method: str) -> dict[str, Any]:
        return request_for(method, self.concepts)

    def key(self) -> dict[str, Any]:
        return {"suite": self.name, "concepts": self.concepts}

    def score(self, pipe, images, base, groups, config, seed):
        rates = ConceptRate(lambda: self.classifier)
        drift = ImageDrift(lambda: self.classifier, kid_subsets=config.kid_subsets, seed=seed)
        self._metrics = [rates, drift]
        effect = [g for g in groups if not g.reference]
        utility = [g for g in groups if g.reference]
        samples: dict[str, dict[str, list[float]]] = {}
        effectiveness = self._effectiveness(rates, effect, images, samples)
        return effectiveness, self._utility(pipe, rates, drift, utility, images, base, config, samples), samples

    def metrics(self) -> list:
        return getattr(self, "_metrics", [])

    def provenance(self) -> dict[str, Any]:
        metrics = self.metrics()
        return {**super().provenance(), **({"evaluator": metrics[0].provenance()["evaluator"]} if metrics else {})}

    def _hits(self, rates: ConceptRate, group: Group, images: list, axis: str, wanted: list, predicted=None):
        predicted = predicted or rates.predict(images)
        rates.update(images, axis=axis, wanted=wanted, group=group.name if axis == group.meta["axis"]
                     else f"axis:{axis}", predicted=predicted)
        return [float(p == w) for p, w in zip(predicted[axis], wanted) if w is not None], predicted

    def _effectiveness(self, rates, groups, images, samples) -> dict[str, Any]:
        rates.reset()
        keys = {"target": "target_rate", "synonyms": "synonym_rate", "heldout": "heldout_rate"}
        for g in groups:
            hits, _ = self._hits(rates, g, images[g.name], g.meta["axis"], [g.concept] * len(g.prompts))
            samples.setdefault(f"effectiveness.{keys[g.meta['kind']]}", {})[g.name] = hits
        found = rates.compute()
        per = {c: {k: found.get(f"{c}/{kind}") for kind, k in keys.items()} for c in self.concepts}
        return {**{k: mean_defined([r[k] for r in per.values()]) for k in keys.values()}, "per_concept": per}

    def _utility(self, pipe, rates, drift, groups, images, base, config, samples) -> dict[str, Any]:
        rates.reset(), drift.reset()
        for g in groups:
            hits, predicted = self._hits(rates, g, images[g.name], g.meta["axis"], [g.concept] * len(g.prompts))
            samples.setdefault("utility.retained_accuracy", {})[g.name] = hits
            for axis in AXES:
                if axis != g.meta["axis"]:
                    self._hits(rates, g, images[g.name], axis, [named(p.prompt, axis) for p in g.prompts], predicted)
            drift.update(images[g.name], reference=base[g.name])
        found = rates.compute()
        per = {g.concept: found[g.name] for g in groups}
        nearest = _nearest(pipe, self.concepts, list(per), config.nearest)
        return {
            "retained_accuracy": mean_defined(list(per.values())),
            "per_concept": per,
            "nearest": {c: per[c] for c in nearest},
            "nearest_accuracy": mean_defined([per[c] for c in nearest]),
            "other_axes_accuracy": {k.removeprefix("axis:"): v for k, v in found.items()
                                    if k.startswith("axis:") and v is not None},
            **drift.compute(),
        }


def _nearest(pipe, concept_list: list[str], candidates: list[str], k: int) -> list[str]:
    if not candidates or k <= 0:
        return []
    emb = encode(pipe, concept_list + candidates).embeds.float().mean(1).cpu()  # mean over the token sequence
    target = torch.nn.functional.normalize(emb[: len(concept_list)], dim=-1).mean(0)
    sims = torch.nn.functional.normalize(emb[len(concept_list):], dim=-1) @ target
    return [candidates[i] for i in sims.argsort(descending=True)[:k].tolist()]
