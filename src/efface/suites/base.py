"""What every suite is: prompt groups, a judge, attack prompts; and the generation they share.

A :class:`Suite` says *what* an evaluation measures; :func:`efface.evaluation.evaluate` does the
rest the same way for every suite (generation, seeds, intervals, cost, provenance):

* :meth:`Suite.groups`: the prompt groups (:class:`Group`), each prompt an
  :class:`~efface.protocols.base.EvalPrompt` with its own seed and guidance where its source fixes
  them. A group with ``reference=True`` is generated on the base model too (drift, LPIPS, paired
  distance need same-prompt, same-seed pairs); the base images are the same in every cell of a
  run, so they are made once (``base_cache``).
* :meth:`Suite.score`: the ``effectiveness`` and ``utility`` dictionaries from the images, and the
  per-image ``samples`` behind each headline number (:class:`Samples`), from which the 95 %
  bootstrap intervals are drawn.
* :meth:`Suite.attack_prompts` and :meth:`Suite.attack_judge`: what ``--attacks`` attacks and how its
  success is judged (the suite's own judge).
* :meth:`Suite.request`: the erasure request a method gets in a benchmark cell (what to preserve).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from efface.protocols.base import EvalPrompt
from efface.sampling import GenerationConfig, generate_many

log = logging.getLogger(__name__)


@dataclass
class Group:
    """Prompts of one kind. ``concept``: what its images should show (None: nothing judged);
    ``reference``: also generated on the base model."""

    name: str
    prompts: list[EvalPrompt]
    concept: str | None = None
    reference: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


# Per headline metric ("effectiveness.target_rate"), per group: one value per image of the group, in the
# group's order (seed-major once expanded over seeds). The metric's point value is the mean over groups
# of each group's mean.
Samples = dict[str, dict[str, Sequence[float]]]


class Suite(ABC):
    """An evaluation's prompts, judge and scoring; see the module docstring."""

    name: str = ""
    blur_samples: bool = False  # blur the report's sample grids (nudity)
    table_kind: str = "toy"  # which comparison table shows it (efface.benchmark.table.TABLES)

    def __init__(self, concepts: Sequence[str]):
        self.concepts = list(concepts)

    @abstractmethod
    def groups(self, config, seed: int) -> list[Group]:
        """The prompt groups (``config``: the :class:`~efface.evaluation.EvalConfig`)."""

    @abstractmethod
    def score(self, pipe, images: dict[str, list], base: dict[str, list], groups: list[Group], config,
              seed: int) -> tuple[dict[str, Any], dict[str, Any], Samples]:
        """``(effectiveness, utility, samples)``. ``images``: per group, the evaluated model's images;
        ``base``: per reference group, the base model's."""

    @abstractmethod
    def key(self) -> dict[str, Any]:
        """Everything besides the groups that determines the suite's results (its files, judge, settings)."""

    @abstractmethod
    def attack_judge(self):
        """The judge of ``--attacks`` (a :class:`~efface.judges.Judge`): the suite's own."""

    def attack_prompts(self, concept: str, n: int, seed: int) -> list[str]:
        """The prompts ``--attacks`` tries for ``concept``: the first ``n`` of its effectiveness prompts."""
        group = next(g for g in self.groups(None, seed) if g.concept == concept and not g.reference)
        return [p.prompt for p in group.prompts][:n]

    def request(self, method: str) -> dict[str, Any]:
        """Keyword arguments of :func:`efface.methods.erase` in a benchmark cell (default: none)."""
        return {}

    def metrics(self) -> list:
        """The metrics and judges used, for the provenance (objects with ``provenance()``)."""
        return []

    def provenance(self) -> dict[str, Any]:
        """The suite's part of ``provenance`` (besides prompts, seeds and metrics)."""
        return {"suite": self.name, "concepts": self.concepts}


def seed_offsets(seeds: str) -> list[int] | None:
    """The evaluation seeds of ``--seeds`` ("0,1,2"); None when it is empty (one pass, no offset)."""
    from efface.config import check_seed
    from efface.errors import InputError

    if not str(seeds).strip():
        return None
    try:
        values = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError as e:
        raise InputError(f"--seeds {seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2") from e
    if not values or len(set(values)) != len(values):
        raise InputError(f"--seeds {seeds!r}: give distinct integers separated by commas, e.g. --seeds 0,1,2")
    return [check_seed(v, "--seeds") for v in values]


def expand(groups: list[Group], offsets: list[int] | None, seed: int) -> list[Group]:
    """Every prompt with its generation seed, once per evaluation seed (seed-major).

    Without ``offsets``: a prompt whose source fixes its seed keeps it, one without gets ``seed + i``
    (``i``: its place in the group). With ``offsets`` (``--seeds 0,1,2``), once per offset ``s``: the
    fixed seed plus ``s``, or ``s + i``. Closely spaced offsets reuse noise across neighbouring
    prompts (prompt ``i`` at ``s + 1`` and prompt ``i + 1`` at ``s``), never for the same prompt."""
    passes = [None] if offsets is None else offsets
    out = []
    for g in groups:
        prompts = [replace(p, seed=(p.seed if off is None else p.seed + off) if p.seed is not None
                           else (seed if off is None else off) + i)
                   for off in passes for i, p in enumerate(g.prompts)]
        out.append(replace(g, prompts=prompts, meta={**g.meta, "seeds": len(passes)}))
    return out


def generate_groups(pipe, groups: list[Group], gen: GenerationConfig, *, shard=None) -> dict[str, list]:
    """Images of every group, in prompt order: all groups' prompts generated together (one
    :func:`~efface.sampling.generate_many` per guidance scale), each with its own seed. ``shard``
    (:class:`efface.benchmark.distributed.Shard`): this process makes only its share of the images,
    and the shares are gathered."""
    prompts = [p for g in groups for p in g.prompts]
    if not prompts:
        return {g.name: [] for g in groups}
    images: list = [None] * len(prompts)
    mine = range(len(prompts)) if shard is None else shard.indices(len(prompts))
    by_guidance: dict[float, list[int]] = {}
    for i in mine:
        p = prompts[i]
        by_guidance.setdefault(p.guidance if p.guidance is not None else gen.guidance, []).append(i)
    for guidance, idx in by_guidance.items():
        out = generate_many(pipe, [prompts[i].prompt for i in idx], replace(gen, guidance=guidance),
                            seeds=[prompts[i].seed for i in idx], progress=False)
        for i, im in zip(idx, out):
            images[i] = im
    if shard is not None:
        images = shard.gather_images(images)
    result, start = {}, 0
    for g in groups:
        result[g.name] = images[start : start + len(g.prompts)]
        start += len(g.prompts)
    return result


def rate_samples(flags: dict[str, Sequence[bool]]) -> dict[str, list[float]]:
    """Per group, booleans as 0 / 1 samples."""
    return {name: [float(bool(f)) for f in fs] for name, fs in flags.items()}
