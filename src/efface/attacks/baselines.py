"""Baselines every robustness table starts from: no attack, and synonym / paraphrase prompts.

* ``no-attack``: the prompt itself (its success rate is the pre-attack ASR).
* ``synonyms``: the concept's word in the prompt replaced by another word for it: the words given
  in the ``synonyms`` option, or, when none are given, the words of ``synonym_source(concept)``, a
  callable handed to the constructor (on toy-sd the toy world's: its other train synonyms, then its
  held-out paraphrases of the concept, "disc", "ring", "round shape" for "circle";
  :func:`efface.toy.presets.attack_inputs`). Prompt ``i`` takes the words in turn (word
  ``i mod n``); a prompt that does not contain the concept word gets the first word prepended
  ("ring, a red circle").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from efface.attacks.base import ALL_FAMILIES, Adversarial, Attack, AttackConfig, AttackContext, register_attack
from efface.config import Preset
from efface.errors import InputError

SynonymSource = Callable[[str], Sequence[str]]  # concept -> other words for it


@dataclass
class NoAttackConfig(AttackConfig):
    pass


@register_attack("no-attack")
class NoAttack(Attack[NoAttackConfig]):
    """The prompt as it is: the baseline whose success rate is the pre-attack ASR."""

    Config = NoAttackConfig
    paper = "baseline"
    needs = frozenset()
    families = ALL_FAMILIES  # the prompt as it is, generated through efface.sampling (family-aware)

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        return Adversarial(ctx.prompts[i])


@dataclass
class SynonymsConfig(AttackConfig):
    synonyms: tuple[str, ...] = field(default=(), metadata={"help": "words for the concept (default: the "
                                                                      "synonym source's; on toy-sd the toy world's "
                                                                      "synonyms and paraphrases)"})


def substitute(prompt: str, concept: str, word: str) -> str:
    """``prompt`` with whole-word occurrences of ``concept`` replaced by ``word`` (or ``word`` prepended)."""
    pattern = re.compile(rf"\b{re.escape(concept)}\b", re.IGNORECASE)
    return pattern.sub(word, prompt) if pattern.search(prompt) else f"{word}, {prompt}"


@register_attack("synonyms")
class Synonyms(Attack[SynonymsConfig]):
    """The concept's word swapped for a synonym or paraphrase (text only, no optimisation).

    ``Synonyms(synonym_source=fn)``: ``fn(concept)`` gives the words when the ``synonyms`` option is empty.
    """

    Config = SynonymsConfig
    paper = "baseline"
    needs = frozenset({"text_encoder"})
    families = ALL_FAMILIES  # text edits only, generated through efface.sampling (family-aware)

    def __init__(self, config: SynonymsConfig | None = None, *, preset: str | Preset | None = None,
                 synonym_source: SynonymSource | None = None, **overrides):
        super().__init__(config, preset=preset, **overrides)
        self.synonym_source = synonym_source

    def _prepare(self, ctx: AttackContext) -> None:
        words = self.config.synonyms or tuple(self.synonym_source(ctx.concept) if self.synonym_source else ())
        if not words:
            raise InputError(f"synonyms has no words for {ctx.concept!r}: pass synonyms=(...) "
                             "(efface attack: --set synonyms=word1,word2) or synonym_source=fn")
        ctx.state["words"] = words

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        word = ctx.state["words"][i % len(ctx.state["words"])]
        return Adversarial(substitute(ctx.prompts[i], ctx.concept, word), meta={"word": word})
