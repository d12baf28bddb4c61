"""The named-concept protocols' plans (objects, artists, celebrities): which concepts are erased and
kept in each cell, their prompts, their judge (:mod:`efface.benchmark.protocol` calls this).

Erased: ``--concepts`` (default: the protocol's); kept: ``--kept`` (default: the protocol's list,
and for celebrities also the ``others`` of a MACE prompt file, without the erased ones). The
multi-concept sets erase the first 1, 5, 10, 100 concepts of (erased, then the rest of the list).
"""

from __future__ import annotations

import math
import re
from typing import Any

from efface.errors import InputError
from efface.protocols.base import EvalPrompt


def names_from_templates(prompts: list[EvalPrompt], templates: tuple[str, ...]) -> list[str]:
    """The names filled into ``templates`` by ``prompts`` (MACE's "others" rows), in order of appearance."""
    patterns = [re.compile("^" + re.escape(t).replace(re.escape("{}"), "(.+?)") + "$") for t in templates]
    found: dict[str, None] = {}
    for p in prompts:
        for pattern in patterns:
            m = pattern.match(p.prompt.strip())
            if m:
                found[m.group(1)] = None
                break
    return list(found)


def _split(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _file_names(config, spec, prompts_fn) -> list[str]:
    """The concepts a prompt file has prompts of, in order (celebrities: the names its templates hold)."""
    _, prompts = prompts_fn(config, spec, {})
    if config.protocol == "celebrities":
        from efface.protocols.celebrities import TEMPLATES

        return names_from_templates(prompts, TEMPLATES)
    return list(dict.fromkeys(p.concept for p in prompts if p.concept))


def _load(config, spec, prompts_fn, names: list[str], eval_config) -> tuple[str, list[EvalPrompt]]:
    """The prompts of ``names`` (each prompt's concept set), from the protocol's file or its templates."""
    wanted = max(eval_config.n, eval_config.n_other)
    if config.protocol == "objects":
        return prompts_fn(config, spec, {"classes": names, "n_per_class": max(wanted, 1)})
    if config.protocol == "artists":
        from efface.protocols.artists import TEMPLATES

        return prompts_fn(config, spec, {"artists": names, "n_per_prompt": math.ceil(wanted / len(TEMPLATES))})
    prompt_set, prompts = prompts_fn(config, spec, {"names": names})
    return prompt_set, prompts


def concept_plan(config, spec, bench, eval_config, coco, factories: dict, prompts_fn, *, clip=None,
                 source: dict | None = None) -> tuple[Any, str, list[EvalPrompt], Any]:
    """``(plan, prompt_set, prompts, judge)`` of a named-concept protocol, every input checked."""
    from efface.benchmark.grid import Plan
    from efface.suites.concepts import ConceptSuite

    erased = bench.names() or list(spec.concepts)
    if len(set(erased)) != len(erased):
        raise InputError(f"--concepts names a concept twice: {erased}")
    pool = list(dict.fromkeys([*erased, *(_file_names(config, spec, prompts_fn) if config.prompts else spec.pool)]))
    both = sorted(set(_split(config.kept)) & set(erased))
    if both:
        raise InputError(f"{', '.join(both)} cannot be both erased (--concepts) and kept (--kept)")
    kept = _split(config.kept) or [c for c in pool if c not in erased]
    names = list(dict.fromkeys([*pool, *kept]))
    prompt_set, prompts = _load(config, spec, prompts_fn, names, eval_config)
    judge = factories["judge"](config, names)
    lpips = factories["lpips"](config) if config.protocol == "artists" and config.lpips else None
    order = list(dict.fromkeys([*erased, *[c for c in pool if c not in erased]]))
    multi = {}
    if bench.multi_concept and spec.multi:
        multi = {str(k): order[:k] for k in spec.multi if k <= len(order)}
    given_kept = _split(config.kept)

    def suite_for(concepts: list[str]) -> ConceptSuite:
        keep = [k for k in (given_kept or names) if k not in concepts]
        return ConceptSuite(config.protocol, concepts, keep, prompts, judge, coco=coco, lpips=lpips, clip=clip,
                            source={**(source or {}), "prompt_set": prompt_set})

    for concepts in [erased[:1], *multi.values()]:
        suite_for(concepts)  # a name without prompts fails here, before any model loads
    from dataclasses import asdict

    plan = Plan(suite_for, erased, multi, record={"protocol": asdict(config)})
    return plan, prompt_set, prompts, judge
