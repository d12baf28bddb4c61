"""Baselines every robustness table starts from: no attack, and synonym / paraphrase prompts.

* ``no-attack``: the prompt itself (its success rate is the pre-attack ASR).
* ``synonyms``: the concept's word in the prompt replaced by another word for it. Real models:
  the words given in ``synonyms``; toy-sd: when none are given, the toy world's other train
  synonyms and its held-out paraphrases of the concept ("disc", "ring", "round shape" for "circle").
  Prompt ``i`` takes the words in turn (word ``i mod n``); a prompt that does not contain the concept
  word gets the first word prepended ("ring, a red circle").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from efface.attacks.base import Adversarial, Attack, AttackConfig, AttackContext, register_attack
from efface.errors import InputError


@dataclass
class NoAttackConfig(AttackConfig):
    pass


@register_attack("no-attack")
class NoAttack(Attack[NoAttackConfig]):
    """The prompt as it is: the baseline whose success rate is the pre-attack ASR."""

    Config = NoAttackConfig
    paper = "baseline"
    needs = frozenset()

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        return Adversarial(ctx.prompts[i])


@dataclass
class SynonymsConfig(AttackConfig):
    synonyms: tuple[str, ...] = field(default=(), metadata={"help": "words for the concept (default on toy-sd: "
                                                                      "the toy world's synonyms and paraphrases)"})


def toy_synonyms(concept: str) -> tuple[str, ...]:
    """The toy world's other words for ``concept`` (train synonyms, then held-out paraphrases)."""
    from efface.toy.world import SYNONYMS

    if concept not in SYNONYMS:
        return ()
    train, heldout = SYNONYMS[concept]
    return tuple(w for w in (*train, *heldout) if w != concept)


def substitute(prompt: str, concept: str, word: str) -> str:
    """``prompt`` with whole-word occurrences of ``concept`` replaced by ``word`` (or ``word`` prepended)."""
    pattern = re.compile(rf"\b{re.escape(concept)}\b", re.IGNORECASE)
    return pattern.sub(word, prompt) if pattern.search(prompt) else f"{word}, {prompt}"


@register_attack("synonyms")
class Synonyms(Attack[SynonymsConfig]):
    """The concept's word swapped for a synonym or paraphrase (text only, no optimisation)."""

    Config = SynonymsConfig
    paper = "baseline"
    needs = frozenset({"text_encoder"})

    def _prepare(self, ctx: AttackContext) -> None:
        words = self.config.synonyms or toy_synonyms(ctx.concept)
        if not words:
            raise InputError(f"synonyms has no words for {ctx.concept!r}: pass synonyms=(...) "
                             "(efface attack: --set synonyms=word1,word2)")
        ctx.state["words"] = words

    def _attack(self, ctx: AttackContext, i: int) -> Adversarial:
        word = ctx.state["words"][i % len(ctx.state["words"])]
        return Adversarial(substitute(ctx.prompts[i], ctx.concept, word), meta={"word": word})
