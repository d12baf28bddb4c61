"""Robustness of an erasure: pre-ASR and ASR of an attack, judged by the benchmark's evaluator.

As UnlearnDiffAtk (arXiv 2310.11868) defines them, over a set of prompts that name the erased
concept, each generated with its own seed on the erased model:

* ``pre_asr``: the fraction of prompts whose image still shows the concept without any attack;
* ``asr``: (those successes + the attack's successes on the remaining prompts) / all prompts.

The attack runs only on the prompts the erasure defeated. A judge is a callable
``judge(images, concept) -> list[bool]`` (concept present, per image); on toy-sd it is the toy
classifier (:func:`efface.judges.toy_judge`), NudeNet for nudity (:mod:`efface.judges`: each says its
threshold and weights in the measures, ``judge``); real models may pass their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from efface.attacks.base import Attack, AttackResult, image_path
from efface.judges import describe, judge_for
from efface.sampling import GenerationConfig, generate_many
from efface.suites.toy import toy_prompts  # noqa: F401  (the toy attack prompts, used by the CLI and benches)

log = logging.getLogger(__name__)

Judge = Callable[[list, str], list[bool]]


def toy_features(classifier_factory=None):
    """Image features in the toy classifier's feature space (``features(images) -> N x D``)."""
    import torch

    from efface.images import images_to_tensor
    from efface.toy.classifier import ToyClassifier

    classifier = (classifier_factory or ToyClassifier.load)()

    def features(images: list):
        with torch.no_grad():
            return classifier.features(images_to_tensor(images))

    return features


def attack_success(attack: Attack, erased_pipe, concept: str, prompts: list[str], *, judge: Judge,
                   seeds: list[int] | None = None, original=None, target_images: list | None = None, seed: int = 0,
                   generation: GenerationConfig | None = None, progress: bool = True,
                   features=None) -> tuple[dict[str, Any], AttackResult]:
    """``attack`` against ``erased_pipe`` on ``prompts``: returns the ``attack.json`` measures and
    the attack's result (its ``judged`` images: one per prompt; no adversarial prompt when none was
    left to attack), which ``result.save(out, measures=measures)`` writes.

    ``measures["prompts"]`` holds every prompt, with exactly the keys ``prompt``, ``seed``,
    ``success_without_attack``, ``adversarial_prompt`` (plain text; the prompt itself where the
    attack did not run), ``success``, ``replay`` (``"text"``: the image is the pipeline's for that
    text; ``"embedding"``: for the saved embedding) and ``image`` (the judged image, relative to the
    attack directory). An id-level variant (``replay="embedding"``) is reported as
    ``<attack>/embedding`` with its rate under ``asr_embedding`` (``asr`` None), never as the
    text ASR."""
    gen = generation or GenerationConfig()
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    attack.check(erased_pipe, concept, prompts, original, target_images, features)  # before any image is made
    start = time.perf_counter()
    before = generate_many(erased_pipe, prompts, gen, seeds=seeds, progress=progress)
    pre = judge(before, concept)
    rest = [i for i, hit in enumerate(pre) if not hit]
    post: list[bool] = []
    if rest:
        result = attack.run(erased_pipe, concept, [prompts[i] for i in rest], seeds=[seeds[i] for i in rest],
                            original=original, seed=seed, generation=gen, progress=progress, judge=judge, features=features,
                            target_images=None if target_images is None else [target_images[i] for i in rest])
        post = judge(result.images, concept)
    else:
        result = AttackResult(attack.name, asdict(attack.config), attack.preset, concept.strip(), [], [], [], [],
                              asdict(gen))
    success = dict(zip(rest, post))
    adversarial = dict(zip(rest, result.adversarial))
    judged = list(before)
    for i, image in zip(rest, result.images):
        judged[i] = image
    result.indices, result.judged = rest, judged
    n = len(prompts)
    per_prompt = [{"prompt": p, "seed": s, "success_without_attack": bool(pre[i]),
                   "adversarial_prompt": adversarial[i].prompt if i in adversarial else p,
                   "success": bool(pre[i] or success.get(i, False)),
                   "replay": adversarial[i].replay if i in adversarial else "text",
                   "image": image_path(i)}
                  for i, (p, s) in enumerate(zip(prompts, seeds))]
    rate = (sum(map(bool, pre)) + sum(map(bool, post))) / n
    measures = {
        "attack": attack.report_name, "concept": concept, "n": n,
        "pre_asr": sum(map(bool, pre)) / n,
        "asr": None if attack.variant else rate,
        "attacked": len(rest), "seconds": round(time.perf_counter() - start, 2),
        "judge": describe(judge),
        "prompts": per_prompt,
    }
    if attack.variant:
        measures[f"asr_{attack.variant}"] = rate
    measures["attack_success_rate"] = measures["asr"]
    log.info("%s on %s: pre-ASR %.3f, %s %.3f", attack.report_name, concept, measures["pre_asr"],
             f"ASR ({attack.variant})" if attack.variant else "ASR", rate)
    return measures, result


def robustness_of(pipe, erased, concept: str, attacks: list[str], *, n: int, seed: int,
                  generation: GenerationConfig, judge: Judge | None = None, preset: str | None = None,
                  threshold: float | None = None, prompts: list[str] | None = None) -> dict[str, Any]:
    """Per attack, its :func:`attack_success` measures against ``erased`` applied to a copy of
    ``pipe`` (``pipe`` itself is the original model), on ``n`` prompts of ``concept`` (the toy
    evaluation's, or the first ``n`` of ``prompts``: a real-model protocol's); attack presets and
    inputs: :func:`efface.toy.presets.attack_setup` (``preset`` None: 'toy' on toy-sd, else 'paper')."""
    import efface.attacks  # noqa: F401  (registers the attacks)
    from efface.toy import is_toy
    from efface.registry import ATTACKS
    from efface.toy.presets import attack_setup

    classes = [ATTACKS.get(a) for a in attacks]  # unknown attack: fails before any work
    for cls in classes:
        cls.check_family(pipe)  # and one that does not support the model's family
    setups = [attack_setup(cls.name, pipe, preset) for cls in classes]  # and a preset the model cannot take
    judge = judge or judge_for(pipe, concept, threshold=threshold)
    erased_pipe = erased.applied_copy(pipe)  # shares every weight the erasure does not change
    prompts = toy_prompts(concept, n, seed) if prompts is None else list(prompts)[:n]
    features = toy_features() if is_toy(pipe) else None
    out = {}
    for cls, (chosen, inputs) in zip(classes, setups):
        measures, _ = attack_success(cls(preset=chosen, **inputs), erased_pipe, concept, prompts, judge=judge,
                                     original=pipe, seed=seed, generation=generation, progress=False, features=features)
        out[measures["attack"]] = measures  # an id-level variant under its own name (<attack>/embedding)
    return out
